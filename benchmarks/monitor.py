"""What a Monitor costs a training loop, in training steps of that same loop, measured in one run.

A plain PyTorch loop trains resnet10t (timm, random init, seed 0, 10 classes) with SGD and
momentum on random images: 16 at 128 px on the CPU (a batch a researcher would train with on a
laptop-class CPU), 64 at 224 px on a GPU. A :class:`layerlie.Monitor` watches 4 probe images at
the same size with 2 groups (``translate_x``, ``rotate``), and measures every step, so that a
run of a few steps holds several measurements. For each setting (no monitor, LEE only,
``layers=True``), the table gives:

- the mean training step;
- the one-time set-up: the monitor's construction;
- the mean measurement (the calls to :meth:`layerlie.Monitor.step`, each of which measures), and
  it over the mean training step of the same loop: the overhead in training steps;
- :attr:`layerlie.Monitor.overhead`, the same ratio as the monitor itself reports it (by wall time).

Times are the process's CPU time on the CPU, where the machine may be shared, and wall time
after the device's queue on a GPU; the first step and measurement are warm-up, left out.

Run: ``python benchmarks/monitor.py [--cpu] [--small] [--profile]``; ``--small`` is batch 4 at
64 px and fewer steps, to try the program. ``benchmarks/gpu.py`` adds :func:`monitor_rows`.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
import warnings
from typing import Callable

import timm
import torch
import torch.nn.functional as F

import layerlie as ll

from bench import markdown, sync

HEADER = ["device", "monitor", "train batch", "train step (ms)", "set-up (s)", "measurement (ms)",
          "overhead (training steps)", "Monitor.overhead (training steps)"]
GROUPS = ["translate_x", "rotate"]
PROBE = 4


def sizes(device: str, small: bool) -> tuple[int, int, int]:
    """``(training batch, resolution, steps)`` of a run."""
    if small:
        return 4, 64, 3
    return (64, 224, 8) if device.startswith("cuda") else (16, 128, 6)


def clock(device: str) -> Callable[[], float]:
    """The benchmark's clock: the process's CPU time on the CPU (the machine is shared, so wall
    time counts other people's work), wall time after the device's queue on a GPU."""
    if device == "cpu":
        return time.process_time

    def wall() -> float:
        sync(device)
        return time.perf_counter()

    return wall


def train(device: str, small: bool, monitor: dict | None) -> tuple[list[float], list[float], float, ll.Monitor | None]:
    """A training run: its steps' times, its measurements' times (the calls to ``Monitor.step``),
    the monitor's construction time, and the monitor. The first step and measurement are warm-up,
    left out."""
    batch, res, steps = sizes(device, small)
    now = clock(device)
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, res, res, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    start = now()
    mon = None if monitor is None else ll.Monitor(model, x[:PROBE], GROUPS, every=1, **monitor)
    built = now() - start
    model.train()
    step_times, measure_times = [], []
    for i in range(steps + 1):
        start = now()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        trained = now()
        if mon is not None:
            mon.step(i)
        if i:
            step_times.append(trained - start)
            measure_times.append(now() - trained)
    return step_times, measure_times, built, mon


def monitor_rows(device: str, small: bool) -> list[list[object]]:
    """One row per setting: no monitor, LEE only, ``layers=True`` (see the module's docstring)."""
    batch, res, _ = sizes(device, small)
    size = f"{batch} x {res} px"
    plain = statistics.mean(train(device, small, None)[0])
    rows: list[list[object]] = [[device, "none", size, f"{plain * 1e3:.0f}", "-", "-", "-", "-"]]
    for name, options in (("LEE only", {}), ("layers=True", {"layers": True})):
        steps, measurements, built, mon = train(device, small, options)
        step, measurement = statistics.mean(steps), statistics.mean(measurements)
        rows.append([device, name, size, f"{step * 1e3:.0f}", f"{built:.2f}", f"{measurement * 1e3:.0f}",
                     f"{measurement / step:.2f}", f"{mon.overhead:.2f}"])
    return rows


def profile(device: str, small: bool, layers: bool, top: int = 12) -> None:
    """cProfile of a few measurements of a built monitor: where a measurement spends its time."""
    batch, res, _ = sizes(device, small)
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10).to(device)
    x = torch.randn(PROBE, 3, res, res).to(device)
    mon = ll.Monitor(model, x, GROUPS, every=1, layers=layers)
    prof = cProfile.Profile()
    prof.enable()
    for i in range(3):
        mon.measure(i)
    prof.disable()
    print(f"profile of 3 measurements, layers={layers}:")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (the default without a GPU)")
    parser.add_argument("--small", action="store_true", help="batch 4 at 64 px, 3 steps: to try the program")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of a few measurements")
    args = parser.parse_args()
    device = "cpu" if args.cpu or not torch.cuda.is_available() else "cuda"
    warnings.simplefilter("ignore")
    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{card}, torch {torch.__version__}; resnet10t, {PROBE} probe images, groups {', '.join(GROUPS)}",
          flush=True)
    start = time.perf_counter()
    print(markdown(HEADER, monitor_rows(device, args.small), right_from=2))
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.profile:
        for layers in (False, True):
            profile(device, args.small, layers)


if __name__ == "__main__":
    main()
