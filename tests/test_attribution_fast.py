"""The fast paths of exact attribution against their references: the defects pass with its
shortcuts against every node's two terms, the fused ``G h`` against :func:`layerlie.tangent`,
and the growing source stacks against one propagation per source (docs/method.md §3-5)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layerlie as ll
from layerlie.measure import attribution
from layerlie.measure.attribution import _Defects, _propagate_sources, _sources
from layerlie.core.layout import Layout, layout_tangent
from layerlie.measure.lie import jvp_ready
from layerlie.core import memory
from layerlie.core.engine import Propagator
from layerlie.core.tangent import Frame, tangent
from layerlie.testing import ATOL, TOL, rel

AGREE = 1e-5  # fast against reference, relative


def _with_offsets(model: nn.Module) -> nn.Module:
    """Random biases and BatchNorm statistics: timm's init zeroes them, and a zero offset would
    hide the border defect ``-G b`` of an affine layer (docs/method.md §3)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
    return model


@functools.lru_cache(maxsize=4)
def _case(name: str) -> tuple[torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    kwargs = {"img_size": 32} if name.startswith("vit") else {}
    model = _with_offsets(ll.load_model(name, **kwargs)).double()
    x = F.interpolate(ll.photos(model, n=1), size=(32, 32), mode="bilinear").double()
    return ll.trace(model, x), x


def _defects(gm, x, group, shortcuts):
    d = _Defects(gm, ll.group(group), "central", "receptive_field", shortcuts=shortcuts)
    with torch.no_grad(), jvp_ready(gm):
        d.propagate(x, None)
    return d


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
@pytest.mark.parametrize("group", ["translate_x", "rotate"])
def test_defects_with_shortcuts_equal_both_terms_at_every_node(name, group):
    """references: every node's ``e_v`` with the shortcuts (affine channel maps as ``-G b``,
    relabelling ops passing ``G h`` through, one jvp for value and tangent) equals the reference
    that forms ``J[G h] - G h_v`` at every node, to 1e-5 relative of the largest defect."""
    gm, x = _case(name)
    fast, ref = _defects(gm, x, group, True), _defects(gm, x, group, False)
    assert len(fast.commuting) > 10 and not ref.commuting
    scale = max(float(e.norm()) for e in ref.e.values() if e is not None)
    offsets = 0
    for n, want in ref.e.items():
        got = fast.e.get(n)
        want = torch.zeros(()) if want is None else want
        got = torch.zeros(()) if got is None else got
        assert float((got - want).norm()) <= AGREE * max(float(want.norm()), 1e-3 * scale), n.name
        offsets += n in fast.commuting and ref.e[n] is not None
    if name.startswith("vit") and group == "translate_x":  # biased linear layers: -G b is checked, not zeros
        assert offsets >= 4
    for n in ref.values:
        if isinstance(ref.values[n], torch.Tensor):
            torch.testing.assert_close(fast.values[n], ref.values[n], rtol=AGREE, atol=ATOL["graph"])


def test_exact_attribution_with_and_without_shortcuts_agree(monkeypatch):
    """references: contributions and total of ``attribute`` through the fast defects pass and
    through the reference one."""
    gm, x = _case("resnet18")
    fast = ll.attribute(gm, x, "rotate").nodes.set_index("node")
    monkeypatch.setattr(attribution, "_Defects", functools.partial(_Defects, shortcuts=False))
    ref = ll.attribute(gm, x, "rotate")
    slow = ref.nodes.set_index("node")
    assert ref.residual < TOL[torch.float64]
    big = slow["contribution_norm"] > 1e-6 * slow["contribution_norm"].max()
    assert big.sum() > 5
    got, want = fast.loc[big, "contribution_norm"], slow.loc[big, "contribution_norm"]
    assert float(((got - want).abs() / want).max()) < AGREE


@pytest.mark.parametrize("group", ["translate_x", "rotate", "scale", "shear_y"])
def test_fused_central_tangent_equals_the_general_one(group):
    """references: ``layout_tangent`` (fused central difference) against :func:`tangent` on the
    grid view, for a grid, tokens with a prefix (contiguous and not) and a pair map."""
    g = ll.group(group)
    grid = Layout("grid", 2, 3, hw=(7, 6), y=(4.0, 1.5), x=(4.0, 1.5), input_hw=(28, 24))
    h = torch.randn(2, 5, 7, 6, dtype=torch.float64)
    assert rel(layout_tangent(h, grid, g), tangent(h, g, "central", grid.frame())) < AGREE
    tokens = Layout("tokens", token_dim=1, prefix=1, hw=(7, 6), y=(4.0, 1.5), x=(4.0, 1.5), input_hw=(28, 24))
    for t in (torch.randn(2, 43, 8, dtype=torch.float64), torch.randn(2, 8, 43, dtype=torch.float64).transpose(1, 2)):
        want = torch.cat([torch.zeros_like(t[:, :1]),
                          tangent(t[:, 1:].unflatten(1, (7, 6)), g, "central", tokens.frame()).flatten(1, 2)], 1)
        assert rel(layout_tangent(t, tokens, g), want) < AGREE
    pair = Layout("pair", token_dim=2, prefix=1, hw=(7, 6), y=(4.0, 1.5), x=(4.0, 1.5), input_hw=(28, 24),
                  key=Layout("tokens", token_dim=3, prefix=1, hw=(7, 6), y=(4.0, 1.5), x=(4.0, 1.5),
                             input_hw=(28, 24)))
    a = torch.randn(2, 3, 43, 43, dtype=torch.float64)
    want = sum(torch.cat([torch.zeros_like(a.narrow(d, 0, 1)),
                          tangent(a.narrow(d, 1, 42).unflatten(d, (7, 6)), g, "central",
                                  Frame(y_dim=d, x_dim=d + 1, channel_dim=None, y=tokens.frame().y,
                                        x=tokens.frame().x)).flatten(d, d + 1)], d) for d in (2, 3))
    assert rel(layout_tangent(a, pair, g), want) < AGREE


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_growing_source_stacks_equal_one_propagation_per_source(name):
    """references: the chunk's stacks grow where each source enters (zero-padded where branches
    meet); each slice equals the propagation of that source alone."""
    gm, x = _case(name)
    d = _defects(gm, x, "rotate", True)
    sources = _sources(d)
    chunk = sources[::max(1, len(sources) // 6)]  # spread over the depth, on branches and trunk
    with torch.no_grad(), jvp_ready(gm):
        stacked = _propagate_sources(gm, x, chunk, d)
        for i, n in enumerate(chunk):
            alone = Propagator(gm, primal=d.values, inject={n.name: lambda _, e=d.e[n]: e[None]}).propagate(x, None)[1]
            want = torch.zeros_like(stacked[i]) if alone is None else alone[0]
            assert float((stacked[i] - want).norm()) <= AGREE * max(float(want.norm()), 1e-30), n.name
    assert len(chunk) >= 4 and any(float(s.norm()) > 0 for s in stacked)


def test_rounding_level_defects_are_not_sources():
    """A 1x1 convolution without offset has ``e_v = 0`` (docs/method.md §3): its two computed terms differ
    by rounding only, under the floor, so it is no source; the GELU's defect is genuine."""
    net = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.GELU(), nn.Conv2d(4, 4, 3, padding=1))
    gm = ll.trace(net.eval(), softmax=False)
    d = _defects(gm, torch.randn(1, 3, 12, 12), "rotate", False)
    names = {n.name: n for n in d.e}
    assert names["_0"] in d.rounded and d.e[names["_0"]] is None
    assert names["_1"] in _sources(d) and names["_1"] not in d.rounded


def test_chunking_does_not_change_the_contributions():
    """references: one chunk for all sources, the default budget, and one source per chunk give
    the same contributions; the chunks follow the graph, more sources per chunk below small maps."""
    gm, x = _case("resnet18")
    d = _defects(gm, x, "rotate", True)
    sources = _sources(d)
    assert len(attribution._chunks(gm, sources, d, 1e12, x.device)) == 1
    with pytest.raises(ll.LayerlieError, match="too small for one source"):
        attribution._chunks(gm, sources, d, 1, x.device)
    small = attribution._chunks(gm, sources, d, 6 * max(memory.nbytes(d.values[n]) for n in sources), x.device)
    assert 1 < len(small) < len(sources) and max(len(c) for c in small[1:]) > len(small[0])
    tables = [ll.attribute(gm, x, "rotate", memory_budget=b).nodes["contribution_norm"] for b in (1e12, None)]
    assert float(((tables[0] - tables[1]).abs() / tables[0].clip(lower=1e-30)).max()) < AGREE
