"""How the cost of ``lee`` scales: cost / forward against the batch size and the number of groups.

For each model (random init, seed 0, embedded photos repeated to the batch and resized to
``--res``), in one run on this machine:
- against the batch (``--batches``): ``lee`` with one group and with all ten, each / one
  no-grad forward at the same batch;
- against the number of groups ``k`` (1 to 10, the first ``k`` of ``list_groups()``) at
  ``--groups-batch`` images: ``lee`` / a forward. The floor is one primal and ``k`` tangent
  passes, ``1 + k`` forwards.

Times are the best of two calls of ``lee`` (more while they total under half a second) and
of three forwards (more while under a second), after one untimed call. The table is saved as
``scaling.csv`` beside the figure, ``scaling.png`` (two panels); ``--plot scaling.csv``
redraws the figure from it.

Run: ``python benchmarks/scaling.py [--res 112] [--batches 1,2,4,8,16,32,64] [--groups-batch 8]
[--models ...] [--out benchmarks/scaling.png] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import platform
import warnings
from pathlib import Path

import pandas as pd
import torch
from matplotlib.figure import Figure

import layerlie as ll

from bench import best_time, markdown, setup


def measure(name: str, args: argparse.Namespace) -> list[dict]:
    """The rows of one model: one per batch size, then one per number of groups."""
    groups = ll.list_groups()
    rows = []

    def timed(x: torch.Tensor, k: int, model: torch.nn.Module) -> float:
        return best_time(lambda: ll.lee(model, x, groups[:k]), args.device, min_seconds=0.5)

    for batch in args.batches:
        model, x = setup(name, batch, args.res, args.device)
        with torch.no_grad():
            t_fwd = best_time(lambda: model(x), args.device, 3, min_seconds=1.0)
        for k in (1, len(groups)):
            rows.append(dict(model=name, sweep="batch", batch=batch, groups=k, forward_s=t_fwd,
                             lee_s=timed(x, k, model)))
        print(f"  {name} batch {batch}: forward {t_fwd:.3f} s, lee 1 group {rows[-2]['lee_s'] / t_fwd:.2f}, "
              f"10 groups {rows[-1]['lee_s'] / t_fwd:.2f} forwards", flush=True)
    model, x = setup(name, args.groups_batch, args.res, args.device)
    with torch.no_grad():
        t_fwd = best_time(lambda: model(x), args.device, 3, min_seconds=1.0)
    for k in range(1, len(groups) + 1):
        rows.append(dict(model=name, sweep="groups", batch=args.groups_batch, groups=k, forward_s=t_fwd,
                         lee_s=timed(x, k, model)))
    print(f"  {name} groups at batch {args.groups_batch}: "
          + ", ".join(f"{r['lee_s'] / t_fwd:.1f}" for r in rows[-len(groups):]), flush=True)
    return rows


def plot(table: pd.DataFrame) -> Figure:
    """Cost / forward against the batch (left) and the number of groups (right), a line per
    model, from the table that :func:`measure` fills."""
    table = table.assign(ratio=table["lee_s"] / table["forward_s"])
    fig = Figure(figsize=(10, 4))  # no pyplot: nothing is shown, the figure is only saved
    ax_b, ax_g = fig.subplots(1, 2)
    for i, (name, rows) in enumerate(table.groupby("model", sort=False)):
        color = f"C{i}"
        by_batch = rows[rows["sweep"] == "batch"]
        for k, style in ((by_batch["groups"].max(), "-"), (1, "--")):
            line = by_batch[by_batch["groups"] == k]
            label = f"{name}, {k} group{'s' if k > 1 else ''}"
            ax_b.plot(line["batch"], line["ratio"], style, marker="o", color=color, label=label)
        by_groups = rows[rows["sweep"] == "groups"]
        ax_g.plot(by_groups["groups"], by_groups["ratio"], marker="o", color=color, label=name)
    ks = sorted(table.loc[table["sweep"] == "groups", "groups"].unique())
    ax_g.plot(ks, [1 + k for k in ks], ":", color="gray", label="1 + k forwards")
    ax_b.set(xscale="log", xlabel="batch size", ylabel="lee time / forward time", title="against the batch")
    ax_b.set_xticks(sorted(table["batch"].unique()), [str(b) for b in sorted(table["batch"].unique())])
    batch = int(table.loc[table["sweep"] == "groups", "batch"].iloc[0])
    ax_g.set(xlabel="number of groups k", ylabel="lee time / forward time",
             title=f"against the number of groups (batch {batch})")
    ax_b.legend(fontsize=7)
    ax_g.legend(fontsize=7)
    fig.tight_layout()
    return fig


def tables(table: pd.DataFrame) -> str:
    """The two sweeps as markdown tables."""
    table = table.assign(ratio=table["lee_s"] / table["forward_s"])
    batch = table[table["sweep"] == "batch"]
    ten = batch["groups"].max()
    rows = []
    for (name, b), r in batch.groupby(["model", "batch"], sort=False):
        rows.append([name, b, f"{r['forward_s'].iloc[0] * 1e3:.1f}", f"{r.loc[r['groups'] == 1, 'ratio'].iloc[0]:.2f}",
                     f"{r.loc[r['groups'] == ten, 'ratio'].iloc[0]:.2f}"])
    first = markdown(["model", "batch", "forward (ms)", "lee 1 group / fwd", f"lee {ten} groups / fwd"], rows, 1)
    by_groups = table[table["sweep"] == "groups"]
    ks = sorted(by_groups["groups"].unique())
    rows = [[name, *[f"{r.loc[r['groups'] == k, 'ratio'].iloc[0]:.2f}" for k in ks]]
            for name, r in by_groups.groupby("model", sort=False)]
    rows.append(["1 + k", *[str(1 + k) for k in ks]])
    second = markdown(["model / k groups", *[str(k) for k in ks]], rows)
    return f"{first}\n\n{second}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,vit_tiny_patch16_224,convnext_atto")
    parser.add_argument("--res", type=int, default=112, help="input size (each model built or resized to it)")
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--groups-batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).with_name("scaling.png")))
    parser.add_argument("--plot", help="redraw the figure from this CSV instead of measuring")
    args = parser.parse_args()
    out = Path(args.out)
    if args.plot:
        table = pd.read_csv(args.plot)
    else:
        warnings.simplefilter("ignore")
        args.batches = [int(b) for b in args.batches.split(",")]
        print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.device}; "
              f"input {args.res} px", flush=True)
        table = pd.DataFrame([row for name in args.models.split(",") for row in measure(name, args)])
        table.to_csv(out.with_suffix(".csv"), index=False)
    plot(table).savefig(out, dpi=120)
    print(tables(table))
    print(f"figure: {out}")


if __name__ == "__main__":
    main()
