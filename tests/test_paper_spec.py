"""The committed paper spec and its figures: the spec parses into the sweep the README
describes, and figures/ holds a PNG and a PDF of each figure, of modest size."""

from __future__ import annotations

from pathlib import Path

import layerlie as ll
from layerlie.results.spec import read_spec

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "sweeps" / "paper-cpu.toml"
FIGURES = ROOT / "figures"


def test_paper_spec_lists_its_tasks(tmp_path: Path) -> None:
    spec = read_spec(SPEC)
    transformers = [m for m in spec["models"] if m.startswith(("vit_", "deit_", "swin_", "pvt_", "levit_"))]
    assert len(spec["models"]) >= 12 and len(transformers) >= 3
    assert sorted(spec["measures"]) == ll.list_measures()
    tasks = ll.sweep(SPEC, tmp_path, dry_run=True).tasks
    assert {t.model for t in tasks} == set(spec["models"])
    per_model = len(spec["groups"]) + len(spec["layers"].get("groups", spec["groups"])) + 2  # e2e, layers per group
    assert len(tasks) == len(spec["models"]) * per_model


def test_committed_figures_come_in_pairs() -> None:
    pngs = sorted(FIGURES.glob("*.png"))
    assert pngs, "figures/ is empty; run make figures"
    assert all(p.with_suffix(".pdf").is_file() and p.stat().st_size > 0 for p in pngs)
    assert sum(f.stat().st_size for f in FIGURES.iterdir()) < 5 * 2**20
