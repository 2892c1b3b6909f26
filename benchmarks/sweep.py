"""Sweep throughput: tasks per minute, serial and on a local Ray of 1 and 2 workers, in one run.

The same spec runs three times into fresh stores: ``workers=0`` (serial, in this process),
then ``workers=1`` and ``workers=2`` (a local Ray started by the sweep, its start included).
It reports each run's wall time and tasks per minute, Ray's overhead as the 1-worker time over
the serial time, the 2-worker speed-up over 1 worker and the cost of a bare Ray start, and
checks that the three stores hold the same tables (but for the ``pid`` column).

Run: ``python benchmarks/sweep.py [--spec sweeps/smoke.toml]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

import layerlie as ll
from layerlie.results.store import TABLES


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", default=str(Path(__file__).parent.parent / "sweeps" / "smoke.toml"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}; spec {args.spec}; one torch thread per task")
    seconds, stores = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (0, 1, 2):
            store = Path(tmp) / f"w{workers}"
            start = time.perf_counter()
            result = ll.sweep(args.spec, store, workers=workers, progress=False)
            seconds[workers] = time.perf_counter() - start
            stores[workers] = store
            n = len(result.ran)
            label = "serial" if workers == 0 else f"ray x{workers}"
            print(f"{label:8s} {n} tasks ({len(result.failed)} failed) in {seconds[workers]:6.1f} s: "
                  f"{60 * n / seconds[workers]:6.1f} tasks/min")
        for workers in (1, 2):
            for t in TABLES:
                # the same rows, but for the node and process each task ran in
                placed = ["ray_node", "pid"]
                pd.testing.assert_frame_equal(ll.load(stores[0], t).drop(columns=placed, errors="ignore"),
                                              ll.load(stores[workers], t).drop(columns=placed, errors="ignore"))
    print(f"Ray start and stop alone: {ray_start():.1f} s; Ray overhead (1 worker / serial): "
          f"{seconds[1] / seconds[0]:.2f}x; "
          f"2 workers over 1: {seconds[1] / seconds[2]:.2f}x faster; tables equal across the three runs")


def ray_start() -> float:
    """Seconds to start a local 2-CPU Ray, run one trivial task on it, and stop it."""
    import ray

    start = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    ray.get(ray.remote(lambda: None).remote())
    ray.shutdown()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
