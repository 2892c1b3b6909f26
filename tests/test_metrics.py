"""Finite metrics (docs/method.md §7): analytic toy models with hand-computed values, and BlurPool."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layerlie as ll
from layerlie.measure.metrics import PSNR_CAP
from layerlie.testing import RTOL


class ConvNet(nn.Module):
    """conv-relu-pool-conv(stride)-relu, global average pooling, a linear head."""

    def __init__(self, padding_mode: str = "circular", stride: int = 1, classes: int = 10,
                 relu: bool = True) -> None:
        super().__init__()
        self.act = nn.ReLU() if relu else nn.Identity()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, padding_mode=padding_mode, bias=False)
        self.pool = nn.MaxPool2d(stride) if stride > 1 else nn.Identity()
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, padding_mode=padding_mode, stride=stride, bias=False)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.c2(self.pool(self.act(self.c1(x)))))
        return self.fc(h.mean((2, 3)))


class AddPattern(nn.Module):
    """``f(x) = x + p``: equivariant exactly where ``p`` is."""

    def __init__(self, pattern: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("pattern", pattern)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pattern


def checkerboard(side: int, amplitude: float) -> torch.Tensor:
    i = torch.arange(side)
    return amplitude * (-1.0) ** (i[:, None] + i[None, :]).expand(1, 3, side, side)


def images(b: int = 4, side: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, side, side, generator=torch.Generator().manual_seed(seed))


# --- analytic --------------------------------------------------------------------------------

def test_circular_stride_one_cnn_is_consistent_and_at_the_cap():
    model = ConvNet("circular").eval()
    x = images(8)
    assert ll.consistency(model, x, max_shift=8, samples=4).tolist() == [1.0] * 8
    assert ll.eq_t(model, x, node="features", samples=3).tolist() == [PSNR_CAP] * 8
    # the same net with zero padding is not equivariant at its border: a finite EQ-T
    assert ll.eq_t(ConvNet("zeros").eval(), x, node="features").max() < 60
    # a ReLU aliases under sub-pixel shifts: finite EQ-T_frac; without it the net is linear and
    # commutes with the band-limited shift
    assert ll.eq_t_frac(model, x, node="features").max() < 40
    linear = ConvNet("circular", relu=False).eval()
    assert ll.eq_t_frac(linear, x, node="features", samples=3).tolist() == [PSNR_CAP] * 8


def test_identity_model_is_at_the_cap():
    x = images()
    for metric in (ll.eq_t, ll.eq_t_frac, ll.eq_r):
        assert metric(nn.Identity().eval(), x, samples=2).tolist() == [PSNR_CAP] * 4, metric.__name__


def test_added_pattern_gives_the_hand_computed_psnr():
    # f(T x) - T f(x) = p - T p. A checkerboard of amplitude a moved by one pixel, or rotated by
    # 90 degrees on an even side, is -p: the error is 2p, MSE = 4 a^2, and with peak 2 the PSNR
    # is 10 log10(4 / (4 a^2)) = -20 log10(a) = 20 dB for a = 0.1.
    x = images(2)
    model = AddPattern(checkerboard(32, 0.1)).eval()
    for shift in [(0, 1), (1, 0), (3, 2)]:
        assert ll.eq_t(model, x, shifts=[shift], peak=2.0) == pytest.approx([20.0] * 2, abs=1e-4)
    assert ll.eq_r(model, x, angles=[90.0], peak=2.0) == pytest.approx([20.0] * 2, abs=1e-4)
    # a shift by two pixels leaves the checkerboard as it is
    assert ll.eq_t(model, x, shifts=[(0, 2)], peak=2.0).tolist() == [PSNR_CAP] * 2


def test_added_pattern_psnr_uses_the_valid_region_and_the_image_range():
    # a random pattern, shifted right by one column: column 0 wrapped around and is left out
    p = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    x = images(1, 16)
    diff = p[..., 1:] - p[..., :-1]
    y = x + p
    expected = 10 * math.log10(float(y.max() - y.min()) ** 2 / float(diff.pow(2).mean()))
    assert float(ll.eq_t(AddPattern(p).eval(), x, shifts=[(0, 1)])) == pytest.approx(expected, rel=1e-5)
    assert expected < PSNR_CAP / 2


def test_invariance_of_a_one_pixel_translation():
    # translate_x by one pixel (2 / (W - 1) in align_corners coordinates) of a constant image
    # zeroes one column of W: the mean squared change of the identity is 1 / W.
    x = torch.ones(2, 3, 16, 16)
    value = ll.invariance(nn.Identity().eval(), x, "translate_x", 2 / 15, softmax=False, samples=3)
    assert value == pytest.approx([1 / 16] * 2, rel=1e-5)
    constant = ll.invariance(lambda z: torch.zeros(z.shape[0], 5), x, "rotate", 0.3)
    assert constant.tolist() == [0.0, 0.0]


# --- BlurPool ----------------------------------------------------------------------------------

def balanced(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set the two-class head's bias so that half of ``x`` falls on each side: at random init the
    top-1 class is otherwise the same for every input, and consistency is 1 whatever the net."""
    fc = model.get_submodule("fc")
    with torch.no_grad():
        fc.bias.zero_()
        z = model(x)
        margin = (z[:, 0] - z[:, 1]).median()
        fc.bias.copy_(torch.stack([-margin / 2, margin / 2]))
    return model


def test_blurpool_raises_consistency_and_eq_t_on_a_strided_cnn():
    torch.manual_seed(0)
    x = images(32)
    model = balanced(ConvNet("circular", stride=2, classes=2).eval(), x)
    blurred = balanced(ll.antialias(model, x=x), x)
    before = ll.consistency(model, x, max_shift=7, samples=8).mean()
    after = ll.consistency(blurred, x, max_shift=7, samples=8).mean()
    assert before < 0.75 and after > before + 0.15, (before, after)
    eq_before = ll.eq_t(model, x, node="features").mean()
    eq_after = ll.eq_t(blurred, x, node="features").mean()
    assert eq_after > eq_before + 3, (eq_before, eq_after)  # dB
    # and the strided net is below the cap: the check above compares two finite values
    assert eq_before < 30


# --- the table, seeds and errors ------------------------------------------------------------------

def test_metrics_table_on_a_timm_model():
    torch.manual_seed(0)
    model = ll.load_model("resnet18")
    x = F.interpolate(ll.photos(model, n=2), size=64, mode="bilinear", antialias=True)
    state = torch.random.get_rng_state()
    table = ll.metrics(model, x, which=["consistency", "eq_t", "invariance"], names=["a", "b"],
                       invariance={"group": "rotate", "magnitude": 0.1})
    assert torch.equal(state, torch.random.get_rng_state())  # each metric has its own generator
    assert list(table.columns) == ["image", "metric", "value"]
    assert table.metric.tolist() == ["consistency"] * 2 + ["eq_t"] * 2 + ["invariance"] * 2
    assert table.image.tolist() == ["a", "b"] * 3
    eq = table[table.metric == "eq_t"].value
    assert ((eq > 0) & (eq < PSNR_CAP)).all()  # a zero-padded strided net: finite
    again = ll.metrics(model, x, which=["consistency", "eq_t", "invariance"], names=["a", "b"],
                       invariance={"group": "rotate", "magnitude": 0.1})
    assert again.equals(table)
    other = ll.eq_t(model, x, node="features", seed=1)
    assert not torch.equal(other, torch.tensor(eq.tolist(), dtype=torch.float64))


def test_batch_size_does_not_change_the_values():
    model = ConvNet("zeros", stride=2).eval()
    x = images(5)
    for metric in (ll.eq_t, ll.eq_r):
        whole = metric(model, x, node="features", samples=2)
        assert torch.allclose(metric(model, x, node="features", samples=2, batch_size=2), whole, rtol=RTOL["regrouped"])


def test_metric_errors_are_one_line():
    model = ConvNet().eval()
    x = images(1)
    with pytest.raises(ll.LayerlieError, match=r"not \(B, C, H, W\).*node="):
        ll.eq_t(model, x)
    with pytest.raises(ll.LayerlieError, match="unknown metric.*'eq_x'.*valid metrics"):
        ll.metrics(model, x, which=["eq_x"])
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4)).eval()
    with pytest.raises(ll.LayerlieError, match="no feature map .* ends this model's graph; pass node="):
        ll.eq_t(flat, x, node="features")
    with pytest.raises(ll.LayerlieError, match=r"node '_0' \(\(1, 3072\)\) has layout none, not a grid .*pass node="):
        ll.eq_t(flat, x, node="_0")
    with pytest.raises(ll.LayerlieError, match="max_shift"):
        ll.consistency(model, x, max_shift=40)
    with pytest.raises(ll.LayerlieError, match=r"valid region of the \(32, 32\) output is empty under \[\(0, 32\)\]"):
        ll.eq_t(nn.Identity().eval(), x, shifts=[(0, 32)])


# --- feature layouts (docs/method.md §5) ------------------------------------------------------------------

class Layouts(nn.Module):
    """One feature map three ways: ``(B, C, H, W)`` (node ``relu``), ``(B, H, W, C)`` (``permute``)
    and tokens ``(B, 1 + H W, C)`` after a class token (``cat``); pooled to a classifier."""

    def __init__(self, padding_mode: str = "circular", stride: int = 1, pattern: torch.Tensor | None = None,
                 kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel, padding=kernel // 2, padding_mode=padding_mode, stride=stride)
        self.register_buffer("pattern", torch.zeros(1, 8, 1, 1) if pattern is None else pattern)
        self.cls = nn.Parameter(torch.full((1, 1, 8), 50.0))  # far from the map: it must be left out
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)) + self.pattern
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), h.permute(0, 2, 3, 1).flatten(1, 2)], 1)
        return self.head(tokens[:, 0] + tokens[:, 1:].mean(1))


MAPS = ("add", "permute", "cat")


def test_grid_nhwc_and_token_maps_give_the_same_values():
    x = images(3)
    model = Layouts("zeros", stride=2).eval()
    for metric in (ll.eq_t, ll.eq_t_frac, ll.eq_r):
        nchw, nhwc, tokens = (metric(model, x, node=n, samples=2) for n in MAPS)
        assert torch.equal(nhwc, nchw) and torch.equal(tokens, nchw), metric.__name__
        assert (nchw < 60).all(), metric.__name__  # zero padding and stride 2: finite values compared
    # the last feature map of the classifier is its tokens
    assert torch.equal(ll.eq_t(model, x, node="features"), ll.eq_t(model, x, node="cat"))


def test_a_circular_map_is_at_the_cap_on_every_layout():
    x = images(2)
    model = Layouts("circular").eval()
    for n in MAPS:
        assert ll.eq_t(model, x, node=n, samples=3).tolist() == [PSNR_CAP] * 2, n
    # a 1 x 1 conv of stride 2 commutes with even shifts: 2 input pixels are 1 sample of its map
    strided = Layouts(stride=2, kernel=1).eval()
    for n in MAPS:
        assert ll.eq_t(strided, x, node=n, shifts=[(0, 2), (4, -6)]).tolist() == [PSNR_CAP] * 2, n
        assert ll.eq_t(strided, x, node=n, shifts=[(0, 1)]).max() < 60, n


def test_token_and_nhwc_maps_give_the_hand_computed_psnr():
    # as test_added_pattern_gives_the_hand_computed_psnr, read through each layout: a checkerboard
    # of amplitude 0.1 added to the map of a pointwise (1 x 1) conv, moved by one pixel or rotated
    # by 90 degrees, is an error of 2p: 20 dB at peak 2
    x = images(2)
    model = Layouts(pattern=checkerboard(32, 0.1)[:, :1].expand(1, 8, 32, 32).clone(), kernel=1).eval()
    for n in MAPS:
        for shift in [(0, 1), (1, 0)]:
            assert ll.eq_t(model, x, node=n, shifts=[shift], peak=2.0) == pytest.approx([20.0] * 2, abs=1e-4), n
        assert ll.eq_r(model, x, node=n, angles=[90.0], peak=2.0) == pytest.approx([20.0] * 2, abs=1e-4), n


def test_a_vit_and_a_convnext_nhwc_map_are_measured():
    x = images(2, 64)
    vit = ll.load_model("vit_tiny_patch16_224", img_size=64)
    table = ll.metrics(vit, x, which=["eq_t", "eq_t_frac", "eq_r"])
    assert ((table.value > 0) & (table.value < PSNR_CAP)).all()
    # "features" is the last tokens, the final norm, read on its 4 x 4 grid without the class token
    assert torch.equal(ll.eq_t(vit, x, node="features"), ll.eq_t(vit, x, node="layer_norm_24"))
    # convnext_atto's layer norm runs on (B, H, W, C); the permute after it holds the same map
    convnext = ll.load_model("convnext_atto")
    assert torch.equal(ll.eq_r(convnext, x, node="layer_norm_1"), ll.eq_r(convnext, x, node="permute_3"))


def test_a_sweep_of_eq_t_on_a_vit_succeeds(tmp_path):
    spec = {"models": ["vit_tiny_patch16_224"], "groups": ["translate_x"], "measures": ["metrics"], "n": 1,
            "size": 64, "metrics": {"which": ["eq_t", "eq_r"]}}
    result = ll.sweep(spec, tmp_path, workers=0, progress=False)
    assert not result.failed
    table = ll.load(tmp_path, "metrics")
    assert sorted(table.metric) == ["eq_r", "eq_t"] and ((table.value > 0) & (table.value < PSNR_CAP)).all()


# --- the registry ----------------------------------------------------------------------------

def test_metric_registry_lists_sorted_names_and_names_them_in_its_error():
    names = ll.list_metrics()
    assert names == sorted(names) and set(ll.DEFAULT_METRICS) | {"invariance", "lee"} <= set(names)
    assert all(ll.get_metric(n).finite for n in ll.DEFAULT_METRICS) and not ll.get_metric("lee").finite
    with pytest.raises(ll.LayerlieError, match=f"valid metrics: {', '.join(names)}"):
        ll.get_metric("eq_x")


def test_a_registered_metric_appears_in_metrics():
    def mean_logit(model, x, *, seed, batch_size, output, scale=1.0):
        with torch.no_grad():
            return model(x).double().mean(1) * scale

    ll.register_metric(ll.Metric("mean_logit", mean_logit, options={"scale": 2.0}))
    model, x = ConvNet().eval(), images(2, side=16)
    table = ll.metrics(model, x, which=["consistency", "mean_logit"])
    assert table.metric.tolist() == ["consistency"] * 2 + ["mean_logit"] * 2
    with torch.no_grad():
        want = (model(x).double().mean(1) * 2).tolist()
    assert table[table.metric == "mean_logit"].value.tolist() == want
    assert table.attrs["options"]["mean_logit"] == {"scale": 2.0}


def test_the_lee_metric_is_the_lee_of_one_group():
    model, x = ConvNet().eval(), images(2, side=16)
    table = ll.metrics(model, x, which=["lee"], lee={"group": "rotate"})
    assert table.value.tolist() == ll.lee(model, x, "rotate")["lee"].tolist()
