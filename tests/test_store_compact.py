"""Compacted stores (docs/design.md §4): one dataset read, the same rows before and after
compaction, crash-safe steps, and --resume beside compacted files."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import layerlie as ll
from layerlie.cli import main
from layerlie.results import store as st

SPEC = {"models": ["resnet18"], "groups": ["translate_x"], "seed": 0}


def rows(task: int, k: int = 2) -> pd.DataFrame:
    """A small e2e-shaped table of one task."""
    return pd.DataFrame({"image": [f"photo{i}" for i in range(k)], "group": "rotate",
                         "lee": [task + 0.25 * i for i in range(k)], "model": f"net{task % 7}",
                         "scheme": "central", "seed": 0, "weights": "random init (seed 0)", "host": "node",
                         "pid": task})


def task_id(i: int) -> str:
    return f"e2e-net-{i:05d}"


def quick_parts(root: Path, n: int) -> pd.DataFrame:
    """Write ``n`` parts of two rows as :func:`st.write_part` lays them out, without its fsyncs,
    every thousandth with a column the others lack; returns the rows a load must give."""
    whole = pd.concat([rows(i) for i in range(min(n, 1000))], ignore_index=True)
    whole = pd.concat([whole] * -(-n // 1000), ignore_index=True).iloc[: 2 * n]
    whole = whole.assign(pid=[i // 2 for i in range(2 * n)], lee=whole.lee + [i // 2000 for i in range(2 * n)])
    arrow = pa.Table.from_pandas(whole, preserve_index=False).replace_schema_metadata()
    extra = [i for i in range(n) if i % 1000 == 3]
    for i in range(n):
        part = arrow.slice(2 * i, 2)
        if i in extra:
            part = part.append_column("alias", pa.array([0.5, 0.5]))
        info = json.dumps({"table": "e2e", "task": task_id(i), "schema": st.SCHEMA}).encode()
        pq.write_table(part.replace_schema_metadata({b"layerlie": info}), root / "parts" / f"{task_id(i)}.parquet")
    alias = [0.5 if i // 2 in extra else float("nan") for i in range(2 * n)]
    return whole.assign(alias=alias) if extra else whole


def files(root: Path) -> tuple[list[str], list[str]]:
    return (sorted(p.name for p in (root / "parts").glob("*.parquet")),
            sorted(p.name for p in (root / "compacted").glob("*.parquet")))


def test_compaction_keeps_the_rows_the_tasks_and_other_tables(tmp_path):
    root = st.create(tmp_path / "s", SPEC)
    want = quick_parts(root, 40)
    st.write_part(root, "metrics-a", "metrics", pd.DataFrame({"image": ["0"], "metric": ["eq_t"], "value": [1.0]}))
    before, tasks = ll.load(root, "e2e"), st.done(root)
    pd.testing.assert_frame_equal(before, want)
    assert main(["store", "compact", str(root)]) == 0
    assert files(root)[0] == [] and len(files(root)[1]) == 2  # one file per table
    pd.testing.assert_frame_equal(ll.load(root, "e2e"), want)
    assert ll.load(root, "metrics").metric.tolist() == ["eq_t"]
    assert st.done(root) == tasks
    assert main(["store", "compact", str(root)]) == 0  # nothing left to merge: nothing changes
    assert len(files(root)[1]) == 2
    pd.testing.assert_frame_equal(ll.load(root, "e2e"), want)


def test_a_store_from_before_compaction_is_compacted(tmp_path):
    root = st.create(tmp_path / "s", SPEC)
    want = quick_parts(root, 3)
    (root / "compacted").rmdir()
    pd.testing.assert_frame_equal(ll.load(root, "e2e"), want)
    assert st.compact(root) == {"e2e": 3}
    pd.testing.assert_frame_equal(ll.load(root, "e2e"), want)


def test_a_part_written_after_compaction_replaces_its_tasks_rows(tmp_path):
    root = st.create(tmp_path / "s", SPEC)
    want = quick_parts(root, 6)
    st.compact(root)
    st.write_part(root, task_id(2), "e2e", rows(2).assign(lee=-1.0))  # the task run again, without --resume
    st.write_part(root, task_id(9), "e2e", rows(9))  # a new task beside the compacted file
    got = ll.load(root, "e2e")
    assert len(got) == len(want) + 2
    assert (got.lee[got.pid == 2] == -1.0).all() and (got.pid == 9).sum() == 2
    st.compact(root)  # the second compaction moves task 2 into the new file; the old one drops it
    pd.testing.assert_frame_equal(ll.load(root, "e2e"), got)
    assert sum(len(e["tasks"]) for e in st._index(root).values()) == 7


@pytest.mark.parametrize("step", ["_write_index", "_remove"])
def test_a_compaction_killed_between_steps_loses_and_duplicates_nothing(tmp_path, monkeypatch, step):
    root = st.create(tmp_path / "s", SPEC)
    want = quick_parts(root, 12)
    tasks = st.done(root)

    def killed(*_: object) -> None:
        raise OSError("killed")

    with monkeypatch.context() as patch:
        patch.setattr(st, step, killed)
        with pytest.raises(OSError, match="killed"):
            st.compact(root)
    assert len(files(root)[0]) == 12 and len(files(root)[1]) == 1  # the parts and the new file are both there
    pd.testing.assert_frame_equal(ll.load(root, "e2e"), want)
    assert st.done(root) == tasks
    st.compact(root)  # compacting again finishes the job and removes what the killed one left
    assert files(root)[0] == [] and len(files(root)[1]) == 1
    pd.testing.assert_frame_equal(ll.load(root, "e2e"), want)
    assert st.done(root) == tasks


def test_the_crash_check_catches_a_load_that_reads_a_task_twice(tmp_path, monkeypatch):
    root = st.create(tmp_path / "s", SPEC)
    want = quick_parts(root, 5)
    monkeypatch.setattr(st, "_remove", lambda *_: None)  # killed after the index: parts and file both hold the rows
    st.compact(root)
    # the fault: compacted rows are read even where a part replaces them
    real = st._compacted
    monkeypatch.setattr(st, "_compacted", lambda root, table, replaced: real(root, table, set()))
    assert len(ll.load(root, "e2e")) == 2 * len(want)


def test_a_missing_or_damaged_index_file_is_named(tmp_path):
    root = st.create(tmp_path / "s", SPEC)
    quick_parts(root, 3)
    st.compact(root)
    (name,) = files(root)[1]
    (root / "compacted" / name).unlink()
    with pytest.raises(st.StoreError, match=rf"{name}: truncated or not parquet"):
        ll.load(root, "e2e")
    (root / "compacted" / "index.json").write_text("{")
    with pytest.raises(st.StoreError, match=r"index\.json: not a layerlie index .*delete compacted/"):
        st.done(root)
    assert main(["store", "compact", str(tmp_path / "nowhere")]) == 2


def test_a_sweep_resumes_beside_compacted_files(tmp_path, capsys):
    spec = tmp_path / "tiny.toml"
    spec.write_text('models = ["resnet18"]\ngroups = ["translate_x", "rotate"]\nmeasures = ["e2e"]\n'
                    'n = 1\nsize = 32\n')
    root = tmp_path / "s"
    assert main(["sweep", str(spec), "--store", str(root), "--workers", "0"]) == 0
    full = ll.load(root, "e2e")
    (lost,) = [p for p in (root / "parts").glob("*rotate*.parquet")]
    lost.unlink()  # a task the killed sweep had not finished
    assert main(["store", "compact", str(root)]) == 0
    capsys.readouterr()
    assert main(["sweep", str(spec), "--store", str(root), "--workers", "0", "--resume"]) == 0
    assert "1 tasks ran, 1 skipped as done" in capsys.readouterr().out
    assert files(root)[0] == [lost.name] and len(files(root)[1]) == 1
    pd.testing.assert_frame_equal(ll.load(root, "e2e").drop(columns="pid"), full.drop(columns="pid"))


@pytest.fixture
def memory_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder in memory (tmpfs) where the machine has one, else ``tmp_path``: ten thousand
    files written, read and deleted on a disk make a test of rows a test of the disk."""
    shm = Path("/dev/shm")
    if not (shm.is_dir() and shutil.disk_usage(shm).free > 1 << 30):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="layerlie-", dir=shm))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_ten_thousand_parts_load_as_before_and_after_compaction(memory_dir):
    root = st.create(memory_dir / "s", SPEC)
    want = quick_parts(root, 10_000)
    assert want.alias.notna().sum() == 20  # ten parts with a column the others lack
    pd.testing.assert_frame_equal(ll.load(root, "e2e"), want)
    st.compact(root)
    assert files(root)[0] == []
    pd.testing.assert_frame_equal(ll.load(root, "e2e"), want)
