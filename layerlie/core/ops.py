"""The op table: one registry of what layerlie knows about each op (docs/method.md §3, 5, 6;
docs/design.md §7).

An op is a module class (matched through its MRO, so timm's ``Conv2dSame`` or ``StdConv2d``
count as convolutions), a function, or a tensor-method name. Its :class:`Op` entry holds all of
its knowledge: its layer type (docs/method.md §3), its linearization rule for the engine and for
whole-callable jvp (docs/design.md §7, :mod:`layerlie.core.rules`), whether it commutes with
``G`` or only relabels samples, whether it is pointwise in space, its window or resampling for
receptive-field layouts (docs/method.md §5), its dense output at stride 1 and module form
(docs/method.md §6), the surgery policies that replace it, and a tiny example on which the
conformance tests check all of that. Adding an op is one :func:`register_op` call. The entries
layerlie ships with are in :mod:`layerlie.core.table`; the structural layout rules of reshapes,
permutes, slicing, ``cat`` and matrix products are still written in :mod:`layerlie.core.layout`.

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

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from layerlie.core.geometry import Axes, ResampleFn, Window, WindowFn, pair
from layerlie.errors import LayerlieError

if TYPE_CHECKING:
    from layerlie.core.examples import Example
    from layerlie.core.layout import Layout

LAYER_TYPES = ("nonlinearity", "strided/downsampling", "conv", "linear", "norm", "attention", "residual add",
               "reshape/other", "output")
"""The layer types of the tables (docs/method.md §3), in table order; ``output`` is the softmax
appended as the measured output (docs/method.md §2), which is not a layer of the model."""

Tangents = dict[int, Any]
Commutes = Callable[[Any, Sequence[Any], "Layout"], tuple[bool, Union[torch.Tensor, None]]]
"""``(fn, args, layout) -> (is an affine map per sample that keeps the layout, its offset b)``."""


@dataclasses.dataclass
class Call:
    """One node's call: its function, its flat arguments (fx-level leaves: a tuple value
    is one leaf), their structure, and its output."""

    fn: Callable[..., Any]
    flat: list[Any]
    spec: pytree.TreeSpec
    out: Any

    def rebuild(self, leaves: list[Any] | None = None) -> tuple[tuple, dict]:
        args, kwargs = pytree.tree_unflatten(self.flat if leaves is None else leaves, self.spec)
        return args, kwargs

    def __call__(self, leaves: list[Any]) -> Any:
        args, kwargs = self.rebuild(leaves)
        return self.fn(*args, **kwargs)


Rule = Callable[[Call, Tangents], Any]
"""``(call, tangents) -> tangent stack of the output``, or ``NotImplemented`` to let the engine
take ``torch.func.jvp`` under ``vmap``."""


@dataclasses.dataclass(frozen=True)
class Op:
    """Everything layerlie knows about one op.

    Attributes:
        key: the module class, function or tensor-method name.
        layer_type: one of :data:`LAYER_TYPES`, or a function of the node (a residual add
            needs two tensor inputs).
        linearize: the engine's rule (docs/design.md §7); None: ``torch.func.jvp`` under ``vmap``.
        fast: ``call -> bool``: where the rule also stands in for PyTorch's forward-mode formula
            in a whole-callable jvp (:class:`layerlie.core.rules.FastRules`): the calls it serves.
        commutes: for an affine map ``h -> W h + b`` that acts on each sample alone, the same at
            every position: whether a call is one and its offset ``b`` shaped to broadcast. Where
            it keeps its input's layout, ``W`` commutes with ``G`` and ``e_v = -G b``
            (docs/method.md §3), without the linearization being computed.
        relabels: only relabels samples (or passes them through, as eval dropout): ``G`` of the
            output is the relabelled ``G`` of the input, exactly, so ``e_v = 0`` (docs/method.md §5).
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
    fast: Callable[[Call], bool] | None = None
    commutes: Commutes | None = None
    relabels: bool = False
    pointwise: bool = False
    normalizes: Callable[[Any, Sequence[Any], Mapping[str, Any]], int] | None = None
    window: WindowFn | None = None
    resample: ResampleFn | None = None
    dense: Callable[[Call], Any] | None = None
    module: Callable[[tuple, dict], Union[nn.Module, None]] | None = None
    substitutes: tuple[str, ...] = ()
    example: Example | None = None


_OPS: dict[Any, Op] = {}


def _check_layer_type(kind: Any) -> None:
    if isinstance(kind, str) and kind not in LAYER_TYPES:
        raise LayerlieError(f"unknown layer type {kind!r}; valid: {', '.join(list_layer_types())}")


def register_op(*keys: Any, **knowledge: Any) -> None:
    """Register one :class:`Op` entry per key, with the fields given as keywords (replacing
    an entry already there).

    Example:
        >>> from layerlie.core.examples import module_example
        >>> class Swish(nn.Module):
        ...     def forward(self, x):
        ...         return x * torch.sigmoid(x)
        >>> register_op(Swish, layer_type="nonlinearity", linearize=get_op(nn.SiLU).linearize, pointwise=True,
        ...             substitutes=("filtered",), example=module_example())
        >>> get_op(Swish).substitutes
        ('filtered',)
    """
    _check_layer_type(knowledge.get("layer_type"))
    for key in keys:
        _OPS[key] = Op(key, **knowledge)


def _update(key: Any, **knowledge: Any) -> None:
    """Change some fields of ``key``'s entry; a class without one of its own starts from the
    entry it inherits, so a rule registered for a subclass keeps its window and layer type."""
    base = find_op(key)
    if base is None:
        register_op(key, **knowledge)
    else:
        _OPS[key] = dataclasses.replace(base, key=key, **knowledge)


def op_name(key: Any) -> str:
    """The name of an op key in listings: ``module.qualname`` of a class or function,
    ``Tensor.<name>`` of a tensor method."""
    if isinstance(key, str):
        return f"Tensor.{key}"
    module = (getattr(key, "__module__", None) or "torch").lstrip("_")  # _operator.add is operator.add
    name = key.__qualname__ if isinstance(key, type) else getattr(key, "__name__", repr(key))
    return f"{module}.{name}"


def op_key(gm: fx.GraphModule, node: fx.Node) -> Any:
    """The registry key of ``node``'s op: its module's class, its function or its method name."""
    return type(gm.get_submodule(node.target)) if node.op == "call_module" else node.target


def find_op(key: Any, node: fx.Node | None = None) -> Op | None:
    """The entry of an op, ``find_op(key)`` or ``find_op(gm, node)``; a module class finds its
    nearest registered base. None for an op with no entry (a generic one, or a node that calls
    nothing): the lookup of the hot paths, which :func:`get_op` wraps with an error."""
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


def get_op(key: Any, node: fx.Node | None = None) -> Op:
    """The entry of an op, ``get_op(key)`` or ``get_op(gm, node)``; ``key`` may also be its name
    from :func:`list_ops`.

    Raises:
        LayerlieError: the op has no entry; the message lists the registered names.
    """
    op = find_op(key, node)
    if op is None and node is None and isinstance(key, str):
        op = next((o for o in _OPS.values() if op_name(o.key) == key), None)
    if op is None:
        what = node.format_node() if node is not None else op_name(key)
        raise LayerlieError(f"no op entry for {what}; registered: {', '.join(list_ops())}. "
                            "Add one with layerlie.register_op")
    return op


def list_ops() -> list[str]:
    """The names of the registered ops, sorted (:func:`op_name`)."""
    return sorted(op_name(key) for key in _OPS)


def register_rule(*keys: Any) -> Callable[[Rule], Rule]:
    """Register a linearization rule for ops (functions, method names, module classes), as a
    decorator. A rule gets ``(call, tangents)``, where ``tangents`` maps flat-argument
    positions to ``(K, *shape)`` stacks, and returns the output's tangent stack (docs/design.md §7)."""

    def deco(rule: Rule) -> Rule:
        for key in keys:
            _update(key, linearize=rule)
        return rule

    return deco


def linearization(key: Any) -> Rule | None:
    """The rule for ``key``, or None (then ``torch.func.jvp`` of the op). A subclass with a
    ``forward`` of its own computes something else than the class whose rule it would inherit
    (timm's ``BatchNormAct2d``), so it gets none."""
    op = find_op(key)
    if op is None or op.linearize is None or _overrides(key, op):
        return None
    return op.linearize


def _overrides(key: Any, op: Op) -> bool:
    """Whether ``key`` is a subclass of ``op``'s class with a ``forward`` of its own."""
    return isinstance(key, type) and key is not op.key and getattr(key, "forward", None) is not op.key.forward


def get_rule(key: Any) -> Rule:
    """The linearization rule of ``key`` (:func:`linearization`); ``key`` may also be its name.

    Raises:
        LayerlieError: the op has no rule; the message lists the ops that have one.
    """
    op = get_op(key) if isinstance(key, str) and find_op(key) is None else None
    rule = linearization(op.key if op is not None else key)
    if rule is None:
        raise LayerlieError(f"no linearization rule for {op_name(key)} (the engine takes torch.func.jvp of it); "
                            f"ops with a rule: {', '.join(list_rules())}. Add one with layerlie.register_rule")
    return rule


def list_rules() -> list[str]:
    """The names of the ops whose entry has a linearization rule, sorted."""
    return sorted(op_name(op.key) for op in _OPS.values() if op.linearize is not None)


def commuting(key: Any) -> Commutes | None:
    """The entry's ``commutes`` test for exactly ``key`` (a subclass may compute something else),
    or None."""
    op = find_op(key)
    return op.commutes if op is not None and op.key is key else None


def relabels(key: Any, fn: Any) -> bool:
    """Whether the op of exactly ``key`` (:func:`op_key`), called as ``fn``, only relabels samples
    (``Op.relabels``; dropout only in eval mode)."""
    op = find_op(key)
    return op is not None and op.key is key and op.relabels and not getattr(fn, "training", False)


def register_layer_type(cls: Any, kind: str) -> Any:
    """Count the op ``cls`` (a module class and its subclasses, or a function) as layer type
    ``kind``, one of :data:`LAYER_TYPES` (docs/method.md §3)."""
    _check_layer_type(kind)
    _update(cls, layer_type=kind)
    return cls


def get_layer_type(key: Any) -> str:
    """The layer type registered for ``key`` (a module class finds its nearest registered base).

    Raises:
        LayerlieError: ``key`` has no entry, or its layer type depends on the node (an add).
    """
    op = get_op(key)
    if callable(op.layer_type):
        raise LayerlieError(f"the layer type of {op_name(key)} depends on the node; "
                            "layerlie.attribute reports it per node")
    return op.layer_type


def list_layer_types() -> list[str]:
    """The layer types (:data:`LAYER_TYPES`), sorted."""
    return sorted(LAYER_TYPES)


def _fn_key(fn: Any) -> Any:
    return type(fn) if isinstance(fn, nn.Module) else fn


def window(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Window | None:
    """The window of ``fn`` (a module or a function) called on ``args``, or None."""
    op = find_op(_fn_key(fn))
    return op.window(fn, args, kwargs) if op is not None and op.window is not None else None


def resample(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any], out: torch.Tensor) -> Axes | None:
    """Where ``fn`` (a module or a function) puts its output samples, per input axis, or None."""
    op = find_op(_fn_key(fn))
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
    op = find_op(gm, node)
    return op is not None and op.pointwise


def is_pointwise_in_space(gm: fx.GraphModule, node: fx.Node, args: Sequence[Any], kwargs: Mapping[str, Any],
                          spatial: Sequence[int]) -> bool:
    """Whether ``node``, called on ``args``, acts on each position of the ``spatial`` axes of
    its input on its own (docs/method.md §6): an elementwise op, or one that mixes only trailing axes
    that are not spatial (a LayerNorm over channels)."""
    op = find_op(gm, node)
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
    op = find_op(gm, node)
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
    op = find_op(gm, node)
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
    op = find_op(type(m))
    if op is None or callable(op.layer_type):
        return None
    return "strided/downsampling" if op.layer_type == "conv" and strided(m) else op.layer_type
