"""The GPU benchmark: LEE and attribution cost on one card, as ratios measured in one run.

For each model (random init, seed 0, embedded photos repeated to the batch, float32, TF32 off):
- one no-grad forward pass at the batch (default 32);
- ``lee`` with one group, and with all ten, / a forward;
- the floor: a forward at 11 times the batch (one primal and ten tangent passes) / a forward;
- the double-backward baseline (``method="double_backward"``), ten groups / ours;
- extra peak memory of ten-group ``lee`` / that of a forward (``torch.cuda.max_memory_allocated``
  above what was allocated before);
- exact and shares attribution (``translate_x``) at a batch of 8 on a graph traced beforehand:
  seconds, / a forward at that batch, and the exact estimator's extra peak memory / that of a
  forward-with-grad (forward, then backward of a random projection of the softmax).

Every call runs once untimed first; times are the best of ``--repeat`` (one for the baseline
and attribution). The whole run takes under 5 minutes on an H100.

Run: ``python benchmarks/gpu.py [--models ...] [--batch 32] [--out table.md]``; without a
GPU, ``python benchmarks/gpu.py --cpu --small`` runs the same program at a tiny size.
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Callable

import torch

import layerlie as ll

from bench import best_time, markdown, setup, sync

HEADER = ["model", "forward (ms)", "lee 1 group / fwd", "lee 10 groups / fwd", "floor: fwd at 11x batch / fwd",
          "double backward / ours (10)", "extra memory, lee 10 / fwd", "fwd at attribution batch (ms)",
          "exact (s)", "exact / fwd", "shares (s)", "shares / fwd", "extra memory, exact / fwd-with-grad"]


def extra_memory(fn: Callable[[], object], device: str) -> float | None:
    """Bytes that ``fn`` allocates at its peak above what was allocated before (CUDA only)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def forward_time(model: torch.nn.Module, x: torch.Tensor, device: str, repeat: int) -> float:
    """The best time of a no-grad forward of ``x``."""
    with torch.no_grad():
        return best_time(lambda: model(x), device, repeat)


def ratio(a: float | None, b: float | None, fmt: str = ".2f") -> str:
    """``a / b`` formatted, or a dash where either was not measured."""
    return "-" if a is None or b is None else format(a / b, fmt)


def measure(name: str, args: argparse.Namespace) -> list[object]:
    """One table row for ``name``; prints the checks that go with it."""
    device, repeat = args.device, args.repeat
    model, x = setup(name, args.batch, args.res, device)
    t_fwd = forward_time(model, x, device, repeat)
    t_floor = forward_time(model, x.repeat(11, 1, 1, 1), device, repeat)
    with torch.no_grad():
        mem_fwd = extra_memory(lambda: model(x), device)
    t_one = best_time(lambda: ll.lee(model, x, "translate_x"), device, repeat)
    t_all = best_time(lambda: ll.lee(model, x, "all"), device, repeat)
    mem_lee = extra_memory(lambda: ll.lee(model, x, "all"), device)
    ours = ll.lee(model, x, "all")
    t_db = best_time(lambda: ll.lee(model, x, "all", method="double_backward"), device, 1, warmup=False)
    base = ll.lee(model, x, "all", method="double_backward")
    agree = float((ours["lee"] - base["lee"]).abs().max() / base["lee"].abs().max())

    x8 = x[:args.attr_batch]
    gm = ll.trace(model, x8)
    z = torch.randn(x8.shape[0], model.num_classes, device=device)

    def with_grad() -> None:
        (model(x8).softmax(-1) * z).sum().backward()
        model.zero_grad(set_to_none=True)

    t_fwd8 = forward_time(gm, x8, device, repeat)
    exact = ll.attribute(gm, x8, "translate_x")
    t_exact = best_time(lambda: ll.attribute(gm, x8, "translate_x"), device, 1, warmup=False)
    t_shares = best_time(lambda: ll.attribute(gm, x8, "translate_x", estimator="shares"), device, 1)
    mem_grad = extra_memory(with_grad, device)
    mem_exact = extra_memory(lambda: ll.attribute(gm, x8, "translate_x"), device)
    print(f"  {name}: double backward vs ours, max rel. diff {agree:.1e}; exact attribution residual "
          f"{exact.residual:.1e}", flush=True)
    return [name, f"{t_fwd * 1e3:.2f}", f"{t_one / t_fwd:.2f}", f"{t_all / t_fwd:.2f}", f"{t_floor / t_fwd:.2f}",
            f"{t_db / t_all:.2f}", ratio(mem_lee, mem_fwd), f"{t_fwd8 * 1e3:.2f}", f"{t_exact:.2f}",
            f"{t_exact / t_fwd8:.1f}", f"{t_shares:.2f}", f"{t_shares / t_fwd8:.1f}", ratio(mem_exact, mem_grad)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,vit_small_patch16_224,convnext_tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--attr-batch", type=int, default=8)
    parser.add_argument("--res", type=int, default=None, help="input size (default: each model's own)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N for the cheap timings")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (to try the program without a GPU)")
    parser.add_argument("--small", action="store_true", help="batch 2, attribution batch 1, 64 px, best of 1")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()
    if args.small:
        args.batch, args.attr_batch, args.res, args.repeat = 2, 1, 64, 1
    args.device = "cpu" if args.cpu else "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; run with --cpu (and --small) to try the program here")
    warnings.simplefilter("ignore")
    # float32 as written: TF32 would change the numbers that the ratios compare
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{card}, torch {torch.__version__}, float32, TF32 off; batch {args.batch}, attribution batch "
          f"{args.attr_batch}, input {args.res or 'each model own'}", flush=True)
    start = time.perf_counter()
    rows = []
    for name in args.models.split(","):
        try:
            rows.append(measure(name, args))
        except (RuntimeError, ll.LayerlieError) as err:  # one model's failure (memory, say) keeps the others
            print(f"  {name}: failed: {str(err).splitlines()[0]}", flush=True)
            rows.append([name, *["-"] * (len(HEADER) - 1)])
        sync(args.device)
    table = markdown(HEADER, rows)
    print(table)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{card}, torch {torch.__version__}\n\n{table}\n")


if __name__ == "__main__":
    main()
