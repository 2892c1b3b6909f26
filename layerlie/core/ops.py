"""One registry of what layerlie knows about each op (docs/method.md §3, 5, 6; docs/design.md §7).

An op is a module class (matched through its MRO, so timm's ``Conv2dSame`` or ``StdConv2d``
count as convolutions), a function, or a tensor-method name. Its :class:`Op` entry holds all of
its knowledge: its layer type (docs/method.md §3), its linearization rule for the engine (docs/design.md §7),
whether it is pointwise in space, its window for receptive-field layouts (docs/method.md §5), its
dense output at stride 1 and module form (docs/method.md §6), the surgery policies that replace it,
and a tiny example on which the conformance tests check all of that. Adding an op is one
:func:`register_op` call; layout inference, the engine, attribution, the alias measure and
surgery read nothing else.

Example:
    >>> from torch import nn
    >>> from timm.layers import Conv2dSame
    >>> op = get_op(Conv2dSame)
    >>> op.layer_type, op.substitutes
    ('conv', ('blurpool', 'aps'))
    >>> strided(Conv2dSame(3, 8, 3, stride=2))
    True
"""

from __future__ import annotations

import copy
import dataclasses
import fractions
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
from torch import nn
from torchvision.models import swin_transformer

from layerlie.errors import LayerlieError

if TYPE_CHECKING:
    from layerlie.core.layout import Layout
    from layerlie.core.engine import Call

LAYER_TYPES = ("nonlinearity", "strided/downsampling", "conv", "linear", "norm", "attention", "residual add",
               "reshape/other", "output")
"""The layer types of the tables (docs/method.md §3); ``output`` is the softmax appended as the measured
output (docs/method.md §2), which is not a layer of the model."""

Tangents = dict[int, Any]
Rule = Callable[["Call", Tangents], Any]
"""``(call, tangents) -> tangent stack of the output``, or ``NotImplemented`` to let the engine
take ``torch.func.jvp`` under ``vmap``."""
Example = Callable[[Any], tuple[Callable[..., Any], tuple]]


class Window(NamedTuple):
    """A spatial window op's geometry, ``(y, x)`` pairs (docs/method.md §5); ``padding`` is before. The
    kernel of a functional convolution is None where its weight is a graph node, not a value
    (whether an op is strided needs only its stride)."""

    kernel: tuple[int, int] | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


WindowFn = Callable[[Any, Sequence[Any], Mapping[str, Any]], Window]
Axes = dict[int, tuple[float, float]]
ResampleFn = Callable[[Any, Sequence[Any], Mapping[str, Any], torch.Tensor], Axes]


@dataclasses.dataclass(frozen=True)
class Op:
    """Everything layerlie knows about one op.

    Attributes:
        key: the module class, function or tensor-method name.
        layer_type: one of :data:`LAYER_TYPES`, or a function of the node (a residual add
            needs two tensor inputs).
        linearize: the engine's rule (docs/design.md §7); None: ``torch.func.jvp`` under ``vmap``.
        pointwise: applied elementwise, so pointwise in space (an activation, docs/method.md §6).
        normalizes: ``(fn, args, kwargs) -> k`` for an op that mixes only its last ``k`` axes
            (a layer norm): pointwise in space where none of them is spatial.
        window: ``(fn, args, kwargs) -> Window`` for a 2-D window op (convolution, pooling,
            padding modules, space-to-depth).
        resample: ``(fn, args, kwargs, out) -> {axis: (scale, shift)}`` for an op that moves
            samples without a window (``F.pad`` on any axes, upsampling, adaptive pooling,
            depth-to-space): output sample ``j`` of each input axis named sits at input sample
            ``shift + scale * j``; the axes not named keep their samples (docs/method.md §5).
        dense: ``call -> output at stride 1`` on the same input (docs/method.md §6, the alias measure).
        module: ``(node args, node kwargs) -> nn.Module | None``: a functional op as a module.
        substitutes: the surgery policies that may replace it.
        example: ``key -> (callable, args)``: a tiny float64 instance for the conformance tests.
    """

    key: Any
    layer_type: Union[str, Callable[[fx.Node], str]] = "reshape/other"
    linearize: Rule | None = None
    pointwise: bool = False
    normalizes: Callable[[Any, Sequence[Any], Mapping[str, Any]], int] | None = None
    window: WindowFn | None = None
    resample: ResampleFn | None = None
    dense: Callable[[Call], Any] | None = None
    module: Callable[[tuple, dict], Union[nn.Module, None]] | None = None
    substitutes: tuple[str, ...] = ()
    example: Example | None = None


_OPS: dict[Any, Op] = {}


def register_op(*keys: Any, **knowledge: Any) -> None:
    """Register one :class:`Op` entry per key, with the fields given as keywords (replacing
    an entry already there).

    Example:
        >>> class Swish(nn.Module):
        ...     def forward(self, x):
        ...         return x * torch.sigmoid(x)
        >>> register_op(Swish, layer_type="nonlinearity", linearize=get_op(nn.SiLU).linearize, pointwise=True,
        ...             substitutes=("filtered",), example=module_example())
        >>> get_op(Swish).substitutes
        ('filtered',)
    """
    kind = knowledge.get("layer_type", "reshape/other")
    if isinstance(kind, str) and kind not in LAYER_TYPES:
        raise LayerlieError(f"unknown layer type {kind!r}; valid: {', '.join(LAYER_TYPES)}")
    for key in keys:
        _OPS[key] = Op(key, **knowledge)


def _update(key: Any, **knowledge: Any) -> None:
    """Change some fields of ``key``'s entry; a class without one of its own starts from the
    entry it inherits, so a rule registered for a subclass keeps its window and layer type."""
    base = get_op(key)
    if base is None:
        register_op(key, **knowledge)
    else:
        _OPS[key] = dataclasses.replace(base, key=key, **knowledge)


def register_rule(*keys: Any) -> Callable[[Rule], Rule]:
    """Register a linearization rule for ops (functions, method names, module classes), as a
    decorator. A rule gets ``(call, tangents)``, where ``tangents`` maps flat-argument
    positions to ``(K, *shape)`` stacks, and returns the output's tangent stack (docs/design.md §7)."""

    def deco(rule: Rule) -> Rule:
        for key in keys:
            _update(key, linearize=rule)
        return rule

    return deco


def register_layer_type(cls: Any, kind: str) -> Any:
    """Count the op ``cls`` (a module class and its subclasses, or a function) as layer type
    ``kind``, one of :data:`LAYER_TYPES` (docs/method.md §3)."""
    if kind not in LAYER_TYPES:
        raise LayerlieError(f"unknown layer type {kind!r}; valid: {', '.join(LAYER_TYPES)}")
    _update(cls, layer_type=kind)
    return cls


def get_layer_type(key: Any) -> str | None:
    """The layer type registered for ``key`` (a module class finds its nearest registered base),
    or None where it has none or it depends on the node."""
    op = get_op(key)
    return None if op is None or callable(op.layer_type) else op.layer_type


def list_layer_types() -> list[str]:
    """The layer types of the tables, :data:`LAYER_TYPES`."""
    return list(LAYER_TYPES)


def op_key(gm: fx.GraphModule, node: fx.Node) -> Any:
    """The registry key of ``node``'s op: its module's class, its function or its method name."""
    return type(gm.get_submodule(node.target)) if node.op == "call_module" else node.target


def get_op(key: Any, node: fx.Node | None = None) -> Op | None:
    """The entry of an op, ``get_op(key)`` or ``get_op(gm, node)``; a module class finds its
    nearest registered base. None for an op with no entry (a generic one)."""
    if node is not None:
        if node.op not in ("call_module", "call_function", "call_method"):
            return None
        key = op_key(key, node)
    if isinstance(key, type):
        return next((_OPS[c] for c in key.__mro__ if c in _OPS), None)
    try:
        return _OPS.get(key)
    except TypeError:  # an unhashable call target
        return None


def list_ops() -> list[Op]:
    """Every registered entry, in registration order."""
    return list(_OPS.values())


def linearization(key: Any) -> Rule | None:
    """The rule for ``key``. A subclass with a ``forward`` of its own computes something else
    than the class whose rule it would inherit (timm's ``BatchNormAct2d``), so it gets none."""
    op = get_op(key)
    if op is None or op.linearize is None:
        return None
    if isinstance(key, type) and key is not op.key and getattr(key, "forward", None) is not op.key.forward:
        return None
    return op.linearize


def get_rule(key: Any) -> Rule | None:
    """The linearization rule registered for ``key``, or None (then ``torch.func.jvp`` of the op)."""
    return linearization(key)


def list_rules() -> list[Any]:
    """The keys whose entry has a linearization rule."""
    return [op.key for op in list_ops() if op.linearize is not None]


def _fn_key(fn: Any) -> Any:
    return type(fn) if isinstance(fn, nn.Module) else fn


def window(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Window | None:
    """The window of ``fn`` (a module or a function) called on ``args``, or None."""
    op = get_op(_fn_key(fn))
    return op.window(fn, args, kwargs) if op is not None and op.window is not None else None


def resample(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any], out: torch.Tensor) -> Axes | None:
    """Where ``fn`` (a module or a function) puts its output samples, per input axis, or None."""
    op = get_op(_fn_key(fn))
    return op.resample(fn, args, kwargs, out) if op is not None and op.resample is not None else None


def strided(fn: Any, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None) -> bool:
    """Whether ``fn`` (a module or a function) is a window op with a stride above 1; False where
    its window arguments are graph nodes rather than values."""
    try:
        w = window(fn, args, kwargs or {})
    except TypeError:
        return False
    return w is not None and max(w.stride) > 1


def is_pointwise(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` applies a pointwise (elementwise) op."""
    op = get_op(gm, node)
    return op is not None and op.pointwise


def is_pointwise_in_space(gm: fx.GraphModule, node: fx.Node, args: Sequence[Any], kwargs: Mapping[str, Any],
                          spatial: Sequence[int]) -> bool:
    """Whether ``node``, called on ``args``, acts on each position of the ``spatial`` axes of
    its input on its own (docs/method.md §6): an elementwise op, or one that mixes only trailing axes
    that are not spatial (a LayerNorm over channels)."""
    op = get_op(gm, node)
    if op is None or op.pointwise:
        return op is not None
    if op.normalizes is None or not args or not isinstance(args[0], torch.Tensor):
        return False
    fn = gm.get_submodule(node.target) if node.op == "call_module" else node.target
    ndim = args[0].ndim
    return all(d % ndim < ndim - op.normalizes(fn, args, kwargs) for d in spatial)


def is_strided(gm: fx.GraphModule, node: fx.Node, values: Mapping[fx.Node, Any] | None = None,
               layout: Callable[[fx.Node], Layout] | None = None) -> bool:
    """Whether ``node`` lowers the resolution (docs/method.md §6): a window op by its stride, any other op
    by its layouts (``layout(node)``, docs/method.md §5), where the samples of a spatial input are
    denser than the output's (slicing, space-to-depth). ``values`` fill in tensor arguments."""
    op = get_op(gm, node)
    if op is not None and op.window is not None:
        fn = gm.get_submodule(node.target) if node.op == "call_module" else node.target
        args = fx.node.map_arg(node.args, lambda a: values.get(a, a)) if values is not None else node.args
        return strided(fn, args, node.kwargs)
    if layout is None or not layout(node).spatial:
        return False
    out = layout(node)
    return any(layout(p).spatial and (layout(p).x[0] < out.x[0] or layout(p).y[0] < out.y[0])
               for p in node.all_input_nodes)


def layer_type(gm: fx.GraphModule, node: fx.Node, strided_node: bool | None = None) -> str:
    """The layer type of a node, for aggregation (docs/method.md §3). A strided node (``strided_node``,
    from :func:`is_strided` with layouts; by default from the op's window) is a downsampling layer
    unless its op says it is a norm, an activation or an attention op. The softmax that
    :func:`layerlie.model.trace.with_output` appends is the ``output``."""
    if node.name == gm.meta.get("layerlie.outputs", {}).get("softmax"):
        return "output"
    if strided_node is None:
        strided_node = is_strided(gm, node)
    op = get_op(gm, node)
    if op is not None:
        kind = op.layer_type(node) if callable(op.layer_type) else op.layer_type
        return "strided/downsampling" if strided_node and kind in ("conv", "linear", "reshape/other") else kind
    if strided_node:
        return "strided/downsampling"
    target = op_key(gm, node) if node.op in ("call_module", "call_function", "call_method") else node.target
    # timm's own norms (RmsNorm, FrozenBatchNorm2d, ...) have no entry; their names say what they are
    return "norm" if "Norm" in getattr(target, "__name__", str(target)) else "reshape/other"


def module_type(m: nn.Module) -> str | None:
    """The layer type of a module from its class, or None without an entry (docs/method.md §3)."""
    op = get_op(type(m))
    if op is None or callable(op.layer_type):
        return None
    return "strided/downsampling" if op.layer_type == "conv" and strided(m) else op.layer_type


def pair(v: Any) -> tuple[int, int]:
    """``(y, x)`` from an int or a one- or two-item sequence."""
    if isinstance(v, int):
        return v, v
    if not isinstance(v, Sequence) or not 1 <= len(v) <= 2:
        raise TypeError(f"expected an int or one or two ints, got {v!r}")
    return int(v[0]), int(v[-1])


def stride_one(layer: nn.Module) -> nn.Module:
    """A shallow twin of ``layer`` at stride 1: the same class (so the same forward, timm's conv
    subclasses included), sharing its parameter and buffer tensors."""
    twin = copy.copy(layer)
    twin.__dict__.update({k: copy.copy(v) for k, v in layer.__dict__.items() if isinstance(v, dict)})
    twin.stride = (1, 1) if isinstance(layer.stride, tuple) else 1
    return twin


# --- windows (docs/method.md §5) ---------------------------------------------------------------------

def _same_before(size: int, k: int, s: int, d: int) -> int:
    """The padding before an axis under timm's dynamic 'same' padding (``pad_same``)."""
    total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2


def _same(w: Window, args: Sequence[Any]) -> Window:
    """``w`` with the padding that timm's 'same' layers add at run time, for the input in ``args``."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor):
        return w
    pad = tuple(_same_before(n, k, s, d) for n, k, s, d in zip(x.shape[-2:], w.kernel, w.stride, w.dilation))
    return w._replace(padding=pad)


def _conv_window(conv: nn.Conv2d, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Window:
    pad = conv.padding
    if isinstance(pad, str):
        pad = (0, 0) if pad == "valid" else tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    w = Window(pair(conv.kernel_size), pair(conv.stride), pair(pad), pair(conv.dilation))
    return _same(w, args) if getattr(conv, "same_pad", False) else w  # timm's StdConv2dSame


def _pool_window(pool: nn.MaxPool2d | nn.AvgPool2d, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Window:
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return Window(pair(pool.kernel_size), pair(stride), pair(pool.padding), pair(getattr(pool, "dilation", 1)))


def _always_same(window_fn: WindowFn) -> WindowFn:
    return lambda fn, args, kwargs: _same(window_fn(fn, args, kwargs), args)


_MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_POOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_CONV_ARGS = ("weight", "bias", "stride", "padding", "dilation", "groups")


def _given(names: Sequence[str], args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A functional op's arguments after the input, by name."""
    return {**dict(zip(names, args[1:])), **kwargs}


def _functional_pool_window(names: Sequence[str]) -> WindowFn:
    def window_of(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Window:
        given = _given(names, args, kwargs)
        k = given["kernel_size"]
        stride = given.get("stride") or k  # None or torch's [] mean the kernel size
        return Window(pair(k), pair(stride), pair(given.get("padding", 0)), pair(given.get("dilation", 1)))

    return window_of


def _functional_conv_window(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Window:
    given = _given(_CONV_ARGS, args, kwargs)
    weight = given["weight"]
    kernel = pair(tuple(weight.shape[-2:])) if isinstance(weight, torch.Tensor) else None
    return Window(kernel, pair(given.get("stride", 1)),
                  pair(given.get("padding", 0)), pair(given.get("dilation", 1)))


def _pad_window(pad: nn.modules.padding._ConstantPadNd, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Window:
    """A 2-D padding module: a kernel-1, stride-1 window whose padding is the module's (left,
    right, top, bottom) before; the padded border holds real samples of other content."""
    left, _, top, _ = pad.padding
    return Window((1, 1), (1, 1), (top, left), (1, 1))


def _unshuffle_window(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Window:
    """Space-to-depth by ``r``: each output sample holds an ``r x r`` block, centred on it."""
    r = fn.downscale_factor if isinstance(fn, nn.Module) else _given(("downscale_factor",), args, kwargs)[
        "downscale_factor"]
    return Window((r, r), (r, r), (0, 0), (1, 1))


def _functional_pad(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any], out: torch.Tensor) -> Axes:
    """``F.pad(x, pad)``: ``pad`` lists (before, after) from the last axis backwards; every
    padded axis shifts by its padding before, in every mode."""
    pad, ndim = _given(("pad",), args, kwargs)["pad"], args[0].ndim
    return {ndim - 1 - i: (1.0, -float(pad[2 * i])) for i in range(len(pad) // 2)}


def _module_pad(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any], out: torch.Tensor) -> Axes:
    return _functional_pad(F.pad, (args[0], fn.padding), {}, out)


def _half_pixel(n_in: int, n_out: int, scale: float | None = None) -> tuple[float, float]:
    """Output sample ``j`` at input sample ``(j + 1/2) * scale - 1/2``, ``scale = n_in / n_out``
    unless the op's scale factor says otherwise: the centres of resized pixels, of adaptive
    pooling's bins, of depth-to-space's sub-samples."""
    scale = n_in / n_out if scale is None else scale
    return scale, (scale - 1) / 2


def _nearest(n_in: int, n_out: int, scale: float | None = None) -> tuple[float, float]:
    """Legacy ``nearest`` copies pixel ``floor(j * scale)``: the line through the mean of those
    copies, ``scale * j - (q - 1) / (2 q)`` for ``scale = p / q`` (pixel centres again where the
    factor is an integer)."""
    scale = n_in / n_out if scale is None else scale
    q = fractions.Fraction(scale).limit_denominator(max(n_out, 1)).denominator
    return scale, -(q - 1) / (2 * q)


def _resized(x: torch.Tensor, out: torch.Tensor, factor: Any, align_corners: bool | None,
             recompute: bool | None, mode: str = "nearest") -> Axes:
    """Resizing of the axes after the channels (docs/method.md §5): corners on corners with
    ``align_corners``, else pixel centres, or legacy ``nearest``'s copies; a scale factor that
    is not recomputed sets the spacing itself, as in torch's source-index arithmetic."""
    axes: Axes = {}
    dims = range(2, x.ndim)
    factors = [None] * len(dims) if factor is None or recompute else \
        ([factor] * len(dims) if isinstance(factor, (int, float)) else list(factor))
    for d, f in zip(dims, factors):
        n_in, n_out = x.shape[d], out.shape[d]
        if align_corners:
            axes[d] = ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0, 0.0)
        else:
            axes[d] = (_nearest if mode == "nearest" else _half_pixel)(n_in, n_out, 1 / f if f else None)
    return axes


_INTERPOLATE_ARGS = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")


def _interpolate(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any], out: torch.Tensor) -> Axes:
    given = _given(_INTERPOLATE_ARGS, args, kwargs)
    return _resized(args[0], out, given.get("scale_factor"), given.get("align_corners"),
                    given.get("recompute_scale_factor"), given.get("mode", "nearest"))


def _upsample(fn: nn.Upsample, args: Sequence[Any], kwargs: Mapping[str, Any], out: torch.Tensor) -> Axes:
    return _resized(args[0], out, fn.scale_factor, fn.align_corners, fn.recompute_scale_factor, fn.mode)


def _centres(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any], out: torch.Tensor) -> Axes:
    """Adaptive pooling, each output sample at the centre of its bin (exact where the size
    divides, within half a pixel otherwise), and depth-to-space by ``r``, ``r`` sub-samples
    per input sample centred on it: both are pixel centres on the last two axes."""
    x = args[0]
    return {d: _half_pixel(x.shape[d], out.shape[d]) for d in (x.ndim - 2, x.ndim - 1)}


# --- stride-1 twins and module forms (docs/method.md §6) ---------------------------------------------

def _module_dense(call: Call) -> Any:
    args, kwargs = call.rebuild()
    return stride_one(call.fn)(*args, **kwargs)


def _functional_dense(names: Sequence[str]) -> Callable[[Call], Any]:
    where = names.index("stride") + 1

    def dense(call: Call) -> Any:
        args, kwargs = call.rebuild()
        if len(args) > where:
            args = (*args[:where], 1, *args[where + 1:])
        else:
            kwargs = {**kwargs, "stride": 1}
        return call.fn(*args, **kwargs)

    return dense


def _pool_module(cls: type[nn.Module], names: Sequence[str]) -> Callable[[tuple, dict], Union[nn.Module, None]]:
    def module(args: tuple, kwargs: dict) -> nn.Module | None:
        given = _given(names, args, kwargs)
        if any(isinstance(v, fx.Node) for v in given.values()) or given.pop("return_indices", False):
            return None
        return cls(**given)

    return module


# --- linearization rules (docs/design.md §7): the K tangents folded into the batch ----------------------

def _fold(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(0, 1)


def _unfold(t: torch.Tensor, k: int) -> torch.Tensor:
    return t.unflatten(0, (k, -1))


def _only_first(call: Call, tangents: Tangents) -> torch.Tensor | None:
    """The tangent of the first argument when it is the only one, and a plain tensor."""
    t = tangents.get(0)
    ok = list(tangents) == [0] and isinstance(t, torch.Tensor) and isinstance(call.flat[0], torch.Tensor)
    return t if ok else None


def _conv_rule(call: Call, tangents: Tangents) -> Any:
    t = _only_first(call, tangents)
    if t is None:
        return NotImplemented
    return _unfold(call.fn._conv_forward(_fold(t), call.fn.weight, None), t.shape[0])


def _linear_rule(call: Call, tangents: Tangents) -> Any:
    t = _only_first(call, tangents)
    return NotImplemented if t is None else F.linear(t, call.fn.weight)


def _batchnorm_rule(call: Call, tangents: Tangents) -> Any:
    t, fn = _only_first(call, tangents), call.fn
    if t is None or fn.training or fn.running_var is None:
        return NotImplemented
    scale = torch.rsqrt(fn.running_var + fn.eps)
    if fn.weight is not None:
        scale = scale * fn.weight
    return t * scale.reshape(-1, *[1] * (t.ndim - 3))


def _batch_linear_rule(call: Call, tangents: Tangents) -> Any:
    """Ops linear in their first argument that treat the batch axis as a batch."""
    t = _only_first(call, tangents)
    args, kwargs = call.rebuild()
    if t is None or _flattens_batch(call.fn, args, kwargs):
        return NotImplemented
    return _unfold(call.fn(_fold(t), *args[1:], **kwargs), t.shape[0])


def _flattens_batch(fn: Any, args: tuple, kwargs: dict) -> bool:
    """A flatten that merges the batch axis with others cannot take K folded into it."""
    if isinstance(fn, nn.Flatten):
        return fn.start_dim % args[0].ndim == 0
    if fn is torch.flatten:
        start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
        return start % args[0].ndim == 0
    return False


def _getitem_rule(call: Call, tangents: Tangents) -> Any:
    """Indexing a tuple output (``unbind``, ``chunk``) indexes its tangent tuple."""
    if isinstance(call.flat[0], torch.Tensor):
        return NotImplemented
    return tangents[0][call.flat[1]] if 0 in tangents else None


def _pointwise_rule(call: Call, tangents: Tangents) -> Any:
    """``s'(h) * t``: the derivative is computed once, for all K tangents."""
    t = _only_first(call, tangents)
    if t is None:
        return NotImplemented
    h = call.flat[0]
    slope = torch.func.jvp(lambda z: call([z, *call.flat[1:]]), (h,), (torch.ones_like(h),))[1]
    return slope * t


def softmax_jvp(p: torch.Tensor, t: torch.Tensor, dim: int) -> torch.Tensor:
    """``J_softmax[t] = p * (t - <p, t>)`` along ``dim`` at the output ``p``; ``t`` may carry extra
    leading (stack) axes. ``t`` is first shifted by its value at the most likely entry.

    The shift leaves the product unchanged (it is zero on constants along ``dim``). Without it,
    a nearly one-hot ``p`` makes the top entry's term the difference of two numbers of the size
    of ``t``: in float32 that rounding is larger than the result (dla34's random-init softmax
    lost four digits of its completeness to it)."""
    dim = dim - p.ndim if dim >= 0 else dim  # from the end, so that leading stack axes do not count
    top = p.argmax(dim, keepdim=True)
    t = t - t.gather(dim, top.expand(*t.shape[:t.ndim - p.ndim], *top.shape))
    return p * (t - (p * t).sum(dim, keepdim=True))


def _softmax_rule(call: Call, tangents: Tangents) -> Any:
    t = _only_first(call, tangents)
    args, kwargs = call.rebuild()
    dim = call.fn.dim if isinstance(call.fn, nn.Softmax) else kwargs.get("dim", args[1] if len(args) > 1 else None)
    if t is None or not isinstance(dim, int) or kwargs.get("dtype") is not None or len(args) > 2:
        return NotImplemented
    return softmax_jvp(call.out, t, dim)


def _lifted(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A ``(K, *shape)`` stack with unit axes after K, up to ``ndim`` axes besides K, so that it
    broadcasts against operands of ``ndim`` axes as its primal does."""
    return t.reshape(t.shape[0], *[1] * (ndim + 1 - t.ndim), *t.shape[1:])


def _tensor_tangents(call: Call, tangents: Tangents, arity: int) -> bool:
    """Whether the tangents sit on plain tensors among the first ``arity`` arguments."""
    return all(i < arity and isinstance(t, torch.Tensor) and isinstance(call.flat[i], torch.Tensor)
               for i, t in tangents.items())


def _matmul_rule(call: Call, tangents: Tangents) -> Any:
    """``tA @ B + A @ tB``, only the terms whose factor carries a tangent; the stack axis leads
    and broadcasting does the rest (vectors, which matmul treats apart, go to the fallback)."""
    args, kwargs = call.rebuild()
    if kwargs or len(args) != 2 or not _tensor_tangents(call, tangents, 2) or min(a.ndim for a in args) < 2:
        return NotImplemented
    a, b = args
    ndim = call.out.ndim
    terms = []
    if 0 in tangents:
        terms.append(torch.matmul(_lifted(tangents[0], ndim), b))
    if 1 in tangents:
        terms.append(torch.matmul(a, _lifted(tangents[1], ndim)))
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _layer_norm_rule(call: Call, tangents: Tangents) -> Any:
    """``w * rstd * (t - mean(t) - xhat * mean(t * xhat))`` over the normalized axes: the
    statistics of the primal input are computed once, for all K tangents (weight and bias are
    constants; a tangent on them goes to the fallback)."""
    t = _only_first(call, tangents)
    if t is None:
        return NotImplemented
    args, kwargs = call.rebuild()
    if isinstance(call.fn, nn.LayerNorm):
        norm = call.fn
        k, weight, eps = len(norm.normalized_shape), norm.weight, norm.eps
    else:
        given = _given(("normalized_shape", "weight", "bias", "eps"), args, kwargs)
        shape = given["normalized_shape"]
        k = 1 if isinstance(shape, int) else len(shape)
        weight, eps = given.get("weight"), given.get("eps", 1e-5)
    x = args[0]
    dims = tuple(range(-k, 0))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (x - mean) * rstd
    out = t - t.mean(dims, keepdim=True) - xhat * (t * xhat).mean(dims, keepdim=True)
    scale = rstd if weight is None else rstd * weight
    return out * scale


def _as_output(total: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A tangent stack broadcast (and materialized) to ``(K, *out.shape)`` in ``out``'s dtype, as
    the op's value is: an operand that broadcasts carries a tangent of its own smaller shape."""
    shape = (total.shape[0], *out.shape)
    total = total if total.shape == shape else total.expand(shape).contiguous()
    return total if total.dtype == out.dtype else total.to(out.dtype)


def _sum_rule(sign: int) -> Rule:
    """``t_a + sign * alpha * t_b`` (add, sub), only the tangents present, broadcast to the
    output's shape (a tangent of an operand that broadcasts is repeated, as its value is)."""

    def rule(call: Call, tangents: Tangents) -> Any:
        args, kwargs = call.rebuild()
        if len(args) != 2 or set(kwargs) - {"alpha"} or not _tensor_tangents(call, tangents, 2):
            return NotImplemented
        out = call.out
        total = None
        for i, t in tangents.items():
            t = _lifted(t, out.ndim)
            if i == 1:
                t = t * (sign * kwargs.get("alpha", 1))
            total = t if total is None else total + t
        return _as_output(total, out)

    return rule


def _mul_rule(call: Call, tangents: Tangents) -> Any:
    """``t_a * b + a * t_b`` (product rule), only the terms whose factor carries a tangent; a
    factor may be a number or a tensor that broadcasts."""
    args, kwargs = call.rebuild()
    if kwargs or len(args) != 2 or not _tensor_tangents(call, tangents, 2):
        return NotImplemented
    out = call.out
    terms = [_lifted(t, out.ndim) * args[1 - i] for i, t in tangents.items()]
    total = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return _as_output(total, out)


# --- tiny examples, float64 (the conformance tests) -----------------------------------------

def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def _image() -> torch.Tensor:
    """``(B, C, H, W)`` with an odd H and an even W, so 'same' paddings differ per axis."""
    return _randn(2, 3, 11, 10)


def _ready(m: nn.Module) -> nn.Module:
    """Random parameters and running statistics, in eval mode, in float64."""
    m = m.double().eval().requires_grad_(False)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn_like(m.running_mean))
            m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return m


def module_example(*args: Any, shape: Sequence[int] | None = None, **kwargs: Any) -> Example:
    """An example that builds the key class with ``args`` and runs it on a random tensor."""
    return lambda cls: (_ready(cls(*args, **kwargs)), (_randn(*shape) if shape else _image(),))


def call_example(*args: Any) -> Example:
    """An example that calls the key (a function) on an image and then ``args``."""
    return lambda fn: (fn, (_image(), *args))


def _method(name: str) -> Callable[..., Any]:
    def method(obj: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(obj, name)(*args, **kwargs)

    return method


def _method_example(*args: Any) -> Example:
    return lambda name: (_method(name), (_image(), *args))


def _second_image(fn: Any) -> tuple[Callable[..., Any], tuple]:
    return fn, (_image(), _image())


# --- the entries --------------------------------------------------------------------------

_WINDOW_SUBSTITUTES = ("blurpool", "aps")

register_op(nn.Conv1d, layer_type="conv", linearize=_conv_rule,
            example=module_example(3, 4, 3, stride=2, padding=1, shape=(2, 3, 9)))
register_op(nn.Conv2d, layer_type="conv", linearize=_conv_rule, window=_conv_window, dense=_module_dense,
            substitutes=_WINDOW_SUBSTITUTES,
            example=module_example(3, 4, 3, stride=2, padding=2, dilation=2, padding_mode="reflect"))
register_op(Conv2dSame, layer_type="conv", window=_always_same(_conv_window), dense=_module_dense,
            substitutes=_WINDOW_SUBSTITUTES, example=module_example(3, 4, 3, stride=2))
register_op(nn.Linear, layer_type="linear", linearize=_linear_rule, example=module_example(5, 4, shape=(2, 7, 5)))
register_op(F.conv2d, layer_type="conv", window=_functional_conv_window, dense=_functional_dense(_CONV_ARGS),
            example=call_example(_randn(4, 3, 3, 3), None, 2, 1))
register_op(F.linear, layer_type="linear", example=lambda fn: (fn, (_randn(2, 7, 5), _randn(4, 5))))

register_op(nn.MaxPool2d, nn.AvgPool2d, layer_type="strided/downsampling", window=_pool_window, dense=_module_dense,
            substitutes=_WINDOW_SUBSTITUTES, example=module_example(3, 2, 1))
_update(nn.AvgPool2d, linearize=_batch_linear_rule)
register_op(MaxPool2dSame, AvgPool2dSame, layer_type="strided/downsampling", window=_always_same(_pool_window),
            dense=_module_dense, substitutes=_WINDOW_SUBSTITUTES, example=module_example(3, 2))
register_op(F.max_pool2d, torch.max_pool2d, layer_type="strided/downsampling",
            window=_functional_pool_window(_MAX_POOL_ARGS), dense=_functional_dense(_MAX_POOL_ARGS),
            module=_pool_module(nn.MaxPool2d, _MAX_POOL_ARGS), substitutes=_WINDOW_SUBSTITUTES,
            example=call_example((3, 3), (2, 2), (1, 1)))
register_op(F.avg_pool2d, torch._C._nn.avg_pool2d, layer_type="strided/downsampling", linearize=_batch_linear_rule,
            window=_functional_pool_window(_AVG_POOL_ARGS), dense=_functional_dense(_AVG_POOL_ARGS),
            module=_pool_module(nn.AvgPool2d, _AVG_POOL_ARGS), substitutes=_WINDOW_SUBSTITUTES,
            example=call_example(3, 2, 1))

register_op(nn.AdaptiveAvgPool2d, linearize=_batch_linear_rule, example=module_example(3))
register_op(nn.AvgPool1d, linearize=_batch_linear_rule, example=module_example(2, shape=(2, 3, 9)))
register_op(nn.AdaptiveAvgPool1d, linearize=_batch_linear_rule, example=module_example(2, shape=(2, 3, 9)))
register_op(nn.Flatten, nn.Identity, linearize=_batch_linear_rule, example=module_example())
register_op(nn.Dropout, linearize=_batch_linear_rule, example=module_example(0.5))
register_op(F.adaptive_avg_pool2d, linearize=_batch_linear_rule, example=call_example(1))
register_op(torch.flatten, linearize=_batch_linear_rule, example=call_example(1))
register_op(F.dropout, linearize=_batch_linear_rule, example=call_example(0.5, False))
register_op(operator.getitem, linearize=_getitem_rule, dense=lambda call: call.flat[0],
            example=lambda fn: (fn, (_image().unbind(1), 1)))

register_op(nn.modules.batchnorm._BatchNorm, layer_type="norm",  # abstract: a concrete subclass stands in
            example=lambda cls: module_example(3, shape=(2, 3, 4, 5, 6))(nn.BatchNorm3d))
register_op(nn.BatchNorm2d, layer_type="norm", linearize=_batchnorm_rule, example=module_example(3))
register_op(nn.BatchNorm1d, layer_type="norm", linearize=_batchnorm_rule, example=module_example(3, shape=(2, 3, 6)))
def _module_normalizes(norm: nn.LayerNorm | nn.RMSNorm, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    return len(norm.normalized_shape)


def _functional_normalizes(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    shape = _given(("normalized_shape",), args, kwargs)["normalized_shape"]
    return 1 if isinstance(shape, int) else len(shape)


register_op(nn.LayerNorm, nn.RMSNorm, layer_type="norm", normalizes=_module_normalizes, example=module_example(10))
register_op(nn.GroupNorm, layer_type="norm", example=module_example(1, 3))
register_op(F.layer_norm, torch.layer_norm, F.rms_norm, torch.rms_norm, layer_type="norm",
            normalizes=_functional_normalizes, example=call_example((10,)))
register_op(F.group_norm, torch.group_norm, layer_type="norm", example=call_example(3))
for _key in (nn.LayerNorm, F.layer_norm, torch.layer_norm):
    _update(_key, linearize=_layer_norm_rule)
_STATS = (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
register_op(F.batch_norm, layer_type="norm", example=call_example(*_STATS))
register_op(torch.batch_norm, layer_type="norm", example=call_example(None, None, *_STATS, False, 0.1, 1e-5, False))

register_op(nn.Softmax, layer_type="attention", linearize=_softmax_rule, example=module_example(-1))
register_op(F.softmax, torch.softmax, layer_type="attention", linearize=_softmax_rule, example=call_example(-1))
register_op("softmax", layer_type="attention", linearize=_softmax_rule, example=_method_example(-1))
register_op(operator.matmul, torch.matmul, torch.bmm, layer_type="attention", linearize=_matmul_rule,
            example=lambda fn: (fn, (_randn(3, 5, 4), _randn(3, 4, 6))))
# the factor with the tangent broadcasts: fewer axes than the other, or a unit batch axis
_update(operator.matmul, example=lambda fn: (fn, (_randn(5, 4), _randn(2, 3, 4, 6))))
_update(torch.matmul, example=lambda fn: (fn, (_randn(2, 1, 5, 4), _randn(3, 4, 6))))
register_op("matmul", "bmm", layer_type="attention", linearize=_matmul_rule,
            example=lambda name: (_method(name), (_randn(3, 5, 4), _randn(3, 4, 6))))
register_op(torch.einsum, layer_type="attention",  # as a batched matrix product: MaxViT's q k^T and A V
            example=lambda fn: (lambda a, b: fn("bij,bjk->bik", a, b), (_randn(3, 5, 4), _randn(3, 4, 6))))
# torchvision's Swin window attention (roll, partition, attention, reverse) is one node: fx cannot open it
register_op(swin_transformer.shifted_window_attention, layer_type="attention",
            example=lambda fn: (fn, (_randn(1, 4, 4, 4), _randn(12, 4), _randn(4, 4), _randn(1, 2, 4, 4), [2, 2], 2,
                                     [1, 1])))
register_op(torch.baddbmm, layer_type="attention",
            example=lambda fn: (fn, (_randn(3, 5, 6), _randn(3, 5, 4), _randn(3, 4, 6))))
register_op(F.scaled_dot_product_attention, layer_type="attention",
            example=lambda fn: (fn, (_randn(2, 3, 5, 4), _randn(2, 3, 7, 4), _randn(2, 3, 7, 6))))


def _residual_add(node: fx.Node) -> str:
    """Two tensors summed (a skip connection); a tensor plus a constant is not one."""
    return "residual add" if sum(isinstance(a, fx.Node) for a in node.args) == 2 else "reshape/other"


register_op(operator.add, torch.add, "add", operator.iadd, layer_type=_residual_add, linearize=_sum_rule(1),
            example=_second_image)
_update("add", example=lambda name: (_method(name), (_image(), _image())))
# a broadcast operand's tangent is repeated over the output (a bias of shape (C, 1, 1), say)
register_op(operator.sub, torch.sub, "sub", linearize=_sum_rule(-1),
            example=lambda fn: (fn, (_randn(3, 1, 1), _image())))
_update("sub", example=lambda name: (_method(name), (_image(), 0.5)))
register_op(operator.mul, torch.mul, "mul", linearize=_mul_rule,
            example=lambda fn: (fn, (_randn(11, 1), _image())))
_update(torch.mul, example=lambda fn: (fn, (_image(), _randn(3, 1, 1))))
_update("mul", example=lambda name: (_method(name), (_image(), 0.125)))

_ACTIVATION = dict(layer_type="nonlinearity", linearize=_pointwise_rule, pointwise=True, substitutes=("filtered",))
register_op(nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
            nn.ELU, nn.Mish, nn.Softplus, example=module_example(), **_ACTIVATION)
register_op(F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish, F.softplus,
            torch.relu, torch.sigmoid, torch.tanh, torch.exp, example=call_example(), **_ACTIVATION)
register_op("relu", "sigmoid", "tanh", "exp", "sin", "cos", example=_method_example(), **_ACTIVATION)

# padding, resizing, adaptive pooling and space <-> depth: where they move the samples (docs/method.md §5)
_PAD = (1, 2, 0, 3)
register_op(nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d, window=_pad_window,
            example=module_example(_PAD))
register_op(nn.ConstantPad2d, window=_pad_window, example=module_example(_PAD, 0.5))
register_op(F.pad, torch._C._nn.pad, resample=_functional_pad, example=call_example((1, 2, 0, 3, 1, 0), "reflect"))
register_op(nn.PixelUnshuffle, window=_unshuffle_window, example=module_example(2, shape=(2, 3, 8, 10)))
register_op(F.pixel_unshuffle, window=_unshuffle_window, example=lambda fn: (fn, (_randn(2, 3, 8, 10), 2)))
register_op(nn.PixelShuffle, resample=_centres, example=module_example(2, shape=(2, 8, 5, 4)))
register_op(F.pixel_shuffle, resample=_centres, example=lambda fn: (fn, (_randn(2, 8, 5, 4), 2)))
register_op(F.interpolate, resample=_interpolate, example=call_example(None, 2.0, "bilinear", False))
register_op(nn.Upsample, resample=_upsample, example=module_example(scale_factor=2, mode="bilinear",
                                                                          align_corners=True))
register_op(nn.AdaptiveMaxPool2d, resample=_centres, example=module_example((4, 5)))
register_op(F.adaptive_max_pool2d, resample=_centres, example=call_example((4, 5)))
_update(nn.AdaptiveAvgPool2d, resample=_centres, example=module_example((4, 5)))
_update(F.adaptive_avg_pool2d, resample=_centres, example=call_example((4, 5)))
