"""Load time of a store of many small parts: the per-part reader of before, ``ll.load`` through
one pyarrow dataset, and ``ll.load`` after ``layerlie store compact`` (docs/design.md §4).

    OMP_NUM_THREADS=1 python benchmarks/store.py --parts 10000

The parts are synthetic rows shaped like a sweep's e2e table (ten groups x two images per
task); the baseline reader is kept here only, as the reference the new one is timed against.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import layerlie as ll
from layerlie.results import store as st

GROUPS = ["translate_x", "translate_y", "rotate", "scale", "shear", "stretch", "saturate", "hue", "brighten",
          "contrast"]


def write_parts(root: Path, n: int) -> None:
    """``n`` e2e parts of 20 rows each, laid out as :func:`st.write_part` writes them (without its fsyncs)."""
    per = 2 * len(GROUPS)
    whole = pa.Table.from_pandas(pd.DataFrame({
        "image": ["photo0", "photo1"] * len(GROUPS) * n, "group": GROUPS * 2 * n,
        "lee": [0.001 * (r // per) + 0.01 * (r % per) for r in range(n * per)],
        "model": [f"model{r // per // 70}" for r in range(n * per)], "scheme": "central", "seed": 0,
        "weights": "random init (seed 0)", "host": "node", "pid": [1000 + r // per % 16 for r in range(n * per)]}),
        preserve_index=False)
    for i in range(n):
        task = f"e2e-model{i // 70}-{i:05d}"
        info = json.dumps({"table": "e2e", "task": task, "schema": st.SCHEMA}).encode()
        part = whole.slice(i * per, per)
        pq.write_table(part.replace_schema_metadata({**part.schema.metadata, b"layerlie": info}),
                       root / "parts" / f"{task}.parquet")


def per_part_load(root: Path, table: str) -> pd.DataFrame:
    """The reader of before: every part read and converted alone, then concatenated."""
    frames = []
    for path in sorted((root / "parts").glob("*.parquet")):
        arrow = pq.read_table(path)
        if json.loads(arrow.schema.metadata[b"layerlie"])["table"] == table:
            frames.append(arrow.to_pandas())
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=10_000)
    parser.add_argument("--figures", action="store_true", help="also time `layerlie figures` before and after")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = st.create(Path(tmp) / "store", {"models": ["synthetic"], "seed": 0})
        t_write, _ = timed(write_parts, root, args.parts)
        t_old, old = timed(per_part_load, root, "e2e")
        t_new, new = timed(ll.load, root, "e2e")
        pd.testing.assert_frame_equal(new, old)
        t_fig = timed(subprocess.run, [sys.executable, "-m", "layerlie.cli", "figures", str(root), "--out",
                                       f"{tmp}/fig"])[0] if args.figures else None
        t_compact, _ = timed(st.compact, root)
        t_after, after = timed(ll.load, root, "e2e")
        pd.testing.assert_frame_equal(after, old)
        t_fig_after = timed(subprocess.run, [sys.executable, "-m", "layerlie.cli", "figures", str(root), "--out",
                                             f"{tmp}/fig"])[0] if args.figures else None
    print(f"{args.parts} parts, {len(old)} rows; {platform.machine()}, python {platform.python_version()}, "
          f"pyarrow {pa.__version__}; writing them took {t_write:.1f} s")
    print("| reader | load e2e (s) | vs per-part |\n| --- | --- | --- |")
    for name, t in (("per-part (before)", t_old), ("ll.load, one dataset", t_new),
                    ("ll.load after `store compact`", t_after)):
        print(f"| {name} | {t:.2f} | {t_old / t:.1f}x |")
    print(f"`store compact` itself: {t_compact:.2f} s")
    if args.figures:
        print(f"`layerlie figures`: {t_fig:.1f} s before compaction, {t_fig_after:.1f} s after")


if __name__ == "__main__":
    main()
