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

import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Mapping
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
    and the failures by task id (``type``, ``message``, ``traceback``)."""

    store: Path
    tasks: list[Task]
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, dict[str, str]] = field(default_factory=dict)


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
          progress: bool = True) -> SweepResult:
    """Run every task of ``spec`` and write one part each into ``store`` (docs/design.md §4).

    Args:
        spec: a TOML file or a mapping, checked by :func:`read_spec` before anything runs.
        store: the store folder.
        workers: Ray workers of the local Ray started here (default: the machine's CPUs);
            0 runs the tasks one after the other in this process, with the same results.
        address: join this Ray cluster instead of starting a local one.
        resume: skip the tasks whose part exists.
        dry_run: list the tasks (and which are done) without running or writing anything.
        force_new: start afresh when the store holds a different spec (its parts are removed).
        progress: show a progress bar of the finished tasks.

    Returns:
        A :class:`SweepResult`; ``failed`` lists the tasks that raised.

    Raises:
        SpecError: a bad spec, or a store that holds a different spec without ``force_new``.
    """
    checked = read_spec(spec)
    todo = tasks(checked)
    root = Path(store)
    old = st.manifest(root)
    changed = old is not None and old["spec"] != plain(checked)
    if changed and not force_new:
        keys = sorted(k for k in set(old["spec"]) | set(checked) if old["spec"].get(k) != plain(checked).get(k))
        raise SpecError(f"the store {str(root)!r} holds a sweep of a different spec (differs in: "
                        f"{', '.join(keys)}); pass --force-new to start it afresh, or choose another --store")
    finished = st.done(root) if resume and not changed else set()
    result = SweepResult(root, todo, skipped=[t.id for t in todo if t.id in finished])
    if dry_run:
        return result
    if workers is not None and workers < 0:
        raise LayerlieError(f"workers must be 0 (serial) or more, got {workers}")
    if workers == 0 and address:
        raise LayerlieError("workers=0 runs serially in this process; drop it to run on the cluster at --address")
    st.create(root, plain(checked), fresh=changed,
              weights={label: s.weights(checked["seed"]) for label, s in sources(checked).items()})
    pending = [t for t in todo if t.id not in finished]

    with _ProgressBar(progress, len(todo), len(result.skipped)) as advance:
        def record(task: Task, outcome: tuple[str, Any, Any]) -> None:
            kind, table, payload = outcome
            if kind == "ok":
                st.write_part(root, task.id, table, payload)
            else:
                st.write_failure(root, task.id, payload)
                result.failed[task.id] = payload
            result.ran.append(task.id)
            advance()

        if workers == 0:
            for task in pending:
                record(task, run_guarded(task, checked))
        elif pending:
            _run_on_ray(pending, checked, record, workers or os.cpu_count() or 1, address)
    return result


def run_task(task: Task, spec: Mapping[str, Any]) -> tuple[str, pd.DataFrame]:
    """Compute one task: its table's name and its rows, with model and settings columns (docs/design.md §4)."""
    torch.manual_seed(spec["seed"])  # the random-init weights, the same in every process
    source = sources(spec)[task.model]
    model = source.load(image_size(spec))
    batch = _images(model, spec)
    x = prepare(model, batch.x).x  # the model contract: images that fit the model, or one line before any measure
    settings = dict(model=task.model, scheme=spec["scheme"], seed=spec["seed"], weights=source.weights(spec["seed"]),
                    **st.where())
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


def _images(model: torch.nn.Module, spec: Mapping[str, Any]) -> Images:
    """The spec's images prepared for ``model`` at its size: a tensor as given, a folder's, or
    the embedded photos (docs/design.md §4)."""
    given, size = spec["images"], image_size(spec)
    if isinstance(given, torch.Tensor):
        return Images(given, [f"image{i}" for i in range(len(given))])
    if given is not None:
        return images(given, model, n=spec["n"], size=size)
    return photo_batch(model, n=spec["n"], size=size)


def _run_on_ray(pending: list[Task], spec: Mapping[str, Any], record: Callable[[Task, tuple], None],
                workers: int, address: str | None) -> None:
    """Run ``pending`` on Ray, and ``record`` each outcome in the order they finish (docs/design.md §4)."""
    try:
        import ray
    except ImportError:
        raise LayerlieError("Ray is not installed; pip install 'layerlie[sweep]', or run serially with "
                            "--workers 0") from None
    started = not ray.is_initialized()  # a session opened by the caller is reused and left open
    if started:
        quiet = dict(log_to_driver=False, logging_level=logging.ERROR, configure_logging=True)
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(address="local", num_cpus=workers, include_dashboard=False,
                     object_store_memory=256 * 2**20, **quiet)
    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(run_guarded)
        shared = ray.put(dict(spec))
        running = {remote.remote(t, shared): t for t in pending}
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                task = running.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as err:  # the worker died: record it like a raise
                    outcome = ("failed", None, st.describe(err))
                record(task, outcome)
    finally:
        if started:
            ray.shutdown()


class _ProgressBar:
    """A rich progress bar of finished tasks, or nothing; the context yields ``advance()`` (docs/design.md §3)."""

    def __init__(self, show: bool, total: int, done: int) -> None:
        self.progress = (Progress(TextColumn("sweep"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                  console=Console(stderr=True)) if show else None)
        self.total, self.done = total, done

    def __enter__(self) -> Callable[[], None]:
        if self.progress is None:
            return lambda: None
        self.progress.start()
        task = self.progress.add_task("sweep", total=self.total, completed=self.done)
        return lambda: self.progress.advance(task)

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
