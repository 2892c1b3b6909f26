"""Where the time goes: ``torch.profiler`` tables of ten-group ``lee`` and of attribution.

For each model of ``--models`` (random init, seed 0, embedded photos): ten-group ``lee``, and
the ops that ``vmap`` runs as a loop over the stacked tangents (functorch's fallback notice).
For each model of ``--attr-models``: the defects pass (every node's ``G_v h_v`` and ``e_v``, on
a graph traced beforehand) and exact attribution (``translate_x``). Each computation runs
once untimed, then once under the profiler; the table lists the ops with the largest self
time (device time on a GPU, CPU time otherwise) and their share of the total; the last row
says how much of the wall time the ops account for (the rest is Python: the fx interpreter,
the rules' dispatch, and on a GPU the launches it waits for).

Run: ``python benchmarks/profile_ops.py [--batch 4] [--attr-batch 2] [--res 224] [--top 12]
[--models ...] [--attr-models ...] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Callable

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import layerlie as ll
from layerlie.measure.attribution import _Defects

from bench import best_time, markdown, setup, sync


def top_ops(fn: Callable[[], object], device: str, top: int) -> tuple[float, str]:
    """Seconds of one profiled call of ``fn`` and the markdown table of its ``top`` ops."""
    cuda = device.startswith("cuda")
    fn()
    sync(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        sync(device)
    seconds = time.perf_counter() - start
    key = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    # the ops, not their kernels: a kernel's time is also the self device time of the op that launched it
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CPU and key(e) > 0]
    total = sum(key(e) for e in events)
    events.sort(key=key, reverse=True)
    unit = "device" if cuda else "CPU"
    rows = [[f"`{e.key}`", e.count, f"{key(e) / 1e3:.1f}", f"{100 * key(e) / total:.1f}%"] for e in events[:top]]
    rows.append(["all ops", sum(e.count for e in events), f"{total / 1e3:.1f}",
                 f"100% ({100 * total / 1e6 / seconds:.0f}% of the wall time)"])
    return seconds, markdown(["op", "calls", f"self {unit} (ms)", "share"], rows)


def vmap_fallbacks(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """The ops that ``vmap`` of ``jvp`` over two tangents runs as a loop on this model."""
    torch._C._functorch._set_vmap_fallback_warning_enabled(True)

    def f(inp: torch.Tensor) -> torch.Tensor:  # the map whose tangents lee stacks
        return model(inp).softmax(-1)

    tangents = torch.randn(2, *x.shape, device=x.device)
    try:
        with warnings.catch_warnings(record=True) as caught, ll.jvp_ready(model), torch.no_grad():
            warnings.simplefilter("always")
            torch.func.vmap(lambda t: torch.func.jvp(f, (x,), (t,)), out_dims=(None, 0))(tangents)
    finally:
        torch._C._functorch._set_vmap_fallback_warning_enabled(False)
    marker = "batching rule for "
    return sorted({str(w.message).split(marker)[1].split(".")[0] for w in caught if marker in str(w.message)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,vit_tiny_patch16_224,convnext_atto", help="for lee")
    parser.add_argument("--attr-models", default="resnet50,vit_small_patch16_224", help="for attribution")
    parser.add_argument("--batch", type=int, default=4, help="images for lee")
    parser.add_argument("--attr-batch", type=int, default=2, help="images for attribution")
    parser.add_argument("--res", type=int, default=None, help="input size (default: each model's own)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    cuda = args.device.startswith("cuda")
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}, torch {torch.__version__}; batch {args.batch} for lee, {args.attr_batch} for attribution, "
          f"input {args.res or 'each model own'}\n")
    for name in filter(None, args.models.split(",")):
        model, x = setup(name, args.batch, args.res, args.device)
        with torch.no_grad():
            t_fwd = best_time(lambda: model(x), args.device)
        seconds, table = top_ops(lambda: ll.lee(model, x, "all"), args.device, args.top)
        loops = vmap_fallbacks(model, x)
        print(f"### {name}: ten-group `lee`, {seconds:.2f} s = {seconds / t_fwd:.1f} forwards (profiled)\n")
        print(f"vmap runs as a loop: {', '.join(f'`{op}`' for op in loops) or 'nothing'}\n\n{table}\n", flush=True)
    for name in filter(None, args.attr_models.split(",")):
        model, x = setup(name, args.attr_batch, args.res, args.device)
        gm = ll.trace(model, x)
        group = ll.group("translate_x")
        with torch.no_grad():
            t_fwd = best_time(lambda: gm(x), args.device)
            seconds, table = top_ops(lambda: _Defects(gm, group, "central", "receptive_field").propagate(x, None),
                                     args.device, args.top)
        print(f"### {name}: defects pass, {seconds:.2f} s = {seconds / t_fwd:.1f} forwards (profiled)\n\n{table}\n",
              flush=True)
        seconds, table = top_ops(lambda: ll.attribute(gm, x, group), args.device, args.top)
        print(f"### {name}: exact attribution, {seconds:.2f} s = {seconds / t_fwd:.1f} forwards (profiled)\n\n"
              f"{table}\n", flush=True)


if __name__ == "__main__":
    main()
