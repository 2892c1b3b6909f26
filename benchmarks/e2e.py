"""End-to-end LEE cost, as ratios measured in one run on this machine.

For each model (random init, batch of embedded photos):
- lee with one group / one no-grad forward pass;
- lee with all ten groups / one forward pass;
- the double-backward baseline's time / ours, ten groups, on the same numbers;
- the same with the other forward-mode rules than the default (``fast=False``, PyTorch's
  own formulas, on the CPU; ``fast=True``, layerlie's rules, on a GPU) and with no memory
  budget (``memory_budget=inf``, every image and group in one pass);
- peak memory of lee (ten groups: the default budget, no budget, and a lean budget of
  ``LEAN`` times the footprint's forward) / that of a no-grad forward. On the CPU each call runs
  in a fresh process (VmHWM, the process's peak resident set, is per process) and two ratios
  are printed: the processes' peaks (``hwm``, what the goal "resident memory <= 4 forwards"
  reads), and the same less the peak of an idle process that imported torch, built the model
  and the images (``growth``). On CUDA: the allocator's peak growth;
- the one-off cost of measuring the footprint (cached per model and input shape);
- with ``--profile``: the top ops of ten-group lee and their share of the CPU time.

Run: ``python benchmarks/e2e.py [--batch 8] [--models resnet18,...] [--profile]``.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
import warnings

import torch

import layerlie as ll
import layerlie.core.memory
import layerlie.measure.lie


def best_time(fn, repeat: int = 2, warmup: bool = True) -> float:
    """The fastest of ``repeat`` timed calls, after one untimed call when ``warmup``."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


LEAN = 3
"""The lean run's budget, in the footprint's no-grad forwards of the same images."""

KINDS = ("idle", "forward", "lee", "lee-whole", "lee-lean")


def _probe(name: str, kind: str, batch: int) -> None:
    """Child process: print its peak resident set (VmHWM) after one computation, in MiB."""
    torch.manual_seed(0)
    model = ll.load_model(name)
    x = ll.photos(model, n=batch)
    if kind == "forward":
        with torch.no_grad():
            model(x)
    elif kind != "idle":
        budget = {"lee": None, "lee-whole": float("inf")}.get(kind)
        if kind == "lee-lean":  # the footprint is measured before the budget is known: its peak counts
            with ll.jvp_ready(model):
                fp, _ = layerlie.core.memory.footprint(layerlie.measure.lie.probabilities(model), x,
                                                       ll.tangent(x, ll.group("translate_x"))[None], fast=True)
            budget = LEAN * fp.forward * len(x)
        ll.lee(model, x, "all", memory_budget=budget)
    print(_status_kib("VmHWM") / 1024)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_rss(name: str, kind: str, batch: int) -> float:
    """The peak resident set (MiB) of a fresh process that runs one of :data:`KINDS`."""
    out = subprocess.run([sys.executable, __file__, "--probe", kind, "--models", name, "--batch", str(batch)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def cuda_peak_growth(fn) -> float:
    """Peak CUDA memory that ``fn()`` allocates beyond what was allocated before, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def top_ops(model, x, n: int = 8) -> str:
    """The ``n`` ops with the largest share of the CPU time of ten-group lee."""
    from torch.profiler import ProfilerActivity, profile

    ll.lee(model, x, "all")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ll.lee(model, x, "all")
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    return ", ".join(f"{e.key.removeprefix('aten::')} {100 * e.self_cpu_time_total / total:.0f}% ({e.count})"
                     for e in events[:n])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet18,vit_tiny_patch16_224,convnext_atto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (fp32, TF32 off; memory from the allocator)")
    parser.add_argument("--profile", action="store_true", help="print the top ops of ten-group lee per model")
    parser.add_argument("--probe", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.probe:
        return _probe(args.models, args.probe, args.batch)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    print(f"machine: {torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    memory = "hwm" if not cuda else "alloc"
    print(f"{'model':24s} {'fwd s':>7s} {'1 group/fwd':>12s} {'10 groups/fwd':>14s} {'other 1/10':>11s} "
          f"{'whole 1/10':>11s} {'db/ours (10)':>13s} {'memory/fwd':>11s} {'whole memory/fwd':>17s} "
          f"{'lean memory/fwd':>16s} (memory: {memory} / growth)")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = ll.load_model(name, device=args.device)
        other_rules = args.device != "cpu"  # the path that the default (fast=None) does not take
        x = ll.photos(model, n=args.batch)
        if args.profile:
            print(f"{name}: {top_ops(model, x)}", flush=True)
            continue
        with torch.no_grad():
            t_fwd = best_time(lambda: model(x))
        start = time.perf_counter()  # measured once per model and input shape, then cached
        with ll.jvp_ready(model):
            layerlie.core.memory.footprint(layerlie.measure.lie.probabilities(model), x,
                                           ll.tangent(x, ll.group("translate_x"))[None], fast=args.device == "cpu")
        t_fp = time.perf_counter() - start
        t_one = best_time(lambda: ll.lee(model, x, "translate_x"))
        t_all = best_time(lambda: ll.lee(model, x, "all"))
        e_one = best_time(lambda: ll.lee(model, x, "translate_x", fast=other_rules))
        e_all = best_time(lambda: ll.lee(model, x, "all", fast=other_rules))
        w_one = best_time(lambda: ll.lee(model, x, "translate_x", memory_budget=float("inf")))
        w_all = best_time(lambda: ll.lee(model, x, "all", memory_budget=float("inf")))
        ours = ll.lee(model, x, "all")
        start = time.perf_counter()
        base = ll.lee(model, x, "all", method="double_backward")
        t_db = time.perf_counter() - start
        agree = float((ours["lee"] - base["lee"]).abs().max() / base["lee"].abs().max())
        other = ll.lee(model, x, "all", fast=other_rules)
        agree_fast = float((ours["lee"] - other["lee"]).abs().max() / other["lee"].abs().max())
        if cuda:
            with ll.jvp_ready(model):
                fp, _ = layerlie.core.memory.footprint(layerlie.measure.lie.probabilities(model), x,
                                                       ll.tangent(x, ll.group("translate_x"))[None], fast=False)
            with torch.no_grad():
                m_fwd = cuda_peak_growth(lambda: model(x))
            peaks = {"idle": 0.0, "forward": m_fwd, "lee": cuda_peak_growth(lambda: ll.lee(model, x, "all")),
                     "lee-whole": cuda_peak_growth(lambda: ll.lee(model, x, "all", memory_budget=float("inf"))),
                     "lee-lean": cuda_peak_growth(lambda: ll.lee(model, x, "all",
                                                                 memory_budget=LEAN * fp.forward * len(x)))}
        else:
            peaks = {k: peak_rss(name, k, args.batch) for k in KINDS}

        def ratios(kind: str) -> str:
            grown = (peaks[kind] - peaks["idle"]) / (peaks["forward"] - peaks["idle"])
            return f"{peaks[kind] / peaks['forward']:.2f}/{grown:.2f}"

        print(f"{name:24s} {t_fwd:7.3f} {t_one / t_fwd:12.2f} {t_all / t_fwd:14.2f} "
              f"{e_one / t_fwd:5.2f}/{e_all / t_fwd:5.2f} {w_one / t_fwd:5.2f}/{w_all / t_fwd:5.2f} "
              f"{t_db / t_all:13.2f} {ratios('lee'):>11s} {ratios('lee-whole'):>17s} {ratios('lee-lean'):>16s}   "
              f"(max rel. diff db vs ours {agree:.1e}, other rules vs default {agree_fast:.1e}; footprint measured "
              f"once in {t_fp:.2f} s; MiB: " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()) + ")", flush=True)


if __name__ == "__main__":
    main()
