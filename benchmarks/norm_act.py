"""What splitting timm's norm+activation leaves shows, before and after (docs/method.md §3, 6).

For each model (``timm.create_model``, random init, seed 0, one random image), with the leaves
kept whole ("before") and split by :mod:`layerlie.model.normact` ("after"):

- the nodes the alias measure lists as nonlinearities (``aliasing``, ``alias_kind``), at
  64 x 64 and at 128 x 128 (maps under 4 x 4 are not measured);
- the activations ``antialias(activations="filtered")`` replaces, at 64 x 64;
- the attribution table's nonlinearity rows, the share of ``|c_v|`` summed over norm and over
  nonlinearity rows, and the completeness residual (exact, translate_x, 64 x 64, the model
  through ``ll.load_model``: in-place activations made out-of-place).

Run: ``python benchmarks/norm_act.py [--models efficientnet_b0,mobilenetv3_small_100]``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator

import timm
import torch

import layerlie as ll

MODELS = "efficientnet_b0,mobilenetv3_small_100,mobilenetv2_100,regnetx_002"


@contextlib.contextmanager
def whole_leaves() -> Iterator[None]:
    """Tracing as before the split: the norm+activation leaves stay one node each."""
    module = sys.modules["layerlie.model.trace"]
    split = module.split_norm_acts
    module.split_norm_acts = lambda root, graph: []
    try:
        yield
    finally:
        module.split_norm_acts = split


def measure(name: str) -> dict[str, object]:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    x64, x128 = (torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0)) for s in (64, 128))
    row: dict[str, object] = {}
    for size, x in (("64", x64), ("128", x128)):
        table = ll.aliasing(model, x)
        row[f"alias nonlinearity rows {size}px"] = int((table["alias_kind"] == "nonlinearity").sum())
    try:
        new = ll.antialias(model, blurpool=False, activations="filtered", x=x64)
        row["filtered replaced"] = len(new.meta["layerlie.surgery"])
    except ll.LayerlieError:  # NothingToReplace
        row["filtered replaced"] = 0
    a = ll.attribute(ll.load_model(model), x64, "translate_x")
    by_type = a.by_type()["contribution_norm"]
    total = by_type.sum()
    row["table nonlinearity rows"] = int((a.nodes["layer_type"] == "nonlinearity").sum())
    row["|c| norm"] = f"{by_type.get('norm', 0.0) / total:.3f}"
    row["|c| nonlinearity"] = f"{by_type.get('nonlinearity', 0.0) / total:.3f}"
    row["residual"] = f"{a.residual:.1e}"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=MODELS)
    args = parser.parse_args()
    for name in args.models.split(","):
        with whole_leaves():
            before = measure(name)
        after = measure(name)
        print(f"\n{name}")
        print("| measure | before | after |\n| --- | ---: | ---: |")
        for key in after:
            print(f"| {key} | {before[key]} | {after[key]} |")


if __name__ == "__main__":
    main()
