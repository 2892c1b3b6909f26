"""What a Monitor costs a training loop, in training steps of that same loop, measured in one run.

A plain PyTorch loop trains resnet10t (timm, random init, seed 0, 10 classes) with SGD and
momentum on random images: 16 at 128 px on the CPU (a batch a researcher would train with on a
laptop-class CPU), 64 at 224 px on a GPU. A :class:`layerlie.Monitor` watches 4 probe images at
the same size with 2 groups (``translate_x``, ``rotate``), and measures every step, so that a
run of a few steps holds several measurements. For each setting (no monitor, LEE only,
``layers=True``), the table gives:

- the mean training step (the monitor's own timing of the gaps between its calls; without a
  monitor, the loop's);
- the one-time set-up (:attr:`layerlie.Monitor.setup_seconds`);
- the mean measurement, and :attr:`layerlie.Monitor.overhead`: measurements in training steps;
- the same overhead from the loop's wall clock: (loop with the monitor - loop without) per
  measurement, in training steps of the loop without.

Run: ``python benchmarks/monitor.py [--cpu] [--small] [--profile]``; ``--small`` is batch 4 at
64 px and fewer steps, to try the program. ``benchmarks/gpu.py`` adds :func:`monitor_rows`.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
import warnings

import timm
import torch
import torch.nn.functional as F

import layerlie as ll

from bench import markdown, sync

HEADER = ["device", "monitor", "train batch", "train step (ms)", "set-up (s)", "measurement (ms)",
          "overhead (training steps)", "overhead, loop wall clock (training steps)"]
GROUPS = ["translate_x", "rotate"]
PROBE = 4


def sizes(device: str, small: bool) -> tuple[int, int, int]:
    """``(training batch, resolution, steps)`` of a run."""
    if small:
        return 4, 64, 3
    return (64, 224, 8) if device.startswith("cuda") else (16, 128, 6)


def train(device: str, small: bool, monitor: dict | None) -> tuple[float, ll.Monitor | None]:
    """The loop's wall-clock seconds over its timed steps (the first, warm-up step excluded), and
    its monitor (built before the loop, so its set-up is outside the timed steps)."""
    batch, res, steps = sizes(device, small)
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10).to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, res, res, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    mon = None if monitor is None else ll.Monitor(model, x[:PROBE], GROUPS, every=1, **monitor)
    model.train()
    start = 0.0
    for i in range(steps + 1):
        if i == 1:
            sync(device)
            start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if mon is not None:
            mon.step(i)
    sync(device)
    return (time.perf_counter() - start) / steps, mon


def monitor_rows(device: str, small: bool) -> list[list[object]]:
    """One row per setting: no monitor, LEE only, ``layers=True`` (see the module's docstring)."""
    batch, res, _ = sizes(device, small)
    plain, _ = train(device, small, None)
    rows: list[list[object]] = [[device, "none", f"{batch} x {res} px", f"{plain * 1e3:.0f}", "-", "-", "-", "-"]]
    for name, options in (("LEE only", {}), ("layers=True", {"layers": True})):
        wall, mon = train(device, small, options)
        measured = mon.table().drop_duplicates("step")
        seconds = float(measured.seconds.iloc[1:].mean())  # the measurement at step 0 precedes any step timing
        step = seconds / mon.overhead if mon.overhead > 0 else float("nan")
        rows.append([device, name, f"{batch} x {res} px", f"{step * 1e3:.0f}", f"{mon.setup_seconds:.2f}",
                     f"{seconds * 1e3:.0f}", f"{mon.overhead:.2f}", f"{(wall - plain) / plain:.2f}"])
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
