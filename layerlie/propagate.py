"""Tangent propagation over a traced graph: one primal pass, stacked tangents (SPEC 7).

Every measurement is this walk. An fx ``Interpreter`` runs each node once and, beside its
value, carries a stack of K tangents ``(K, *shape)``: the linear part of the node's op
applied to its parents' tangents. Sources may inject a tangent at any node.

- End-to-end Lie derivative: one source, ``G x`` at the input, one slice per group.
- Exact attribution: every node with a defect ``e_v`` is a source in its own slice.
- Local defects: each node's op linearized at its inputs, applied to ``G_p h_p``.

The linear part of an op comes from a rule registry (:func:`register_rule`): folding the
K axis into the batch for ops that are linear in their input (convolutions, pooling),
``s'(h) * t`` for pointwise activations, and ``torch.func.jvp`` under ``vmap`` for the rest.

Example:
    >>> import torch, layerlie as ll
    >>> gm = ll.trace(ll.load_model("resnet18"))
    >>> x = torch.randn(1, 3, 64, 64)
    >>> out, t = ll.propagate(gm, x, torch.stack([x, 2 * x]))
    >>> bool(torch.allclose(t[1], 2 * t[0], atol=1e-6))
    True
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from layerlie.errors import LayerlieError


@dataclass
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


Tangents = dict[int, Any]
Rule = Callable[[Call, Tangents], Any]
_RULES: dict[Any, Rule] = {}


def register_rule(*targets: Any) -> Callable[[Rule], Rule]:
    """Register a linearization rule for fx call targets (functions, method names, or
    module classes). A rule gets ``(call, tangents)``, where ``tangents`` maps flat-argument
    positions to ``(K, *shape)`` stacks, and returns the output's tangent stack."""

    def deco(rule: Rule) -> Rule:
        for t in targets:
            _RULES[t] = rule
        return rule

    return deco


def node_callable(gm: fx.GraphModule, node: fx.Node) -> Callable[..., Any]:
    """The function that ``node`` applies to its arguments."""
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    if node.op == "call_method":
        return lambda obj, *a, **k: getattr(obj, node.target)(*a, **k)
    return node.target


def rule_key(gm: fx.GraphModule, node: fx.Node) -> Any:
    return type(gm.get_submodule(node.target)) if node.op == "call_module" else node.target


def bind(gm: fx.GraphModule, node: fx.Node, values: Mapping[fx.Node, Any],
         tangents: Mapping[fx.Node, Any], out: Any) -> tuple[Call, Tangents]:
    """``node``'s :class:`Call` on ``values``, and the tangents of its flat arguments."""
    nodes, spec = pytree.tree_flatten((node.args, node.kwargs))
    # map_arg also opens slices, which pytree keeps whole: ``x[:, :H]`` with a traced ``H`` (Swin)
    flat = [fx.node.map_arg(a, values.__getitem__) for a in nodes]
    stacks = {i: tangents[a] for i, a in enumerate(nodes) if isinstance(a, fx.Node) and tangents.get(a) is not None}
    return Call(node_callable(gm, node), flat, spec, out), stacks


def linearize(call: Call, tangents: Tangents, key: Any = None) -> Any:
    """The tangent stack of ``call``'s output given tangent stacks of some of its flat
    arguments; None when no argument carries a tangent or the output holds no float tensor."""
    if not tangents or not _has_tensor(call.out):
        return None
    return _RULES.get(key, _vmap_jvp)(call, tangents)


def _has_tensor(out: Any) -> bool:
    return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in pytree.tree_leaves(out))


def _stack_size(tangents: Tangents) -> int:
    return next(t.shape[0] for t in pytree.tree_leaves(list(tangents.values())))


def _vmap_jvp(call: Call, tangents: Tangents) -> Any:
    where = sorted(tangents)

    def f(*primals):
        leaves = list(call.flat)
        for i, p in zip(where, primals):
            leaves[i] = p
        return call(leaves)

    primals = tuple(_dense(call.flat[i]) for i in where)
    stacks = tuple(tangents[i] for i in where)
    with warnings.catch_warnings():
        # functorch's notice that an op falls back to a loop: slower, still exact.
        warnings.filterwarnings("ignore", message="There is a performance drop")
        if _stack_size(tangents) == 1:
            first = pytree.tree_map(lambda t: t[0], stacks)
            result = torch.func.jvp(f, primals, first)[1]
            return pytree.tree_map(lambda t: t[None] if isinstance(t, torch.Tensor) else t, result)
        return torch.func.vmap(lambda *ts: torch.func.jvp(f, primals, ts)[1])(*stacks)


def _dense(t: Any) -> Any:
    """Broadcast views (``expand``) cannot carry a dual tangent: materialize them."""
    if isinstance(t, torch.Tensor) and any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        return t.contiguous()
    return t


def _fold(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(0, 1)


def _unfold(t: torch.Tensor, k: int) -> torch.Tensor:
    return t.unflatten(0, (k, -1))


def _only_first(call: Call, tangents: Tangents) -> torch.Tensor | None:
    """The tangent of the first argument when it is the only one, and a plain tensor."""
    t = tangents.get(0)
    ok = list(tangents) == [0] and isinstance(t, torch.Tensor) and isinstance(call.flat[0], torch.Tensor)
    return t if ok else None


@register_rule(nn.Conv1d, nn.Conv2d)
def _conv_module(call, tangents):
    t = _only_first(call, tangents)
    if t is None:
        return _vmap_jvp(call, tangents)
    return _unfold(call.fn._conv_forward(_fold(t), call.fn.weight, None), t.shape[0])


@register_rule(nn.Linear)
def _linear_module(call, tangents):
    t = _only_first(call, tangents)
    if t is None:
        return _vmap_jvp(call, tangents)
    return F.linear(t, call.fn.weight)


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d)
def _batchnorm_module(call, tangents):
    t, fn = _only_first(call, tangents), call.fn
    if t is None or fn.training or fn.running_var is None:
        return _vmap_jvp(call, tangents)
    scale = torch.rsqrt(fn.running_var + fn.eps)
    if fn.weight is not None:
        scale = scale * fn.weight
    return t * scale.reshape(-1, *[1] * (t.ndim - 3))


_BATCH_LINEAR = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.Flatten,
                 nn.Dropout, nn.Identity, F.avg_pool2d, F.adaptive_avg_pool2d, torch.flatten, F.dropout)


@register_rule(*_BATCH_LINEAR)
def _batch_linear(call, tangents):
    """Ops linear in their first argument that treat the batch axis as a batch."""
    t = _only_first(call, tangents)
    args, kwargs = call.rebuild()
    if t is None or _flattens_batch(call.fn, args, kwargs):
        return _vmap_jvp(call, tangents)
    return _unfold(call.fn(_fold(t), *args[1:], **kwargs), t.shape[0])


def _flattens_batch(fn: Any, args: tuple, kwargs: dict) -> bool:
    """A flatten that merges the batch axis with others cannot take K folded into it."""
    if isinstance(fn, nn.Flatten):
        return fn.start_dim % args[0].ndim == 0
    if fn is torch.flatten:
        start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
        return start % args[0].ndim == 0
    return False


@register_rule(operator.getitem)
def _getitem(call, tangents):
    """Indexing a tuple output (``unbind``, ``chunk``) indexes its tangent tuple."""
    container = call.flat[0]
    if isinstance(container, torch.Tensor):
        return _vmap_jvp(call, tangents)
    if 0 not in tangents:
        return None
    return tangents[0][call.flat[1]]


_POINTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
              nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softplus, F.relu, F.relu6, F.gelu, F.silu, F.hardswish,
              F.hardsigmoid, F.leaky_relu, F.elu, F.mish, F.softplus, torch.relu, torch.sigmoid,
              torch.tanh, torch.exp, "relu", "sigmoid", "tanh", "exp", "sin", "cos")


@register_rule(*_POINTWISE)
def _pointwise(call, tangents):
    """``s'(h) * t``: the derivative is computed once, for all K tangents."""
    t = _only_first(call, tangents)
    if t is None:
        return _vmap_jvp(call, tangents)
    h = call.flat[0]
    slope = torch.func.jvp(lambda z: call([z, *call.flat[1:]]), (h,), (torch.ones_like(h),))[1]
    return slope * t


@register_rule(torch.softmax, F.softmax, nn.Softmax, "softmax")
def _softmax(call, tangents):
    """``p * (t - <p, t>)``, with ``t`` first shifted by its value at the most likely class.

    The shift leaves the product unchanged (it is zero on constants along ``dim``). Without it,
    a nearly one-hot ``p`` makes the top class's term the difference of two numbers of the size
    of ``t``: in float32 that rounding is larger than the result (dla34's random-init softmax
    lost four digits of its completeness to it)."""
    t = _only_first(call, tangents)
    args, kwargs = call.rebuild()
    dim = call.fn.dim if isinstance(call.fn, nn.Softmax) else kwargs.get("dim", args[1] if len(args) > 1 else None)
    if t is None or not isinstance(dim, int) or kwargs.get("dtype") is not None or len(args) > 2:
        return _vmap_jvp(call, tangents)
    p = call.out
    d = dim % p.ndim + 1
    top = p.argmax(dim % p.ndim, keepdim=True).expand_as(t[0])[None].expand_as(t)
    t = t - t.gather(d, top)
    return p * (t - (p * t).sum(d, keepdim=True))


def pointwise_targets() -> tuple[Any, ...]:
    """The call targets treated as pointwise activations."""
    return _POINTWISE


class Propagator(fx.Interpreter):
    """Runs a GraphModule once with a stack of K tangents beside every value.

    Args:
        gm: the traced model.
        inject: ``{node name: fn(value) -> (K, *shape) stack}`` added to that node's
            tangent after its own op (sources).
        keep: keep every node's value and tangent (``.values``, ``.tangents``).
        primal: node values from an earlier pass at the same input; given, the ops are
            not run again and only tangents are computed.
    """

    def __init__(self, gm: fx.GraphModule, inject: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                 keep: bool = False, primal: Mapping[fx.Node, Any] | None = None) -> None:
        super().__init__(gm, garbage_collect_values=not keep)
        self.inject = inject or {}
        self.keep = keep
        self.primal = primal or {}
        self.tangents: dict[fx.Node, Any] = {}
        self.values: dict[fx.Node, Any] = {}
        self.input_tangent: torch.Tensor | None = None
        self.out_tangent: Any = None

    def run_node(self, n: fx.Node) -> Any:
        try:
            known = n in self.primal and n.op != "placeholder"  # placeholders consume the inputs
            out = self.primal[n] if known else super().run_node(n)
        except LayerlieError:
            raise
        except Exception as err:
            raise LayerlieError(f"node {n.format_node()} (module {n.meta.get('nn_module_stack', n.target)}) "
                                f"failed: {' '.join(str(err).split())[:200]}") from None
        if n.op == "placeholder":  # the first is the input; later ones are constant options
            tan = self.input_tangent if next(iter(self.module.graph.nodes)) is n else None
        elif n.op == "output":
            self.out_tangent = self._gather(n.args[0])
            return out
        elif n.op == "get_attr":
            tan = None
        else:
            call, tangents = bind(self.module, n, self.env, self.tangents, out)
            tan = linearize(call, tangents, rule_key(self.module, n))
        if n.name in self.inject:
            src = self.inject[n.name](out)
            tan = src if tan is None else tan + src
        self.tangents[n] = tan
        if self.keep:
            self.values[n] = out
        else:
            for dead in self.user_to_last_uses.get(n, []):
                self.tangents.pop(dead, None)
        return out

    def _gather(self, arg: Any) -> Any:
        return pytree.tree_map(lambda a: self.tangents.get(a) if isinstance(a, fx.Node) else None, arg)

    def propagate(self, x: torch.Tensor, tangent: torch.Tensor | None) -> tuple[Any, Any]:
        """Run the graph at ``x`` with input tangent stack ``tangent: (K, *x.shape)``."""
        self.input_tangent = tangent
        with torch.no_grad():
            out = self.run(x)
        return out, self.out_tangent


def propagate(gm: fx.GraphModule, x: torch.Tensor, tangents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``gm(x)`` and ``J_gm(x)[tangents]`` for a stack ``tangents: (K, *x.shape)``."""
    out, tan = Propagator(gm).propagate(x, tangents)
    if tan is None:
        tan = torch.zeros((tangents.shape[0], *out.shape), dtype=out.dtype, device=out.device)
    return out, tan
