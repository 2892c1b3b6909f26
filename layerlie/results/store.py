"""A results store is a folder that a killed sweep leaves readable (docs/design.md §4).

Layout::

    STORE/manifest.json              spec, package versions, seeds, weights, machine, schema version
    STORE/parts/<task-id>.parquet    one task's table; it exists only once it is complete
    STORE/failures/<task-id>.json    a task's exception type, message and traceback
    STORE/compacted/<table>-<id>.parquet   many tasks' rows of one table (:func:`compact`)
    STORE/compacted/index.json       which tasks each compacted file holds

A part is written to a temporary name in ``parts/``, flushed to disk, and renamed, so a part
that exists is complete and a sweep can resume by skipping the tasks whose part exists. Its
parquet metadata names its table, task and schema version, which is how :func:`load` tells a
layerlie part from a foreign file.

:func:`compact` merges the parts of each table into one larger file and lists its tasks in the
index; a task is done when its part exists or the index lists it. A part written after its task
was compacted (a sweep run again without ``--resume``) replaces the task's compacted rows.
:func:`load` reads every file of a table through one ``pyarrow.dataset``.

Example:
    >>> import layerlie as ll
    >>> ll.load("out/", "e2e")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import socket
import sys
import traceback
import warnings
from importlib import metadata
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from layerlie.errors import LayerlieError

SCHEMA = 1
"""The store layout version this code writes and reads; a newer store is refused."""

TABLES = ("e2e", "layers", "metrics", "ablation", "monitor")
"""The tables a store holds: one per sweep measure, and the measurements along training
(:class:`layerlie.Monitor`)."""

_KEY = b"layerlie"
_TASK, _FILE = "__layerlie_task", "__layerlie_file"  # columns of the scan, dropped before rows are returned
_FORMAT, _FS = ds.ParquetFileFormat(), pafs.LocalFileSystem()


class StoreError(LayerlieError):
    """A store or one of its files that cannot be read or written."""


def manifest(store: str | Path) -> dict[str, Any] | None:
    """The store's manifest, or None for a folder that has none (docs/design.md §4).

    Raises:
        StoreError: unreadable, or written with a newer schema version.
    """
    path = Path(store) / "manifest.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        schema = int(data["schema"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StoreError(f"{path}: not a layerlie manifest ({err}); point --store at a sweep's folder") from None
    if schema > SCHEMA:
        raise StoreError(f"{path}: schema version {schema} is newer than this layerlie's {SCHEMA}; "
                         "upgrade layerlie to read this store")
    return data


def create(store: str | Path, spec: dict[str, Any], *, fresh: bool = False,
           weights: Mapping[str, str] | None = None) -> Path:
    """Make ``store`` a store of ``spec`` and write its manifest (docs/design.md §4).

    Args:
        store: the folder (created when missing).
        spec: the sweep spec, as plain data.
        fresh: remove the parts and failures of an earlier sweep first. Temporary files that
            a killed sweep left are removed either way.
        weights: where each model's weights come from, by model (the provenance its rows'
            ``weights`` column repeats).

    Returns:
        The store's path.
    """
    root = Path(store)
    try:
        for sub in ("parts", "failures", "compacted"):
            (root / sub).mkdir(parents=True, exist_ok=True)
            for f in (root / sub).iterdir():  # temporary files of a killed writer; all, when fresh
                if f.suffix == ".tmp" or (fresh and f.suffix in (".parquet", ".json")):
                    f.unlink()
        data = dict(schema=SCHEMA, spec=spec, seeds={"seed": spec.get("seed", 0)}, weights=dict(weights or {}),
                    versions=_versions(), machine=_machine())
        _atomic_write(root / "manifest.json", json.dumps(data, indent=2, default=str).encode())
    except OSError as err:
        raise StoreError(f"cannot write the store {str(root)!r} ({err.strerror}); choose a writable folder") from None
    return root


def write_part(store: str | Path, task: str, table: str, frame: pd.DataFrame) -> Path:
    """Write one task's ``frame`` of ``table`` as ``parts/<task>.parquet``, atomically (docs/design.md §4)."""
    if table not in TABLES:
        raise StoreError(f"unknown table {table!r}; a store holds {', '.join(TABLES)}")
    arrow = pa.Table.from_pandas(frame, preserve_index=False)
    info = json.dumps({"table": table, "task": task, "schema": SCHEMA}).encode()
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), _KEY: info})
    path = Path(store) / "parts" / f"{task}.parquet"
    sink = pa.BufferOutputStream()
    pq.write_table(arrow, sink)
    _atomic_write(path, sink.getvalue().to_pybytes())
    (Path(store) / "failures" / f"{task}.json").unlink(missing_ok=True)
    return path


def write_failure(store: str | Path, task: str, error: dict[str, str]) -> Path:
    """Record a failed task as ``failures/<task>.json``: ``type``, ``message``, ``traceback`` (docs/design.md §4)."""
    path = Path(store) / "failures" / f"{task}.json"
    _atomic_write(path, json.dumps({"task": task, **error}, indent=2).encode())
    return path


def describe(err: BaseException) -> dict[str, str]:
    """An exception as the record :func:`write_failure` stores (docs/design.md §4)."""
    return {"type": type(err).__name__, "message": str(err),
            "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__))}


def done(store: str | Path) -> set[str]:
    """The ids of the tasks whose part exists or whose rows a compacted file holds (docs/design.md §4)."""
    parts = Path(store) / "parts"
    loose = {p.stem for p in parts.glob("*.parquet")} if parts.is_dir() else set()
    return loose | {task for entry in _index(Path(store)).values() for task in entry["tasks"]}


def failures(store: str | Path) -> dict[str, dict[str, str]]:
    """The recorded failures, by task id (docs/design.md §4)."""
    folder = Path(store) / "failures"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def load(store: str | Path, table: str, *, errors: Literal["raise", "skip"] = "raise") -> pd.DataFrame:
    """One table of a store: the rows of its parts and compacted files, in task order (docs/design.md §4).

    Every file of the table is read through one ``pyarrow.dataset`` whose schema unifies the
    files' (a column that some parts lack is null in their rows).

    Args:
        store: the store folder.
        table: one of :data:`TABLES`.
        errors: ``"raise"`` on a truncated or foreign part, naming the file; ``"skip"`` warns
            and loads the others.

    Returns:
        The table, with its ``model`` and settings columns; empty when no file holds it.

    Example:
        >>> ll.load("out/", "metrics").groupby(["model", "metric"]).value.mean()  # doctest: +SKIP
    """
    if table not in TABLES:
        raise StoreError(f"unknown table {table!r}; a store holds {', '.join(TABLES)}")
    if errors not in ("raise", "skip"):
        raise StoreError(f"errors must be 'raise' or 'skip', got {errors!r}")
    root = _checked_store(Path(store))
    loose = _parts(root, errors)[table]
    kept = _compacted(root, table, {Path(f.path).stem for f in loose})
    scanned = _scan(loose + [f for f, _ in kept], {Path(f.path).name: tasks for f, tasks in kept})
    if scanned is None:
        return pd.DataFrame()
    ordered = scanned.take(pc.sort_indices(scanned, [(_TASK, "ascending")]))  # a stable sort: rows keep their order
    return ordered.drop_columns([_TASK, _FILE]).to_pandas()


def compact(store: str | Path) -> dict[str, int]:
    """Merge the parts of each table into one compacted file, and list its tasks in the index (docs/design.md §4).

    Crash-safe: the new files are written first, then the index that names them, and only then
    are the merged parts (and compacted files the index no longer names) deleted. A kill between
    the steps leaves rows that :func:`load` reads once each, and tasks that :func:`done` still
    counts; compacting again finishes the job.

    Returns:
        The number of parts merged, by table (tables without parts are left out).

    Raises:
        StoreError: not a store, or a damaged part (named; delete it and resume the sweep).

    Example:
        >>> ll.results.compact("out/")  # doctest: +SKIP
        {'e2e': 9800, 'layers': 200}
    """
    root = _checked_store(Path(store))
    (root / "compacted").mkdir(exist_ok=True)  # a store written before compaction existed has none
    index = _index(root)
    merged: dict[str, int] = {}
    written: dict[str, dict[str, Any]] = {}
    for table, loose in _parts(root, "raise").items():
        scanned = _scan(loose, {})
        if scanned is None:
            continue
        ordered = scanned.take(pc.sort_indices(scanned, [(_TASK, "ascending")]))
        tasks = sorted(Path(f.path).stem for f in loose)
        name = f"{table}-{secrets.token_hex(4)}.parquet"
        info = json.dumps({"table": table, "tasks": len(tasks), "schema": SCHEMA}).encode()
        arrow = ordered.drop_columns([_FILE]).replace_schema_metadata({_KEY: info})
        sink = pa.BufferOutputStream()
        pq.write_table(arrow, sink, row_group_size=2**20)
        _atomic_write(root / "compacted" / name, sink.getvalue().to_pybytes())
        written[name] = {"table": table, "tasks": tasks}
        merged[table] = len(tasks)
    moved = {task for entry in written.values() for task in entry["tasks"]}
    kept = {name: {**entry, "tasks": [t for t in entry["tasks"] if t not in moved]} for name, entry in index.items()}
    _write_index(root, {**{n: e for n, e in kept.items() if e["tasks"]}, **written})
    _remove(root, moved)
    return merged


def _checked_store(root: Path) -> Path:
    """``root`` when it is a store this layerlie reads (docs/design.md §4)."""
    if not (root / "parts").is_dir():
        raise StoreError(f"{str(root)!r} is not a layerlie store (no parts/ folder); pass the --store of a sweep")
    manifest(root)
    return root


def _parts(root: Path, errors: Literal["raise", "skip"]) -> dict[str, list[ds.ParquetFileFragment]]:
    """The loose parts by table, as dataset fragments whose task is their name, each footer read
    once; a truncated or foreign part raises or, with ``errors="skip"``, warns (docs/design.md §4)."""
    out: dict[str, list[ds.ParquetFileFragment]] = {table: [] for table in TABLES}
    for path in sorted((root / "parts").glob("*.parquet")):
        try:
            info, fragment = _fragment(path, (ds.field(_FILE) == path.name) & (ds.field(_TASK) == path.stem))
        except StoreError as err:
            if errors == "raise":
                raise
            warnings.warn(f"skipping {err}", stacklevel=3)
            continue
        out[info["table"]].append(fragment)
    return out


def _compacted(root: Path, table: str, replaced: set[str]) -> list[tuple[ds.ParquetFileFragment, list[str]]]:
    """The compacted files of ``table`` that the index names, as fragments, with the tasks to
    read from each: those that no loose part replaces (docs/design.md §4)."""
    out = []
    for name, entry in _index(root).items():
        tasks = [t for t in entry["tasks"] if t not in replaced]
        if entry["table"] == table and tasks:
            out.append((_fragment(root / "compacted" / name, ds.field(_FILE) == name)[1], tasks))
    return out


def _scan(fragments: list[ds.ParquetFileFragment], tasks: Mapping[str, list[str]]) -> pa.Table | None:
    """The rows of ``fragments`` through one dataset, with each row's task and file as columns:
    a part's task is its name; a compacted file (named in ``tasks``) has a task column, and only
    the rows of its tasks are read. None when there are no files (docs/design.md §4)."""
    if not fragments:
        return None
    try:
        schema = pa.unify_schemas([f.physical_schema.remove_metadata() for f in fragments],
                                  promote_options="permissive")
    except (pa.ArrowException, ValueError) as err:
        raise StoreError(f"the parts' columns do not fit together ({' '.join(str(err).split())[:160]})") from None
    for column in (_TASK, _FILE):
        if schema.get_field_index(column) < 0:
            schema = schema.append(pa.field(column, pa.string()))
    data = ds.FileSystemDataset(fragments, schema, _FORMAT, _FS)
    wanted = ~ds.field(_FILE).isin(pa.array(list(tasks), pa.string()))
    for name, names in tasks.items():
        wanted = wanted | ((ds.field(_FILE) == name) & ds.field(_TASK).isin(pa.array(names, pa.string())))
    try:
        return data.to_table(filter=wanted)
    except (OSError, pa.ArrowException) as err:
        raise StoreError(f"{str(Path(fragments[0].path).parent)!r}: a file changed while it was read "
                         f"({' '.join(str(err).split())[:160]}); load again") from None


def _index(root: Path) -> dict[str, dict[str, Any]]:
    """The compacted files by name, each with its ``table`` and ``tasks`` (docs/design.md §4)."""
    path = root / "compacted" / "index.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise StoreError(f"{path}: not a layerlie index ({err}); restore it, or delete compacted/ and rerun "
                         "the sweep with --resume") from None


def _write_index(root: Path, files: Mapping[str, dict[str, Any]]) -> None:
    """Replace the index, atomically (docs/design.md §4)."""
    _atomic_write(root / "compacted" / "index.json", json.dumps({"schema": SCHEMA, "files": files}).encode())


def _remove(root: Path, merged: set[str]) -> None:
    """Delete the parts the index now holds, and the compacted files it no longer names (docs/design.md §4)."""
    named = set(_index(root))
    for path in (root / "parts").glob("*.parquet"):
        if path.stem in merged:
            path.unlink(missing_ok=True)
    for path in (root / "compacted").glob("*.parquet"):
        if path.name not in named:
            path.unlink(missing_ok=True)


def _fragment(path: Path, partition: ds.Expression) -> tuple[dict[str, Any], ds.ParquetFileFragment]:
    """A part's (or compacted file's) layerlie metadata, and the file as a dataset fragment that
    keeps its footer and carries ``partition``; a truncated or foreign file is an error that
    names it (docs/design.md §4)."""
    try:
        fragment = _FORMAT.make_fragment(str(path), _FS, partition_expression=partition)
        fragment.ensure_complete_metadata()
        schema = fragment.physical_schema
    except (OSError, pa.ArrowException) as err:
        raise StoreError(f"{path}: truncated or not parquet ({' '.join(str(err).split())[:120]}); "
                         "delete it and rerun the sweep with --resume") from None
    raw = (schema.metadata or {}).get(_KEY)
    try:
        info = json.loads(raw)
        version, table = int(info["schema"]), info["table"]
    except (TypeError, ValueError, KeyError):
        raise StoreError(f"{path}: not a layerlie part (no layerlie metadata); move foreign files out of "
                         f"{path.parent.name}/") from None
    if version > SCHEMA:
        raise StoreError(f"{path}: schema version {version} is newer than this layerlie's {SCHEMA}; upgrade layerlie")
    if table not in TABLES:
        raise StoreError(f"{path}: unknown table {table!r}")
    return info, fragment


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name beside ``path``, flush to disk, rename, and flush the folder,
    so that ``path`` either does not exist or is complete, even after SIGKILL or power loss
    (docs/design.md §4)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _versions() -> dict[str, str]:
    """The package versions a manifest records (docs/design.md §4)."""
    out = {"python": platform.python_version()}
    for pkg in ("layerlie", "torch", "timm", "numpy", "pandas", "pyarrow", "ray"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def where() -> dict[str, Any]:
    """The node and process this runs on, as every part's rows record them: the host, the Ray
    node id (None outside Ray) and the process id (docs/design.md §4)."""
    ray = sys.modules.get("ray")  # only a process that Ray runs has imported it
    node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    return {"host": socket.gethostname(), "ray_node": node, "pid": os.getpid()}


def write_heartbeat(store: str | Path, beat: Mapping[str, Any]) -> None:
    """Record a running sweep's heartbeat (time, driver, task counts) in the manifest, atomically
    (docs/design.md §4)."""
    data = manifest(store)
    if data is None:
        raise StoreError(f"{str(store)!r} has no manifest to beat in; create the store first")
    data["heartbeat"] = dict(beat)
    try:
        _atomic_write(Path(store) / "manifest.json", json.dumps(data, indent=2, default=str).encode())
    except OSError as err:
        raise StoreError(f"cannot write the heartbeat of {str(store)!r} ({err.strerror})") from None


def _machine() -> dict[str, Any]:
    """The machine a manifest records, and the process that wrote it (docs/design.md §4)."""
    return {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
            "executable": sys.executable, **where()}
