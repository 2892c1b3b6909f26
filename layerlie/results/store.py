"""A results store is a folder that a killed sweep leaves readable (docs/design.md §4).

Layout::

    STORE/manifest.json              spec, package versions, seeds, weights, machine, schema version
    STORE/parts/<task-id>.parquet    one task's table; it exists only once it is complete
    STORE/failures/<task-id>.json    a task's exception type, message and traceback

A part is written to a temporary name in ``parts/``, flushed to disk, and renamed, so a part
that exists is complete and a sweep can resume by skipping the tasks whose part exists. Its
parquet metadata names its table, task and schema version, which is how :func:`load` tells a
layerlie part from a foreign file.

Example:
    >>> import layerlie as ll
    >>> ll.load("out/", "e2e")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import platform
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
import pyarrow.parquet as pq

from layerlie.errors import LayerlieError

SCHEMA = 1
"""The store layout version this code writes and reads; a newer store is refused."""

TABLES = ("e2e", "layers", "metrics", "ablation", "monitor")
"""The tables a store holds: one per sweep measure, and the measurements along training
(:class:`layerlie.Monitor`)."""

_KEY = b"layerlie"


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
        for sub in ("parts", "failures"):
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
    """The ids of the tasks whose part exists (docs/design.md §4)."""
    parts = Path(store) / "parts"
    return {p.stem for p in parts.glob("*.parquet")} if parts.is_dir() else set()


def failures(store: str | Path) -> dict[str, dict[str, str]]:
    """The recorded failures, by task id (docs/design.md §4)."""
    folder = Path(store) / "failures"
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def load(store: str | Path, table: str, *, errors: Literal["raise", "skip"] = "raise") -> pd.DataFrame:
    """One table of a store: its parts in task order, concatenated (docs/design.md §4).

    Args:
        store: the store folder.
        table: one of :data:`TABLES`.
        errors: ``"raise"`` on a truncated or foreign part, naming the file; ``"skip"`` warns
            and loads the others.

    Returns:
        The table, with its ``model`` and settings columns; empty when no part holds it.

    Example:
        >>> ll.load("out/", "metrics").groupby(["model", "metric"]).value.mean()  # doctest: +SKIP
    """
    if table not in TABLES:
        raise StoreError(f"unknown table {table!r}; a store holds {', '.join(TABLES)}")
    if errors not in ("raise", "skip"):
        raise StoreError(f"errors must be 'raise' or 'skip', got {errors!r}")
    root = Path(store)
    if not (root / "parts").is_dir():
        raise StoreError(f"{str(root)!r} is not a layerlie store (no parts/ folder); pass the --store of a sweep")
    manifest(root)
    frames = []
    for path in sorted((root / "parts").glob("*.parquet")):
        try:
            info, arrow = _read_part(path)
        except StoreError as err:
            if errors == "raise":
                raise
            warnings.warn(f"skipping {err}", stacklevel=2)
            continue
        if info["table"] == table:
            frames.append(arrow.to_pandas())
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _read_part(path: Path) -> tuple[dict[str, Any], pa.Table]:
    """A part's layerlie metadata and its rows; a truncated or foreign file is an error that
    names it (docs/design.md §4)."""
    try:
        arrow = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise StoreError(f"{path}: truncated or not parquet ({' '.join(str(err).split())[:120]}); "
                         "delete it and rerun the sweep with --resume") from None
    raw = (arrow.schema.metadata or {}).get(_KEY)
    try:
        info = json.loads(raw)
        schema, table = int(info["schema"]), info["table"]
    except (TypeError, ValueError, KeyError):
        raise StoreError(f"{path}: not a layerlie part (no layerlie metadata); move foreign files out of "
                         "parts/") from None
    if schema > SCHEMA:
        raise StoreError(f"{path}: schema version {schema} is newer than this layerlie's {SCHEMA}; upgrade layerlie")
    if table not in TABLES:
        raise StoreError(f"{path}: unknown table {table!r}")
    return info, arrow


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
