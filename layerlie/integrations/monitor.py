"""Equivariance measured along training, from inside a plain PyTorch loop (docs/method.md §2, 4, 7).

A :class:`Monitor` measures a fixed probe batch every ``every`` steps: the published e2e LEE
per group (docs/method.md §2), optionally the signed layer shares by layer type with their check
(docs/method.md §4), and optionally the finite metrics (docs/method.md §7). Each measurement runs in eval mode
and puts back exactly what it touched, so training with a monitor is bit-identical to training
without one: every module's training flag, every parameter's ``.grad``, the buffers
(BatchNorm running statistics) and the random states of the CPU and of CUDA.

What depends only on the architecture and the fixed probe is made once, at construction
(:attr:`Monitor.setup`): the memory plan of the LEE's passes with the probe's tangents ``G x``
(:func:`layerlie.measure.lie.lee_passes`), and, for the shares and metrics, the traced graph. A
measurement is then a weight copy into that graph, the engine's passes
(:func:`layerlie.measure.lie.replay_lee` on the live model; with ``layers``, the shares, whose
total gives the LEE) and the reductions, so it follows training; :meth:`Monitor.cost` says
what it costs the loop. Each measurement can go to a TensorBoard writer
(:meth:`Monitor.log_to`); in Lightning, :mod:`layerlie.integrations.lightning` builds the monitor
at fit start and logs to the trainer's loggers.

Example:
    >>> import torch, layerlie as ll
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(),
    ...                             torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> mon = ll.Monitor(model, torch.randn(1, 3, 16, 16), groups=["translate_x", "rotate"], every=2)
    >>> [mon.step(i) for i in range(4)]  # here, a training step before each call
    [True, False, True, False]
    >>> mon.table()[["step", "group"]].values.tolist()
    [[0, 'translate_x'], [0, 'rotate'], [2, 'translate_x'], [2, 'rotate']]
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch
from torch import fx, nn

from layerlie.results import store as st
from layerlie.measure.attribution import attribute
from layerlie.model.contract import Output, prepare
from layerlie.deprecation import renamed
from layerlie.errors import LayerlieError
from layerlie.core.groups import DEFAULT_GROUPS, Group, resolve_groups
from layerlie.measure.lie import Pass, jvp_ready, lee_passes, per_image_lee, replay_lee
from layerlie.core.engine import coarsest
from layerlie.measure.metrics import DEFAULT_METRICS, list_metrics, metrics as finite_metrics
from layerlie.core.ops import list_layer_types
from layerlie.core.tangent import check_scheme
from layerlie.model.trace import TraceError, trace, with_output

TABLE = "monitor"
"""The store table the monitor writes."""

Metrics = bool | Sequence[str] | Mapping[str, Mapping[str, Any]]
"""``metrics=``: True for :data:`~layerlie.measure.metrics.DEFAULT_METRICS`, metric names, or metric names mapped to their options."""


class MonitorError(LayerlieError):
    """A monitor that cannot be set up: one line that names the argument and the fix."""


class Setup(NamedTuple):
    """What a :class:`Monitor` makes once, from the architecture and the fixed probe, and reuses
    at every measurement (docs/design.md §7).

    Attributes:
        lee: the probabilities of the live model as the engine's graph
            (:func:`layerlie.core.engine.coarsest`): it reads the live weights, so nothing is
            copied. None with ``layers``, whose shares bring the LEE with them (their total).
        passes: the LEE's passes, planned once, with the probe's tangents
            (:func:`layerlie.measure.lie.lee_passes`); none with ``layers``.
        graph: the traced graph, for ``layers`` and ``metrics`` (else None); its weights are
            copied from the live model at each measurement.
        softmax: ``graph`` with the softmax output, for ``layers`` (else None).
        seconds: the time the set-up took, with one measurement whose values are dropped (it
            pays the first call's costs: lazy imports, the layouts of the graph).
    """

    lee: fx.GraphModule | None
    passes: list[Pass]
    graph: fx.GraphModule | None
    softmax: fx.GraphModule | None
    seconds: float


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Run the body in eval mode under ``torch.no_grad`` and put back what it may touch.

    Restored afterwards: every module's ``training`` flag, every parameter's ``.grad`` (the
    same tensor objects, held aside so that nothing accumulates into them), the buffers' values
    (BatchNorm running statistics), and the CPU and CUDA random states.
    """
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    for p, _ in grads:
        p.grad = None
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, g in grads:
            p.grad = g
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


class Monitor:
    """Measure a model's equivariance on a probe batch along training (docs/method.md §2, 4, 7).

    Args:
        model: the model being trained; it returns logits ``(B, K)``, or a structure that holds
            them (the output rule of :mod:`layerlie.model.contract`).
        x: the probe images ``(B, C, H, W)``, normalized as the model expects; a copy is
            kept, in the model's dtype and on its device (cast with a note).
        groups: names or groups, as :func:`layerlie.resolve_groups` takes them.
        every: :meth:`step` measures when ``step % every == 0``.
        layers: also record the signed shares of ``L F`` by layer type, from
            ``layerlie.attribute(..., estimator="shares")`` (docs/method.md §4), as ``share_<layer type>``
            columns, and their check ``|sum share - 1|`` as ``share_residual``.
        metrics: also record finite metrics (docs/method.md §7), the mean over the probe images, one
            column each: True for :data:`~layerlie.measure.metrics.DEFAULT_METRICS`, names from :func:`layerlie.list_metrics`,
            or a mapping of names to their options (``{"eq_t": {"max_shift": 0.25}}``), as
            :func:`layerlie.metrics` takes them. They do not depend on the group.
        scheme: the derivative scheme of ``G``.
        store: a results store folder (:mod:`layerlie.results.store`): each measurement is written
            as the part ``monitor-<run>-<step>`` of the table ``monitor``; an existing manifest
            is kept. Measuring a step again replaces its part.
        run: the training run's name, required with ``store``; a ``run`` column of the table.
        output: the tensor of a tuple, dict or ``.logits`` output to measure (the output rule).

    Attributes:
        setup: what was made once (:class:`Setup`): the LEE's plan and tangents, the trace.
        setup_seconds: the one-time set-up, done at construction: the plan, the trace, and one
            measurement whose values are dropped, which pays the first call's costs (lazy
            imports, the graph's layouts). :attr:`overhead` and the ``seconds`` column leave it out.

    Raises:
        MonitorError: ``every`` below 1, unknown metrics, ``store`` without ``run``, or a model
            whose graph cannot be traced when ``layers`` or ``metrics`` needs it.
        LayerlieError: a probe batch of the wrong shape, dtype or channels; an unknown group or
            scheme.
    """

    @renamed(x_probe="x")
    def __init__(self, model: nn.Module, x: torch.Tensor,
                 groups: str | Group | Iterable[str | Group] = DEFAULT_GROUPS, *, every: int = 50,
                 layers: bool = False, metrics: Metrics = False, scheme: str = "central",
                 store: str | Path | None = None, run: str | None = None, output: Output = None) -> None:
        start = time.perf_counter()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise MonitorError(f"every must be a positive integer (measure every that many steps), got {every!r}")
        check_scheme(scheme)
        with untouched(model):  # the live model, measured in eval mode as every measurement is
            prepared = prepare(model, x, output)
        x, self.output = prepared.x, prepared.output
        self.groups = resolve_groups(groups, channels=x.shape[1])
        compat = [g.name for g in self.groups if g.origin is not None]
        if layers and compat:
            raise MonitorError(f"group {compat[0]!r} is a compatibility map, which layer shares cannot take; "
                               "drop it from groups= or pass layers=False")
        self.options = _metric_options(metrics)
        self.which = list(self.options)
        unknown = [w for w in self.which if w not in list_metrics()]
        if unknown:
            raise MonitorError(f"unknown metric {unknown[0]!r}; pass metrics=True or names from "
                               f"{', '.join(list_metrics())}")
        if store is not None and not run:
            raise MonitorError("store= needs run=, the name of this training run, e.g. run='resnet10t-seed0'")
        self.model, self.x = model, x.detach().clone()
        self.every, self.layers, self.scheme = every, layers, scheme
        self.store, self.run = (None if store is None else Path(store)), run
        lee_graph, passes = self._plan(prepared.selected) if not layers else (None, [])
        self._gm = self._trace() if layers or self.which else None
        self._soft = with_output(self._gm, "softmax")[0] if layers else None
        self.setup = Setup(lee_graph, passes, self._gm, self._soft, 0.0)
        with untouched(self.model):
            self._values()
        self.setup = self.setup._replace(seconds=time.perf_counter() - start)
        self.setup_seconds = self.setup.seconds
        if self.store is not None:
            if st.manifest(self.store) is None:
                st.create(self.store, self.settings())
            (self.store / "parts").mkdir(parents=True, exist_ok=True)
        self._rows: dict[int, list[dict[str, Any]]] = {}
        self._seconds: list[float] = []
        self._train = [0.0, 0]  # seconds and count of training steps timed between calls
        self._since: float | None = None  # when the monitor last handed control back
        self._writers: list[Any] = []

    def settings(self) -> dict[str, Any]:
        """What the monitor measures, as plain data (a new store's manifest records it)."""
        return dict(monitor=dict(groups=[g.name for g in self.groups], every=self.every, layers=self.layers,
                                 metrics=self.options, scheme=self.scheme, run=self.run,
                                 probe=list(self.x.shape)))

    def step(self, step: int) -> bool:
        """Call once per training step: measure when ``step % every == 0`` (or when nothing has
        been measured yet) and that step has not been measured. Returns whether it measured."""
        now = time.perf_counter()
        if self._since is not None:
            self._train[0] += now - self._since
            self._train[1] += 1
        due = (step % self.every == 0 or not self._rows) and step not in self._rows
        if due:
            self.measure(step)
        self._since = time.perf_counter()
        return due

    def measure(self, step: int) -> pd.DataFrame:
        """Measure now (at initialisation, at the end); replaces the rows of ``step`` if it was
        measured before. Returns this measurement's rows."""
        start = time.perf_counter()
        with untouched(self.model):
            values = self._values()
        seconds = time.perf_counter() - start
        self._seconds.append(seconds)
        train = self._train_step()
        rows = [dict(step=step, group=g, **v, scheme=self.scheme, seconds=seconds, overhead=seconds / train)
                for g, v in values.items()]
        if self.run is not None:
            rows = [dict(r, run=self.run) for r in rows]
        self._rows[step] = rows
        frame = pd.DataFrame(rows)
        if self.store is not None:
            st.write_part(self.store, _part(self.run, step), TABLE, frame)
        for writer in self._writers:
            _write(writer, self.scalars(step), step)
        self._since = time.perf_counter()
        return frame

    def scalars(self, step: int) -> dict[str, float]:
        """The measurement of ``step`` as named scalars, the form loggers take:
        ``layerlie/lee/<group>``; with ``layers``, ``layerlie/share_<layer type>/<group>`` (the
        type's spaces and slashes as ``_``: ``share_strided_downsampling``) and
        ``layerlie/share_residual/<group>``; with ``metrics``, ``layerlie/<metric>``."""
        if step not in self._rows:
            raise MonitorError(f"step {step} was not measured; measured steps: {sorted(self._rows) or 'none yet'}")
        out = {}
        for row in self._rows[step]:
            out[f"layerlie/lee/{row['group']}"] = row["lee"]
            out.update({f"layerlie/{re.sub('[ /]', '_', k)}/{row['group']}": v
                        for k, v in row.items() if k.startswith("share_")})
            out.update({f"layerlie/{m}": row[m] for m in self.which})
        return out

    def log_to(self, writer: Any) -> None:
        """Write every measurement to ``writer``, those made so far and each one to come, as
        :meth:`scalars` names them, at their training step.

        Args:
            writer: a TensorBoard ``torch.utils.tensorboard.SummaryWriter``, or anything with
                its ``add_scalar(tag, value, global_step)``.
        """
        if not callable(getattr(writer, "add_scalar", None)):
            raise MonitorError(f"log_to needs a writer with add_scalar(tag, value, global_step), such as "
                               f"torch.utils.tensorboard.SummaryWriter; got {type(writer).__name__}")
        self._writers.append(writer)
        for step in sorted(self._rows):
            _write(writer, self.scalars(step), step)

    def table(self) -> pd.DataFrame:
        """One row per measured step and group, in step order: ``step, group, lee, scheme,
        seconds, overhead`` (with ``layers``: ``share_<layer type>``, ``share_residual``; with
        ``metrics``: one column per metric; with ``run``: ``run``)."""
        rows = [r for step in sorted(self._rows) for r in self._rows[step]]
        table = pd.DataFrame(rows)
        table.attrs.update(self.settings()["monitor"], setup_seconds=self.setup_seconds)
        return table

    def cost(self) -> str:
        """What the monitor costs the training loop, in one line (docs/design.md §7): training
        steps per measurement (:attr:`overhead`, the loop's own steps as :meth:`step` timed
        them), the mean measurement's seconds, and the one-time set-up's (:attr:`setup_seconds`).

        Example: ``"0.41 training steps per measurement (0.289 s each, 7 made), plus 1.07 s once (set-up)"``.
        """
        once = f"plus {self.setup_seconds:.2f} s once (set-up)"
        if not self._seconds:
            return f"no measurement yet; {once}"
        mean = sum(self._seconds) / len(self._seconds)
        steps = self.overhead
        per = "unknown training steps (no step timed yet)" if math.isnan(steps) else f"{steps:.2f} training steps"
        return f"{per} per measurement ({mean:.3f} s each, {len(self._seconds)} made), {once}"

    @property
    def overhead(self) -> float:
        """Mean measurement time over mean training-step time (the time between calls to
        :meth:`step`, measurements excluded); NaN until both are known. The one-time set-up is
        not in it: it is :attr:`setup_seconds`."""
        if not self._seconds:
            return float("nan")
        return sum(self._seconds) / len(self._seconds) / self._train_step()

    def _train_step(self) -> float:
        seconds, count = self._train
        return seconds / count if count and seconds > 0 else float("nan")

    def _plan(self, selected: Any) -> tuple[fx.GraphModule, list[Pass]]:
        """The probabilities of the live (selected) model as the engine's graph, and the LEE's
        passes over the probe, planned and with their tangents: made once."""
        def probabilities(z: torch.Tensor) -> torch.Tensor:
            return selected(z).softmax(-1)

        with untouched(self.model), jvp_ready(self.model):
            return coarsest(probabilities), lee_passes(probabilities, self.x, self.groups, scheme=self.scheme)

    def _trace(self) -> fx.GraphModule:
        """The model's graph, traced once; its parameters are frozen, since the shares' reverse
        pass needs only the input's cotangent, and :meth:`_sync` refreshes them."""
        with untouched(self.model):
            try:
                gm = trace(self.model, self.x, output=self.output)
            except TraceError as err:
                raise MonitorError(f"{err}; layers= and metrics= need the graph: pass layers=False, "
                                   "metrics=False") from None
        gm.eval().requires_grad_(False)
        live = _tensors(self.model)
        stale = [name for name in _tensors(gm) if name not in live]
        if stale:
            raise MonitorError(f"the traced graph holds {stale[0]!r}, which the model does not, so it could not "
                               "follow training; pass layers=False, metrics=False")
        return gm

    def _sync(self) -> None:
        """Copy the live model's parameters and buffers into the traced graph."""
        live = _tensors(self.model)
        for name, t in _tensors(self._gm).items():
            t.copy_(live[name])

    def _values(self) -> dict[str, dict[str, float]]:
        """One measurement, by group: ``lee`` and the optional share and metric columns."""
        if self._gm is not None:
            self._sync()
        if not self.layers:
            with jvp_ready(self.model):
                per_image = replay_lee(self.setup.lee, self.setup.passes)
            out = {g.name: {"lee": v} for g, v in zip(self.groups, per_image.mean(1).tolist())}
        else:
            out = {}
            for g in self.groups:
                a = attribute(self._soft, self.x, g, estimator="shares", scheme=self.scheme)
                by_type = a.nodes.groupby("layer_type")["share"].sum()
                # the shares' total is L softmax by one jvp of the whole graph: the LEE, without a pass of its own
                out[g.name] = {"lee": float(per_image_lee(a.total[None]).mean()),
                               **{f"share_{t}": float(by_type.get(t, 0.0)) for t in list_layer_types()},
                               "share_residual": a.residual}
        if self.which:
            per_image = finite_metrics(self._gm, self.x, self.which, **self.options)
            means = per_image.groupby("metric", sort=False)["value"].mean()
            for v in out.values():
                v.update({m: float(means[m]) for m in self.which})
        return out


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by name, tied ones under each of their names."""
    return {**dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False))}


def _write(writer: Any, scalars: Mapping[str, float], step: int) -> None:
    """One measurement's scalars into a TensorBoard-style writer."""
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, global_step=step)


def _metric_options(metrics: Metrics) -> dict[str, dict[str, Any]]:
    """``metrics=`` as ``{name: options}``, in the order given."""
    if metrics is True:
        return {m: {} for m in DEFAULT_METRICS}
    if isinstance(metrics, Mapping):
        return {m: dict(o) for m, o in metrics.items()}
    return {m: {} for m in metrics or []}


def _part(run: str | None, step: int) -> str:
    """``monitor-<run>-<step>``: file-safe, and in step order when sorted by name."""
    return f"{TABLE}-{re.sub(r'[^A-Za-z0-9_.]+', '_', str(run))}-{step:09d}"
