"""Sweep throughput on a Ray cluster against its number of worker nodes, in one run.

A head (no CPUs) starts once; worker nodes of one CPU each join one by one. With 1, 2 and 3
worker nodes the same spec runs into a fresh store through ``--address``, and the script
reports each run's wall time (the driver's connect and the workers' start included) and
tasks per minute, the speed-up over one node, and checks that the stores hold the same
tables (but for the ``ray_node`` and ``pid`` columns). The head and every node are processes of
this machine (:class:`layerlie.testing.LocalCluster`), killed by their pids at the end.

Run: ``python benchmarks/cluster.py [--spec sweeps/smoke.toml] [--nodes 3]``.
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
from layerlie.testing import LocalCluster


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", default=str(Path(__file__).parent.parent / "sweeps" / "smoke.toml"))
    parser.add_argument("--nodes", type=int, default=3, help="the most worker nodes (one CPU each)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}; spec {args.spec}; worker nodes of 1 CPU, one torch thread per task")
    root = str(Path(__file__).resolve().parent.parent)
    os.environ["RAY_AUTH_MODE"] = "disabled"  # this process is the driver of a cluster without tokens
    per_minute, stores = {}, {}
    with tempfile.TemporaryDirectory() as tmp, \
            LocalCluster(env={"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}) as cluster:
        for nodes in range(1, args.nodes + 1):
            cluster.add_node(num_cpus=1)
            store = Path(tmp) / f"n{nodes}"
            start = time.perf_counter()
            result = ll.sweep(args.spec, store, address=cluster.address, progress=False)
            seconds = time.perf_counter() - start
            n, used = len(result.ran), ll.load(store, "e2e").ray_node.nunique()
            per_minute[nodes], stores[nodes] = 60 * n / seconds, store
            print(f"{nodes} worker node(s): {n} tasks ({len(result.failed)} failed) in {seconds:6.1f} s: "
                  f"{per_minute[nodes]:6.1f} tasks/min, e2e rows from {used} node(s)")
        for nodes in stores:
            for t in TABLES:  # the same rows, but for the node and process each task ran in
                placed = ["ray_node", "pid"]
                pd.testing.assert_frame_equal(ll.load(stores[1], t).drop(columns=placed, errors="ignore"),
                                              ll.load(stores[nodes], t).drop(columns=placed, errors="ignore"))
    print("speed-up over 1 node: " + ", ".join(f"{k} nodes {v / per_minute[1]:.2f}x" for k, v in per_minute.items())
          + "; tables equal across the runs")


if __name__ == "__main__":
    main()
