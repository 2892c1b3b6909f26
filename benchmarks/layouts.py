"""Unknown layouts per family (docs/method.md §5): tensor nodes whose layout is ``unknown``, over all
tensor-valued nodes, and the first unknown node, for random-init timm models at their
default input size.

Run: ``python benchmarks/layouts.py [--models vit_tiny_patch16_224,levit_128s]``.
"""

from __future__ import annotations

import argparse

import timm
import torch

import layerlie as ll
from layerlie.core.layout import unknown_layouts

FAMILIES = ("vit_tiny_patch16_224", "deit3_small_patch16_224", "eva02_tiny_patch14_224", "cait_xxs24_224",
            "xcit_nano_12_p16_224", "levit_128s", "pit_ti_224", "twins_svt_small", "edgenext_xx_small",
            "hgnetv2_b0", "resnest14d", "nest_tiny", "crossvit_tiny_240", "pvt_v2_b0", "botnet26t_256",
            "visformer_tiny", "coat_lite_tiny")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(FAMILIES))
    args = parser.parse_args()
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        size = timm.data.resolve_data_config({}, model=model)["input_size"][1:]
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
        unknown, total = unknown_layouts(ll.trace(model), x)
        first = unknown[0].format_node() if unknown else None
        print(f"{name:28s} {tuple(size)} unknown {len(unknown):4d}/{total:4d} = {len(unknown) / total:6.1%}  "
              f"first: {first}")


if __name__ == "__main__":
    main()
