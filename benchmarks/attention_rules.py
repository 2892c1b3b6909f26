"""Exact attribution with and without the registry's rules for matmul, layer norm, add/sub and
mul (without them those ops take ``torch.func.jvp`` under ``vmap``), in one process, as seconds
and as forwards. Run with one thread::

    OMP_NUM_THREADS=1 python benchmarks/attention_rules.py --model vit_tiny_patch16_224 --batch 1
"""

from __future__ import annotations

import argparse
import dataclasses
import operator
import time

import torch
import torch.nn.functional as F
from torch import nn

import layerlie as ll
from layerlie.core import ops

KEYS = (operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", nn.LayerNorm, F.layer_norm, torch.layer_norm,
        operator.add, torch.add, "add", operator.iadd, operator.sub, torch.sub, "sub", operator.mul, torch.mul, "mul")


def rules(on: bool, saved: dict) -> None:
    """The rules of ``KEYS`` registered (``on``) or removed, in this process only."""
    for key in KEYS:
        ops._OPS[key] = saved[key] if on else dataclasses.replace(saved[key], linearize=None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ll.load_model(args.model)
    gm = ll.trace(model)
    x = torch.randn(args.batch, 3, args.size, args.size)
    with torch.no_grad():
        gm(x)
        start = time.perf_counter()
        for _ in range(5):
            gm(x)
        forward = (time.perf_counter() - start) / 5
    saved = {key: ops._OPS[key] for key in KEYS}
    times: dict[bool, list[float]] = {False: [], True: []}
    result = {}
    for _ in range(args.repeats):
        for on in (False, True):
            rules(on, saved)
            start = time.perf_counter()
            a = ll.attribute(gm, x, "translate_x", estimator="exact")
            times[on].append(time.perf_counter() - start)
            result[on] = a
    rules(True, saved)
    print(f"{args.model}, batch {args.batch} at {args.size}, {torch.get_num_threads()} thread(s), "
          f"forward {forward:.3f} s")
    for on in (False, True):
        best = min(times[on])
        print(f"rules {'on ' if on else 'off'}: exact {best:.2f} s = {best / forward:.1f} forwards "
              f"(runs {', '.join(f'{t:.2f}' for t in times[on])}), residual {result[on].residual:.2e}")
    c = {on: torch.tensor(result[on].nodes["contribution_norm"].to_numpy()) for on in (False, True)}
    print(f"contribution norms, on vs off: max relative difference "
          f"{float(((c[True] - c[False]).abs() / c[False].abs().clamp_min(1e-30)).max()):.1e}")


if __name__ == "__main__":
    main()
