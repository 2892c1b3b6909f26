"""The GPU benchmark: LEE and attribution cost on one card, with the pass captured and not, and
plain-PyTorch references, as ratios to a no-grad forward measured in one run.

For each model (random init, seed 0, embedded photos repeated to the batch, float32, TF32 off):
- references: the floor (a forward at 11 times the batch: one primal and ten tangent passes);
  ``torch.func.jvp`` of softmax(model) with ten random tangents under ``vmap`` and with one, eager,
  and the same one and ten replayed from a CUDA graph (``layerlie.core.program.cuda_graph``);
- ``lee`` with one group, ten groups, and ten groups with ``memory_budget=inf``, with the pass
  captured (``capture=None``, the device's default: a CUDA graph on CUDA, eager on the CPU) and
  not (``capture=False``);
- extra peak memory of ten-group ``lee`` / that of a forward, both ways; captured, it counts the
  graph's own memory and static buffers, made in the calls measured;
- exact and shares attribution (``translate_x``) at batch 8 on a graph traced beforehand, both
  ways, / a forward at that batch.

A captured call is timed once its program is made (two untimed calls: the key is seen, then
captured); times are the best of ``--repeat`` after one untimed call. Checks printed per model:
ten-group ``lee`` captured against eager (max relative difference) and the estimators' residuals.
On the CPU the CUDA-graph references print "-". The whole run is meant to take under 4 minutes
on an H200.

Run: ``python benchmarks/gpu.py [--models ...] [--batch 32] [--out table.md]``; without a GPU,
``python benchmarks/gpu.py --cpu --small`` runs the same program at a tiny size.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch

import layerlie as ll
from layerlie.core import program
from layerlie.measure.lie import jvp_ready

from bench import best_time, markdown, setup, sync

# Monitor rows: benchmarks/monitor.py, where present, gives the cost of a Monitor measurement in
# training steps; this benchmark prints its table after its own, from the same run.
try:
    from monitor import HEADER as MONITOR_HEADER
    from monitor import monitor_rows
except ImportError:
    MONITOR_HEADER, monitor_rows = None, None

MODELS = "resnet50,vit_small_patch16_224,convnext_tiny,efficientnet_b0,swin_tiny_patch4_window7_224"

LEE_HEADER = ["model", "forward (ms)", "floor: fwd at 11x / fwd", "vmap(jvp) 10, eager", "jvp 1, eager",
              "jvp 1, CUDA graph", "jvp 10, CUDA graph", "lee 1 group", "lee 1 group, captured", "lee 10",
              "lee 10, captured", "lee 10 inf", "lee 10 inf, captured", "extra memory lee 10 / fwd",
              "extra memory lee 10, captured / fwd"]
ATTRIBUTION_HEADER = ["model", "forward at attribution batch (ms)", "exact / fwd", "exact, captured / fwd",
                      "shares / fwd", "shares, captured / fwd"]


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


def steady_time(fn: Callable[[], object], device: str, repeat: int) -> float:
    """The best time of ``fn`` once a captured program is made: one more untimed call than
    :func:`best_time` makes (a key runs eagerly once, then is captured)."""
    fn()
    return best_time(fn, device, repeat)


def ratio(a: float | None, b: float | None, fmt: str = ".2f") -> str:
    """``a / b`` formatted, or a dash where either was not measured."""
    return "-" if a is None or b is None else format(a / b, fmt)


def references(model: torch.nn.Module, x: torch.Tensor, device: str, repeat: int) -> list[float | None]:
    """Seconds of plain PyTorch: ``vmap(jvp)`` with ten random tangents and ``jvp`` with one, eager,
    then the same one and ten replayed from a CUDA graph (None off CUDA)."""
    def f(z: torch.Tensor) -> torch.Tensor:
        return model(z).softmax(-1)

    def jvp(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(f, (z,), (t,))[1]

    def jvps(z: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        return torch.func.vmap(lambda t: jvp(z, t))(ts)

    gen = torch.Generator(device=x.device).manual_seed(0)
    tens = torch.randn((10, *x.shape), generator=gen, device=x.device)
    times: list[float | None] = []
    with torch.no_grad(), jvp_ready(model):
        times.append(best_time(lambda: jvps(x, tens), device, repeat))
        times.append(best_time(lambda: jvp(x, tens[0]), device, repeat))
        for fn, inputs in ((jvp, (x, tens[0])), (jvps, (x, tens))):
            times.append(graph_time(fn, inputs, device, repeat))
    return times


def graph_time(fn: Callable[..., object], inputs: tuple[torch.Tensor, ...], device: str, repeat: int) -> float | None:
    """The best time of ``fn`` replayed from a CUDA graph; None off CUDA or where it cannot be captured."""
    if not device.startswith("cuda"):
        return None
    try:
        replay = program.cuda_graph(fn, inputs)
    except Exception as err:  # a reference that cannot be captured leaves its cell empty, not the row
        print(f"  CUDA graph reference not captured: {' '.join(str(err).split())[:160]}", flush=True)
        return None
    return best_time(lambda: replay(*inputs), device, repeat)


def lee_row(name: str, args: argparse.Namespace) -> list[object]:
    """One row of the ``lee`` table; prints the check that goes with it."""
    device, repeat = args.device, args.repeat
    model, x = setup(name, args.batch, args.res, device)
    t_fwd = forward_time(model, x, device, repeat)
    t_floor = forward_time(model, x.repeat(11, 1, 1, 1), device, repeat)
    with torch.no_grad():
        mem_fwd = extra_memory(lambda: model(x), device)
    refs = references(model, x, device, repeat)
    lee = []
    for groups, budget in (("translate_x", None), ("all", None), ("all", float("inf"))):
        for capture in (False, None):
            lee.append(steady_time(lambda: ll.lee(model, x, groups, memory_budget=budget, capture=capture),
                                   device, repeat))
    mem = []
    for capture in (False, None):
        program.PROGRAMS.clear()
        mem.append(extra_memory(lambda: [ll.lee(model, x, "all", capture=capture) for _ in range(3)], device))
    eager = torch.tensor(ll.lee(model, x, "all", capture=False)["lee"].to_numpy())
    captured = torch.tensor(ll.lee(model, x, "all")["lee"].to_numpy())
    print(f"  {name}: ten-group lee, captured against eager: max rel. diff "
          f"{float((captured - eager).abs().max() / eager.abs().max()):.1e}", flush=True)
    program.PROGRAMS.clear()
    return [name, f"{t_fwd * 1e3:.2f}", ratio(t_floor, t_fwd), *(ratio(t, t_fwd) for t in refs),
            *(ratio(t, t_fwd) for t in lee), *(ratio(m, mem_fwd) for m in mem)]


def attribution_row(name: str, args: argparse.Namespace) -> list[object]:
    """One row of the attribution table; prints the estimators' checks."""
    device = args.device
    model, x = setup(name, args.attr_batch, args.res, device)
    gm = ll.trace(model, x)
    t_fwd = forward_time(gm, x, device, args.repeat)
    row: list[object] = [name, f"{t_fwd * 1e3:.2f}"]
    for estimator in ("exact", "shares"):
        for capture in (False, None):
            last: list[ll.Attribution] = []

            def run() -> None:
                last[:] = [ll.attribute(gm, x, "translate_x", estimator=estimator, capture=capture)]

            t = steady_time(run, device, 1) if capture is None else best_time(run, device, 1)
            row.append(ratio(t, t_fwd, ".1f"))
            print(f"  {name}: {estimator}{', captured' if capture is None else ''}: {last[0].check_line()}",
                  flush=True)
    program.PROGRAMS.clear()
    return row


def rows(measure: Callable[[str, argparse.Namespace], list[object]], header: list[str],
         args: argparse.Namespace) -> list[list[object]]:
    """One row per model; a model that fails (memory, say) gets dashes and the others go on."""
    out = []
    for name in args.models.split(","):
        try:
            out.append(measure(name, args))
        except (RuntimeError, ll.LayerlieError) as err:
            print(f"  {name}: failed: {str(err).splitlines()[0]}", flush=True)
            out.append([name, *["-"] * (len(header) - 1)])
        sync(args.device)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--attr-batch", type=int, default=8)
    parser.add_argument("--res", type=int, default=None, help="input size (default: each model's own)")
    parser.add_argument("--repeat", type=int, default=2, help="best of N for the cheap timings")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (to try the program without a GPU)")
    parser.add_argument("--small", action="store_true", help="batch 2, attribution batch 1, 64 px, best of 1")
    parser.add_argument("--out", help="also write the tables to this markdown file")
    args = parser.parse_args()
    if args.small:
        args.batch, args.attr_batch, args.res, args.repeat = 2, 1, 64, 1
    args.device = "cpu" if args.cpu else "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; run with --cpu (and --small) to try the program here")
    warnings.simplefilter("ignore")
    warnings.simplefilter("always", program.CaptureNote)  # a pass that runs eagerly must be seen
    # float32 as written: TF32 would change the numbers that the ratios compare
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{card}, torch {torch.__version__}, float32, TF32 off; batch {args.batch}, attribution batch "
          f"{args.attr_batch}, input {args.res or 'each model own'}; ratios to a no-grad forward", flush=True)
    start = time.perf_counter()
    tables = [markdown(LEE_HEADER, rows(lee_row, LEE_HEADER, args)),
              markdown(ATTRIBUTION_HEADER, rows(attribution_row, ATTRIBUTION_HEADER, args))]
    if monitor_rows is not None:
        tables.append(markdown(MONITOR_HEADER, monitor_rows(args.device, args.small)))
    text = "\n\n".join(tables)
    print(text)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{card}, torch {torch.__version__}\n\n{text}\n")


if __name__ == "__main__":
    main()
