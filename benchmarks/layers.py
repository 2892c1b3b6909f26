"""Attribution cost against the published layer-wise method, as ratios measured in one run.

For each model (random init, seed 0, a batch of embedded photos, one group):
- the published method (baseline, below) / ``attribute(estimator="exact")`` (goal >= 3);
- the baseline / ``attribute(estimator="shares")`` (goal >= 30);
- peak memory added by exact attribution / by one forward-with-grad (forward, then backward
  of a random projection of the softmax) (goal <= 3, with chunking: ``--memory-budget``);
- the defects pass (every node's ``G_v h_v`` and ``e_v``) / one no-grad forward of the graph.

Our side runs on a GraphModule traced beforehand (``ll.trace``): tracing is not timed. Exact
attribution and the forward-with-grad each run in a fresh process (``--probe exact|grad``),
which reports the time and the peak resident memory that the computation adds.

The baseline re-implements the layer-wise code of Gruver et al. (2023), "The Lie Derivative
for Measuring Learned Equivariance" (docs/method.md §4, Hutchinson): a forward hook on every leaf
module (their leaf list, dropout excluded) computes the module's local Lie derivative,
``d/dt T_{-t} m(T_t h)`` at ``t = 0``, by their double-backward trick through their
hand-written bilinear sampler on ``affine_grid`` (reflection at the border), on tensors whose
layout is guessed from the shape (``B,C,H,W``, or ``B,N,C`` with ``N`` a square or one or two
off a square) in the per-tensor ``[-1, 1]`` convention. Then each probe ``z ~ N(0, I)`` on
the softmax costs one reverse pass (parameter gradients included, as their
``loss.backward()``), and the mean over probes of ``(z^T J_{out<-m} e_m)^2`` per image
estimates ``||c_m||^2``. Their loop re-runs the forward for every probe; here the graph is
kept and reversed ``--probes`` times, so the baseline is cheaper than theirs and the ratios
are lower bounds. ``--check`` prints its estimates beside exact attribution in the published
scheme and coordinates: they agree within the probes' noise.

Run: ``python benchmarks/layers.py [--models resnet50,vit_small_patch16_224] [--batch 4]
[--probes 100] [--group translate_x] [--check]``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from timm.layers import BlurPool2d, DropPath, EvoNorm2dB0, GatherExcite, Mlp, PatchEmbed, SEModule
from timm.models._efficientnet_blocks import SqueezeExcite
from timm.models.convit import GPSA, MHSA
from timm.models.mlp_mixer import Affine, MixerBlock, SpatialGatingBlock
from timm.models.vision_transformer import Attention
from torch import nn

import layerlie as ll
from layerlie.measure.attribution import _Defects
from layerlie.measure.lie import jvp_ready

from e2e import best_time

# The published leaf list: modules hooked whole, not through their children.
PUBLISHED_LEAVES = (Attention, MixerBlock, Affine, SpatialGatingBlock, PatchEmbed, Mlp, DropPath, BlurPool2d,
                    GatherExcite, EvoNorm2dB0, nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm,
                    SEModule, SqueezeExcite, MHSA, GPSA)


def leaf_modules(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The published ``selective_apply``: leaves (no children, or a listed class), no dropout."""
    children = list(model.named_children())
    if not children or isinstance(model, PUBLISHED_LEAVES):
        return [] if isinstance(model, nn.Dropout) else [(prefix, model)]
    return [leaf for name, c in children for leaf in leaf_modules(c, f"{prefix}.{name}" if prefix else name)]


def guessed_tokens(shape: torch.Size) -> int | None:
    """The published layout guess: 0 prefix tokens for ``B,C,H,W``, 0-2 for ``B,N,C`` with
    ``N`` a square or one or two off a square, None when the tensor is not image-like."""
    if len(shape) == 4:
        return 0 if tuple(shape[-2:]) != (1, 1) else None
    if len(shape) == 3 and shape[1] != 1:
        return next((k for k in (0, 1, 2) if math.isqrt(shape[1] - k) ** 2 == shape[1] - k), None)
    return None


def published_sample(h: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The published bilinear sampler of ``h: (B, C, H, W)`` at ``affine_grid(theta)``, written
    out so that autograd can differentiate it twice in ``theta``."""
    n, c, ih, iw = h.shape
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, ih, iw], align_corners=True)
    ix = (grid[..., 0] + 1) / 2 * (iw - 1)
    iy = (grid[..., 1] + 1) / 2 * (ih - 1)
    with torch.no_grad():
        x0, y0 = ix.floor(), iy.floor()
    flat = h.reshape(n, c, ih * iw)

    def tap(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        yy, xx = ih - 1 - (ih - 1 - yy.abs()).abs(), iw - 1 - (iw - 1 - xx.abs()).abs()
        index = (yy * iw + xx).long().view(n, 1, ih * iw).repeat(1, c, 1)
        return flat.gather(2, index).view(n, c, ih, iw)

    wx1, wy1 = (ix - x0)[:, None], (iy - y0)[:, None]
    wx0, wy0 = 1 - wx1, 1 - wy1
    return (tap(y0, x0) * wx0 * wy0 + tap(y0, x0 + 1) * wx1 * wy0
            + tap(y0 + 1, x0) * wx0 * wy1 + tap(y0 + 1, x0 + 1) * wx1 * wy1)


def published_transform(h: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``T h`` on a tensor of guessed layout; prefix tokens pass through."""
    k = guessed_tokens(h.shape)
    if h.ndim == 4:
        return published_sample(h, theta)
    b, n, c = h.shape
    s = math.isqrt(n - k)
    grid = h[:, k:].reshape(b, s, s, c).permute(0, 3, 1, 2)
    moved = published_sample(grid, theta).permute(0, 2, 3, 1).reshape(b, s * s, c)
    return torch.cat([h[:, :k], moved], 1)


def published_local_defect(module: nn.Module, h: torch.Tensor, generator: torch.Tensor) -> torch.Tensor:
    """``d/dt T_{-t} m(T_t h)`` at ``t = 0`` by the published double-backward trick."""
    t = torch.zeros(1, requires_grad=True)
    eye = torch.eye(2, 3, dtype=h.dtype)
    with torch.enable_grad():
        y = module(published_transform(h, eye + t * generator))  # first order in t: all L sees
        if guessed_tokens(y.shape) is not None:
            y = published_transform(y, eye - t * generator)
        v = torch.ones_like(y, requires_grad=True)
        (vj,) = torch.autograd.grad(y, t, v, create_graph=True)
        (ju,) = torch.autograd.grad(vj, v, torch.ones_like(t), create_graph=True)
    return ju.detach()


def published_layerwise(model: nn.Module, x: torch.Tensor, group: ll.Group, probes: int) -> dict[str, torch.Tensor]:
    """The published estimate of ``||c_m||`` per hooked module call and image: ``{name: (B,)}``."""
    if not group.spatial:
        raise ll.LayerlieError(f"the baseline implements spatial groups only, got {group.name!r}")
    generator = group.generator.to(x.dtype)
    calls: dict[str, int] = {}  # a module called twice gets two entries, as in theirs
    sums: dict[str, torch.Tensor] = {}
    busy = False

    def forward_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            nonlocal busy
            if busy or len(inputs) != 1 or not isinstance(output, torch.Tensor) \
                    or guessed_tokens(inputs[0].shape) is None:
                return  # their lie derivative of a non-image input is 0: no estimator
            busy = True  # the module runs again inside: no hooks there
            try:
                e = published_local_defect(module, inputs[0].detach() + 0, generator)
            finally:
                busy = False
            calls[name] = calls.get(name, -1) + 1
            key = f"{name}#{calls[name]}"
            sums[key] = torch.zeros(x.shape[0], dtype=torch.float64)
            if output.requires_grad:
                output.register_hook(lambda g: estimate(key, g, e))
        return hook

    def estimate(key: str, g: torch.Tensor, e: torch.Tensor) -> None:
        sums[key] += (g * e).flatten(1).sum(1).double() ** 2  # their store_estimator, per image

    handles = [m.register_forward_hook(forward_hook(name)) for name, m in leaf_modules(model)]
    try:
        with jvp_ready(model):
            y = model(x).softmax(-1)
    finally:
        for handle in handles:
            handle.remove()
    for i in range(probes):
        (torch.randn_like(y) * y).sum().backward(retain_graph=i < probes - 1)
        model.zero_grad()
    return {k: (s / probes).sqrt() for k, s in sums.items()}


def check(models: list[str], batch: int, group: ll.Group, probes: int) -> None:
    """The baseline's estimate beside ``||c_v||`` from exact attribution with the published
    scheme and coordinates, for the modules that are one graph node, largest first."""
    for name in models:
        model, x = _setup(name, batch)
        gm = ll.trace(model, x)
        exact = ll.attribute(gm, x, group, estimator="exact", scheme="published", coords="published").nodes.set_index("node")
        base = published_layerwise(model, x, group, probes)
        pairs = [(k, float(v.square().sum().sqrt()), exact.loc[k.split("#")[0].replace(".", "_"), "contribution_norm"])
                 for k, v in base.items() if k.endswith("#0") and k[:-2].replace(".", "_") in exact.index]
        print(f"{name}: baseline ({probes} probes) vs exact, published scheme and coordinates")
        for k, b, e in sorted(pairs, key=lambda p: -p[2])[:10]:
            print(f"  {k[:-2]:32s} {b:10.3e} {e:10.3e}  {b / e - 1:+7.1%}")


def _setup(name: str, batch: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = ll.load_model(name)
    return model, ll.photos(model, n=batch)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _probe(name: str, kind: str, args: argparse.Namespace) -> None:
    """Child process: time one computation and print, as JSON, its seconds and the peak
    resident memory it adds (MiB); for exact attribution also its sources and residual.

    The peak is the process's own high-water mark (``VmHWM``), reset after setup through
    ``/proc/self/clear_refs``: ``ru_maxrss`` would start from the size of the process that forked this one."""
    model, x = _setup(name, args.batch)
    gm = ll.trace(model, x) if kind == "exact" else None
    z = torch.randn(x.shape[0], model.num_classes)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what setup freed, so that it is not reused unseen
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    if kind == "grad":
        (model(x).softmax(-1) * z).sum().backward()
        extra = {}
    else:
        budget = args.memory_budget * args.batch if args.memory_budget is not None else None
        a = ll.attribute(gm, x, args.group, estimator="exact", memory_budget=budget)
        extra = dict(sources=int((a.nodes["local_norm"] > 0).sum()),
                     reaching=int((a.nodes["contribution_norm"] > 0).sum()), residual=a.residual)
    seconds = time.perf_counter() - start
    print(json.dumps(dict(seconds=seconds, mib=(_status_kib("VmHWM") - before) / 1024, **extra)))


def in_fresh_process(name: str, kind: str, args: argparse.Namespace) -> dict:
    """Exact attribution or a forward-with-grad, timed and measured in a fresh process."""
    budget = ["--memory-budget", str(args.memory_budget)] if args.memory_budget is not None else []
    out = subprocess.run([sys.executable, __file__, "--probe", kind, "--models", name, "--batch", str(args.batch),
                          "--group", args.group, *budget],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--probes", type=int, default=100, help="Hutchinson probes of the baseline")
    parser.add_argument("--group", default="translate_x")
    parser.add_argument("--memory-budget", type=float, default=None,
                        help="exact: bytes of tensors a chunk's propagation may hold, per image (memory_budget "
                             "= this times the batch); by default the library's, three forwards")
    parser.add_argument("--repeat", type=int, default=3, help="best of N for the cheap timings")
    parser.add_argument("--check", action="store_true",
                        help="instead of timing: the baseline beside exact attribution in the published "
                             "conventions, module by module")
    parser.add_argument("--probe", choices=["exact", "grad"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.probe:
        return _probe(args.models, args.probe, args)
    group = ll.group(args.group)
    if args.check:
        return check(args.models.split(","), args.batch, group, args.probes)
    print(f"machine: {machine()}")
    print(f"batch {args.batch} photos, group {group.name}, baseline {args.probes} probes, "
          f"exact memory budget {'the default' if args.memory_budget is None else f'{args.memory_budget:.2g} B per image'}; "
          "times in s, memory in MiB added")
    header = (f"{'model':24s} {'fwd':>6s} {'baseline':>9s} {'exact':>7s} {'shares':>7s} {'base/exact':>11s} "
              f"{'base/shares':>12s} {'mem exact':>10s} {'mem grad':>9s} {'mem ratio':>10s} {'defects/fwd':>12s}")
    goals = (f"{'goal':24s} {'':>6s} {'':>9s} {'':>7s} {'':>7s} {'>= 3':>11s} {'>= 30':>12s} {'':>10s} "
             f"{'':>9s} {'<= 3':>10s} {'':>12s}")
    rows = []
    for name in args.models.split(","):
        model, x = _setup(name, args.batch)
        gm = ll.trace(model, x)
        with torch.no_grad():
            gm(x)
            t_fwd = best_time(lambda: gm(x), args.repeat, warmup=False)
            t_defects = best_time(lambda: _Defects(gm, ll.group(group), "central", "receptive_field").propagate(x, None), args.repeat, warmup=False)
        t_shares = best_time(lambda: ll.attribute(gm, x, group, estimator="shares"), args.repeat, warmup=False)
        torch.manual_seed(0)
        start = time.perf_counter()
        base = published_layerwise(model, x, group, args.probes)
        t_base = time.perf_counter() - start
        exact = in_fresh_process(name, "exact", args)
        grad = in_fresh_process(name, "grad", args)
        print(f"  {name}: baseline hooks {len(base)} module calls; exact: {exact['sources']} nodes with a "
              f"defect, {exact['reaching']} reach the output, completeness residual {exact['residual']:.1e}; "
              f"forward-with-grad {grad['seconds']:.2f} s", flush=True)
        rows.append(f"{name:24s} {t_fwd:6.3f} {t_base:9.1f} {exact['seconds']:7.1f} {t_shares:7.2f} "
                    f"{t_base / exact['seconds']:11.2f} {t_base / t_shares:12.1f} {exact['mib']:10.0f} "
                    f"{grad['mib']:9.0f} {exact['mib'] / grad['mib']:10.2f} {t_defects / t_fwd:12.2f}")
    print(header, goals, *rows, sep="\n")


if __name__ == "__main__":
    main()
