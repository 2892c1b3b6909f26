"""Every classification model of torchvision, traced and attributed (docs/method.md §3-5).

For each model of ``torchvision.models.list_models(module=torchvision.models)`` (random init,
seed 0, eval mode), one embedded photo prepared by the model's own torchvision preset (resize,
centre crop, normalize) at the size its default weights expect, and one group:
- the time of ``ll.trace`` and the number of tensor-valued nodes;
- the nodes whose layout is ``unknown`` (``ll.unknown_layouts``), count and share (goal <= 5%);
- the check of ``ll.attribute`` (goal <= 1e-4 in float32) and the estimator that gave it:
  ``exact`` (the completeness residual) where the model is small enough to run it in reasonable
  time on a CPU (``--exact-gflops``), else ``shares`` (the share-sum residual), and its time;
- the forward GFLOPs and the peak resident memory of the model's process;
- ``|L F|``, the norm of the end-to-end Lie derivative the check is relative to: at random init,
  in eval mode with unit batch-norm statistics, the activations of some models (the EfficientNets,
  MobileNetV3s, GoogLeNet, Inception, ResNet-101/152, Wide ResNet-101) shrink to logits of about
  1e-14, ``L F`` is about 0 and the check is absolute (``Attribution.degenerate``), so the table
  calls it ``degenerate`` and gives beside it the check of the model with batch-norm statistics
  fitted to the photo (:func:`with_batch_statistics`);
- the one-line error of a model that fails.

Each model runs in a process of its own (``--probe NAME``), so that one that fails or runs out
of memory is a row of the table, not the end of the run. Models in :data:`SMALLER` are measured
at a smaller input than their default (the table says so). torchvision's ViT heads start at zero, so
they get random weights (std 0.02) here, else the output is a constant.

Run: ``python benchmarks/zoo.py [--models 'resnet*,maxvit_t'] [--size 128] [--group rotate]
[--estimator exact|shares] [--exact-gflops 40] [--timeout 1800]``.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import resource
import subprocess
import sys
import time
import warnings

import torch
import torchvision
from PIL import Image
from torchvision.transforms._presets import ImageClassification

import layerlie as ll
from layerlie.model.data import photo_paths

SMALLER = {"regnet_y_128gf": 224, "vit_h_14": 224}
"""Models measured at a smaller input than their default weights' (memory: regnet_y_128gf takes
8 GB at 224 px, more than twice that at its default 384; vit_h_14's default is 518): the table
shows the size used and ``(default N)``."""

OPTIONS = {"googlenet": {"aux_logits": False, "init_weights": True},
           "inception_v3": {"aux_logits": False, "init_weights": True}}
"""Constructor options: the auxiliary heads are training-time outputs."""


def default_size(name: str) -> int:
    """The crop size of the model's default torchvision weights (224 where there are none)."""
    try:
        return int(torchvision.models.get_model_weights(name).DEFAULT.transforms().crop_size[0])
    except (ValueError, AttributeError):
        return 224


def build(name: str, size: int) -> torch.nn.Module:
    """The random-init model (seed 0) in eval mode; MaxViT is built for ``size``."""
    torch.manual_seed(0)
    kwargs = dict(OPTIONS.get(name, {}))
    if name.startswith("maxvit"):
        kwargs["input_size"] = (size, size)
    if name.startswith("vit_"):
        kwargs["image_size"] = size
    model = torchvision.models.get_model(name, **kwargs).eval()
    if name.startswith("vit_"):  # torchvision zero-initializes the ViT head: a constant output otherwise
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    return model


def photo(size: int) -> torch.Tensor:
    """The first embedded photo through torchvision's classification preset at ``size``."""
    with Image.open(photo_paths()[0]) as img:
        return ImageClassification(crop_size=size, resize_size=size)(img.convert("RGB"))[None]


def with_batch_statistics(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """A copy whose batch norms hold the statistics of ``x`` (one pass in training mode, no
    gradient), in eval mode: at random init the unit running statistics let the activations of
    deep nets shrink stage by stage, down to logits of about 1e-14 (EfficientNet)."""
    fitted = copy.deepcopy(model)
    for m in fitted.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # the cumulative average: exactly the statistics of x
    with torch.no_grad():
        fitted.train()(x)
    return fitted.eval()


def gflops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Forward GFLOPs (torch's counter), the cost model for the choice of estimator."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9


def probe(name: str, size: int, group: str, estimator: str | None, exact_gflops: float) -> dict:
    """Measure one model; the row of the table as a dict."""
    row: dict = {"model": name, "size": size}
    try:
        model = build(name, size)
        x = photo(size)
        row["gflops"] = gflops(model, x)
        start = time.perf_counter()
        gm = ll.trace(model)
        row["trace_s"] = time.perf_counter() - start
        unknown, total = ll.unknown_layouts(gm, x)
        row.update(nodes=total, unknown=len(unknown), first_unknown=unknown[0].name if unknown else "")
        row["estimator"] = estimator or ("exact" if row["gflops"] <= exact_gflops else "shares")
        start = time.perf_counter()
        a = ll.attribute(gm, x, group, estimator=row["estimator"])
        row.update(attribute_s=time.perf_counter() - start, check=float(a.residual), total=float(a.total.norm()))
        if a.degenerate:
            fitted = ll.attribute(with_batch_statistics(model, x), x, group, estimator=row["estimator"])
            row.update(fitted_check=float(fitted.residual), fitted_total=float(fitted.total.norm()))
        row["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    except Exception as err:  # any failure is the model's row: its type and first line
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
    return row


def selected(patterns: str | None) -> list[str]:
    """The classification models the patterns select (every one without patterns)."""
    names = torchvision.models.list_models(module=torchvision.models)
    return [n for n in names if not patterns or any(fnmatch.fnmatch(n, p) for p in patterns.split(","))]


def line(row: dict) -> str:
    """One row of the table."""
    default = default_size(row["model"])
    size = f"{row['size']}" + (f" (default {default})" if row["size"] != default else "")
    head = f"{row['model']:20s} {size:18s}"
    if "error" in row and "nodes" not in row:
        return f"{head} {row['error']}"
    share = row["unknown"] / max(row["nodes"], 1)
    layout = f"{row['trace_s']:6.1f} {row['nodes']:5d} {row['unknown']:4d} {share:6.1%}"
    if "error" in row:
        return f"{head} {layout}  {row['error']}"
    note = f"  degenerate; with the photo's BN statistics: check {row['fitted_check']:.1e}, " \
        f"|L F| {row['fitted_total']:.1e}" if "fitted_check" in row else ""
    return (f"{head} {layout} {row['check']:9.1e} {row['estimator']:6s} {row['gflops']:6.1f} {row['attribute_s']:7.1f} "
            f"{row['peak_gb']:5.1f} {row['total']:8.1e}{note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated names or patterns (fnmatch); default: all")
    parser.add_argument("--size", type=int, help="input size for every model (default: each model's own)")
    parser.add_argument("--group", default="rotate")
    parser.add_argument("--estimator", choices=("exact", "shares"), help="default: by --exact-gflops")
    parser.add_argument("--exact-gflops", type=float, default=40.0,
                        help="exact attribution up to this many forward GFLOPs, shares above")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per model")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        warnings.simplefilter("ignore")
        print(json.dumps(probe(args.probe, args.size, args.group, args.estimator, args.exact_gflops)))
        return
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, group {args.group}, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'model':20s} {'input':18s} {'trace':>6s} {'nodes':>5s} {'unkn':>4s} {'unkn%':>6s} "
          f"{'check':>9s} {'estim.':6s} {'GFLOP':>6s} {'attr s':>7s} {'GB':>5s} {'|L F|':>8s}")
    for name in selected(args.models):
        size = args.size or SMALLER.get(name) or default_size(name)
        command = [sys.executable, __file__, "--probe", name, "--size", str(size), "--group", args.group,
                   "--exact-gflops", str(args.exact_gflops)] + (["--estimator", args.estimator] if args.estimator else [])
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
            out = done.stdout.strip().splitlines()
            row = json.loads(out[-1]) if done.returncode == 0 and out else \
                {"model": name, "size": size, "error": f"process ended with code {done.returncode}"
                                                         + (" (out of memory?)" if done.returncode < 0 else "")}
        except subprocess.TimeoutExpired:
            row = {"model": name, "size": size, "error": f"over the {args.timeout:.0f} s timeout"}
        print(line(row), flush=True)


if __name__ == "__main__":
    main()
