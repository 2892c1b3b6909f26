"""Sweeps: many models x measures x groups into one store, on Ray or serially (docs/design.md §4).

A spec is TOML (or a dict) with fixed keys::

    models = ["resnet18", "convnext_*"]   # timm names, fnmatch patterns, or "pkg.module:factory",
                                          # or a table per model (below)
    groups = ["translate_x", "rotate"]    # or "all"
    measures = ["e2e", "layers", "metrics", "ablation"]
    n = 8                                 # embedded photos; or images = "DIR" with n as a cap
    seed = 0                              # random-init weights, and every metric's generator
    scheme = "central"                    # optional
    batch_size = 8                        # optional: images per pass
    size = 64                             # optional: images of 64 x 64 pixels (or [h, w]), and
                                          # img_size=size for models that take it (ViTs)
    [layers]                              # optional: estimator, groups, top, output, probes, and
                                          # alias = true to join the alias flags (docs/method.md §6)
    [metrics]                             # optional: which, options = {eq_r = {max_angle = 45}}
    [ablation]                            # optional: variants, estimator, filter_size, groups

A model's table says where its weights come from, and may name it (``label``, the ``model``
column; by default the timm name with its pretrained tag, or the name and the checkpoint's
file)::

    models = [{ name = "resnet50", pretrained = true },          # timm's weights: resnet50.a1_in1k
              { name = "resnet50", checkpoint = "w.safetensors" },  # a state dict, read strictly
              { callable = "pkg.mod:fn", checkpoint = "w.pth" },    # the callable's model, these weights
              "resnet50"]                                           # random init from the seed

A dict spec may also hold ``{ module = an_nn_Module }`` and ``images = a (B, C, H, W) tensor``;
the manifest records their class, shape and hash. Every row records where its weights came
from (``weights``: ``random init (seed N)``, ``pretrained (timm arch.tag)``, ``checkpoint
(path, sha256 H)``, ``callable pkg.mod:fn`` or ``module Name (given)``) and the ``host`` and
``pid`` its task ran on; the manifest records the weights per model.

One task is one (model, measure), and one group too for ``e2e`` and ``layers``; ``metrics``
takes its invariance per group and ``ablation`` its LEE per group within the one task. Task ids
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

import fnmatch
import hashlib
import json
import logging
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from layerlie.results import store as st
from layerlie.antialias.ablation import ablate, list_variants
from layerlie.measure.aliasing import with_aliasing
from layerlie.measure.attribution import ESTIMATORS, attribute
from layerlie.model.contract import prepare
from layerlie.model.data import Images, images, photo_batch
from layerlie.errors import LayerlieError
from layerlie.core.groups import list_groups, resolve_groups
from layerlie.measure.lie import lee
from layerlie.measure.metrics import METRICS, invariance, metrics
from layerlie.model.loading import load_model, pretrained_weights, read_state_dict
from layerlie.core.tangent import list_schemes

KEYS = ("models", "groups", "measures", "n", "images", "seed", "scheme", "batch_size", "size",
        "layers", "metrics", "ablation")
"""The keys a spec may hold."""

MEASURES = ("e2e", "layers", "metrics", "ablation")
"""The measures a spec may list; each writes the store table of its name."""

MODEL_KEYS = ("name", "callable", "module", "pretrained", "checkpoint", "label")
"""The keys of a model's table."""

VARIANTS = ("blurpool", "filtered", "aps", "all")
"""The ablation variants of a sweep unless ``[ablation] variants`` says otherwise."""

OPTIONS = {"layers": ("estimator", "groups", "top", "output", "probes", "alias"),
           "metrics": ("which", "options"),
           "ablation": ("variants", "estimator", "filter_size", "groups")}
"""The keys of each measure's optional table."""

DEFAULTS: dict[str, Any] = dict(groups=["translate_x", "rotate"], measures=["e2e"], n=8, images=None, seed=0,
                                scheme="central", batch_size=None, size=None)


class SpecError(LayerlieError):
    """A sweep spec that cannot run: one line that names the key."""


@dataclass(frozen=True)
class Source:
    """One model of a checked spec: what builds it, and where its weights come from (docs/design.md §4)."""

    label: str
    build: str | torch.nn.Module
    pretrained: str | None = None
    checkpoint: str | None = None
    sha256: str | None = None

    def weights(self, seed: int) -> str:
        """The provenance of the weights, as the ``weights`` column and the manifest say it."""
        if self.checkpoint is not None:
            return f"checkpoint ({self.checkpoint}, sha256 {self.sha256})"
        if self.pretrained is not None:
            return f"pretrained (timm {self.pretrained})"
        if isinstance(self.build, torch.nn.Module):
            return f"module {type(self.build).__name__} (given)"
        if ":" in self.build:
            return f"callable {self.build}"
        return f"random init (seed {seed})"

    def load(self, size: int | list[int] | None) -> torch.nn.Module:
        """The model, built for ``size`` where its constructor takes one, with its weights."""
        if self.checkpoint is not None and _sha256_file(self.checkpoint) != self.sha256:
            raise LayerlieError(f"checkpoint {self.checkpoint!r} changed after the sweep began (its sha256 is no "
                                f"longer {self.sha256}); run the sweep again with --force-new")
        return load_model(self.pretrained or self.build, pretrained=self.pretrained is not None,
                          checkpoint=self.checkpoint, size=_size(size))


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


def read_spec(spec: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Parse and check a spec, before anything runs (docs/design.md §4).

    Args:
        spec: a TOML file, or the same data as a mapping.

    Returns:
        The spec with its defaults filled in, as plain data.

    Raises:
        SpecError: an unreadable file, an unknown key, group, measure or option, a model pattern
            that matches nothing, or a value of the wrong kind; one line that names the key.
    """
    where = ""
    if not isinstance(spec, Mapping):
        path = Path(spec)
        where = f"{path}: "
        try:
            spec = tomllib.loads(path.read_text())
        except OSError as err:
            raise SpecError(f"cannot read the spec {str(path)!r} ({err.strerror})") from None
        except tomllib.TOMLDecodeError as err:
            raise SpecError(f"{where}not valid TOML ({err})") from None
    try:
        return _checked(dict(spec))
    except SpecError as err:
        raise SpecError(f"{where}{err}") from None


def sources(spec: Mapping[str, Any]) -> dict[str, Source]:
    """The models of a checked spec by label, the ``model`` column of their rows (docs/design.md §4)."""
    out = {}
    for entry in spec["models"]:
        if isinstance(entry, str):
            out[entry] = Source(entry, entry)
        else:
            build = entry.get("module", entry.get("callable", entry.get("name")))
            out[entry["label"]] = Source(entry["label"], build, entry.get("pretrained"), entry.get("checkpoint"),
                                         entry.get("sha256"))
    return out


def tasks(spec: Mapping[str, Any]) -> list[Task]:
    """The tasks of a checked spec, in a fixed order, with stable ids (docs/design.md §4)."""
    out = []
    for model in sources(spec):
        for measure in spec["measures"]:
            groups = spec["layers"].get("groups", spec["groups"]) if measure == "layers" else spec["groups"]
            for group in groups if measure in ("e2e", "layers") else [None]:
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
    changed = old is not None and old["spec"] != _plain(checked)
    if changed and not force_new:
        keys = sorted(k for k in set(old["spec"]) | set(checked) if old["spec"].get(k) != _plain(checked).get(k))
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
    st.create(root, _plain(checked), fresh=changed,
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
    model = source.load(spec["size"])
    batch = _images(model, spec)
    x = batch.x
    x = prepare(model, x).x  # the model contract: images that fit the model, or one line before any measure
    settings = dict(model=task.model, scheme=spec["scheme"], seed=spec["seed"], weights=source.weights(spec["seed"]),
                    **st.where())
    if task.measure == "e2e":
        table = lee(model, x, [task.group], scheme=spec["scheme"], names=batch.names, batch_size=spec["batch_size"])
    elif task.measure == "layers":
        opts = spec["layers"]
        a = attribute(model, x, task.group, scheme=spec["scheme"], estimator=opts.get("estimator", "exact"),
                      output=opts.get("output", "softmax"), samples=opts.get("probes", 100), seed=spec["seed"])
        if opts.get("alias") and a.settings.get("granularity") == "node":
            a = with_aliasing(a, model, x)
        table = a.nodes.assign(group=task.group, estimator=opts.get("estimator", "exact"), check=a.check,
                               residual=a.residual, granularity=a.settings.get("granularity", "node"))
        if "top" in opts:
            key = "share" if opts.get("estimator") == "shares" else "contribution_norm"
            table = table.sort_values(key, ascending=False, key=lambda c: c.abs()).head(opts["top"])
    elif task.measure == "metrics":
        table = _metrics(model, x, batch.names, spec)
    else:
        opts = spec["ablation"]
        ab = ablate(model, x, variants=opts.get("variants", VARIANTS),
                    groups=opts.get("groups", spec["groups"]), estimator=opts.get("estimator", "exact"),
                    scheme=spec["scheme"],
                    filter_size=opts.get("filter_size", 3))
        table = ab.table.assign(group=ab.settings["group"])
    return task.measure, table.assign(**settings).reset_index(drop=True)


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


def _metrics(model: torch.nn.Module, x: torch.Tensor, names: list[str], spec: Mapping[str, Any]) -> pd.DataFrame:
    """The metrics table: ``invariance`` once per group of the spec, the others once (docs/design.md §4, docs/method.md §7)."""
    opts = spec["metrics"]
    which = list(opts.get("which", ["consistency", "eq_t", "eq_t_frac", "eq_r"]))
    options = dict(opts.get("options", {}))
    shared = dict(seed=spec["seed"], batch_size=spec["batch_size"])
    frames = []
    others = [w for w in which if w != "invariance"]
    if others:
        frames.append(metrics(model, x, others, names=names, **shared,
                              **{k: v for k, v in options.items() if k in others}).assign(group=None))
    if "invariance" in which:
        inv = dict(options.get("invariance", {}))
        for g in [inv.pop("group")] if "group" in inv else spec["groups"]:
            values = invariance(model, x, g, inv.get("magnitude", 0.125), **shared,
                                **{k: v for k, v in inv.items() if k != "magnitude"})
            frames.append(pd.DataFrame({"image": names, "metric": "invariance", "value": values.tolist(),
                                        "group": g}))
    return pd.concat(frames, ignore_index=True)


def _images(model: torch.nn.Module, spec: Mapping[str, Any]) -> Images:
    """The spec's images prepared for ``model`` at its size: a tensor as given, a folder's, or
    the embedded photos (docs/design.md §4)."""
    given, size = spec["images"], _size(spec["size"])
    if isinstance(given, torch.Tensor):
        return Images(given, [f"image{i}" for i in range(len(given))])
    if given is not None:
        return images(given, model, n=spec["n"], size=size)
    return photo_batch(model, n=spec["n"], size=size)


def _size(size: int | list[int] | None) -> int | tuple[int, int] | None:
    return tuple(size) if isinstance(size, list) else size


def _sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """One hash of named tensors' bytes, whatever their dtype or device."""
    digest = hashlib.sha256()
    for name, t in tensors:
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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


def _plain(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as JSON data, as the manifest stores it: a module or a tensor by its class or
    shape and the hash of its values (docs/design.md §4)."""
    def described(value: object) -> str:
        if isinstance(value, torch.nn.Module):
            return f"{type(value).__name__} (state sha256 {_sha256_tensors(value.state_dict().items())})"
        if isinstance(value, torch.Tensor):
            return (f"tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')} "
                    f"(sha256 {_sha256_tensors([('', value)])})")
        raise TypeError(f"{type(value).__name__} is not JSON data")

    return json.loads(json.dumps(spec, default=described))


def _checked(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with defaults filled in; a bad key or value is a one-line :class:`SpecError` (docs/design.md §4)."""
    unknown = [k for k in spec if k not in KEYS]
    if unknown:
        raise SpecError(f"spec key {unknown[0]!r} is unknown; valid keys: {', '.join(KEYS)}")
    if "models" not in spec:
        raise SpecError("spec key 'models' is missing; give timm names or patterns, e.g. models = ['resnet18']")
    out = {**DEFAULTS, **spec}
    out["models"] = _models(out["models"])
    out["groups"] = _groups("groups", out["groups"])
    out["measures"] = _strings("measures", out["measures"])
    bad = [m for m in out["measures"] if m not in MEASURES]
    if bad:
        raise SpecError(f"spec key 'measures': unknown measure {bad[0]!r}; valid: {', '.join(MEASURES)}")
    for key in ("n", "batch_size", "size"):
        value = out[key]
        if key == "size" and isinstance(value, (list, tuple)) and len(value) == 2 and all(_positive(v) for v in value):
            out[key] = list(value)
        elif value is not None and not _positive(value):
            said = " or [height, width]" if key == "size" else ""
            raise SpecError(f"spec key {key!r}: expected a positive integer{said}, got {value!r}")
    if not isinstance(out["seed"], int) or isinstance(out["seed"], bool):
        raise SpecError(f"spec key 'seed': expected an integer, got {out['seed']!r}")
    if out["scheme"] not in list_schemes():
        raise SpecError(f"spec key 'scheme': unknown scheme {out['scheme']!r}; valid: {', '.join(list_schemes())}")
    given = out["images"]
    if isinstance(given, torch.Tensor):
        if given.ndim != 4 or not given.is_floating_point():
            raise SpecError(f"spec key 'images': a tensor must be a float batch (B, C, H, W), got shape "
                            f"{tuple(given.shape)} {given.dtype}")
    elif given is not None and not (isinstance(given, (str, Path)) and Path(given).is_dir()):
        raise SpecError(f"spec key 'images': {_shown(given)} is not a folder; give a folder of images or "
                        "leave it out for the embedded photos")
    elif given is not None:
        out["images"] = str(given)
    for measure, allowed in OPTIONS.items():
        table = out.get(measure, {})
        if not isinstance(table, Mapping):
            raise SpecError(f"spec key {measure!r}: expected a table [{measure}], got {table!r}")
        extra = [k for k in table if k not in allowed]
        if extra:
            raise SpecError(f"spec key '{measure}.{extra[0]}' is unknown; valid keys: {', '.join(allowed)}")
        out[measure] = dict(table)
    _options(out)
    return out


def _options(out: dict[str, Any]) -> None:
    """Check the measures' own tables: estimators, groups, metrics, variants (docs/design.md §4)."""
    layers, mets, abl = out["layers"], out["metrics"], out["ablation"]
    for key, opts in (("layers", layers), ("ablation", abl)):
        if opts.get("estimator", "exact") not in ESTIMATORS:
            raise SpecError(f"spec key '{key}.estimator': unknown estimator {opts['estimator']!r}; valid: "
                            f"{', '.join(ESTIMATORS)}")
    for key, opts in (("layers", layers), ("ablation", abl)):
        if "groups" in opts:
            opts["groups"] = _groups(f"{key}.groups", opts["groups"])
    if not isinstance(layers.get("alias", False), bool):
        raise SpecError(f"spec key 'layers.alias': expected true or false, got {layers['alias']!r}")
    if "top" in layers and (not isinstance(layers["top"], int) or layers["top"] < 1):
        raise SpecError(f"spec key 'layers.top': expected a positive integer, got {layers['top']!r}")
    which = _strings("metrics.which", mets.get("which", list(METRICS)))
    named = [*which, *mets.get("options", {})]
    if any(w not in METRICS for w in named):
        bad = next(w for w in named if w not in METRICS)
        raise SpecError(f"spec key 'metrics.which': unknown metric {bad!r}; valid: {', '.join(METRICS)}")
    variants = _strings("ablation.variants", abl.get("variants", list(VARIANTS)))
    bad_variants = [v for v in variants if v not in list_variants()]
    if bad_variants:
        raise SpecError(f"spec key 'ablation.variants': unknown variant {bad_variants[0]!r}; valid: "
                        f"{', '.join(list_variants())}")


def _strings(key: str, value: Any) -> list[str]:
    """A string or a list of strings, as a list (docs/design.md §4)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise SpecError(f"spec key {key!r}: expected a string or a non-empty list of strings, got {value!r}")
    return list(items)


def _groups(key: str, value: Any) -> list[str]:
    """Group names, ``"all"`` expanded (docs/design.md §4)."""
    names = _strings(key, value)
    if names == ["all"]:
        return [g.name for g in resolve_groups("all")]
    valid = list_groups(compat=True)
    bad = [g for g in names if g not in valid]
    if bad:
        raise SpecError(f"spec key {key!r}: unknown group {bad[0]!r}; valid groups: all, {', '.join(valid)}")
    return names


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _shown(value: object) -> str:
    """A value in an error message: a module or a tensor by its kind, never its whole repr."""
    if isinstance(value, torch.nn.Module):
        return f"a {type(value).__name__} module"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value)


def _models(value: Any) -> list[str | dict[str, Any]]:
    """The models of a spec, in order, each once: timm names from names and fnmatch patterns,
    ``pkg.module:factory`` as given, and checked tables (docs/design.md §4)."""
    import timm

    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise SpecError("spec key 'models': the list is empty; give timm names or patterns, e.g. models = ['resnet18']")
    out: list[str | dict[str, Any]] = []
    every = None
    for item in items:
        if isinstance(item, str) and ":" not in item:
            every = every if every is not None else timm.list_models()
            found = fnmatch.filter(every, item)
            if not found:
                raise SpecError(f"spec key 'models': {item!r} matches no timm model; list them with "
                                "`layerlie models PATTERN`")
        else:
            found = [_table(item)]
        out += [m for m in found if m not in out]
    labels = [m if isinstance(m, str) else m["label"] for m in out]
    twice = next((label for label in labels if labels.count(label) > 1), None)
    if twice is not None:
        raise SpecError(f"spec key 'models': two models are labelled {twice!r}; give one a label = '...'")
    return out


def _table(item: Any) -> str | dict[str, Any]:
    """One model given as a callable, a module or a table, checked: its weights at hand (a
    checkpoint readable and hashed, its path taken from the working directory; pretrained
    weights cached or reachable) and its label (docs/design.md §4). A table that only names a model is
    that name."""
    import timm

    if isinstance(item, (str, torch.nn.Module)):
        item = {"callable" if isinstance(item, str) else "module": item}
    if not isinstance(item, Mapping):
        raise SpecError(f"spec key 'models': expected a timm name, 'pkg.module:fn' or a table, got {_shown(item)}")
    unknown = [k for k in item if k not in MODEL_KEYS]
    kinds = [k for k in ("name", "callable", "module") if k in item]
    if unknown or len(kinds) != 1:
        said = f"unknown key {unknown[0]!r}" if unknown else f"{' and '.join(kinds) or 'no model'}"
        raise SpecError(f"spec key 'models': a model's table takes one of name, callable or module, and "
                        f"pretrained, checkpoint, label; got {said}")
    kind, build = kinds[0], item[kinds[0]]
    entry: dict[str, Any] = {kind: build}
    if kind == "module" and not isinstance(build, torch.nn.Module):
        raise SpecError(f"spec key 'models': module = expects a torch.nn.Module, got {_shown(build)}")
    if kind == "name" and not (isinstance(build, str) and timm.is_model(build)):
        raise SpecError(f"spec key 'models': name = {_shown(build)} is not a timm model; list them with "
                        "`layerlie models PATTERN`")
    if kind == "callable" and not (isinstance(build, str) and ":" in build):
        raise SpecError(f"spec key 'models': callable = {_shown(build)}; give 'package.module:callable'")
    pretrained, checkpoint, label = item.get("pretrained", False), item.get("checkpoint"), item.get("label")
    if not isinstance(pretrained, bool):
        raise SpecError(f"spec key 'models': pretrained = expects true or false, got {_shown(pretrained)}")
    if pretrained and (kind != "name" or checkpoint is not None):
        raise SpecError("spec key 'models': pretrained = true takes timm's weights for a timm name, without a "
                        "checkpoint; a callable or module brings its own, a checkpoint replaces them")
    if pretrained:
        try:
            entry["pretrained"] = pretrained_weights(build)[0]
        except LayerlieError as err:
            raise SpecError(f"spec key 'models': {err}") from None
    if checkpoint is not None:
        if not isinstance(checkpoint, (str, Path)):
            raise SpecError(f"spec key 'models': checkpoint = expects a path, got {_shown(checkpoint)}")
        path = Path(checkpoint).absolute()
        try:
            read_state_dict(path)  # a missing or unreadable file is refused before anything runs
        except LayerlieError as err:
            raise SpecError(f"spec key 'models': {err}") from None
        entry.update(checkpoint=str(path), sha256=_sha256_file(path))
    if label is not None and not (isinstance(label, str) and label.strip()):
        raise SpecError(f"spec key 'models': label = expects a non-empty string, got {_shown(label)}")
    named = type(build).__name__ if kind == "module" else build
    if label is None and len(entry) == 1 and kind != "module":
        return build
    entry["label"] = label or entry.get("pretrained") or (
        f"{named} ({Path(checkpoint).name})" if checkpoint is not None else named)
    return entry
