"""The op registry (layerlie.ops): every entry checked on its own tiny example (references),
and the three readers of "is this node downsampling" agreeing on one model (analytic)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.layers import Conv2dSame
from torch import nn
from torch.utils import _pytree as pytree

import layerlie as ll
from layerlie.core import examples, ops
from layerlie.core.engine import Call, linearize
from layerlie.antialias.layers import PolyphaseSample
from layerlie.testing import TOL, registered_op, rel


K = 3  # tangents per stack: a rule must treat the stack axis as a batch of tangents
OPS = [ops.get_op(name) for name in ops.list_ops()]


def _name(op: ops.Op) -> str:
    return ops.op_name(op.key)


def _example(op: ops.Op) -> tuple[Callable[..., Any], tuple]:
    torch.manual_seed(0)
    return op.example(op.key)


def _jvp_stack(fn: Callable[..., Any], args: tuple, stack: Any) -> torch.Tensor:
    """The reference: ``torch.func.jvp`` of the op in its first argument (a tensor or a tuple of
    them), one tangent at a time."""
    return torch.stack([torch.func.jvp(lambda z: fn(z, *args[1:]), (args[0],),
                                       (pytree.tree_map(lambda t: t[k], stack),))[1] for k in range(K)])


def _rule_error(op: ops.Op) -> float:
    """``||rule - jvp|| / ||jvp||`` on the op's example: its own rule where it has one (which must
    not hand the example to the generic fallback), else the engine's generic linearization."""
    fn, args = _example(op)
    # as the engine binds a node: a tuple value (``unbind``'s output) is one argument
    flat, spec = pytree.tree_flatten((args, {}), is_leaf=lambda a: a is args[0])
    call = Call(fn, flat, spec, fn(*args))
    stack = pytree.tree_map(lambda a: torch.randn((K, *a.shape), dtype=a.dtype), args[0])
    got = op.linearize(call, {0: stack}) if op.linearize is not None else linearize(call, {0: stack}, op.key)
    assert got is not NotImplemented, f"{_name(op)}'s rule does not apply to its own example"
    want = _jvp_stack(fn, args, stack)
    assert got.shape == want.shape
    return rel(got, want)


def test_every_op_has_an_example():
    missing = [_name(op) for op in OPS if op.example is None]
    assert not missing, f"give these ops an example= in their entry: {missing}"


@pytest.mark.parametrize("op", OPS, ids=_name)
def test_linearization_equals_jvp(op):
    """references: each op's linearization (its rule, or the generic one) equals forward-mode AD
    of the op, in float64."""
    assert _rule_error(op) < TOL[torch.float64]


def test_a_wrong_rule_fails_conformance():
    """The conformance check can fail: a rule off by 10%, registered as a user would, is caught."""
    right = ops.get_op(nn.GELU)
    with registered_op():
        ll.register_rule(nn.GELU)(lambda call, tangents: 1.1 * right.linearize(call, tangents))
        assert ops.get_op(nn.GELU).linearize is not right.linearize
        assert _rule_error(ops.get_op(nn.GELU)) > 0.05


def test_a_rule_for_a_subclass_keeps_what_it_inherits():
    class Conv(nn.Conv2d):
        pass

    with registered_op():
        ll.register_rule(Conv)(ops.get_op(nn.Conv2d).linearize)
        assert ops.get_op(Conv).key is Conv and ops.get_op(Conv).window is ops.get_op(nn.Conv2d).window
        assert ops.module_type(Conv(3, 4, 3, stride=2)) == "strided/downsampling"


def test_a_subclass_with_its_own_forward_gets_no_inherited_rule():
    """A timm conv whose forward pads first must not take nn.Conv2d's rule (which skips the pad)."""
    assert ops.get_op(Conv2dSame).window is not None
    assert ops.linearization(Conv2dSame) is None
    assert ops.linearization(nn.Conv2d) is ops.get_op(nn.Conv2d).linearize


# --- pointwise in space ---------------------------------------------------------------------

def _pointwise_error(op: ops.Op, mixed: int | None = None) -> float:
    """How far the op is from commuting with a permutation of the positions of the axes that it
    does not mix: all but the batch for an elementwise op, those before the last ``k`` for a
    layer norm (``mixed`` overrides ``k``)."""
    fn, args = _example(op)
    x = args[0]
    if mixed is None:
        mixed = op.normalizes(fn, args, {}) if op.normalizes is not None else 0
    perm = torch.randperm(x.shape[1:x.ndim - mixed].numel())

    def shuffle(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1, t.ndim - mixed - 1)[:, perm].unflatten(1, t.shape[1:t.ndim - mixed])

    return rel(fn(shuffle(x), *args[1:]), shuffle(fn(*args)))


@pytest.mark.parametrize("op", [op for op in OPS if op.pointwise or op.normalizes is not None], ids=_name)
def test_pointwise_ops_commute_with_shuffling_the_positions(op):
    """invariants: an op registered as pointwise (in space where its mixed axes are not spatial)
    commutes with any permutation of the positions of the other axes."""
    assert _pointwise_error(op) < TOL[torch.float64]


def test_a_false_pointwise_claim_is_caught():
    """The check can fail: a LayerNorm said to mix no axis is caught mixing the last one."""
    assert _pointwise_error(ops.get_op(nn.LayerNorm), mixed=0) > 0.1


# --- windows: the receptive-field layout of a one-op graph -----------------------------------

def _one_op_graph(fn: Any, args: tuple) -> fx.GraphModule:
    """``fn`` as the only op of a graph; tensor arguments after the input become attributes."""
    root, graph = nn.Module(), fx.Graph()
    rest = []
    for i, a in enumerate(args[1:]):
        if isinstance(a, torch.Tensor):
            root.register_buffer(f"arg{i}", a)
            rest.append(graph.get_attr(f"arg{i}"))
        else:
            rest.append(a)
    x = graph.placeholder("x")
    if isinstance(fn, nn.Module):
        root.op = fn
        y = graph.call_module("op", (x, *rest))
    else:
        y = graph.call_function(fn, (x, *rest))
    graph.output(y)
    return fx.GraphModule(root, graph)


def _supports(fn: Callable[..., Any], args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """For every output sample, the input rows and columns that move it: ``(Ho, H)``, ``(Wo, W)``
    boolean masks, from one forward pass per input pixel set to 1 on zeros."""
    x = args[0][:1]
    _, c, h, w = x.shape
    bumps = torch.zeros(h * w, c, h * w, dtype=x.dtype)
    bumps[torch.arange(h * w), :, torch.arange(h * w)] = 1
    bumps = bumps.unflatten(-1, (h, w))
    with torch.no_grad():
        base = fn(torch.zeros_like(x), *args[1:])
        moved = (fn(bumps, *args[1:]) - base).abs().sum(1) > 0  # (h * w, Ho, Wo)
    moved = moved.unflatten(0, (h, w))  # (h, w, Ho, Wo); windows are rectangles
    return moved.any(1).any(-1).T, moved.any(0).any(1).T


def _window_error(op: ops.Op, slack: float = 0.0) -> float:
    """The largest gap, in input pixels, between where the layout of the one-op graph puts each
    output sample and the middle of the input pixels that move it (samples whose window is whole);
    infinite where a sample sits more than ``slack`` outside the pixels that move it. Samples
    placed outside the image are a padding's border: real samples of other content (zeros,
    reflections), which no input pixel at their place moves."""
    fn, args = _example(op)
    gm = _one_op_graph(fn, args)
    node = list(gm.graph.nodes)[-2]
    return _placement_error(fn, args, ll.infer_layouts(gm, args[0])[node.name], slack)


def _placement_error(fn: Callable[..., Any], args: tuple, lay: Any, slack: float = 0.0) -> float:
    """:func:`_window_error` for the layout ``lay`` of ``fn(*args)``."""
    assert lay.kind == "grid" and lay.hw == tuple(fn(*args).shape[-2:])
    worst = 0.0
    for (stride, offset), rows in zip((lay.y, lay.x), _supports(fn, args)):
        where = offset + stride * torch.arange(rows.shape[0], dtype=torch.float64)
        inside = (where >= 0) & (where <= rows.shape[1] - 1)
        where, rows = where[inside], rows[inside]
        index = torch.arange(rows.shape[1], dtype=torch.float64)
        first = torch.where(rows, index, torch.inf).amin(1)
        last = torch.where(rows, index, -torch.inf).amax(1)
        if ((where < first - slack - 1e-9) | (where > last + slack + 1e-9)).any():  # rounding of the positions
            return float("inf")
        whole = (last - first) == (last - first).max()
        assert whole.any()
        if isinstance(fn, PolyphaseSample):
            continue  # the kept phase follows the input, so a bump always lands on a sample
        worst = max(worst, float((where - (first + last) / 2)[whole].abs().max()))
    return worst


WINDOW_OPS = [op for op in OPS if op.window is not None]


@pytest.mark.parametrize("op", WINDOW_OPS, ids=_name)
def test_window_places_every_output_sample(op):
    """references: the layout that the window gives a one-op graph puts each output sample in
    the middle of the input pixels that move it (timm's 'same' paddings, dilation, reflect)."""
    assert _window_error(op) == 0.0


RESAMPLE_OPS = [op for op in OPS if op.resample is not None]


@pytest.mark.parametrize("op", RESAMPLE_OPS, ids=_name)
def test_resample_places_every_output_sample(op):
    """references: an op that moves samples without a window (``F.pad``, resizing, adaptive
    pooling, depth-to-space) gives the one-op graph its real output shape, and puts every
    output sample over the input pixels that move it, to within half a pixel (a resized sample
    sits between the pixels it blends); ``F.pad``, a pure shift, exactly in their middle."""
    exact = op.key in (F.pad, torch._C._nn.pad)
    assert _window_error(op, slack=0.0 if exact else 0.5) <= (0.0 if exact else 0.5 + 1e-9)


# align_corners exists for the interpolating modes only
MODES = [(m, False) for m in ("nearest", "nearest-exact", "bilinear", "bicubic", "area")] \
    + [(m, True) for m in ("bilinear", "bicubic")]


@pytest.mark.parametrize(("mode", "corners"), MODES)
@pytest.mark.parametrize("size", [dict(scale_factor=2.0), dict(scale_factor=1.5), dict(size=(7, 16))])
def test_interpolate_positions_in_every_mode(mode, corners, size):
    """references: ``F.interpolate`` in every mode, corners aligned or not, by size or by scale
    factor: the layout has the real output shape, and each sample sits within half a pixel of
    the input pixels that move it."""
    kwargs = dict(mode=mode, **size, **(dict(align_corners=True) if corners else {}))
    op = ops.Op(F.interpolate, resample=ops.get_op(F.interpolate).resample,
                example=lambda fn: (lambda x: fn(x, **kwargs), (examples.image(),)))
    fn, args = _example(op)
    gm = fx.symbolic_trace(_Call(fn))
    lay = ll.infer_layouts(gm, args[0])[list(gm.graph.nodes)[-2].name]
    assert _placement_error(fn, args, lay, slack=0.5) <= 0.5 + 1e-9


def test_a_wrong_resample_is_caught():
    """The check can fail: an ``F.pad`` rule that shifts the wrong way puts every sample a
    pixel or more from the pixel that it copies."""
    op = ops.get_op(F.pad)

    def backwards(fn, args, kwargs, out):
        return {d: (scale, -shift) for d, (scale, shift) in op.resample(fn, args, kwargs, out).items()}

    with registered_op(F.pad, resample=backwards):
        assert _window_error(ops.get_op(F.pad)) >= 1.0


def test_bilinear_positions_are_the_weights_centroids():
    """analytic: bilinear resizing blends the two pixels around ``(j + 1/2) / f - 1/2`` (pixel
    centres) or ``j (n - 1) / (m - 1)`` (corners): the centroid of each interior sample's weights
    is exactly where the layout puts it."""
    x = torch.zeros(1, 1, 9, 9, dtype=torch.float64, requires_grad=True)
    for kwargs in (dict(scale_factor=2.0), dict(scale_factor=1.5), dict(size=(14, 14), align_corners=True)):
        fn = _Call(lambda z: F.interpolate(z, mode="bilinear", **{"align_corners": False, **kwargs}))
        gm = fx.symbolic_trace(fn)
        lay = ll.infer_layouts(gm, x.detach())[list(gm.graph.nodes)[-2].name]
        assert lay.kind == "grid"
        y = fn(x)
        for j in range(2, y.shape[2] - 2):
            (g,) = torch.autograd.grad(y[0, 0, j, 4], x)
            centroid = float((g[0, 0].sum(1) * torch.arange(9.0, dtype=torch.float64)).sum() / g.sum())
            assert abs(lay.y[1] + lay.y[0] * j - centroid) < 1e-9, (kwargs, j)


def test_corners_taken_for_centres_are_caught():
    """The centroid check can fail: a rule that ignores ``align_corners`` misplaces the samples."""
    op = ops.get_op(F.interpolate)
    with registered_op(F.interpolate, resample=lambda fn, a, k, out: op.resample(fn, a, {**k, "align_corners": False},
                                                                                   out)):
        with pytest.raises(AssertionError, match="align_corners"):
            test_bilinear_positions_are_the_weights_centroids()


class _Call(nn.Module):
    """A function as the one module of a graph (fx opens it: its ops are the graph's nodes)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def test_a_wrong_window_is_caught():
    """The window check can fail: a padding off by one moves every sample by a pixel."""
    op = ops.get_op(nn.Conv2d)

    def off_by_one(fn, args, kwargs):
        w = op.window(fn, args, kwargs)
        return w._replace(padding=(w.padding[0] + 1, w.padding[1]))

    with registered_op(nn.Conv2d, window=off_by_one):
        assert _window_error(ops.get_op(nn.Conv2d)) >= 1.0


def test_timm_same_padding_is_read_from_the_input():
    """analytic: kernel 3, stride 2 'same' on 10 columns pads 1 in all, 0 before; on 11, 1 before."""
    w = ops.window(Conv2dSame(3, 4, 3, stride=2), (torch.zeros(1, 3, 11, 10),), {})
    assert w.padding == (1, 0) and w.stride == (2, 2)


# --- one decision: is this node downsampling ------------------------------------------------

class _Downsamplers(nn.Module):
    """One of each strided op next to a stride-1 control, every map at least 4 x 4 at 64 px."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.control = nn.Conv2d(8, 8, 3, padding=1)
        self.same = Conv2dSame(8, 8, 3, stride=2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.mix = nn.Conv2d(3, 8, 1)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.avg_pool2d(self.pool(self.same(torch.relu(self.control(self.conv(x))))), 2)
        b = self.mix(torch._C._nn.avg_pool2d(x, 2))
        c = self.patch(x)
        return self.head(torch.cat([t.mean((2, 3)) for t in (a, b, c)], 1))


def test_attribution_aliasing_and_surgery_agree_on_downsampling():
    """analytic: functional and module pools, a strided conv, timm's Conv2dSame at stride 2 and a
    patch embedding are downsampling to the layer types, to the alias measure and to surgery;
    the stride-1 convolutions are not."""
    torch.manual_seed(0)
    model = _Downsamplers().eval()
    x = torch.randn(1, 3, 64, 64)
    gm = ll.trace(model, x)
    want = {"conv", "same", "pool", "avg_pool2d", "avg_pool2d_1", "patch"}
    assert {n.name for n in gm.graph.nodes} >= want | {"control", "mix"}
    table = ll.attribute(gm, x, "translate_x").nodes
    by_type = set(table.loc[table["layer_type"] == "strided/downsampling", "node"])
    alias = ll.aliasing(gm, x)
    by_alias = set(alias.loc[alias["alias_kind"] == "downsampling", "node"])
    by_surgery = set(ll.antialias(gm).meta["layerlie.surgery"])
    assert by_type == by_alias == by_surgery == want
    assert set(alias.loc[alias["alias_kind"] == "downsampling", "layer_type"]) == {"strided/downsampling"}


def test_an_entry_without_its_window_breaks_the_agreement():
    """The agreement can fail: without a window in Conv2dSame's entry (as when each reader kept its
    own list of window ops), surgery no longer finds it and the layouts after it are lost."""
    with registered_op(Conv2dSame, window=None), pytest.raises(AssertionError, match=r"\} == \{"):
        test_attribution_aliasing_and_surgery_agree_on_downsampling()


def test_register_layer_type_and_register_op_check_the_kind():
    class Gate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    with registered_op():
        ll.register_layer_type(Gate, "norm")
        gm = _one_op_graph(Gate(), (torch.zeros(1),))
        node = next(n for n in gm.graph.nodes if n.op == "call_module")
        assert ops.layer_type(gm, node) == "norm" and ops.module_type(Gate()) == "norm"
    with pytest.raises(ll.LayerlieError, match="unknown layer type 'gate'; valid: attention, conv"):
        ops.register_op(Gate, layer_type="gate")


class _Plain(nn.Module):
    """A plain CNN with a linear layer as a module and as a function: no attention anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 6)
        self.weight = nn.Parameter(torch.randn(4, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.fc(torch.relu(self.conv(x)).mean((2, 3))), self.weight)


def test_linear_layers_and_the_appended_softmax_have_their_own_types():
    """A linear layer is `linear`, not `conv`; the softmax that layerlie appends to measure the
    published LEE is the `output`, so a plain CNN has no attention row, and a ViT's own softmaxes
    stay attention."""
    torch.manual_seed(0)
    table = ll.attribute(_Plain().eval(), torch.randn(1, 3, 16, 16), "rotate").nodes
    types = table.set_index("node")["layer_type"]
    assert (types["conv"], types["fc"], types["linear"]) == ("conv", "linear", "linear")
    assert "attention" not in set(types) and list(types[types == "output"].index) == [table["node"].iloc[-1]]
    assert "output" not in set(ll.attribute(_Plain().eval(), torch.randn(1, 3, 16, 16), "rotate",
                                            output="logits").nodes["layer_type"])
    vit = ll.load_model("vit_tiny_patch16_224", img_size=32, depth=1)
    types = ll.attribute(vit, torch.randn(1, 3, 32, 32), "rotate", estimator="shares").nodes.set_index("node")["layer_type"]
    assert (types["blocks_0_attn_qkv"], types["head"], types["softmax"]) == ("linear", "linear", "attention")
    assert (types == "output").sum() == 1 and types.iloc[-1] == "output"
    assert ops.LAYER_TYPES[-1] == "output" and ll.list_layer_types() == sorted(ops.LAYER_TYPES)
