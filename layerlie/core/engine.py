"""The engine: one tangent propagation over a graph, for every measurement (docs/design.md §7).

An fx ``Interpreter`` runs each node once and, beside its value, carries a stack of K
tangents ``(K, *shape)``: the linear part of the node's op applied to its parents' tangents.
Sources enter where they sit (:meth:`Propagator.enter`). The measurements differ only in their
graph and their sources:

- ``lee`` and ``lie_derivative``: the coarsest graph of the callable (:func:`coarsest`, one
  node, ``torch.func.jvp`` under ``vmap``), ``G x`` at the input, one slice per group;
- local defects: the traced graph, ``G x`` at the input, and every node replaces its pushed
  tangent by its own ``G_v h_v`` (:class:`layerlie.measure.attribution` ``_Defects``);
- exact attribution: the traced graph on the recorded primal values, every node with a
  defect ``e_v`` a source in its own slice (``sources``); the stack grows where each source
  enters, so no zero slice is carried from the chunk's first source on.

The linear part of an op is its linearization rule in the op registry (:mod:`layerlie.core.ops`,
:func:`layerlie.core.ops.register_rule`): folding the K axis into the batch for ops that are linear
in their input (convolutions, pooling), ``s'(h) * t`` for pointwise activations. An op without a
rule runs once inside ``torch.func.jvp`` under ``vmap``, which gives its value and its tangents
together.

Example:
    >>> import torch, layerlie as ll
    >>> gm = ll.trace(ll.load_model("resnet18"))
    >>> x = torch.randn(1, 3, 64, 64)
    >>> out, t = ll.propagate(gm, x, torch.stack([x, 2 * x]))
    >>> bool(torch.allclose(t[1], 2 * t[0], atol=1e-6))
    True
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from layerlie.errors import LayerlieError
from layerlie.core.rules import FastRules
from layerlie.core.ops import Call, Tangents, linearization, op_key


def node_callable(gm: fx.GraphModule, node: fx.Node) -> Callable[..., Any]:
    """The function that ``node`` applies to its arguments."""
    if node.op == "call_module":
        return gm.get_submodule(node.target)
    if node.op == "call_method":
        return lambda obj, *a, **k: getattr(obj, node.target)(*a, **k)
    return node.target


def bind(gm: fx.GraphModule, node: fx.Node, values: Mapping[fx.Node, Any],
         tangents: Mapping[fx.Node, Any], out: Any) -> tuple[Call, Tangents]:
    """``node``'s :class:`Call` on ``values``, and the tangents of its flat arguments."""
    nodes, spec = pytree.tree_flatten((node.args, node.kwargs))
    # map_arg also opens slices, which pytree keeps whole: ``x[:, :H]`` with a traced ``H`` (Swin)
    flat = [fx.node.map_arg(a, values.__getitem__) for a in nodes]
    stacks = {i: tangents[a] for i, a in enumerate(nodes) if isinstance(a, fx.Node) and tangents.get(a) is not None}
    return Call(node_callable(gm, node), flat, spec, out), stacks


def linearize(call: Call, tangents: Tangents, key: Any = None, fast: bool = False) -> Any:
    """The tangent stack of ``call``'s output given tangent stacks of some of its flat
    arguments; None when no argument carries a tangent or the output holds no float tensor.
    ``fast``: an op without a rule runs its jvp under :class:`FastRules`."""
    if not tangents or not _has_tensor(call.out):
        return None
    rule = linearization(key)
    out = rule(call, tangents) if rule is not None else NotImplemented
    return jvp_stack(call, tangents, fast)[1] if out is NotImplemented else out


def _has_tensor(out: Any) -> bool:
    return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in pytree.tree_leaves(out))


def _stack_size(tangents: Tangents) -> int:
    return next(t.shape[0] for t in pytree.tree_leaves(list(tangents.values())))


def _of(call: Call, where: list[int]) -> Callable[..., Any]:
    """``call`` as a function of its flat arguments at ``where`` (the others held fixed)."""
    def f(*primals):
        leaves = list(call.flat)
        for i, p in zip(where, primals):
            leaves[i] = p
        return call(leaves)
    return f


def jvp_stack(call: Call, tangents: Tangents, fast: bool = False) -> tuple[Any, Any]:
    """``call``'s output and its tangent stack from ``torch.func.jvp`` under ``vmap``: the op runs
    once for both (the primal is not batched). ``call.out`` is not read. ``fast``: under
    :class:`FastRules`, which skip the weights' zero terms (docs/method.md §2)."""
    where = sorted(tangents)
    f = _of(call, where)
    primals = tuple(_dense(call.flat[i]) for i in where)
    stacks = tuple(tangents[i] for i in where)
    with warnings.catch_warnings(), FastRules() if fast else contextlib.nullcontext():
        # functorch's notice that an op falls back to a loop (as_strided_, in timm's global
        # pooling): slower, still exact.
        warnings.filterwarnings("ignore", message="There is a performance drop")
        try:
            if _stack_size(tangents) == 1:
                out, first = torch.func.jvp(f, primals, pytree.tree_map(lambda t: t[0], stacks))
                return out, pytree.tree_map(lambda t: t[None] if isinstance(t, torch.Tensor) else t, first)
            return torch.func.vmap(lambda *ts: torch.func.jvp(f, primals, ts), out_dims=(None, 0))(*stacks)
        except RuntimeError as err:
            if "mutate a captured Tensor" not in str(err):
                raise
            raise LayerlieError("the function changes a tensor it holds in place (a BatchNorm in training mode "
                                "updates its running statistics, and this call has run it); call model.eval() "
                                "first, or pass the model itself, which is measured in eval mode on a copy") from None


def _dense(t: Any) -> Any:
    """Broadcast views (``expand``) cannot carry a dual tangent: materialize them."""
    if isinstance(t, torch.Tensor) and any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        return t.contiguous()
    return t


_CALLS = ("call_module", "call_function", "call_method")


class Interpreter(fx.Interpreter):
    """``fx.Interpreter`` that leaves its note on the failing node ("While executing ...", with
    the node's stack trace) off layerlie's own errors, which say what to fix in one line and
    name the node where it matters; other errors keep it."""

    @property
    def extra_traceback(self) -> bool:  # read by fx while the node's error is being handled
        return not isinstance(sys.exc_info()[1], LayerlieError)

    @extra_traceback.setter
    def extra_traceback(self, value: bool) -> None:  # fx.Interpreter.__init__ sets it; it is derived
        pass


class Propagator(Interpreter):
    """Runs a GraphModule once with a stack of K tangents beside every value (docs/design.md §7).

    Each node is evaluated (:meth:`evaluate`), then carries its tangent (:meth:`carry`): the
    pushed tangent of its op (:meth:`push`) with the sources that enter there added
    (:meth:`enter`). A subclass changes what a pass measures by overriding these steps.

    Args:
        gm: the traced model.
        inject: ``{node name: fn(value) -> (K, *shape) stack}`` added to that node's
            tangent after its own op (sources).
        keep: keep every node's value and tangent (``.values``, ``.tangents``).
        primal: node values from an earlier pass at the same input; given, the ops are
            not run again and only tangents are computed.
        sources: ``{node name: e}``, in topological order: source ``i`` enters as slice ``i``
            at its node. A node's stack holds slices ``0 .. k-1`` for the sources entered
            upstream of it; an op whose arguments hold fewer slices than others sees them
            padded with zeros, so each source costs only the path below it.
        fast: ops without a rule run their jvp under :class:`FastRules`.
    """

    deferred = False
    """Whether :meth:`run_node` leaves :meth:`carry` to the subclass (which needs something it
    learns of the node after evaluating it, e.g. its layout)."""

    def __init__(self, gm: fx.GraphModule, inject: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                 keep: bool = False, primal: Mapping[fx.Node, Any] | None = None,
                 sources: Mapping[str, torch.Tensor] | None = None, fast: bool = False) -> None:
        super().__init__(gm, garbage_collect_values=not keep)
        self.inject = inject or {}
        self.sources = {name: (i, e) for i, (name, e) in enumerate((sources or {}).items())}
        self.keep = keep
        self.primal = primal or {}
        self.fast = fast
        self.tangents: dict[fx.Node, Any] = {}
        self.values: dict[fx.Node, Any] = {}
        self.input_tangent: torch.Tensor | None = None
        self.out_tangent: Any = None
        self._pushed: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = self.evaluate(n)
        if self.keep:
            self.values[n] = out
        if n.op == "output":
            self.out_tangent = self._gather(n.args[0])
        elif not self.deferred:
            self.carry(n, out)
        return out

    def evaluate(self, n: fx.Node) -> Any:
        """``n``'s value: recorded (``primal``), or computed; an op without a rule whose arguments
        carry tangents runs once inside ``torch.func.jvp`` for its value and its tangents. A
        failing node is named in the error."""
        try:
            if n in self.primal and n.op != "placeholder":  # placeholders consume the inputs
                return self.primal[n]
            if n.op in _CALLS and linearization(op_key(self.module, n)) is None:
                call, tangents = bind(self.module, n, self.env, self.tangents, None)
                if tangents:
                    try:
                        out, self._pushed[n] = jvp_stack(call, self._aligned(tangents), self.fast)
                        return out
                    except Exception:  # no forward-mode formula, non-tensor outputs: the plain path reports it
                        pass
            return super().run_node(n)
        except LayerlieError:
            raise
        except Exception as err:
            raise LayerlieError(f"node {n.format_node()} (module {n.meta.get('nn_module_stack', n.target)}) "
                                f"failed: {' '.join(str(err).split())[:200]}") from None

    def carry(self, n: fx.Node, out: Any) -> None:
        """Set ``n``'s tangent, :meth:`enter` of :meth:`push`, and drop those no later node reads."""
        self.tangents[n] = self.enter(n, out, self.push(n, out))
        if not self.keep:
            for dead in self.user_to_last_uses.get(n, []):
                self.tangents.pop(dead, None)

    def push(self, n: fx.Node, out: Any) -> Any:
        """The tangent that ``n``'s op makes of its arguments' tangents (the input tangent at the
        first placeholder; later ones are constant options); None where none arrives."""
        if n.op == "placeholder":
            return self.input_tangent if next(iter(self.module.graph.nodes)) is n else None
        if n in self._pushed:
            pushed = self._pushed.pop(n)
            return pushed if _has_tensor(out) else None
        if n.op == "get_attr" or all(self.tangents.get(a) is None for a in n.all_input_nodes):
            return None
        call, tangents = bind(self.module, n, self.env, self.tangents, out)
        return linearize(call, self._aligned(tangents), op_key(self.module, n), self.fast)

    def enter(self, n: fx.Node, out: Any, tangent: Any) -> Any:
        """``n``'s outgoing tangent: ``tangent`` with the sources at ``n`` added (``inject``) or
        stacked as new slices (``sources``)."""
        if n.name in self.inject:
            src = self.inject[n.name](out)
            tangent = src if tangent is None else tangent + src
        if n.name in self.sources:
            i, e = self.sources[n.name]
            tangent = padded(tangent, i, e)
            tangent = torch.cat([tangent, e[None]]) if tangent is not None else e[None]
        return tangent

    def _aligned(self, tangents: Tangents) -> Tangents:
        return aligned(tangents) if self.sources else tangents

    def _gather(self, arg: Any) -> Any:
        return pytree.tree_map(lambda a: self.tangents.get(a) if isinstance(a, fx.Node) else None, arg)

    def propagate(self, x: torch.Tensor, tangent: torch.Tensor | None) -> tuple[Any, Any]:
        """Run the graph at ``x`` with input tangent stack ``tangent: (K, *x.shape)``."""
        self.input_tangent = tangent
        with torch.no_grad():
            out = self.run(x)
        return out, self.out_tangent


def stack_depth(tangent: Any) -> int:
    """The number of slices of a tangent stack (or of the largest stack of a tuple of them)."""
    return max((t.shape[0] for t in pytree.tree_leaves(tangent) if isinstance(t, torch.Tensor)), default=0)


def padded(tangent: Any, k: int, like: torch.Tensor | None = None) -> Any:
    """``tangent`` with zero slices appended up to ``k`` (stacks that already hold ``k`` are kept
    as they are); None stays None unless ``like`` gives the shape of ``k`` zero slices."""
    if tangent is None:
        return like.new_zeros((k, *like.shape)) if like is not None and k else None

    def pad(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.shape[0] >= k:
            return t
        return torch.cat([t, t.new_zeros((k - t.shape[0], *t.shape[1:]))])

    return pytree.tree_map(pad, tangent)


def aligned(tangents: Tangents) -> Tangents:
    """Every argument's stack padded to the deepest one (the sources entered on any path)."""
    depths = {i: stack_depth(t) for i, t in tangents.items()}
    k = max(depths.values(), default=0)
    if all(d == k for d in depths.values()):
        return tangents
    return {i: padded(t, k) for i, t in tangents.items()}


class Recorder(Interpreter):
    """Runs a GraphModule once, without tangents, keeping ``keep(node, value)`` for each node
    where it is not None (``.kept``, by node name); a failing node is named in the error.

    Example:
        >>> import torch, layerlie as ll
        >>> gm = ll.trace(ll.load_model("resnet18"))
        >>> shapes = Recorder(gm, lambda n, v: v.shape if isinstance(v, torch.Tensor) else None)
        >>> _ = shapes.run(torch.randn(1, 3, 64, 64))
        >>> tuple(shapes.kept["conv1"])
        (1, 64, 32, 32)
    """

    def __init__(self, gm: fx.GraphModule, keep: Callable[[fx.Node, Any], Any]) -> None:
        super().__init__(gm)
        self.keep = keep
        self.kept: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except LayerlieError as err:
            raise LayerlieError(f"node {n.name}: {err}") from None
        kept = self.keep(n, out)
        if kept is not None:
            self.kept[n.name] = kept
        return out


class _Whole(torch.nn.Module):
    """A callable as a module, so that a graph can call it as one node."""

    def __init__(self, f: Callable[..., Any]) -> None:
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> Any:
        return self.f(x)


def coarsest(f: Callable[[torch.Tensor], Any]) -> fx.GraphModule:
    """``f`` as the coarsest graph: one node, which no rule linearizes, so that the engine runs it
    once inside ``torch.func.jvp`` under ``vmap`` (docs/design.md §7). This is how a callable
    that is not a GraphModule (``lambda x: m(x).softmax(-1)``, a model fx cannot trace) is
    propagated.

    Example:
        >>> import torch
        >>> gm = coarsest(lambda z: z.sin())
        >>> x = torch.randn(3)
        >>> out, t = propagate(gm, x, torch.ones(1, 3))
        >>> bool(torch.allclose(t[0], x.cos()))
        True
    """
    graph = fx.Graph()
    graph.output(graph.call_module("whole", (graph.placeholder("x"),)))
    root = torch.nn.Module()
    root.whole = _Whole(f)
    return fx.GraphModule(root, graph)


def propagate(gm: fx.GraphModule, x: torch.Tensor, tangents: torch.Tensor, *,
              fast: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``gm(x)`` and ``J_gm(x)[tangents]`` for a stack ``tangents: (K, *x.shape)``; ``fast`` as in
    :class:`Propagator`."""
    out, tan = Propagator(gm, fast=fast).propagate(x, tangents)
    if tan is None:
        tan = torch.zeros((tangents.shape[0], *out.shape), dtype=out.dtype, device=out.device)
    return out, tan
