"""The results store (docs/design.md §4): atomic parts, failures, a versioned manifest, and damaged files."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

import layerlie as ll
from layerlie.results import store as st

SPEC = {"models": ["resnet18"], "groups": ["translate_x"], "seed": 0}


def frame(model: str, k: int = 3) -> pd.DataFrame:
    return pd.DataFrame({"image": [str(i) for i in range(k)], "group": "translate_x",
                         "lee": [0.5 * i for i in range(k)], "model": model, "scheme": "central", "seed": 0})


def filled(tmp_path):
    root = st.create(tmp_path / "s", SPEC)
    st.write_part(root, "e2e-a", "e2e", frame("a"))
    st.write_part(root, "e2e-b", "e2e", frame("b", 2))
    st.write_part(root, "metrics-a", "metrics", pd.DataFrame({"image": ["0"], "metric": ["eq_t"], "value": [1.0]}))
    return root


def test_parts_round_trip_by_table_in_task_order(tmp_path):
    root = filled(tmp_path)
    e2e = ll.load(root, "e2e")
    pd.testing.assert_frame_equal(e2e, pd.concat([frame("a"), frame("b", 2)], ignore_index=True))
    assert ll.load(root, "metrics").metric.tolist() == ["eq_t"]
    assert ll.load(root, "ablation").empty
    assert st.done(root) == {"e2e-a", "e2e-b", "metrics-a"}
    assert not [p for p in os.listdir(root / "parts") if p.endswith(".tmp")]
    data = json.loads((root / "manifest.json").read_text())
    assert data["schema"] == st.SCHEMA and data["spec"] == SPEC and data["seeds"] == {"seed": 0}
    assert {"torch", "timm", "python", "layerlie"} <= set(data["versions"]) and data["machine"]["cpus"] >= 1


def test_a_write_that_dies_before_the_rename_leaves_no_part(tmp_path, monkeypatch):
    root = st.create(tmp_path / "s", SPEC)

    def killed(*_: object) -> None:
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        st.write_part(root, "e2e-a", "e2e", frame("a"))
    assert os.listdir(root / "parts") == []  # neither a part nor a temporary file
    assert st.done(root) == set()


def test_failures_are_recorded_and_cleared_by_a_later_success(tmp_path):
    root = st.create(tmp_path / "s", SPEC)
    try:
        raise RuntimeError("out of memory")
    except RuntimeError as err:
        st.write_failure(root, "e2e-a", st.describe(err))
    record = st.failures(root)["e2e-a"]
    assert record["type"] == "RuntimeError" and record["message"] == "out of memory"
    assert "raise RuntimeError" in record["traceback"]
    st.write_part(root, "e2e-a", "e2e", frame("a"))
    assert st.failures(root) == {}


def test_truncated_part_names_the_file_and_skip_loads_the_rest(tmp_path):
    root = filled(tmp_path)
    part = root / "parts" / "e2e-a.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(st.StoreError, match=r"e2e-a\.parquet: truncated or not parquet"):
        ll.load(root, "e2e")
    with pytest.warns(UserWarning, match=r"skipping .*e2e-a\.parquet"):
        rest = ll.load(root, "e2e", errors="skip")
    pd.testing.assert_frame_equal(rest, frame("b", 2))


def test_foreign_parquet_names_the_file(tmp_path):
    root = filled(tmp_path)
    frame("x").to_parquet(root / "parts" / "foreign.parquet")
    with pytest.raises(st.StoreError, match=r"foreign\.parquet: not a layerlie part"):
        ll.load(root, "e2e")
    with pytest.warns(UserWarning, match=r"foreign\.parquet"):
        assert len(ll.load(root, "e2e", errors="skip")) == 5


def test_newer_schema_is_refused(tmp_path):
    root = filled(tmp_path)
    data = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**data, "schema": st.SCHEMA + 1}))
    with pytest.raises(st.StoreError, match="schema version 2 is newer than this layerlie's 1; upgrade"):
        ll.load(root, "e2e")


def test_store_errors_are_one_line(tmp_path):
    with pytest.raises(st.StoreError, match="not a layerlie store"):
        ll.load(tmp_path, "e2e")
    root = filled(tmp_path)
    with pytest.raises(st.StoreError, match="unknown table 'lee'; a store holds e2e, layers"):
        ll.load(root, "lee")
    with pytest.raises(st.StoreError, match="errors must be 'raise' or 'skip'"):
        ll.load(root, "e2e", errors="ignore")
