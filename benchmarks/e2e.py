"""End-to-end LEE cost, as ratios measured in one run on this machine.

For each model (random init, batch of embedded photos):
- lee with one group / one no-grad forward pass;
- lee with all ten groups / one forward pass;
- the double-backward baseline's time / ours, ten groups, on the same numbers;
- extra peak memory of lee (ten groups) / that of a no-grad forward, each measured in a
  fresh process with ``--probe forward`` and ``--probe lee`` (CPU: resident-set growth).

Run: ``python benchmarks/e2e.py [--batch 8] [--models resnet18,...]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import time
import warnings

import torch

import layerlie as ll


def best_time(fn, repeat: int = 2, warmup: bool = True) -> float:
    """The fastest of ``repeat`` timed calls, after one untimed call when ``warmup``."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _probe(name: str, kind: str, batch: int) -> None:
    """Child process: print the peak resident memory that one computation adds, in MiB."""
    torch.manual_seed(0)
    model = ll.load_model(name)
    x = ll.photos(model, n=batch)
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024
    if kind == "forward":
        with torch.no_grad():
            model(x)
    else:
        ll.lee(model, x, "all")
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)


def peak_rss_growth(name: str, kind: str, batch: int) -> float:
    """Peak memory added by a no-grad forward or by lee, each measured in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--probe", kind, "--models", name, "--batch", str(batch)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet18,vit_tiny_patch16_224,convnext_atto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--probe", choices=["forward", "lee"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.probe:
        return _probe(args.models, args.probe, args.batch)
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'model':24s} {'fwd s':>7s} {'1 group/fwd':>12s} {'10 groups/fwd':>14s} "
          f"{'db/ours (10)':>13s}")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = ll.load_model(name)
        x = ll.photos(model, n=args.batch)
        with torch.no_grad():
            t_fwd = best_time(lambda: model(x))
        t_one = best_time(lambda: ll.lee(model, x, "translate_x"))
        t_all = best_time(lambda: ll.lee(model, x, "all"))
        ours = ll.lee(model, x, "all")
        start = time.perf_counter()
        base = ll.lee(model, x, "all", method="double_backward")
        t_db = time.perf_counter() - start
        agree = float((ours["lee"] - base["lee"]).abs().max() / base["lee"].abs().max())
        print(f"{name:24s} {t_fwd:7.3f} {t_one / t_fwd:12.2f} {t_all / t_fwd:14.2f} "
              f"{t_db / t_all:13.2f}   (max rel. diff db vs ours {agree:.1e})")
    print("peak memory: run `python benchmarks/e2e.py --probe forward|lee --models NAME` (MiB added, fresh process)")


if __name__ == "__main__":
    main()
