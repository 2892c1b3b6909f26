"""Sweeps: many models x measures x groups into one store, on Ray or serially (docs/design.md §4).

The spec (:mod:`layerlie.results.spec`) names models, groups and measures; each measure is a
registry entry (:mod:`layerlie.results.measures`) that says how it runs and which store table it
writes.

One task is one (model, measure), and one group too for a per-group measure (``e2e``,
``layers``); ``metrics`` takes its invariance per group and ``ablation`` its LEE per group within
the one task. Task ids
are stable: the same spec gives the same ids. Each task writes one part of the store
(:mod:`layerlie.results.store`); a task that raises is recorded and the others go on.

Example:
    >>> import tempfile, layerlie as ll
    >>> spec = {"models": ["resnet18"], "groups": ["translate_x"], "measures": ["e2e"], "n": 1}
    >>> store = tempfile.mkdtemp()
    >>> [t.id for t in ll.sweep(spec, store, dry_run=True).tasks]  # lists, runs and writes nothing
    ['e2e-resnet18-translate_x-31fd0f']
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from layerlie.antialias.ablation import DEFAULT_VARIANTS
from layerlie.errors import LayerlieError
from layerlie.model.contract import prepare
from layerlie.model.data import Images, images, photo_batch
from layerlie.results import spec as sp
from layerlie.results import store as st
from layerlie.results.measures import get_measure, list_measures
from layerlie.results.spec import SpecError, image_size, plain, read_spec, sources


MAX_RETRIES = 2
"""How often Ray reruns a task whose worker process or node died (a system failure) before the
task is recorded as failed; a task that raises is recorded at once, never rerun."""

HEARTBEAT_S = 2.0
"""Seconds between the driver's heartbeats in the manifest; a heartbeat three times older is
stale: its driver is gone."""


class SweepError(LayerlieError):
    """A sweep that cannot run where it was asked to: a device or resource the cluster lacks."""


@dataclass(frozen=True)
class Task:
    """One unit of a sweep: a model, a measure, and a group where the measure takes one."""

    id: str
    model: str
    measure: str
    group: str | None = None


@dataclass
class SweepResult:
    """What :func:`sweep` did: every task of the spec, which ran, which were skipped as done,
    and the failures by task id (``type``, ``message``, ``traceback``), under the checked spec."""

    store: Path
    tasks: list[Task]
    spec: dict[str, Any] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepStatus:
    """A store's sweep as another shell sees it (:func:`status`): task counts, and whether its
    driver is alive (its heartbeat is fresh)."""

    tasks: int
    finished: int
    failed: int
    running: int
    pending: int
    driver: str
    alive: bool


def tasks(spec: Mapping[str, Any]) -> list[Task]:
    """The tasks of a checked spec, in a fixed order, with stable ids (docs/design.md §4)."""
    out = []
    for model in sources(spec):
        for measure in spec["measures"]:
            groups = spec.get(measure, {}).get("groups", spec["groups"]) if get_measure(measure).per_group else [None]
            for group in groups:
                out.append(Task(_task_id(model, measure, group), model, measure, group))
    return out


def sweep(spec: str | Path | Mapping[str, Any], store: str | Path, *, workers: int | None = None,
          address: str | None = None, resume: bool = False, dry_run: bool = False, force_new: bool = False,
          progress: bool = True, max_retries: int = MAX_RETRIES, gpu_resource: str = "GPU") -> SweepResult:
    """Run every task of ``spec`` and write one part each into ``store`` (docs/design.md §4).

    Args:
        spec: a TOML file or a mapping, checked by :func:`read_spec` before anything runs.
        store: the store folder.
        workers: Ray workers of the local Ray started here (default: the machine's CPUs);
            0 runs the tasks one after the other in this process, with the same results.
        address: join this Ray cluster instead of starting a local one.
        resume: skip the tasks whose part exists.
        dry_run: list the tasks (and which are done) without running or writing anything, or looking for
            the weights (pretrained weights are only named, checkpoints not hashed).
        force_new: start afresh when the store holds a different spec (its parts are removed).
        progress: show a progress bar of the finished and failed tasks.
        max_retries: how often Ray reruns a task whose worker or node died before it is
            recorded as failed (:data:`MAX_RETRIES`).
        gpu_resource: the Ray resource a GPU task asks for (:func:`placement`).

    Returns:
        A :class:`SweepResult`; ``failed`` lists the tasks that raised.

    Raises:
        SpecError: a bad spec, or a store that holds a different spec without ``force_new``.
        SweepError: ``device = "cuda"`` where no GPU is, refused before any task is submitted.
    """
    checked = read_spec(spec, weights=not dry_run)  # a listing names the weights, it does not look for them
    todo = tasks(checked)
    root = Path(store)
    old = st.manifest(root)
    # a key added to specs since the store was written reads as its default there
    stored = None if old is None else {**plain(sp.DEFAULTS), **old["spec"]}
    if stored is not None and dry_run:
        stored = sp.without_hashes(stored)
    mine = plain(checked)
    changed = stored is not None and stored != mine
    if changed and not force_new:
        keys = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
        raise SpecError(f"the store {str(root)!r} holds a sweep of a different spec (differs in: "
                        f"{', '.join(keys)}); pass --force-new to start it afresh, or choose another --store")
    finished = st.done(root) if resume and not changed else set()
    result = SweepResult(root, todo, checked, skipped=[t.id for t in todo if t.id in finished])
    if dry_run:
        return result
    if workers is not None and workers < 0:
        raise LayerlieError(f"workers must be 0 (serial) or more, got {workers}")
    if workers == 0 and address:
        raise LayerlieError("workers=0 runs serially in this process; drop it to run on the cluster at --address")
    if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
        raise LayerlieError(f"max_retries must be 0 or more, got {max_retries!r}")
    if workers == 0 and checked["device"] == "cuda" and not torch.cuda.is_available():
        raise SweepError("device = 'cuda', but this machine has no GPU for the serial run; set device = 'auto' "
                         "or 'cpu', or run on a cluster with GPUs (--address)")
    pending = [t for t in todo if t.id not in finished]
    with contextlib.ExitStack() as session:
        ray = session.enter_context(_ray_session(workers or os.cpu_count() or 1, address)) \
            if workers != 0 and pending else None
        need = placement(checked, ray.cluster_resources(), gpu=gpu_resource) if ray else {}  # before any write
        st.create(root, mine, fresh=changed,
                  weights={label: s.weights(checked["seed"]) for label, s in sources(checked).items()})
        _run(pending, checked, result, ray, need, progress=progress, max_retries=max_retries)
    return result


def _run(pending: list[Task], spec: Mapping[str, Any], result: SweepResult, ray: Any, need: dict[str, float], *,
         progress: bool, max_retries: int) -> None:
    """Run ``pending`` serially (``ray`` None) or on Ray, writing each outcome into the store
    under a progress bar and the driver's heartbeat (docs/design.md §4)."""
    root, total = result.store, len(result.tasks)
    with _ProgressBar(progress, total, len(result.skipped)) as advance, _Heartbeat(root, total) as beat:
        def record(task: Task, outcome: tuple[str, Any, Any]) -> None:
            kind, table, payload = outcome
            if kind == "ok":
                st.write_part(root, task.id, table, payload)
            else:
                st.write_failure(root, task.id, payload)
                result.failed[task.id] = payload
            result.ran.append(task.id)
            beat.finish(task.id, failed=kind != "ok")
            advance(failed=kind != "ok")

        if ray is None:
            for task in pending:
                beat.start(task.id)
                record(task, run_guarded(task, spec))
        else:
            _run_on_ray(ray, pending, spec, need, record, beat.start, max_retries=max_retries)


def placement(spec: Mapping[str, Any], cluster: Mapping[str, float] | None = None, *,
              gpu: str = "GPU") -> dict[str, float]:
    """The resources one task of ``spec`` asks Ray for (docs/design.md §4).

    A task takes one CPU; with ``device = "cuda"`` also ``gpus_per_task`` of ``gpu``, and with
    ``device = "auto"`` the same where the cluster has any ``gpu``, else none.

    Args:
        spec: a checked spec.
        cluster: the cluster's resources (``ray.cluster_resources()``); None when not known, where
            ``auto`` counts as a GPU task.
        gpu: the resource that stands for a GPU: Ray's ``"GPU"``, or a custom resource name.

    Returns:
        The resource shape, e.g. ``{"CPU": 1, "GPU": 0.25}``.

    Raises:
        SweepError: a shape the cluster cannot hold (a GPU task where it has no ``gpu``), so
            that nothing is left pending.

    Example:
        >>> from layerlie.results.spec import read_spec
        >>> placement(read_spec({"models": ["resnet18"], "device": "cuda", "gpus_per_task": 0.25}))
        {'CPU': 1, 'GPU': 0.25}
    """
    device = spec["device"]
    wants_gpu = device == "cuda" or (device == "auto" and (cluster is None or cluster.get(gpu, 0) > 0))
    shape: dict[str, float] = {"CPU": 1, **({gpu: spec["gpus_per_task"]} if wants_gpu else {})}
    if cluster is not None:
        short = [k for k, v in shape.items() if cluster.get(k, 0) < v]
        if short:
            has = ", ".join(f"{k} {v:g}" for k, v in sorted(cluster.items()) if k in ("CPU", "GPU", gpu)) or "nothing"
            fix = ("set device = 'auto' or 'cpu', or run on a cluster with GPUs" if gpu in short
                   else "add worker nodes with CPUs")
            raise SweepError(f"device = {device!r}: each task asks for {_shape_text(shape)}, but the cluster has "
                             f"{has}; {fix}")
    return shape


def node_types(spec: Mapping[str, Any], todo: list[Task], *, gpu: str = "GPU") -> dict[str, int]:
    """How many of ``todo`` need each kind of node, by resource shape: ``"CPU task (CPU 1)"`` or
    ``"GPU task (CPU 1, GPU 0.25)"``, as ``--dry-run`` prints them (docs/design.md §4)."""
    shape = placement(spec, gpu=gpu)
    kind = "GPU task" if gpu in shape else "CPU task"
    if spec["device"] == "auto":
        kind = "GPU task where the cluster has GPUs, else CPU task"
    return {f"{kind} ({_shape_text(shape)})": len(todo)} if todo else {}


def status(store: str | Path) -> SweepStatus:
    """The state of the sweep that writes ``store``, from its manifest's heartbeat and its parts:
    finished, failed, running (the driver's heartbeat is fresh, the task submitted and without a
    part) and pending tasks (docs/design.md §4).

    Raises:
        StoreError: a folder without a manifest, or a store that no sweep has beaten in.
    """
    root = Path(store)
    data = st.manifest(root)
    if data is None:
        raise st.StoreError(f"{str(root)!r} is not a layerlie store (no manifest.json); pass the --store of a sweep")
    beat = data.get("heartbeat")
    if beat is None:
        raise st.StoreError(f"{str(root)!r} has no heartbeat: no sweep has run into it with this layerlie")
    done = st.done(root)
    age = time.time() - beat["time"]
    alive = beat.get("ended") is None and age < 3 * HEARTBEAT_S and _process_alive(beat["host"], beat["pid"])
    running = set(beat["running"]) - done if alive else set()
    failed = set(st.failures(root)) - done - running
    pending = max(beat["tasks"] - len(done) - len(failed) - len(running), 0)
    if alive:
        driver = f"running: driver pid {beat['pid']} on {beat['host']}, heartbeat {age:.1f} s ago"
    elif beat.get("ended") is not None:
        driver = f"ended {time.time() - beat['ended']:.0f} s ago (driver pid {beat['pid']} on {beat['host']})"
    else:
        driver = (f"not running: driver pid {beat['pid']} on {beat['host']} last beat {age:.0f} s ago; "
                  "rerun the sweep with --resume")
    return SweepStatus(beat["tasks"], len(done), len(failed), len(running), pending, driver, alive)


def run_task(task: Task, spec: Mapping[str, Any]) -> tuple[str, pd.DataFrame]:
    """Compute one task: its table's name and its rows, with model and settings columns (docs/design.md §4)."""
    torch.manual_seed(spec["seed"])  # the random-init weights, the same in every process
    device = _device(spec)
    source = sources(spec)[task.model]
    model = source.load(image_size(spec), device)
    batch = _images(model, spec)
    x = prepare(model, batch.x.to(device)).x  # the model contract: images that fit, or one line before any measure
    settings = dict(model=task.model, scheme=spec["scheme"], seed=spec["seed"], weights=source.weights(spec["seed"]),
                    device=str(device), **st.where())
    measure = get_measure(task.measure)
    table = measure.run(model, x, batch.names, task.group, spec)
    return measure.table, table.assign(**settings).reset_index(drop=True)


def run_guarded(task: Task, spec: Mapping[str, Any]) -> tuple[str, Any, Any]:
    """:func:`run_task` on one thread, as ``("ok", table, frame)`` or ``("failed", None, error)`` (docs/design.md §4).

    One thread per task keeps N workers on N cores, and makes the serial path compute what a
    Ray worker does, bit for bit.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        table, frame = run_task(task, spec)
        return "ok", table, frame
    except Exception as err:  # a failing task is recorded and the sweep goes on
        return "failed", None, st.describe(err)
    finally:
        torch.set_num_threads(threads)


def _device(spec: Mapping[str, Any]) -> torch.device:
    """Where this process measures a task of ``spec``: a GPU Ray gave it (or this machine's), or
    the CPU (docs/design.md §4)."""
    if spec["device"] == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if spec["device"] == "auto":
        return torch.device("cpu")
    raise SweepError(f"device = 'cuda', but the process {os.getpid()} on {socket.gethostname()} sees no GPU; "
                     "set device = 'auto' or 'cpu'")


def _images(model: torch.nn.Module, spec: Mapping[str, Any]) -> Images:
    """The spec's images prepared for ``model`` at its size: a tensor as given, a folder's, or
    the embedded photos (docs/design.md §4)."""
    given, size = spec["images"], image_size(spec)
    if isinstance(given, torch.Tensor):
        return Images(given, [f"image{i}" for i in range(len(given))])
    if given is not None:
        return images(given, model, n=spec["n"], size=size)
    return photo_batch(model, n=spec["n"], size=size)


@contextlib.contextmanager
def _ray_session(workers: int, address: str | None) -> Iterator[Any]:
    """Ray, joined at ``address`` or started here with ``workers`` CPUs; a session the caller
    opened is reused and left open (docs/design.md §4)."""
    try:
        import ray
    except ImportError:
        raise LayerlieError("Ray is not installed; pip install 'layerlie[sweep]', or run serially with "
                            "--workers 0") from None
    started = not ray.is_initialized()
    if started:
        quiet = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(address="local", num_cpus=workers, include_dashboard=False,
                     object_store_memory=256 * 2**20, **quiet)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def _run_on_ray(ray: Any, pending: list[Task], spec: Mapping[str, Any], need: Mapping[str, float],
                record: Callable[[Task, tuple], None], submitted: Callable[[str], None], *, max_retries: int) -> None:
    """Run ``pending`` on Ray, each task asking for the resources ``need`` (:func:`placement`), and
    ``record`` each outcome in the order they finish; ``submitted`` hears each task as it is handed
    to the cluster (docs/design.md §4).

    Tasks are handed over as slots free up, as many at a time as the cluster's live resources
    hold, so that a submitted task is a running one. A task whose worker or node dies is rerun
    by Ray up to ``max_retries`` times.
    """
    rest = {k: v for k, v in need.items() if k not in ("CPU", "GPU")}
    remote = ray.remote(max_retries=max_retries, retry_exceptions=False, num_cpus=need["CPU"],
                        num_gpus=need.get("GPU", 0), resources=rest)(run_guarded)
    shared = ray.put(dict(spec))
    queue, running = list(pending), {}
    while queue or running:
        room = max(_slots(need, ray.cluster_resources()) - len(running), 0 if running else 1)
        for task in queue[:room]:
            running[remote.remote(task, shared)] = task
            submitted(task.id)
        queue = queue[room:]
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            task = running.pop(ref)
            try:
                outcome = ray.get(ref)
            except ray.exceptions.RayError as err:  # its worker or node died past the retries, or out of memory
                outcome = ("failed", None, st.describe(err))
            record(task, outcome)


def _slots(shape: Mapping[str, float], cluster: Mapping[str, float]) -> int:
    """How many tasks of ``shape`` the live ``cluster`` holds at once (docs/design.md §4)."""
    return min(int(cluster.get(k, 0) / v + 1e-9) for k, v in shape.items() if v > 0)


def _shape_text(shape: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in shape.items())


def _process_alive(host: str, pid: int) -> bool:
    """False only where ``pid`` is known to be gone: on this host, and no such process."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Heartbeat:
    """The driver's heartbeat: a thread writes the time, this process and the task counts to
    the manifest every :data:`HEARTBEAT_S` seconds, within a quarter second of a task's start or
    end, and once more, ended, on exit (docs/design.md §4)."""

    def __init__(self, store: Path, total: int) -> None:
        self.store, self.total = store, total
        self.running: set[str] = set()
        self.finished = self.failed = 0
        self.changed, self.last = False, 0.0
        self.lock, self.stop = threading.Lock(), threading.Event()
        self.thread = threading.Thread(target=self._loop, name="layerlie-heartbeat", daemon=True)

    def start(self, task: str) -> None:
        with self.lock:
            self.running.add(task)
            self.changed = True

    def finish(self, task: str, *, failed: bool) -> None:
        with self.lock:
            self.running.discard(task)
            self.failed += failed
            self.finished += not failed
            self.changed = True

    def beat(self, ended: float | None = None) -> None:
        with self.lock:
            self.changed, self.last = False, time.time()
            record = dict(time=self.last, pid=os.getpid(), host=socket.gethostname(), tasks=self.total,
                          finished=self.finished, failed=self.failed, running=sorted(self.running), ended=ended)
            st.write_heartbeat(self.store, record)

    def _loop(self) -> None:
        while not self.stop.wait(HEARTBEAT_S / 8):
            if self.changed or time.time() - self.last >= HEARTBEAT_S:
                self.beat()

    def __enter__(self) -> _Heartbeat:
        self.beat()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.beat(ended=time.time())


class _ProgressBar:
    """A rich progress bar of the tasks done, with the failed ones counted apart, or nothing; the
    context yields ``advance(failed=...)`` (docs/design.md §3)."""

    def __init__(self, show: bool, total: int, done: int) -> None:
        self.progress = (Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
                                  console=Console(stderr=True)) if show else None)
        self.total, self.done, self.failed = total, done, 0

    def __enter__(self) -> Callable[..., None]:
        if self.progress is None:
            return lambda failed=False: None
        self.progress.start()
        task = self.progress.add_task("sweep", total=self.total, completed=self.done, failed=0)

        def advance(failed: bool = False) -> None:
            self.failed += failed
            self.progress.update(task, advance=1, failed=self.failed)
        return advance

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


def _task_id(model: str, measure: str, group: str | None) -> str:
    """``measure-model[-group]-hash``: readable, file-safe, and the same for the same task (docs/design.md §4)."""
    key = json.dumps([measure, model, group])
    return f"{'-'.join(slug(s) for s in (measure, model, group) if s)}-{hashlib.sha1(key.encode()).hexdigest()[:6]}"


def slug(text: str) -> str:
    """``text`` as a task id writes it: each run of characters other than letters, digits, ``_``
    and ``.`` becomes one ``_`` (docs/design.md §4)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text)


_DEPRECATED = {"KEYS": ("layerlie.results.spec.KEYS", lambda: sp.KEYS),
               "MODEL_KEYS": ("layerlie.results.spec.MODEL_KEYS", lambda: sp.MODEL_KEYS),
               "DEFAULTS": ("layerlie.results.spec.DEFAULTS", lambda: sp.DEFAULTS),
               "MEASURES": ("list_measures()", lambda: tuple(list_measures())),
               "OPTIONS": ("get_measure(name).options",
                           lambda: {m: get_measure(m).options for m in list_measures() if get_measure(m).options}),
               "VARIANTS": ("layerlie.antialias.ablation.DEFAULT_VARIANTS", lambda: DEFAULT_VARIANTS)}


def __getattr__(name: str) -> Any:
    if name in _DEPRECATED:
        new, value = _DEPRECATED[name]
        warnings.warn(f"layerlie.results.sweep.{name} is deprecated; use {new}", DeprecationWarning, stacklevel=2)
        return value()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
