"""Windowed layouts (docs/method.md §5, Windows): window and grid partitions, their reverses, rolls and
patch merging relabel a grid's samples, so ``G`` on them is ``G`` of the reassembled grid and
they have no defect; then completeness and the unknown-layout share on Swin and MaxViT, and
completeness on dla34, whose random-init softmax is nearly one-hot."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import maxxvit, swin_transformer
from torch import nn

import layerlie as ll
from layerlie.core.layout import Layout, layout_tangent
from layerlie.core.engine import Call, linearize
from layerlie.testing import ATOL, TOL, rel
from torch.utils import _pytree as pytree

RELABELLING = ("permute", "view", "reshape", "contiguous", "roll", "window_reverse", "grid_reverse")


class Windowed(nn.Module):
    """Roll, cut into 4 x 4 windows (timm's partition, traced inline), mix channels per token,
    put the windows back (timm's reverse, a no-trace function) and roll back: an equivariant
    map built of relabellings only."""

    def __init__(self, grid: bool = False, shift: int = 2):
        super().__init__()
        self.mix = nn.Linear(3, 3, bias=False)  # a bias is a constant: G of it is not 0 at the border
        self.grid, self.shift = grid, shift

    def forward(self, x):
        h = x.permute(0, 2, 3, 1)
        h = torch.roll(h, shifts=(-self.shift, -self.shift), dims=(1, 2))
        cut, back = (maxxvit.grid_partition, maxxvit.grid_reverse) if self.grid else \
            (swin_transformer.window_partition, lambda w, s, hw: swin_transformer.window_reverse(w, s, *hw))
        w = cut(h, (4, 4)).view(-1, 16, 3)
        w = self.mix(w).view(-1, 4, 4, 3)
        h = back(w, (4, 4), (16, 16))
        h = torch.roll(h, shifts=(self.shift, self.shift), dims=(1, 2))
        return h.permute(0, 3, 1, 2)


@pytest.mark.parametrize("grid", [False, True], ids=["block", "grid"])
@pytest.mark.parametrize("group", ["translate_x", "rotate"])
def test_partition_reverse_and_roll_have_no_defect(grid, group):
    """analytic: every node relabels samples or mixes channels, so every e_v is 0 and so is L F."""
    torch.manual_seed(0)
    model = Windowed(grid).double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    a = ll.attribute(model, x, group, output="logits")
    nodes = a.nodes.set_index("node")
    kinds = set(nodes["layout"].str.split("(").str[0])
    assert {"windows", "grid"} <= kinds and "unknown" not in kinds
    assert (nodes["target"].str.contains("|".join(RELABELLING))).sum() >= 8
    assert nodes["local_norm"].max() < 1e-12
    assert float(a.total.norm()) < 1e-12


def _grid_layout(shape: tuple[int, ...], stride: float = 4.0, offset: float = 1.5) -> Layout:
    """A (B, H, W, C) grid at stride 4, as after a 4 x 4 patch embedding of a 4H x 4W image."""
    return Layout("grid", 1, 2, hw=shape[1:3], y=(stride, offset), x=(stride, offset),
                  input_hw=(4 * shape[1], 4 * shape[2]))


class Cut(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how

    def forward(self, h):
        if self.how == "roll":
            return torch.roll(h, shifts=(-3, 2), dims=(1, 2))
        cut = swin_transformer.window_partition if self.how == "block" else maxxvit.grid_partition
        return cut(h, (4, 4))


def _layout_of_output(module: nn.Module, h: torch.Tensor) -> Layout:
    """The layout of ``module(h)`` when ``h`` has a grid layout."""
    from layerlie.core.layout import _Seeded

    gm = torch.fx.symbolic_trace(module)
    prop = _Seeded(gm, _grid_layout(tuple(h.shape)))
    prop.propagate(h, None)
    return prop.layouts[next(n for n in gm.graph.nodes if n.op == "output").args[0].name]


@pytest.mark.parametrize("how", ["block", "grid", "roll"])
@pytest.mark.parametrize("group", ["translate_x", "rotate", "scale"])
def test_tangent_of_a_windowed_tensor_is_the_cut_tangent_of_the_grid(how, group):
    """reference: G(cut(h)) = cut(G h), with G h on the whole grid at its sample positions
    (timm's own partition and torch.roll cut the reference)."""
    h = torch.randn(2, 8, 12, 5, dtype=torch.float64)
    cut = Cut(how)
    lay = _layout_of_output(cut, h)
    assert lay.kind == "windows"
    g = ll.group(group)
    want = cut(layout_tangent(h, _grid_layout(tuple(h.shape)), g))
    assert torch.allclose(layout_tangent(cut(h), lay, g), want, atol=ATOL["graph"])


class Scores(nn.Module):
    """Window attention scores ``q k^T`` of a (B, H, W, C) grid in 4 x 4 windows."""

    def forward(self, h):
        t = swin_transformer.window_partition(h, (4, 4)).view(-1, 16, h.shape[-1])
        return t @ t.transpose(-2, -1)


@pytest.mark.parametrize("group", ["translate_x", "rotate"])
def test_tangent_of_window_attention_scores_acts_on_both_token_axes(group):
    """reference: G A = G_q A + G_k A, each the tangent of the reassembled grid along one token
    axis with the other held as a channel (timm's reverse and partition cut the reference)."""
    h = torch.randn(2, 8, 12, 5, dtype=torch.float64)
    scores = Scores()
    lay = _layout_of_output(scores, h)
    assert lay.kind == "windows" and lay.key_windows is not None
    a, g = scores(h), ll.group(group)

    def along_queries(m: torch.Tensor) -> torch.Tensor:
        grid = swin_transformer.window_reverse(m.reshape(-1, 4, 4, 16), (4, 4), 8, 12)
        return swin_transformer.window_partition(layout_tangent(grid, _grid_layout(tuple(grid.shape)), g),
                                                 (4, 4)).reshape(m.shape)

    want = along_queries(a) + along_queries(a.transpose(-2, -1)).transpose(-2, -1)
    assert torch.allclose(layout_tangent(a, lay, g), want, atol=ATOL["graph"])


def test_roll_keeps_the_positions_of_the_wrapped_samples():
    """The choice for torch.roll: a relabelling, so a sample carried across the border keeps its
    own position. Treating the roll as an offset shift instead would difference across the seam:
    the two differ exactly on the wrapped rows and columns."""
    h = torch.randn(1, 8, 8, 2, dtype=torch.float64)
    lay = _layout_of_output(Cut("roll"), h)
    rolled = torch.roll(h, shifts=(-3, 2), dims=(1, 2))
    ours = layout_tangent(rolled, lay, ll.group("translate_x"))
    shifted = Layout("grid", 1, 2, hw=(8, 8), y=(4.0, 1.5 + 4 * 3), x=(4.0, 1.5 - 4 * 2), input_hw=(32, 32))
    naive = layout_tangent(rolled, shifted, ll.group("translate_x"))
    differs = (ours - naive).abs().amax((0, 1, 3)) > 1e-12  # per column
    # columns 0, 1 are the wrapped ones (rolled by 2), 2 and 7 their neighbours across the seam
    assert differs.tolist() == [True, True, True, False, False, False, False, True]


def test_patch_merging_is_a_grid_of_doubled_stride():
    """analytic: Swin's patch merging (space to depth) gives stride 8 from stride 4, centred on
    the 2 x 2 samples it merges: 1.5 + 4 / 2 = 3.5, the centre of input pixels 0..7."""
    torch.manual_seed(0)
    model = ll.load_model("swin_tiny_patch4_window7_224", img_size=32, window_size=4, depths=(1, 1, 1, 1))
    lay = ll.infer_layouts(ll.trace(model), torch.randn(1, 3, 32, 32))
    assert lay["patch_embed_norm"].y == (4.0, 1.5)
    assert lay["flatten"].kind == "grid" and lay["flatten"].y == lay["flatten"].x == (8.0, 3.5)
    assert lay["flatten"].hw == (4, 4)


WINDOWED = {
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=64, window_size=4, depths=(2, 2, 2, 2))),
    # timm sizes MaxViT's windows and grids from the input: 64 / 32 = 2 x 2 (block and grid)
    "maxvit": ("maxvit_tiny_rw_224", dict(img_size=64)),
}


@pytest.mark.parametrize("family", WINDOWED)
def test_windowed_families(family):
    """completeness at float32 precision; relabelling nodes have no defect; attention maps in
    windows are windowed pairs (the last stage's single window over the whole grid is a plain
    token pair); no tensor is unknown (docs/method.md §5)."""
    name, kwargs = WINDOWED[family]
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()  # as a user makes it: in-place activations and all
    x = F.interpolate(ll.photos(model, n=1), size=(64, 64), mode="bilinear")
    a = ll.attribute(model, x, "translate_x")
    assert a.residual <= 1e-5
    nodes = a.nodes.set_index("node")
    relabel = nodes[nodes["target"].str.contains("|".join(RELABELLING)) & (nodes["layout"] != "unknown")]
    assert len(relabel) > 40 and relabel["local_norm"].max() == 0
    unknown = nodes[nodes["layout"] == "unknown"]
    assert unknown.empty, list(unknown.index[:5])
    assert nodes["layout"].str.endswith(",pair)").sum() >= 4 * (4 if family == "swin" else 8)


def test_dla34_completeness():
    """completeness on a raw timm model whose random-init softmax is nearly one-hot (dla34)."""
    torch.manual_seed(0)
    model = timm.create_model("dla34").eval()
    x = F.interpolate(ll.photos(model, n=1), size=(64, 64), mode="bilinear")
    a = ll.attribute(model, x, "translate_x")
    assert float(a.nodes["share"].sum()) == pytest.approx(1.0, abs=1e-3)
    assert a.residual <= 1e-5


def _softmax_call(z: torch.Tensor) -> Call:
    flat, spec = pytree.tree_flatten(((z, -1), {}))
    return Call(torch.softmax, flat, spec, torch.softmax(z, -1))


def test_softmax_rule_near_one_hot():
    """reference: the softmax linearization equals torch.func.jvp in float64, and keeps float32
    accuracy where the softmax is nearly one-hot (1 - p_max = 5e-4, as in random-init dla34),
    against float64 at the same float32 inputs (the plain formula is off by 6e-4 there)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 1000, generator=g, dtype=torch.float64)
    z[:, 0] = 15
    t = (torch.randn(3, 2, 1000, generator=g, dtype=torch.float64) * 100).float().double()
    z = z.float().double()
    exact = torch.stack([torch.func.jvp(lambda u: torch.softmax(u, -1), (z,), (ti,))[1] for ti in t])
    assert rel(linearize(_softmax_call(z), {0: t}, torch.softmax), exact) < TOL[torch.float64]
    got = linearize(_softmax_call(z.float()), {0: t.float()}, torch.softmax)
    assert rel(got.double(), exact) < 1e-5
