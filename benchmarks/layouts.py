"""Unknown layouts per family (METHOD 5): tensor nodes whose layout is ``unknown``, over all
tensor-valued nodes, and the first unknown node, for random-init timm models.

Run: ``python benchmarks/layouts.py [--models vit_tiny_patch16_224,levit_128s] [--small]``.
``--small`` builds each family at the reduced size the tests use (64 px, fewer blocks).
"""

from __future__ import annotations

import argparse

import timm
import torch

import layerlie as ll
from layerlie.layout import LayoutProp

FAMILIES = ("vit_tiny_patch16_224", "deit3_small_patch16_224", "eva02_tiny_patch14_224", "cait_xxs24_224",
            "xcit_nano_12_p16_224", "levit_128s", "pit_ti_224", "twins_svt_small", "edgenext_xx_small")
# create-time kwargs of each family's test size: 64 px where the family accepts img_size, fewer blocks
SMALL: dict[str, dict[str, object]] = {
    "vit_tiny_patch16_224": {"img_size": 64, "depth": 2},
    "deit3_small_patch16_224": {"img_size": 64, "depth": 2},
    "eva02_tiny_patch14_224": {"img_size": 56, "depth": 2},
    "cait_xxs24_224": {"img_size": 64, "depth": 2, "depth_token_only": 1},
    "xcit_nano_12_p16_224": {"img_size": 64, "depth": 2, "cls_attn_layers": 1},
    "levit_128s": {"img_size": 64},
    "pit_ti_224": {"img_size": 64},
    "twins_svt_small": {"img_size": 64, "depths": (1, 1, 1, 1)},
    "edgenext_xx_small": {"depths": (1, 1, 1, 1)},
}


def unknown_share(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int, str | None]:
    """``(unknown tensor nodes, tensor nodes, first unknown node)`` of ``model`` on ``x``."""
    gm = ll.trace(model)
    prop = LayoutProp(gm)
    prop.propagate(x, None)
    tensors = [n for n in gm.graph.nodes if isinstance(prop.values.get(n), torch.Tensor)]
    unknown = [n for n in tensors if prop.layouts[n.name].kind == "unknown"]
    return len(unknown), len(tensors), (unknown[0].format_node() if unknown else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(FAMILIES))
    parser.add_argument("--small", action="store_true")
    args = parser.parse_args()
    for name in args.models.split(","):
        torch.manual_seed(0)
        kwargs = SMALL.get(name, {}) if args.small else {}
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        size = timm.data.resolve_data_config({}, model=model)["input_size"][1:]
        if "img_size" in kwargs:  # the data config keeps the pretrained size
            size = (kwargs["img_size"],) * 2
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0))
        try:
            unknown, total, first = unknown_share(model, x)
        except Exception as err:  # report the failure and go on with the next family
            print(f"{name:28s} failed: {type(err).__name__}: {str(err)[:150]}")
            continue
        print(f"{name:28s} {tuple(size)} unknown {unknown:4d}/{total:4d} = {unknown / total:6.1%}  first: {first}")


if __name__ == "__main__":
    main()
