"""Anti-aliased variants: forward cost and end-to-end LEE reduction, measured in one run.

For each model (random init, batch of embedded photos) and each registered variant
(``ll.list_variants()``):
- the variant's no-grad forward time / the original traced model's;
- the mean LEE of the original / the variant's, per group (the reduction factor).

Run: ``python benchmarks/ablation.py [--batch 4] [--models resnet18,...] [--groups translate_x,rotate]``.
"""

from __future__ import annotations

import argparse
import platform
import warnings

import torch

import layerlie as ll
from layerlie.model.trace import with_output

from e2e import best_time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="resnet18,resnet50,vit_tiny_patch16_224,convnext_atto")
    parser.add_argument("--variants", default=",".join(ll.list_variants()))
    parser.add_argument("--groups", default="translate_x,rotate")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    groups = args.groups.split(",")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; batch {args.batch} at the model's input size")
    print(f"{'model':22s} {'variant':9s} {'replaced':>8s} {'fwd/orig':>9s} "
          + " ".join(f"{'LEE ' + g:>14s} {'reduction':>9s}" for g in groups))
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = ll.load_model(name)
        x = ll.photos(model, n=args.batch)
        original = ll.trace(model, x)
        variants = {"original": original}
        for v in args.variants.split(","):
            try:
                variants[v] = ll.antialias(original, **ll.get_variant(v), x=x)
            except ll.LayerlieError as err:
                print(f"{name:22s} {v:9s} skipped: {err}")
        logits = {v: with_output(gm, "logits")[0] for v, gm in variants.items()}
        with torch.no_grad():
            t_orig = best_time(lambda: logits["original"](x))
        base = None
        for v, gm in logits.items():
            with torch.no_grad():
                t = best_time(lambda: gm(x))
            lee = ll.summarize(ll.lee(gm, x, groups))["mean"]
            base = lee if base is None else base
            replaced = len(variants[v].meta.get("layerlie.surgery", {}))
            print(f"{name:22s} {v:9s} {replaced:8d} {t / t_orig:9.2f} "
                  + " ".join(f"{lee[g]:14.3e} {base[g] / lee[g]:9.2f}" for g in groups), flush=True)


if __name__ == "__main__":
    main()
