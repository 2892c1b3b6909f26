"""Layouts by probing (layerlie.probe, docs/method.md §5): probing agrees with every explicit rule, decides
the ops that no rule knows (said so in the layout column), says "unknown" for global mixing,
runs once per (op, input layout, shape), and gives the hooks fallback its layouts; the
attribution summary counts unknown tensor nodes only."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn

import layerlie as ll
from layerlie.core import layout, ops, probe
from layerlie.measure.hooks import guessed_layout, module_layouts
from layerlie.antialias.layers import PolyphaseSample
from layerlie.testing import TOL, registered_op


def _graph(fn: Any, *rest: Any) -> fx.GraphModule:
    """``fn(x, *rest)`` as the only op of a graph."""
    root, graph = nn.Module(), fx.Graph()
    x = graph.placeholder("x")
    if isinstance(fn, nn.Module):
        root.op = fn
        y = graph.call_module("op", (x, *rest))
    else:
        for i, a in enumerate(rest):
            if isinstance(a, torch.Tensor):
                root.register_buffer(f"arg{i}", a)
        rest = tuple(graph.get_attr(f"arg{i}") if isinstance(a, torch.Tensor) else a for i, a in enumerate(rest))
        y = graph.call_function(fn, (x, *rest))
    graph.output(y)
    return fx.GraphModule(root, graph)


def _rule_and_probe(fn: Any, x: torch.Tensor, *rest: Any, **kwargs: Any) -> tuple[tuple, tuple]:
    """The ``(y, x)`` positions that the op's rule gives its output grid, and those probing finds."""
    gm = _graph(fn, *rest)
    lay = ll.infer_layouts(gm, x)[list(gm.graph.nodes)[-2].name]
    assert lay.kind == "grid" and not lay.probed
    return (lay.y, lay.x), probe.probe_axes(lambda z: fn(z, *rest), x, (2, 3))


def _registry_cases() -> list:
    """Every registry entry with a window or a resample rule whose positions are exact, on its
    own example: not resizing, nor adaptive pooling, whose example has unequal bins (both below,
    on sizes that divide); the polyphase sampler keeps the phase that its input picks, so where
    it sits depends on the values."""
    resizing = (F.interpolate, nn.Upsample, nn.PixelShuffle, F.pixel_shuffle, nn.AdaptiveAvgPool2d,
                F.adaptive_avg_pool2d, nn.AdaptiveMaxPool2d, F.adaptive_max_pool2d)
    cases = []
    for op in map(ops.get_op, ops.list_ops()):
        if (op.window is not None or op.resample is not None) and op.key is not PolyphaseSample \
                and op.key not in resizing:
            fn, args = op.example(op.key)
            if args[0].ndim == 4:
                cases.append(pytest.param(fn, args[0], args[1:], id=getattr(op.key, "__name__", str(op.key))))
    return cases


X = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
CONVS = [pytest.param(nn.Conv2d(3, 4, 3, stride=s, padding=p, dilation=d).double(), X, (), id=f"conv-s{s}-p{p}-d{d}")
         for s in (1, 2, 3) for p in (0, 1, 2) for d in (1, 2)]
OTHERS = [
    pytest.param(nn.Conv2d(3, 8, 4, stride=4).double(), X, (), id="patch-embed-4"),
    pytest.param(nn.Conv2d(3, 8, (2, 4), stride=(2, 4)).double(), X, (), id="patch-embed-2x4"),
    pytest.param(Conv2dSame(3, 4, 5, stride=3).double(), X, (), id="conv-same-5-s3"),
    pytest.param(nn.MaxPool2d(3, 2, 1), X, (), id="maxpool-3-2-1"),
    pytest.param(nn.AvgPool2d(2, ceil_mode=True), X, (), id="avgpool-2-ceil"),
    pytest.param(nn.AdaptiveAvgPool2d((4, 8)), X, (), id="adaptive-avg-4x8"),
    pytest.param(F.adaptive_max_pool2d, X, ((8, 4),), id="adaptive-max-8x4"),
    pytest.param(nn.PixelUnshuffle(4), X, (), id="pixel-unshuffle-4"),
    *[pytest.param(F.pad, X, ((2, 1, 1, 3), mode), id=f"F.pad-{mode}")
      for mode in ("constant", "reflect", "replicate", "circular")],
]


@pytest.mark.parametrize(("fn", "x", "rest"), _registry_cases() + CONVS + OTHERS)
def test_probing_agrees_with_the_rule(fn, x, rest):
    """references: on every op that has an explicit rule (convolutions with every stride,
    padding and dilation, pools, patch embeddings, padding ops, space-to-depth, adaptive
    pools), probing its receptive field gives the rule's stride and offset on both axes."""
    rule, probed = _rule_and_probe(fn, x, *rest)
    assert probed is not None
    assert [v for axis in probed for v in axis] == pytest.approx([v for axis in rule for v in axis], abs=1e-9)


def test_a_wrong_rule_disagrees_with_probing():
    """The agreement can fail: a padding rule that forgets the padding is off by its padding."""
    with registered_op(nn.ReflectionPad2d, window=lambda fn, a, k: ops.Window((1, 1), (1, 1), (0, 0), (1, 1))):
        rule, probed = _rule_and_probe(nn.ReflectionPad2d((2, 1, 1, 3)), X)
    assert rule == ((1.0, 0.0), (1.0, 0.0)) and probed == ((1.0, -1.0), (1.0, -2.0))


class LpNet(nn.Module):
    """A conv net whose downsampling is ``nn.LPPool2d``, an op with no entry in the registry."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.LPPool2d(2, 3, stride=2)
        self.head = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.pool(torch.relu(self.conv(x)) + 0.1)).mean((2, 3)))


def test_an_op_no_rule_knows_is_probed_and_said_so():
    """analytic: LPPool2d(kernel 3, stride 2) sits where AvgPool2d(3, 2) does, stride 2, offset
    1; the layout column says that probing decided, the rule-placed nodes after it do not; the
    attribution stays complete."""
    torch.manual_seed(0)
    model = LpNet().double().eval()
    x = torch.rand(1, 3, 16, 16, dtype=torch.float64) + 0.5
    gm = ll.trace(model)
    lay = ll.infer_layouts(gm, x)
    assert lay["pool"].y == lay["pool"].x == (2.0, 1.0) and lay["pool"].hw == (7, 7)
    a = ll.attribute(gm, x, "rotate", output="logits")
    layouts = a.nodes.set_index("node")["layout"]
    assert layouts["pool"] == "grid(y=2,x=3), probed" and layouts["head"] == "grid(y=2,x=3)"
    assert a.residual <= TOL[torch.float64]


def test_without_probing_the_unknown_op_is_unknown(monkeypatch):
    """The probed layout is probing's doing: without it the pool and everything after are unknown."""
    monkeypatch.setattr(layout, "probe_axes", lambda *a, **k: None)
    lay = ll.infer_layouts(ll.trace(LpNet().double().eval()), torch.rand(1, 3, 16, 16, dtype=torch.float64))
    assert lay["pool"].kind == "unknown" and lay["head"].kind == "unknown"


class Mixing(nn.Module):
    """An op with no entry that drops the last column after mixing: over a whole axis, or
    along a window that grows (a cumulative sum)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = torch.cumsum(x, 3) if self.how == "cumsum" else F.normalize(x, dim=2)
        return mixed[..., :-1]


@pytest.mark.parametrize("how", ["cumsum", "normalize-over-rows"])
def test_global_mixing_is_unknown_and_said_so(how):
    """invariants: an op whose output samples each depend on a whole axis (a normalisation
    over the rows) or on a window that grows along it (a cumulative sum) has no sample
    positions: ``unknown``, said as probed. The same op without the mixing is placed."""
    gm = _graph(Mixing(how))
    lay = ll.infer_layouts(gm, torch.randn(1, 3, 12, 12))["op"]
    assert lay.kind == "unknown" and lay.describe() == "unknown, probed"
    crop = ll.infer_layouts(_graph(_Crop()), torch.randn(1, 3, 12, 12))["op"]
    assert crop.describe() == "grid(y=2,x=3), probed" and crop.x == (1.0, 0.0) and crop.hw == (12, 11)


class _Crop(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :-1]


def test_probing_runs_once_per_op_layout_and_shape(monkeypatch):
    """The probe of an op is cached per (op, input layout, shape): a second pass over the same
    graph probes nothing, a new input size probes again."""
    calls = []
    real = probe._probe
    monkeypatch.setattr(probe, "_probe", lambda *a: calls.append(a[1].shape) or real(*a))
    gm = ll.trace(LpNet().eval())
    ll.infer_layouts(gm, torch.rand(1, 3, 16, 16))
    assert len(calls) == 1
    ll.infer_layouts(gm, torch.rand(1, 3, 16, 16))
    assert len(calls) == 1
    ll.infer_layouts(gm, torch.rand(1, 3, 20, 20))
    assert len(calls) == 2


class NormPool(nn.Module):
    """A module with no entry that holds a batch norm: probing must not train it."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(3)
        self.pool = nn.LPPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.norm(x))


def test_probing_leaves_a_training_module_as_it_was():
    """A module in training mode is probed in eval mode and put back: its running statistics
    move by the one forward pass of the propagation, not by the probe's dozens."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    probed, plain = NormPool().train(), NormPool().train()
    lay = ll.infer_layouts(_graph(probed), x)["op"]
    plain(x)
    assert lay.x == (2.0, 0.5) and lay.probed and probed.training
    assert torch.equal(probed.norm.running_mean, plain.norm.running_mean)
    assert int(probed.norm.num_batches_tracked) == 1


# --- the hooks fallback -------------------------------------------------------------------

class ValidStride(nn.Module):
    """A custom strided module: a 3 x 3 convolution without padding at stride 2."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, c, 3, 3) / 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, stride=2)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.down = ValidStride(4)
        self.act = nn.GELU()
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if h.sum() > 1e9:  # control flow on a value: fx cannot trace this model
            h = -h
        return self.fc(self.act(self.down(h)).mean((2, 3)))


def test_hooks_fallback_probes_a_custom_strided_module():
    """analytic: the 15 x 15 output of a valid 3 x 3 stride-2 convolution of a 32 x 32 grid sits
    at stride 2, offset 1 (guessing from shapes cannot tell: 32 is no multiple of 15); the
    GELU after it keeps that layout; the module attribution stays complete."""
    torch.manual_seed(0)
    model = Untraceable().double().eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    lay = module_layouts(model, x)
    h = model.down(model.stem(x))
    assert guessed_layout(h, (32, 32)).kind == "unknown"
    assert lay["down"].y == lay["down"].x == (2.0, 1.0) and lay["down"].describe() == "grid(y=2,x=3), probed"
    assert lay["act:in0"] == lay["down"] and lay["act"].x == (2.0, 1.0)
    with pytest.warns(UserWarning, match="forward hooks"):
        a = ll.attribute(model, x, "rotate", output="logits")
    assert a.residual <= TOL[torch.float64]
    assert a.nodes.set_index("node").loc["down", "layout"] == "grid(y=2,x=3), probed"


# --- the unknown count --------------------------------------------------------------------

class Tile(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return torch.cat([x, x], 3).mean((2, 3)).reshape(b, -1)


def test_summary_counts_unknown_tensor_nodes_and_names_the_first():
    """analytic: of cat (along a spatial axis: unknown), mean and reshape, one tensor node is
    unknown; the shape and its item are not tensors and are not counted."""
    gm = ll.trace(Tile())
    a = ll.attribute(gm, torch.randn(1, 3, 8, 8), "translate_x", output="logits")
    assert set(a.nodes["node"]) >= {"cat", "mean", "reshape"} and len(a.nodes) == 5
    assert "unknown layouts: 1 of 3 tensor nodes (33.3%); the first is cat" in a.summary()
