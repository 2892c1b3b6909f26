"""Layouts of attention (docs/method.md §5, pair layouts).

- analytic: ``G A = G_q A + G_k A`` on a band-limited pair map equals the derivative of the
  map under the motion of both token sets, each at its own sample positions; a hand-built
  ``softmax(q k^T) v`` head has zero defect at ``q @ k^T`` and at ``A @ V``, where an unknown
  map charges both with large, cancelling defects;
- invariants: on a random-init ViT, the attention matmuls carry nothing and the patch and
  position embeddings carry the Lie derivative;
- completeness and coverage: attention families at test size, raw ``timm.create_model``
  models, at most 5% unknown tensor nodes and the exact residual at float precision.
"""

from __future__ import annotations

import functools
import math
import operator

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import layerlie as ll
from layerlie.core import layout
from layerlie.core.layout import Layout, layout_tangent, unknown_layouts
from layerlie.testing import TOL, rel, smooth_image

# create-time kwargs of each family at test size, and the input's side (None: its img_size)
FAMILIES: dict[str, tuple[dict[str, object], int]] = {
    "vit_tiny_patch16_224": ({"img_size": 64, "depth": 2}, 64),
    "deit3_small_patch16_224": ({"img_size": 64, "depth": 2}, 64),
    "eva02_tiny_patch14_224": ({"img_size": 56, "depth": 2}, 56),  # rotary embeddings
    "cait_xxs24_224": ({"img_size": 64, "depth": 2, "depth_token_only": 1}, 64),  # class attention
    "xcit_nano_12_p16_224": ({"img_size": 64, "depth": 2, "cls_attn_layers": 1}, 64),  # channel attention
    "levit_128s": ({"img_size": 64}, 64),  # attention-subsample; its depth is fixed by the variant
    "pit_ti_224": ({"img_size": 64}, 64),  # token grids pooled by a strided conv
    # a locally-grouped and a global sub-sampled block in the first stage (16 x 16 queries, 2 x 2 keys)
    "twins_svt_small": ({"img_size": 64, "depths": (2, 1, 1, 1)}, 64),
    "edgenext_xx_small": ({"depths": (1, 1, 1, 1)}, 64),  # takes any input size: no img_size
}
SLOW = {"twins_svt_small", "pit_ti_224"}


@functools.lru_cache(maxsize=2)
def family(name: str) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    """A raw random-init ``timm.create_model`` model at test size, traced, and one photo."""
    kwargs, side = FAMILIES[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = F.interpolate(ll.photos(model, n=1), size=(side, side), mode="bilinear", align_corners=False)
    return ll.trace(model, x), x


@pytest.mark.parametrize("name", [pytest.param(f, marks=[pytest.mark.slow] if f in SLOW else [])
                                  for f in FAMILIES])
def test_attention_families_have_layouts_and_completeness(name):
    gm, x = family(name)
    unknown, total = unknown_layouts(gm, x)
    assert len(unknown) <= 0.05 * total, f"{len(unknown)}/{total} unknown, first: {unknown[0].format_node()}"
    a = ll.attribute(gm, x, "translate_x")
    assert not a.degenerate and a.residual <= TOL[torch.float32]


def _band_limited_pair(q: Layout, k: Layout, group: ll.Group, g: torch.Generator
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """A map ``A[i, j] = sum_m a_m cos(phase_q(i) + phase_k(j) + c_m)`` whose phases are plane
    waves below Nyquist in each token grid's own periodic positions (prefix tokens: a constant
    phase, no position), and its exact ``d/dt`` under the group: ``v(u) . grad_u`` per token."""
    hy, wx = q.input_hw

    def phases(lay: Layout, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (h, w), (sy, oy), (sx, ox) = lay.hw, lay.y, lay.x
        py = (oy + sy * torch.arange(h, dtype=torch.float64))[:, None].expand(h, w).reshape(-1)
        px = (ox + sx * torch.arange(w, dtype=torch.float64))[None, :].expand(h, w).reshape(-1)
        ky, kx = 2 * math.pi * freqs[:, :1] / (h * sy), 2 * math.pi * freqs[:, 1:] / (w * sx)
        phase = ky * py + kx * px  # (terms, h * w)
        uy, ux = 2 * py / (hy - 1) - 1, 2 * px / (wx - 1) - 1  # normalized positions (docs/method.md §1)
        m = group.generator.double()
        vx, vy = m[0, 0] * ux + m[0, 1] * uy + m[0, 2], m[1, 0] * ux + m[1, 1] * uy + m[1, 2]
        rate = vx * kx * (wx - 1) / 2 + vy * ky * (hy - 1) / 2  # d phase / dt
        prefix = torch.rand(len(freqs), lay.prefix, generator=g, dtype=torch.float64) * 2 * math.pi
        return torch.cat([prefix, phase], 1), torch.cat([torch.zeros_like(prefix), rate], 1)

    def waves(lay: Layout) -> torch.Tensor:  # integer frequencies strictly below Nyquist
        lim = torch.tensor([(lay.hw[0] - 1) // 2, (lay.hw[1] - 1) // 2])
        return torch.stack([torch.randint(-int(n), int(n) + 1, (4,), generator=g) for n in lim], 1).double()

    (pq, rq), (pk, rk) = phases(q, waves(q)), phases(k, waves(k))
    amp = torch.randn(4, 1, 1, generator=g, dtype=torch.float64)
    shift = torch.rand(4, 1, 1, generator=g, dtype=torch.float64) * 2 * math.pi
    arg = pq[:, :, None] + pk[:, None, :] + shift
    value = (amp * torch.cos(arg)).sum(0)
    rate = (-amp * torch.sin(arg) * (rq[:, :, None] + rk[:, None, :])).sum(0)
    return value[None, None], rate[None, None]


@pytest.mark.parametrize("group", ["translate_x", "rotate", "scale"])
def test_pair_tangent_is_the_motion_of_both_token_sets(group):
    """Queries on a coarse grid with a class token, keys on a finer one with two prefix tokens
    (LeViT-like subsampled queries): each axis moves at its own positions."""
    grp = ll.group(group)
    q = Layout("tokens", token_dim=2, prefix=1, hw=(4, 6), y=(8.0, 3.5), x=(8.0, 3.5), input_hw=(32, 48))
    k = Layout("tokens", token_dim=3, prefix=2, hw=(8, 12), y=(4.0, 1.5), x=(4.0, 1.5), input_hw=(32, 48))
    pair = Layout("pair", token_dim=2, prefix=1, hw=(4, 6), y=(8.0, 3.5), x=(8.0, 3.5), input_hw=(32, 48), key=k)
    a, want = _band_limited_pair(q, k, grp, torch.Generator().manual_seed(0))
    got = layout_tangent(a, pair, grp, "spectral")
    assert rel(got, want) < TOL[torch.float64]
    assert got[..., :1, :2].abs().max() == 0  # class token x prefix keys: no position on either axis
    assert pair.describe() == "pair(q=dim2,P=1,4x6; k=dim3,P=2,8x12)"


class SelfAttention(nn.Module):
    """One head of ``softmax(q k^T / sqrt(d)) v`` on the pixels of a 1x1-conv feature map: no
    position embedding, no patches, nothing that breaks translation in the continuum."""

    def __init__(self, c: int = 3, d: int = 4):
        super().__init__()
        self.embed = nn.Conv2d(c, d, 1)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, 5)
        self.scale = d ** -0.5

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)
        q, k, v = self.q(t), self.k(t), self.v(t)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(-1)
        return self.head((attn @ v).mean(1))


def _attention_defects(model: nn.Module, x: torch.Tensor, group: str) -> tuple[dict[str, float], ll.Attribution]:
    a = ll.attribute(model, x, group, output="logits")
    nodes = a.nodes.set_index("node")
    return {n: float(nodes.loc[n, "local_norm"]) for n in ("matmul", "softmax", "matmul_1")}, a


@pytest.mark.parametrize("group", ["translate_x", "rotate"])
def test_pair_layout_puts_no_defect_on_the_attention_products(group, monkeypatch):
    """``q @ k^T`` is bilinear in the tokens and ``A @ V`` sums over the keys, where the
    central difference sums by parts (both fields' x velocity is constant along x, y along
    y): with ``G`` on both axes of the map their defects vanish. Left unknown, the map
    charges both with defects of the size of ``G`` of the tokens, which cancel downstream.
    (For scale, whose field has a divergence, ``A @ V`` keeps a genuine defect: the sum over
    keys is not scale-invariant.)"""
    torch.manual_seed(0)
    model = SelfAttention().double().eval()
    x = smooth_image(b=1, h=8, w=8)
    pair, a = _attention_defects(model, x, group)
    assert ll.infer_layouts(ll.trace(model), x)["softmax"].describe() == "pair(q=dim1,P=0,8x8; k=dim2,P=0,8x8)"
    monkeypatch.setattr(layout, "_attention_rule", lambda *args: None)  # the map left unknown
    unknown, b = _attention_defects(model, x, group)
    assert a.residual <= TOL[torch.float64] and b.residual <= TOL[torch.float64]
    assert b.nodes.set_index("node").loc["softmax", "layout"] == "unknown"
    for node in ("matmul", "matmul_1"):
        assert pair[node] <= 1e-12 * unknown["matmul"], node
    assert unknown["matmul"] > 0.1 and unknown["matmul_1"] > 0.1
    # the softmax keeps a genuine discrete defect (a nonlinearity of neighbouring samples)
    assert 0 < pair["softmax"] < unknown["matmul"]


def test_vit_attention_matmuls_carry_nothing_the_embeddings_carry_it():
    """Random-init ViT, translate_x: the patch embedding (strided) and the position embedding
    (added to the tokens) carry the Lie derivative; the attention matmuls carry none of it."""
    gm, x = family("vit_tiny_patch16_224")
    a = ll.attribute(gm, x, "translate_x")
    nodes = a.nodes.set_index("node")
    pos = next(n.name for n in gm.graph.nodes if n.target is operator.add
               and any(getattr(p, "target", None) == "pos_embed" for p in n.args))
    matmuls = [n.name for n in gm.graph.nodes if n.target is operator.matmul]
    assert len(matmuls) == 4
    assert nodes.loc[matmuls, "contribution_norm"].sum() <= 1e-6 * float(a.total.norm())
    assert nodes.loc[["patch_embed_proj", pos], "share"].sum() >= 0.9
    assert nodes.loc["matmul", "layout"] == "pair(q=dim2,P=1,4x4; k=dim3,P=1,4x4)"


def test_levit_subsampled_queries_sit_on_their_own_grid():
    """LeViT's attention-subsample: queries on every other token of the keys' grid."""
    gm, x = family("levit_128s")
    maps = [lay for lay in ll.infer_layouts(gm, x).values() if lay.kind == "pair" and lay.hw != lay.key.hw]
    assert maps, "no attention map with subsampled queries"
    q, k = maps[0].query, maps[0].key
    assert q.hw == ((k.hw[0] + 1) // 2, (k.hw[1] + 1) // 2) and q.x[0] == 2 * k.x[0] and q.x[1] == k.x[1]


def test_channel_attention_map_has_no_spatial_action():
    """XCiT and EdgeNeXt attend over channels: ``q^T k`` sums over the tokens, so the map is
    channel x channel and ``G`` acts on it as zero; ``A @ V`` gives tokens back."""
    for name in ("xcit_nano_12_p16_224", "edgenext_xx_small"):
        gm, x = family(name)
        lays = ll.infer_layouts(gm, x)
        softmax = next(n for n in gm.graph.nodes if n.target == "softmax")
        assert lays[softmax.name].kind == "none", name
        product = next(iter(softmax.users))
        assert lays[next(iter(product.users)).name].kind == "tokens", name


def test_folded_token_axis_moves_each_sequence():
    """LeViT runs BatchNorm1d on ``(B * N, C)``: ``G`` on the folded axis is ``G`` of each
    image's tokens, folded; the layout follows the fold and the unfold."""
    h = torch.randn(3, 1 + 4 * 5, 7, dtype=torch.float64)
    tokens = Layout("tokens", token_dim=1, prefix=1, hw=(4, 5), y=(4.0, 1.5), x=(4.0, 1.5), input_hw=(16, 20))
    folded = layout._fold_tokens(tokens, h, h.flatten(0, 1))
    assert folded == Layout("tokens", token_dim=0, prefix=1, hw=(4, 5), y=(4.0, 1.5), x=(4.0, 1.5), input_hw=(16, 20))
    assert layout._fold_tokens(folded, h.flatten(0, 1), h) == tokens
    for group in ("translate_x", "rotate"):
        want = layout_tangent(h, tokens, ll.group(group)).flatten(0, 1)
        assert torch.equal(layout_tangent(h.flatten(0, 1), folded, ll.group(group)), want)


def test_levit_batch_of_two_is_complete():
    gm, x = family("levit_128s")
    a = ll.attribute(gm, torch.cat([x, x.flip(-1)]), "translate_x")
    assert a.residual <= TOL[torch.float32]
