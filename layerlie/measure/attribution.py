"""Exact per-node attribution of the Lie derivative on the fx graph (docs/method.md §3, 4).

Every node ``v`` has a local defect ``e_v = sum_p J_{v<-p}[G_p h_p] - G_v h_v`` and a
contribution ``c_v = J_{out<-v}[e_v]``; by the chain rule ``L F(x) = sum_v c_v`` exactly.

Each estimator reports the check that fits it (docs/method.md §4), against an ``L F`` computed
independently of the parts: ``torch.func.jvp`` of the whole GraphModule, not the
linearization rules of :mod:`layerlie.core.engine` that give the defects. Completeness
telescopes, so a total made by the same rules would hide any wrong rule.

Estimators of ``c_v`` (docs/method.md §4), by how they run (:mod:`layerlie.measure.estimators`):
- ``"forward"`` (``exact``): forward-mode propagation of every ``e_v`` to the output, the
  sources stacked on the tangent axis and chunked under a memory budget; sources that cannot
  reach the output (one reverse pass tells) are skipped.
- ``"reverse"`` (``shares``): the signed shares ``<c_v, L F> / ||L F||^2`` from one reverse pass.
- ``"probes"`` (``hutchinson``): the published estimator of ``||c_v||^2``, with the entry's probes.

Example:
    >>> import layerlie as ll
    >>> m = ll.load_model("resnet18")
    >>> a = ll.attribute(m, ll.photos(m, n=1)[..., ::4, ::4], "translate_x")
    >>> a.check, a.residual < 1e-4
    ('completeness residual', True)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import pandas as pd
import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from layerlie.model.contract import Output, prepare, select
from layerlie.deprecation import renamed
from layerlie.errors import LayerlieError, note
from layerlie.core.groups import Group, group as get_group
from layerlie.core.layout import NONE, Coords, Layout, LayoutProp, layout_tangent
from layerlie.measure.hooks import module_contributions, module_cotangents, module_defects
from layerlie.measure.lie import exact_math, jvp_ready
from layerlie.core import memory, program
from layerlie.core.ops import commuting, is_strided, layer_type, linearization, module_type, op_key, relabels
from layerlie.core.rules import Offset, softmax_jvp
from layerlie.core.engine import Propagator, Recorder, bind, padded
from layerlie.core.tangent import check_scheme, tangent
from layerlie.measure.estimators import Estimator, get_estimator
from layerlie.model.trace import TraceError, trace, with_output


def two_panels(ax: Any, figsize: tuple[float, float]) -> tuple[Any, tuple[Any, Any]]:
    """The figure and the two axes of a result's plot: ``ax`` (a pair) where given, else a new
    figure of ``figsize``."""
    if ax is None:
        import matplotlib.pyplot as plt

        fig, pair = plt.subplots(1, 2, figsize=figsize)
        return fig, tuple(pair)
    return ax[0].figure, tuple(ax)


@dataclass
class Attribution:
    """Per-node attribution of ``L F(x)`` (docs/method.md §3-4).

    Attributes:
        nodes: one row per graph node: node, op, target, module, layer_type, depth, layout,
            tensor (its value is a tensor: the unknown count counts these), local_norm,
            contribution_norm, share, stderr, position_mismatch (where the inputs of an op
            disagree on their sample positions, docs/method.md §5; else empty).
        total: ``L F(x)``, by forward-mode AD of the whole model (independent of the parts).
        residual: the value of ``check``: ``||L F - sum_v c_v|| / ||L F||`` (exact),
            ``|sum_v share_v - 1|`` (shares), NaN (Hutchinson); absolute when ``L F`` is about 0.
        check: its name: the estimator's :attr:`~layerlie.Estimator.check`.
        defects: the local defect ``e_v`` of every node where it is not zero, by node name,
            shaped like the node's output (nodes absent from it have ``e_v = 0``).
        settings: group, scheme, estimator, output, coords, dtype; on graphs also ``rounded`` (nodes
            whose ``e_v`` is under :func:`rounding_floor`) and ``commuting`` (nodes given ``e_v``
            without their linearization: affine channel maps, relabelling ops).
    """

    nodes: pd.DataFrame
    total: torch.Tensor
    residual: float
    check: str = get_estimator("exact").check
    defects: Mapping[str, torch.Tensor] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def degenerate(self) -> bool:
        """``L F`` is about zero (e.g. a one-hot softmax): shares are undefined."""
        return bool(self.settings.get("degenerate", False))

    def __repr__(self) -> str:
        """One line, no tensors: the model, the settings, the check and the top three nodes by
        ``||c_v||`` (by ``|share|`` for the shares estimator), docs/method.md §3-4."""
        s = self.settings
        key = "share" if s.get("estimator") == "shares" else "contribution_norm"
        top = self.nodes.assign(rank=self.nodes[key].abs()).nlargest(3, "rank")
        ranked = ", ".join(f"{r.node} ({r.layer_type}) {r[key]:.3g}" for _, r in top.iterrows())
        return (f"Attribution(model={s.get('model', 'model')!r}, group={s.get('group')!r}, "
                f"scheme={s.get('scheme')!r}, estimator={s.get('estimator')!r}, nodes={len(self.nodes)}, "
                f"{self.check_line()}, top by {'share' if key == 'share' else '||c_v||'}: {ranked or 'none'})")

    def to_frame(self) -> pd.DataFrame:
        return self.nodes.copy()

    def by_type(self) -> pd.DataFrame:
        """Contribution and share summed per layer type."""
        return self._aggregate("layer_type")

    def by_module(self) -> pd.DataFrame:
        """Contribution and share summed per module path."""
        return self._aggregate("module")

    def _aggregate(self, key: str) -> pd.DataFrame:
        agg = self.nodes.groupby(key, sort=False)[["contribution_norm", "share"]].sum(min_count=1)
        return agg.sort_values("contribution_norm", ascending=False)

    def summary(self, top: int = 10) -> str:
        """The top nodes, the share by type, and the estimator's check, as text."""
        s = self.settings
        lines = [f"{s.get('model', 'model')}: {s['group']} ({s['scheme']} scheme, {s['estimator']}), "
                 f"|L F| = {float(self.total.norm()):.3e}"]
        cols = ["node", "layer_type", "layout", "local_norm", "contribution_norm", "share"]
        ranked = self.nodes.sort_values("contribution_norm", ascending=False, na_position="last")
        lines.append(ranked[cols].head(top).to_string(index=False))
        lines.append(self.by_type().to_string())
        lines.append(self.unknown_line())
        lines.append(self.check_line())
        return "\n".join(lines)

    def unknown_line(self) -> str:
        """How many tensor nodes have an ``unknown`` layout (``G`` acts on them as zero,
        docs/method.md §5), and the first of them, where layout inference stopped; shapes and other non-tensor
        nodes are not counted."""
        tensors = self.nodes[self.nodes["tensor"]]
        unknown = tensors[tensors["layout"].str.startswith("unknown")]
        first = f"; the first is {unknown['node'].iloc[0]}" if len(unknown) else ""
        return (f"unknown layouts: {len(unknown)} of {len(tensors)} tensor nodes "
                f"({len(unknown) / max(len(tensors), 1):.1%}){first}")

    def check_line(self) -> str:
        """The check by its name and its value, e.g. ``completeness residual (relative): 3.1e-07``."""
        if self.check == get_estimator("hutchinson").check:
            return f"{self.check} (Hutchinson estimates norms, not vectors): nan"
        kind = "absolute" if self.degenerate else "relative"
        return f"{self.check} ({kind}): {self.residual:.2e}"

    def plot(self, ax: Any = None) -> Any:
        """Contribution by depth (left) and share by layer type (right). Returns the figure."""
        fig, (ax_depth, ax_type) = two_panels(ax, (11, 3.5))
        exact = not self.nodes["contribution_norm"].isna().any()
        y = self.nodes["contribution_norm"] if exact else self.nodes["share"].abs()
        rows = self.nodes.assign(y=y)[y.fillna(0) > 0]
        for kind, part in rows.groupby("layer_type"):
            ax_depth.scatter(part["depth"], part["y"], s=10, label=kind)
        ax_depth.set(xlabel="depth (node index)", ylabel="||c_v||" if exact else "|share|", yscale="log",
                     title=f"{self.settings['group']}: contribution by depth")
        if len(rows):
            ax_depth.legend(fontsize=7)
        value = "contribution_norm" if self.nodes["share"].isna().all() else "share"
        self.by_type()[value].plot.bar(ax=ax_type)
        ax_type.set(ylabel=value, title=f"{value} by layer type")
        fig.tight_layout()
        return fig


def rounding_floor(dtype: torch.dtype) -> float:
    """The relative size below which ``e_v = J[G h] - G h_v`` is the rounding of two equal terms:
    ``sqrt(eps)``, half the digits of ``dtype``.

    Ops that commute with ``G`` (docs/method.md §3: linear layers on channels, eval BatchNorm, adds,
    layer scales, ``q k^T`` and ``A v`` under translation) leave a difference of about ``1e-7`` of
    the terms in float32 and ``1e-16`` in float64; the defects of non-linear and strided ops
    measure ``1e-2`` and more (``benchmarks/RESULTS.md``). Such a node is no source: exact
    attribution does not propagate its noise."""
    return torch.finfo(dtype).eps ** 0.5


class _Defects(LayoutProp):
    """The engine's pass with every node as a source of its own ``G_v h_v`` (docs/method.md §3,
    docs/design.md §7): ``G x`` enters at the input, each node's pushed tangent (one slice) gives
    ``e_v = pushed - G_v h_v``, and ``G_v h_v`` goes on in its place. Values and layouts are
    recorded as in :class:`LayoutProp`; the tangents are dropped after their last user, except at
    the input and the output. An ``e_v`` under :func:`rounding_floor` of its two terms is zero
    (``.rounded``). Run it with ``propagate(x, None)``.

    With ``shortcuts`` (the default), an op whose entry ``commutes`` (:class:`layerlie.core.ops.Op`)
    and that keeps its input's layout gets ``e_v = 0`` without its linearization being computed (``.commuting``): for linear layers
    that is the cost of a second forward. ``shortcuts=False`` computes both terms at every node,
    the reference that the tests compare with."""

    deferred = True  # a node's G_v needs its layout, inferred after its value

    def __init__(self, gm: fx.GraphModule, group: Group, scheme: str, coords: Coords,
                 shortcuts: bool = True) -> None:
        super().__init__(gm)
        self.gm, self.group, self.scheme, self.coords = gm, group, scheme, coords
        self.shortcuts = shortcuts
        self.commuting: set[fx.Node] = set()
        self.e: dict[fx.Node, torch.Tensor | None] = {}
        self.rounded: set[fx.Node] = set()
        self._offsets: dict[fx.Node, Offset] = {}
        nodes = list(gm.graph.nodes)
        keep = {nodes[0], *nodes[-1].all_input_nodes}
        last_user = {p: n for n in nodes for p in n.all_input_nodes}
        self._dead: dict[fx.Node, list[fx.Node]] = {}
        for p, n in last_user.items():
            if p not in keep:
                self._dead.setdefault(n, []).append(p)

    def layout(self, n: fx.Node) -> Layout:
        return self.layouts.get(n.name, NONE)

    def own(self, n: fx.Node) -> torch.Tensor | None:
        """``G_v h_v`` of node ``n`` (None where ``G_v = 0``), as the pass left it."""
        t = self.tangents.get(n)
        return t[0] if t is not None else None

    def propagate(self, x: torch.Tensor, stack: torch.Tensor | None = None) -> tuple[Any, Any]:
        """Run the pass at ``x``; the input tangent is ``G x`` unless ``stack`` gives another."""
        return super().propagate(x, tangent(x, self.group, self.scheme)[None] if stack is None else stack)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op != "output":
            with torch.no_grad():
                self.carry(n, out)
        for p in self._dead.get(n, []):
            self.tangents.pop(p, None)
        return out

    def push(self, n: fx.Node, out: Any) -> Any:
        offset = self._commutes(n, out) if self.shortcuts else False
        if offset is False:
            return super().push(n, out)
        self._offsets[n] = offset
        return None

    def enter(self, n: fx.Node, value: Any, pushed: Any) -> Any:
        lay = self.layout(n)
        if n.op == "placeholder":  # the images; other placeholders are constant options
            return pushed
        if lay.kind == "tuple" or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            self.e[n] = None
            return pushed  # the representation on tuples is the incoming one
        if n in self._offsets:
            offset = self._offsets.pop(n)
            moved = offset is not None and bool(offset.any())
            self.e[n] = -layout_tangent(offset.expand_as(value), lay, self.group, self.scheme, self.coords) \
                if moved else None
            self.commuting.add(n)
            return self._own(n, value, lay)[None]
        if self.shortcuts and lay.spatial and isinstance(pushed, torch.Tensor) and self._relabelling(n, value):
            self.e[n] = None
            self.commuting.add(n)
            return pushed
        own = layout_tangent(value, lay, self.group, self.scheme, self.coords) \
            if lay.moves and self.group.spatial else None
        if pushed is None:
            self.e[n] = None if own is None else -own
            return None if own is None else own[None]
        e = pushed[0] if own is None else pushed[0] - own
        size = _finite(n, e.norm())
        if own is not None and self._rounding(size, pushed[0], own):
            self.rounded.add(n)
            e = None
        self.e[n] = e
        return None if own is None else own[None]

    @staticmethod
    def _rounding(size: torch.Tensor, pushed: torch.Tensor, own: torch.Tensor) -> bool:
        """``||e|| <= floor * max(||pushed||, ||own||)``; since ``||pushed|| <= ||own|| + ||e||``, a
        defect above ``floor * (||own|| + ||e||)`` is genuine without a third norm."""
        floor, own_size = rounding_floor(own.dtype), own.norm()
        if size > floor * (own_size + size):
            return False
        return bool(size <= floor * torch.maximum(own_size, pushed.norm()))

    def _own(self, n: fx.Node, value: torch.Tensor, lay: Layout) -> torch.Tensor:
        """``G_v h_v``, checked for NaN and inf (one reduction) where no ``e_v`` is formed."""
        own = layout_tangent(value, lay, self.group, self.scheme, self.coords)
        _finite(n, own.sum())
        return own

    def _commutes(self, n: fx.Node, value: Any) -> Offset | bool:
        """``n`` applies an op whose entry ``commutes`` to its first argument alone, which carries
        ``G h`` and has the layout of ``n`` (the same samples at the same positions): its offset
        (None: none), or False."""
        lay = self.layout(n)
        if not self.group.spatial or not lay.spatial or n.op not in ("call_module", "call_function", "call_method"):
            return False
        call, incoming = bind(self.gm, n, self.env, self.tangents, value)
        if list(incoming) != [0]:
            return False
        rule = commuting(type(call.fn) if isinstance(call.fn, nn.Module) else call.fn)
        first = n.all_input_nodes[0] if n.all_input_nodes else None
        if rule is None or first is None or self.layout(first) != lay:
            return False
        args, _ = call.rebuild()
        ok, offset = rule(call.fn, args, lay)
        return offset if ok else False

    def _relabelling(self, n: fx.Node, value: Any) -> bool:
        """``n`` relabels the samples of its first argument, the only one that carries ``G h``."""
        call, incoming = bind(self.gm, n, self.env, self.tangents, value)
        return list(incoming) == [0] and relabels(op_key(self.gm, n), call.fn)


def _finite(n: fx.Node, reduced: torch.Tensor) -> torch.Tensor:
    """``reduced`` (a sum or norm of a node's tensor), after checking it: a NaN or inf anywhere in
    the tensor makes it non-finite, so one reduction stands for a mask per node."""
    if not torch.isfinite(reduced):
        raise LayerlieError(f"NaN or inf first appears at node {n.format_node()}; check the model's "
                            "weights or use dtype=torch.float64")
    return reduced


def _sources(defects: _Defects) -> list[fx.Node]:
    return [n for n, e in defects.e.items() if e is not None and bool(e.any())]


def _propagate_sources(gm: fx.GraphModule, x: torch.Tensor, sources: list[fx.Node],
                       defects: _Defects, capture: program.Capture = None,
                       key: tuple[fx.GraphModule, str] | None = None) -> torch.Tensor:
    """``J_{out<-v}[e_v]`` for each source, stacked: ``(len(sources), *out.shape)``. Each source's
    slice starts where it enters (:class:`Propagator` ``sources``), so the chunk pays for the path
    below each source, not for zeros carried from the chunk's first one (docs/method.md §4).

    The pass is a function of ``x``, the defects and the recorded values, run as ``capture`` says
    (:mod:`layerlie.core.program`), keyed on the chunk's sources and ``key``: the caller's graph,
    of which ``gm`` is the cut at an output node (``gm`` itself by default), and that node's name."""
    owner, out_name = key or (gm, None)
    names = [n.name for n in sources]
    nodes = list(defects.values)
    leaves, spec = pytree.tree_flatten([defects.values[n] for n in nodes])
    at = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]

    def sources_pass(x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        flat = list(leaves)
        for i, t in zip(at, tensors[len(names):]):
            flat[i] = t
        primal = dict(zip(nodes, pytree.tree_unflatten(flat, spec)))
        out, tan = Propagator(gm, primal=primal, sources=dict(zip(names, tensors))).propagate(x, None)
        return padded(tan, len(names), out)

    inputs = (x, *(defects.e[n] for n in sources), *(leaves[i] for i in at))
    return program.run(sources_pass, inputs, owner=owner, key=("sources", out_name, tuple(names)), capture=capture)


@renamed(probes="samples")
def attribute(model: nn.Module | fx.GraphModule, x: torch.Tensor, group: Group | str, *,
              estimator: str | Estimator = "exact", scheme: str = "central", output: str | int = "softmax",
              samples: int = 100, seed: int = 0, coords: Coords = "receptive_field",
              memory_budget: float | None = None, granularity: Literal["node", "module"] = "node",
              capture: program.Capture = None) -> Attribution:
    """Attribute the Lie derivative of ``model`` at ``x`` to the nodes of its graph (docs/method.md §3-4).

    Args:
        model: a model (traced here) or a GraphModule from :func:`layerlie.trace`; taken by the
            model contract (:mod:`layerlie.model.contract`): never changed, measured in eval mode.
        x: images ``(B, C, H, W)``.
        group: the group or its name.
        estimator: a registered estimator (:func:`layerlie.list_estimators`) or an
            :class:`~layerlie.Estimator`: ``"exact"`` (contributions ``c_v``), ``"shares"``
            (signed shares from one reverse pass) or ``"hutchinson"`` (the published probe
            estimate of ``||c_v||``).
        scheme: derivative scheme for every ``G_v``.
        output: ``"softmax"`` (published) or ``"logits"`` of the tensor the output rule selects,
            a node name (features), or an index, key or attribute of a tuple, dict or object
            output, which selects a tensor measured as it is.
        samples: Hutchinson probes.
        seed: seeds the random probes (Hutchinson, and the reach test of the exact estimator)
            on a generator of their own; the global random state is left alone.
        coords: ``"receptive_field"`` sample positions (docs/method.md §5) or the ``"published"``
            per-tensor ``[-1, 1]`` convention.
        memory_budget: bytes of tensors a propagation of a chunk of sources may hold beside the
            recorded values (exact estimator, :mod:`layerlie.core.memory`); by default
            :data:`layerlie.core.memory.FORWARDS` times what a no-grad forward holds.
        granularity: ``"node"`` (the fx graph) or ``"module"`` (leaf-module forward hooks,
            :mod:`layerlie.measure.hooks`). A model that fx cannot trace falls back to ``"module"``
            with a one-line warning that says why.
        capture: how the exact estimator's propagation of the defects and the shares' reverse
            pass run (:data:`layerlie.core.program.Capture`): by default replayed from a CUDA
            graph on CUDA, captured the second time a graph, input shape and chunk of sources
            come, and eagerly elsewhere. A model is traced anew on each call; pass a graph from
            :func:`layerlie.trace` to replay across calls.

    Returns:
        An :class:`Attribution` with its check (``a.check``, ``a.residual``);
        ``settings["granularity"]`` says which.
    """
    est = get_estimator(estimator)
    check_scheme(scheme)
    model, x, pick, head = prepare(model, x, output, heads=True)
    g = get_group(group)
    if g.origin is not None:
        raise LayerlieError(f"group {g.name!r} is a compatibility map, not a group; attribution needs a group")
    if granularity not in ("node", "module"):
        raise LayerlieError(f"unknown granularity {granularity!r}; use 'node' or 'module'")
    options = _Options(g, est, scheme, head, samples, seed, coords, memory_budget, pick, capture)
    if granularity == "module":
        return _attribute_modules(model, x, options)
    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        try:
            gm = _traced(model, x, pick)
        except TraceError as err:
            note(f"{err}; attributing at module granularity with forward hooks")
            return _attribute_modules(model, x, options)
    with exact_math():
        result = _attribute_graph(gm, x, options)
    result.settings["model"] = type(model).__name__
    return result


class _Options(NamedTuple):
    group: Group
    estimator: Estimator
    scheme: str
    output: str
    probes: int
    seed: int
    coords: Coords
    memory_budget: float | None
    pick: Output = None  # the tensor of a structured output (the output rule of layerlie.contract)
    capture: program.Capture = None

    def settings(self, **more: Any) -> dict[str, Any]:
        return dict(group=self.group.name, scheme=self.scheme, estimator=self.estimator.name, output=self.output,
                    selected=self.pick, coords=self.coords, **more)


def _attribute_graph(gm: fx.GraphModule, x: torch.Tensor, o: _Options) -> Attribution:
    owner = gm  # the caller's graph: with_output may give a new one for each call
    gm, out_name = with_output(gm, o.output)
    rng = torch.Generator(device=x.device).manual_seed(o.seed)
    reaching = _reaching(gm, x, rng) if o.estimator.runs == "forward" else None
    with torch.no_grad(), jvp_ready(gm):
        defects = _Defects(gm, o.group, o.scheme, o.coords)
        defects.propagate(x, None)
        out_node = next(n for n in gm.graph.nodes if n.name == out_name)
        y = defects.values[out_node]
        if y.ndim == 0 or y.shape[0] != x.shape[0]:
            raise LayerlieError(f"output {o.output!r} has shape {tuple(y.shape)}, with no batch axis; choose "
                                "a node whose first axis is the batch")
        x_node = next(iter(gm.graph.nodes))
        total = _end_to_end(gm, out_name, x, defects.own(x_node), y)
        if defects.own(out_node) is not None:
            total = total - defects.own(out_node)
        sources = _sources(defects)
        contrib: dict[fx.Node, float] = {}
        shares: dict[fx.Node, float] = {}
        stderr: dict[fx.Node, float] = {}
        summed = torch.zeros_like(total)
        if o.estimator.runs == "forward":
            live = [n for n in sources if n.name in reaching]
            for n in sources:
                if n not in live:
                    contrib[n] = shares[n] = 0.0
            for chunk in _chunks(gm, live, defects, o.memory_budget):
                c = _propagate_sources(gm, x, chunk, defects, o.capture, (owner, out_name))
                for n, cv in zip(chunk, c):
                    contrib[n] = float(cv.norm())
                    shares[n] = float((cv * total).sum())
                    summed += cv
    if o.estimator.runs == "reverse":
        shares = _shares(gm, x, sources, defects, total, o.capture, (owner, out_name))
    elif o.estimator.runs == "probes":
        contrib, stderr = _hutchinson(gm, x, sources, defects, o.probes, o.estimator.probe, rng)
    lf2, degenerate = _squared_norm(total, y)
    residual = _check(o.estimator, total, summed, shares.values(), lf2, degenerate)
    table = _table(gm, defects, contrib, shares, stderr, lf2, degenerate)
    settings = o.settings(dtype=str(x.dtype), degenerate=degenerate, granularity="node",
                          rounded=len(defects.rounded), commuting=len(defects.commuting))
    e = {n.name: defects.e[n] for n in sources}
    return Attribution(table, total, residual, o.estimator.check, e, settings)


def _end_to_end(gm: fx.GraphModule, out_name: str, x: torch.Tensor, gx: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``J_F[G x]`` by one ``torch.func.jvp`` of the module's own code, outside the engine and its
    rules, so that a wrong rule cannot cancel out of the check (docs/method.md §4). The softmax head
    that layerlie appends is linearized at the logits in its shifted form (:func:`softmax_jvp`):
    autograd's formula loses float32 digits on a nearly one-hot softmax."""
    names = gm.meta.get("layerlie.outputs", {})
    whole = out_name != names.get("softmax") or "logits" not in names
    f = gm if whole else with_output(gm, "logits")[0]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")  # functorch's loop fallback
        jv = torch.func.jvp(f, (x,), (gx,))[1]
    return jv if whole else softmax_jvp(y, jv, -1)


def _squared_norm(total: torch.Tensor, y: torch.Tensor) -> tuple[float, bool]:
    """``||L F||^2``, and whether it is about zero (then shares are undefined)."""
    lf2 = float((total * total).sum())
    return lf2, lf2 < 1e-20 * max(1.0, float((y * y).sum()))


def _check(estimator: Estimator, total: torch.Tensor, summed: torch.Tensor, shares: Iterable[float],
           lf2: float, degenerate: bool) -> float:
    """The estimator's check (docs/method.md §4), relative, or absolute when ``L F`` is about 0.

    exact: ``||L F - sum_v c_v|| / ||L F||``; shares: ``|sum_v <c_v, L F> - ||L F||^2| / ||L F||^2``,
    the reverse pass against the forward total; Hutchinson: NaN, it estimates norms only.
    """
    if estimator.runs == "forward":
        residual = float((total - summed).norm())
        return residual if degenerate else residual / math.sqrt(lf2)
    if estimator.runs == "reverse":
        gap = abs(math.fsum(shares) - lf2)
        return gap if degenerate else gap / lf2
    return float("nan")


def _attribute_modules(model: nn.Module, x: torch.Tensor, o: _Options) -> Attribution:
    """The same estimators at module granularity, through forward hooks (``layerlie.hooks``)."""
    if o.output not in ("softmax", "logits"):
        raise LayerlieError(f"output {o.output!r} needs a graph; at module granularity use 'softmax' or 'logits'")

    def head(y: Any) -> torch.Tensor:
        logits = select(y, o.pick)
        return logits.softmax(-1) if o.output == "softmax" else logits

    rng = torch.Generator(device=x.device).manual_seed(o.seed)
    with exact_math():
        # total: forward mode through the unhooked model, independent of the sites' defects
        sites, y, total = module_defects(model, x, o.group, o.scheme, o.coords, head)
        contrib, shares, stderr = {}, {}, {}
        summed = torch.zeros_like(total)
        active = [s for s in sites if s.defect.any()]
        if o.estimator.runs == "forward":
            for s, c in zip(active, module_contributions(model, x, active, head)):
                contrib[s.name], shares[s.name] = float(c.norm()), float((c * total).sum())
                summed += c
        elif o.estimator.runs == "reverse":
            grads = module_cotangents(model, x, active, [total], head)[0]
            shares = {s.name: float((gr * s.defect).sum()) for s, gr in zip(active, grads)}
        else:
            zs = [o.estimator.probe(y.shape, dtype=y.dtype, device=y.device, generator=rng) for _ in range(o.probes)]
            samples = [[float((gr * s.defect).sum()) ** 2 for gr, s in zip(grads, active)]
                       for grads in module_cotangents(model, x, active, zs, head)]
            contrib, stderr = _probe_stats(dict(zip([s.name for s in active], zip(*samples))))
    lf2, degenerate = _squared_norm(total, y)
    residual = _check(o.estimator, total, summed, shares.values(), lf2, degenerate)
    modules = dict(model.named_modules())
    rows = []
    for depth, s in enumerate(sites):
        m = modules.get(s.module) if s.kind == "module" else None
        share = shares.get(s.name)
        rows.append(dict(
            node=s.name, op="call_module" if m is not None else "glue",
            target=type(m).__name__ if m is not None else "glue", module=s.module,
            layer_type="output" if s.kind == "output" else (module_type(m) if m is not None else None) or "reshape/other",
            depth=depth,
            layout=s.layout.describe(), tensor=True, local_norm=float(s.defect.norm()),
            contribution_norm=contrib.get(s.name, 0.0 if not s.defect.any() else float("nan")),
            share=share / lf2 if share is not None and not degenerate else (0.0 if not s.defect.any() else float("nan")),
            stderr=stderr.get(s.name, float("nan"))))
    settings = o.settings(dtype=str(x.dtype), degenerate=degenerate, model=type(model).__name__,
                          granularity="module")
    e = {s.name: s.defect for s in active}
    return Attribution(pd.DataFrame(rows), total, residual, o.estimator.check, e, settings)


def _traced(model: nn.Module, x: torch.Tensor, output: Output) -> fx.GraphModule:
    with jvp_ready(model):
        return trace(model, x, output=output)


def _chunks(gm: fx.GraphModule, sources: list[fx.Node], defects: _Defects,
            memory_budget: float | None) -> list[list[fx.Node]]:
    """The sources in consecutive chunks whose propagation holds at most ``memory_budget`` bytes
    of stacked tangents (:func:`layerlie.core.memory.plan_sources`), by the recorded values:
    a stack holds, below each source of its chunk, one slice shaped like the value (docs/design.md §7)."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    last = [max((order[u] for u in n.users), default=i) for i, n in enumerate(nodes)]
    lifetimes = memory.Lifetimes.of([memory.nbytes(defects.values.get(n)) for n in nodes], last)
    budget = memory.budget_bytes(memory_budget, lifetimes.forward)
    plan = memory.plan_sources(lifetimes, [order[n] for n in sources], budget, strict=memory_budget is not None)
    return [[sources[k] for k in chunk] for chunk in plan]


def _shares(gm: fx.GraphModule, x: torch.Tensor, sources: list[fx.Node], defects: _Defects, total: torch.Tensor,
            capture: program.Capture = None, key: tuple[fx.GraphModule, str] | None = None) -> dict[fx.Node, float]:
    """``<e_v, J_{out<-v}^T L F>`` for every source from one reverse pass (docs/method.md §4).

    The pass is a function of ``x``, ``L F`` and the defects, run as ``capture`` says
    (:mod:`layerlie.core.program`), keyed as in :func:`_propagate_sources`."""
    owner, out_name = key or (gm, None)

    def shares_pass(x: torch.Tensor, total: torch.Tensor, *e: torch.Tensor) -> torch.Tensor:
        at = dict(zip(sources, e))
        return _cotangents(gm, x, sources, [total], lambda n, g: (g * at[n]).sum())[0]

    inputs = (x, total, *(defects.e[n] for n in sources))
    shares = program.run(shares_pass, inputs, owner=owner, key=("shares", out_name, tuple(n.name for n in sources)),
                         capture=capture)
    return dict(zip(sources, shares.tolist()))


def _reaching(gm: fx.GraphModule, x: torch.Tensor, rng: torch.Generator) -> set[str]:
    """The nodes whose ``J_{out<-v}`` is not zero: ``J^T z != 0`` for one Gaussian ``z``, almost
    surely. One reverse pass spares forward propagations of defects that never reach the output
    (e.g. inside residual branches whose last BatchNorm is zero-initialised, as in timm). It runs
    before the defects pass, over every node, so that its graph and the stored activations of
    that pass are never held at once."""
    nodes = [n for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")]

    def probe(out: torch.Tensor) -> list[torch.Tensor]:
        return [torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=rng)]

    reach = _cotangents(gm, x, nodes, probe, lambda n, g: g.any())[0].tolist()
    return {n.name for n, r in zip(nodes, reach) if r}


def _cotangents(gm: fx.GraphModule, x: torch.Tensor, nodes: list[fx.Node],
                weights: Sequence[torch.Tensor] | Callable[[torch.Tensor], Sequence[torch.Tensor]],
                reduce: Callable[[fx.Node, torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
    """``reduce(v, J_{out<-v}^T w)`` (a 0-d tensor) for every node ``v`` in ``nodes`` and every ``w``
    in ``weights`` (or ``weights(output)``): one reverse pass each, a tensor ``(len(nodes),)`` (0
    where the pass does not reach). Each cotangent is reduced by a tensor hook, registered as the
    forward computes the node, the moment the pass reaches it, so neither the node's value nor its
    cotangent is kept for it; the reductions stay on the device, so the pass never waits for the
    host."""
    by_name = {n.name: n for n in nodes}
    reduced: dict[fx.Node, torch.Tensor] = {}

    def hook(n: fx.Node, v: Any) -> None:
        if n.name in by_name and isinstance(v, torch.Tensor) and v.requires_grad:
            v.register_hook(lambda g, n=by_name[n.name]: reduced.__setitem__(n, reduce(n, g)))

    recorder = Recorder(gm, hook)
    results = []
    with torch.enable_grad(), jvp_ready(gm):
        xr = x.detach().requires_grad_(True)
        out = recorder.run(xr)
        ws = weights(out) if callable(weights) else weights
        zero = torch.zeros((), dtype=x.dtype, device=x.device)
        for i, w in enumerate(ws):
            reduced.clear()
            torch.autograd.backward(out, w, retain_graph=i < len(ws) - 1, inputs=[xr])
            results.append(torch.stack([reduced.get(n, zero).to(zero.dtype) for n in nodes]))
    return results


def _hutchinson(gm: fx.GraphModule, x: torch.Tensor, sources: list[fx.Node], defects: _Defects,
                probes: int, probe: Callable[..., torch.Tensor],
                rng: torch.Generator) -> tuple[dict[fx.Node, float], dict[fx.Node, float]]:
    """Unbiased ``||c_v||^2 ~ mean_z (z^T J_{out<-v} e_v)^2`` with ``probe``'s draws (Gaussian
    as published) for probes of unit variance; returns ``sqrt`` of the mean and its standard error."""
    out_shape = defects.values[next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]].shape
    zs = [probe(out_shape, dtype=x.dtype, device=x.device, generator=rng) for _ in range(probes)]
    probed = torch.stack(_cotangents(gm, x, sources, zs, lambda n, g: (g * defects.e[n]).sum())).T.tolist()
    return _probe_stats({n: [z ** 2 for z in p] for n, p in zip(sources, probed)})


def _probe_stats(samples: dict[Any, Sequence[float]]) -> tuple[dict[Any, float], dict[Any, float]]:
    """``sqrt`` of the mean of each key's squared probe values, and its standard error."""
    norms, errs = {}, {}
    for n, s in samples.items():
        t = torch.tensor(s, dtype=torch.float64)
        mean, se = float(t.mean()), float(t.std() / math.sqrt(len(s))) if len(s) > 1 else float("nan")
        norms[n] = math.sqrt(mean)
        errs[n] = se / (2 * math.sqrt(mean)) if mean > 0 else float("nan")  # delta method for the sqrt
    return norms, errs


def _table(gm: fx.GraphModule, d: _Defects, contrib: dict, shares: dict, stderr: dict, lf2: float,
           degenerate: bool) -> pd.DataFrame:
    rows = []
    for depth, n in enumerate(gm.graph.nodes):
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        e = d.e.get(n)
        lay = d.layout(n)
        stack = n.meta.get("nn_module_stack") or {}
        module = n.target if n.op == "call_module" else (list(stack.values())[-1][0] if stack else "")
        strided = is_strided(gm, n, d.values, d.layout)
        share = shares.get(n)
        rows.append(dict(
            node=n.name, op=n.op, target=str(getattr(n.target, "__name__", n.target)), module=str(module),
            layer_type=layer_type(gm, n, strided), depth=depth, layout=lay.describe(),
            tensor=isinstance(d.values.get(n), torch.Tensor),
            local_norm=float(e.norm()) if e is not None else 0.0,
            contribution_norm=contrib.get(n, 0.0 if e is None or not e.any() else float("nan")),
            share=(share / lf2 if share is not None and not degenerate else (0.0 if e is None else float("nan"))),
            stderr=stderr.get(n, float("nan")), position_mismatch=d.mismatches.get(n.name, ""),
        ))
    return pd.DataFrame(rows)
