"""Aliasing measures (docs/method.md §6): analytic signals with known spectra, and timm models."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layerlie as ll
from layerlie.measure.aliasing import ALIAS_THRESHOLDS, energy_above, upsample
from layerlie.testing import TOL, smooth_image, timm_model


def cosine(n: int = 32, k: int = 13, b: int = 1, c: int = 2) -> torch.Tensor:
    """``cos(2 pi k x / n)`` along x, the same in every row and channel."""
    x = torch.arange(n, dtype=torch.float64) * 2 * math.pi * k / n
    return torch.cos(x).expand(b, c, n, n).clone()


class Pointwise(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x).mean((2, 3))


class Subsample(nn.Module):
    """A stride-2 1x1 identity conv (plain subsampling), optionally after a binomial blur."""

    def __init__(self, channels: int = 2, blur: bool = False) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, channels, 1, stride=2, bias=False, groups=channels).double()
        nn.init.ones_(self.down.weight)
        self.blur = nn.Conv2d(channels, channels, 5, padding=2, padding_mode="circular", bias=False,
                              groups=channels).double() if blur else nn.Identity()
        if blur:
            taps = torch.tensor([1.0, 4, 6, 4, 1], dtype=torch.float64) / 16
            self.blur.weight.data.copy_(taps[:, None] * taps)

    def forward(self, x):
        return self.down(self.blur(x)).mean((2, 3))


def ratio(model: nn.Module, x: torch.Tensor, kind: str) -> float:
    table = ll.aliasing(model.eval(), x)
    row = table[table["alias_kind"] == kind]
    assert len(row) == 1
    return float(row["alias_ratio"].iloc[0])


def test_upsampling_is_band_limited_and_interpolates():
    x = smooth_image(max_freq=3)
    up = upsample(x)
    assert torch.allclose(up[..., ::2, ::2], x, atol=TOL[torch.float64])
    assert energy_above(up, (x.shape[-2] / 2, x.shape[-1] / 2)) <= TOL[torch.float64]


def test_relu_of_a_high_frequency_cosine_aliases_and_a_linear_op_does_not():
    x = cosine(k=13)  # ReLU makes harmonics 26, 39, ... above the grid's Nyquist (16)
    relu = ratio(Pointwise(F.relu), x, "nonlinearity")
    assert relu > ALIAS_THRESHOLDS["nonlinearity"]
    linear = ratio(Pointwise(lambda h: F.leaky_relu(h, 1.0)), x, "nonlinearity")  # the identity
    assert linear <= TOL[torch.float64]
    # ReLU of cos(3x) has even harmonics 6, 12, 18, ... of amplitude ~1/n^2: little above 16
    low = ratio(Pointwise(F.relu), cosine(k=3), "nonlinearity")
    assert 0 < low < ALIAS_THRESHOLDS["nonlinearity"] < relu


def test_stride_two_subsampling_aliases_content_above_half_nyquist_only():
    high = ratio(Subsample(), cosine(k=11), "downsampling")  # 11 > 32 / 4: folds back
    assert high > 0.9
    below = ratio(Subsample(), cosine(k=3), "downsampling")
    assert below < ALIAS_THRESHOLDS["downsampling"] / 10
    blurred = ratio(Subsample(blur=True), smooth_image(h=32, w=32, c=2, max_freq=5), "downsampling")
    assert blurred < ALIAS_THRESHOLDS["downsampling"] / 10


class Sliced(nn.Module):
    def forward(self, x):
        return x[..., 1::2, ::2].mean((2, 3))


def test_strided_slicing_moves_the_samples_and_is_measured():
    layouts = ll.infer_layouts(ll.trace(Sliced(), softmax=False), cosine(k=11))
    sliced = next(lay for name, lay in layouts.items() if name.startswith("getitem"))
    assert (sliced.y, sliced.x, sliced.hw) == ((2.0, 1.0), (2.0, 0.0), (16, 16))
    assert ratio(Sliced().eval(), cosine(k=11), "downsampling") > 0.9
    assert ratio(Sliced().eval(), cosine(k=3), "downsampling") < ALIAS_THRESHOLDS["downsampling"] / 10
    a = ll.attribute(Sliced().double().eval(), smooth_image(), "rotate", output="logits")
    assert a.residual <= TOL[torch.float64]


def test_resnet18_flags_strided_convs_and_measures_relus():
    model = timm_model("resnet18")
    table = ll.aliasing(model, ll.photos(model, n=1)[..., ::2, ::2]).set_index("node")
    assert table.loc["layer2_0_conv1", "alias_kind"] == "downsampling"
    assert table.loc["layer2_0_conv1", "flagged"]
    relus = table[table["layer_type"] == "nonlinearity"]
    assert (relus["alias_kind"] == "nonlinearity").all()
    assert (relus["alias_ratio"].dropna() > 0).all()
    assert pd.isna(table.loc["layer1_0_conv1", "alias_kind"])  # stride 1, linear: not a candidate


def test_vit_token_maps_are_measured_through_their_layout():
    model = timm_model("vit_tiny_patch16_224", img_size=64)
    table = ll.aliasing(model, torch.randn(1, 3, 64, 64)).set_index("node")
    assert table.loc["patch_embed_proj", "alias_kind"] == "downsampling"
    gelu = table.loc["blocks_0_mlp_act"]
    assert gelu["alias_kind"] == "nonlinearity" and gelu["alias_ratio"] > 0
    norms = table[(table["layer_type"] == "norm") & (table["alias_kind"] == "nonlinearity")]
    assert len(norms) >= 2 * 12  # LayerNorm over channels is pointwise in space


def test_alias_flags_join_the_attribution():
    model = timm_model("resnet18")
    x = ll.photos(model, n=1)[..., ::4, ::4]
    a = ll.with_aliasing(ll.attribute(model, x, "translate_x"), model, x)
    assert {"alias_kind", "alias_ratio", "flagged"} <= set(a.nodes.columns)
    flagged = a.nodes[a.nodes["flagged"]]
    assert len(flagged) > 0 and flagged["contribution_norm"].notna().all()
    assert a.residual <= TOL[torch.float32]


def test_aliasing_rejects_bad_images():
    with pytest.raises(ll.LayerlieError, match=r"\(B, C, H, W\)"):
        ll.aliasing(timm_model("resnet18"), torch.randn(3, 32, 32))
