"""The learned-equivariance experiment's figures and summary, from its store alone (STYLE 11).

:func:`render` writes ``lee_vs_step``, ``shares_by_type`` and ``lee_vs_accuracy`` (PNG) and
``SUMMARY.md``: the numbers of every run and whether each of the paper's claims holds here.

Example:
    >>> from layerlie.experiments import learned_report
    >>> learned_report.render("out/learned", "figures/learned")  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from layerlie.results import store as st
from layerlie.errors import LayerlieError
from layerlie.views.figures import PALETTE, spearman

_STYLE = {"font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "legend.fontsize": 6,
          "xtick.labelsize": 6, "ytick.labelsize": 6, "savefig.dpi": 150}
_MARKERS = ("o", "s", "^", "D", "v", "P")


class Tables(NamedTuple):
    """The experiment's store tables."""

    monitor: pd.DataFrame
    e2e: pd.DataFrame
    layers: pd.DataFrame
    metrics: pd.DataFrame

    @classmethod
    def load(cls, store: str | Path) -> Tables:
        tables = cls(*(st.load(store, t) for t in cls._fields))
        empty = [name for name, t in zip(cls._fields, tables) if t.empty]
        if empty:
            raise LayerlieError(f"the store {str(store)!r} holds no {empty[0]} table; run "
                                "`layerlie experiment learned-equivariance --store STORE` first")
        return tables


OUTPUTS = {"softmax": "published LEE of the softmax", "logits_relative": "relative LEE of the centred logits"}
"""The e2e table's outputs: the published measure, and the scale-free one that compares a
trained model with its initialisation (:func:`layerlie.experiments.learned.relative_lee`)."""


def per_run(t: Tables, scheme: str = "central", output: str = "softmax") -> pd.DataFrame:
    """One row per run: accuracy and the mean LEE per group (over the probe images), at
    initialisation and at the end, with the groups' mean as ``lee``."""
    keys = ["dataset", "model", "condition"]
    e2e = t.e2e[(t.e2e["scheme"] == scheme) & (t.e2e["output"] == output)]
    lee = e2e.groupby([*keys, "phase", "group"], sort=False)["lee"].mean().unstack("group")
    lee["lee"] = lee.mean(axis=1)
    acc = t.metrics[t.metrics["metric"] == "accuracy"].groupby([*keys, "phase"], sort=False)["value"].first()
    wide = lee.join(acc.rename("accuracy")).unstack("phase")
    wide.columns = [f"{col}_{phase}" for col, phase in wide.columns]
    return wide.reset_index()


def _ordered(frame: pd.DataFrame, column: str) -> list[str]:
    return list(dict.fromkeys(frame[column]))


def lee_vs_step(t: Tables, scheme: str = "central") -> Figure:
    """The monitor's mean LEE against the training step: a row per (dataset, group), a column
    per model, a line per condition."""
    mon = t.monitor[t.monitor["scheme"] == scheme]
    datasets, groups, models = _ordered(mon, "dataset"), _ordered(mon, "group"), _ordered(mon, "model")
    rows = [(d, g) for d in datasets for g in groups]
    with mpl.rc_context(_STYLE):
        fig = Figure(figsize=(2.3 * len(models), 1.5 * len(rows) + 0.6), layout="constrained")
        axes = np.atleast_2d(fig.subplots(len(rows), len(models), squeeze=False, sharex=True))
        for i, (d, g) in enumerate(rows):
            for j, m in enumerate(models):
                ax = axes[i, j]
                part = mon[(mon["dataset"] == d) & (mon["group"] == g) & (mon["model"] == m)]
                for c, line in part.groupby("condition", sort=False):
                    ax.plot(line["step"], line["lee"], marker=".", label=c)
                ax.set_yscale("log")
                ax.set_title(f"{d} · {m}", loc="left")
                if j == 0:
                    ax.set_ylabel(f"LEE, {g}")
                if i == len(rows) - 1:
                    ax.set_xlabel("training step")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
        fig.suptitle(f"end-to-end LEE along training ({scheme} scheme, mean over the probe images)")
    return fig


def shares_by_type(t: Tables) -> Figure:
    """Signed shares of ``L logits`` by layer type at initialisation and at the end, one
    heatmap per (dataset, group); rows are runs."""
    lay = t.layers
    datasets, groups = _ordered(lay, "dataset"), _ordered(lay, "group")
    types = [k for k in PALETTE if k in set(lay["layer_type"])]
    with mpl.rc_context(_STYLE):
        n_rows = lay.groupby(["model", "condition", "phase"]).ngroups
        fig = Figure(figsize=(4.2 * len(groups), (0.17 * n_rows + 1.2) * len(datasets) + 0.4), layout="constrained")
        axes = fig.subplots(len(datasets), len(groups), squeeze=False)
        for ax, (d, g) in zip(axes.flat, itertools.product(datasets, groups)):
            part = lay[(lay["dataset"] == d) & (lay["group"] == g)]
            grid = part.pivot_table(index=["model", "condition", "phase"], columns="layer_type", values="share",
                                    aggfunc="sum", sort=False).reindex(columns=types).fillna(0.0)
            image = ax.imshow(grid.to_numpy(), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
            for (r, c), v in np.ndenumerate(grid.to_numpy()):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=5)
            ax.set_xticks(range(len(types)), [k.replace("/", "/\n") for k in types], rotation=90)
            ax.set_yticks(range(len(grid)), [" · ".join(idx) for idx in grid.index])
            ax.set_title(f"{d}, {g}", loc="left")
        fig.colorbar(image, ax=list(axes.flat), shrink=0.6, label="share of L logits")
        fig.suptitle("layer-type shares before (init) and after (end) training")
    return fig


def lee_vs_accuracy(t: Tables, scheme: str = "central") -> Figure:
    """End-of-training LEE (mean over groups and probe images) against held-out accuracy, one
    point per run; a row per output (:data:`OUTPUTS`), a column per dataset, with Spearman's
    rho over the panel's runs."""
    outputs = [o for o in OUTPUTS if o in set(t.e2e["output"])]
    first = per_run(t, scheme, outputs[0])
    datasets, models = _ordered(first, "dataset"), _ordered(first, "model")
    conditions = _ordered(first, "condition")
    colours = dict(zip(conditions, mpl.colormaps["tab10"].colors))
    with mpl.rc_context(_STYLE):
        fig = Figure(figsize=(3.6 * len(datasets), 2.5 * len(outputs) + 0.5), layout="constrained")
        axes = fig.subplots(len(outputs), len(datasets), squeeze=False)
        for (i, output), (j, d) in itertools.product(enumerate(outputs), enumerate(datasets)):
            ax, runs = axes[i, j], per_run(t, scheme, output)
            part = runs[runs["dataset"] == d]
            for _, r in part.iterrows():
                ax.scatter(r["lee_end"], 100 * r["accuracy_end"], color=colours[r["condition"]],
                           marker=_MARKERS[models.index(r["model"]) % len(_MARKERS)])
            rho, p = spearman(part["lee_end"], part["accuracy_end"])
            ax.set(xscale="log", xlabel=f"{output} LEE after training ({scheme}, mean over groups)",
                   ylabel="held-out accuracy (%)", title=f"{d}: Spearman rho {rho:.2f} (p {p:.2g}, n={len(part)})")
        handles = [mpl.lines.Line2D([], [], color="0.3", marker=_MARKERS[i % len(_MARKERS)], ls="", label=m)
                   for i, m in enumerate(models)]
        handles += [mpl.lines.Line2D([], [], color=colours[c], marker="o", ls="", label=c) for c in conditions]
        fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
    return fig


class Claim(NamedTuple):
    """One of the paper's claims, tested on the runs: how many comparisons agree."""

    name: str
    agree: int
    total: int
    detail: str

    @property
    def verdict(self) -> str:
        if self.total == 0:
            return "not tested (the grid lacks the runs it compares)"
        if self.agree == self.total:
            return "holds"
        return "holds mostly" if self.agree > self.total / 2 else "does not hold"


def claims(t: Tables, scheme: str = "central", output: str = "softmax") -> list[Claim]:
    """The four claims: trained below init, augmentation lowers the LEE, anti-aliasing lowers
    it, and the LEE tracks accuracy across runs (Spearman, negative)."""
    runs = per_run(t, scheme, output).set_index(["dataset", "model", "condition"])
    groups = [c.removesuffix("_end") for c in runs if c.endswith("_end") and c not in ("lee_end", "accuracy_end")]
    out = []
    lower = runs["lee_end"] < runs["lee_init"]
    per_group = ", ".join(f"{g} {int((runs[f'{g}_end'] < runs[f'{g}_init']).sum())}/{len(runs)}" for g in groups)
    out.append(Claim("trained models are more equivariant than at initialisation", int(lower.sum()), len(runs),
                     f"runs whose mean LEE fell; per group: {per_group}"))

    pairs = []
    for aug, measured in (("translate", [g for g in groups if g.startswith("translate")]),
                          ("translate_rotate", groups)):
        for (d, m, c), r in runs.iterrows():
            if c == aug and (d, m, "none") in runs.index:
                base = runs.loc[(d, m, "none")]
                pairs += [(f"{d}/{m} {aug} {g}", r[f"{g}_end"] < base[f"{g}_end"]) for g in measured]
    missed = [name for name, ok in pairs if not ok]
    out.append(Claim("augmentation lowers the LEE", sum(ok for _, ok in pairs), len(pairs),
                     "comparisons against no augmentation, per group" +
                     (f"; not lower: {', '.join(missed)}" if missed else "")))

    pairs = []
    for (d, m, c), r in runs.iterrows():
        plain = (d, m.removesuffix("_blurpool"), c)
        if m.endswith("_blurpool") and plain in runs.index:
            pairs.append((f"{d}/{c}", r["lee_end"] < runs.loc[plain, "lee_end"]))
    missed = [name for name, ok in pairs if not ok]
    out.append(Claim("anti-aliasing lowers the LEE", sum(ok for _, ok in pairs), len(pairs),
                     "BlurPool against the same CNN after training, mean over groups" +
                     (f"; not lower: {', '.join(missed)}" if missed else "")))

    agree, total, parts = 0, 0, []
    for d, part in runs.groupby(level="dataset", sort=False):
        rho, p = spearman(part["lee_end"], part["accuracy_end"])
        if np.isfinite(rho):
            total += 1
            agree += rho < 0
        parts.append(f"{d}: rho {rho:.2f} (p {p:.2g}, {len(part)} runs)")
    out.append(Claim("the LEE tracks accuracy across models (lower LEE, higher accuracy)", agree, total,
                     "Spearman's rho of end LEE against held-out accuracy, per data set: " + "; ".join(parts)))
    return out


def after_warmup(t: Tables, scheme: str = "central") -> tuple[int, int, int]:
    """The monitor's first step after initialisation, and in how many of how many runs the mean
    LEE over groups is lower at the last step than there."""
    mon = t.monitor[t.monitor["scheme"] == scheme]
    steps = sorted(mon["step"].unique())
    if len(steps) < 3:
        return (steps[-1] if steps else 0), 0, 0
    mean = mon.groupby(["run", "step"])["lee"].mean().unstack("step")
    lower = mean[steps[-1]] < mean[steps[1]]
    return int(steps[1]), int(lower.sum()), len(lower)


def _fmt(v: Any) -> str:
    return "" if pd.isna(v) else (f"{v:.3g}" if isinstance(v, float) else str(v))


def summary(t: Tables, spec: dict[str, Any] | None = None) -> str:
    """``SUMMARY.md``: the setup, a table of every run, the finite metrics, the shares before
    and after, and the claims under each output."""
    config = (spec or {}).get("config", {})
    groups = config.get("groups", [])
    soft, spectral = per_run(t, "central", "softmax"), per_run(t, "spectral", "softmax")
    relative = per_run(t, "central", "logits_relative")
    lines = ["# Learned equivariance, measured on this CPU", "",
             f"Random-init timm models trained for {config.get('steps', '?')} steps (batch "
             f"{config.get('batch_size', '?')}, seed {config.get('seed', '?')}) on data bundled with scikit-learn "
             "and scikit-image; a small task at small scale, not ImageNet. LEE: the published end-to-end LEE "
             "(mean over classes of |L softmax|), and the relative LEE of the logits centred over the classes, "
             f"||L z|| / ||z||, which does not grow when training only scales the logits up. Each is the mean over "
             f"{config.get('probe', '?')} held-out probe images and over the groups ({', '.join(groups)}).", "",
             "## Runs", "",
             "| data | model | condition | accuracy init → end | LEE init → end | LEE spectral init → end | "
             "relative LEE init → end | " + " | ".join(f"LEE {g} end" for g in groups) + " |",
             "|" + "---|" * (7 + len(groups))]
    for (_, c), (_, s), (_, r) in zip(soft.iterrows(), spectral.iterrows(), relative.iterrows()):
        cells = " | ".join(_fmt(c.get(f"{g}_end")) for g in groups)
        lines.append(f"| {c['dataset']} | {c['model']} | {c['condition']} | {c['accuracy_init']:.2f} → "
                     f"{c['accuracy_end']:.2f} | {c['lee_init']:.3g} → {c['lee_end']:.3g} | "
                     f"{s['lee_init']:.3g} → {s['lee_end']:.3g} | {r['lee_init']:.3g} → {r['lee_end']:.3g} | "
                     f"{cells} |")
    lines += ["", "## Finite metrics", "",
              "| data | model | condition | consistency init → end | EQ-T dB init → end |", "|---|---|---|---|---|"]
    fin = t.metrics[t.metrics["metric"].isin(["consistency", "eq_t"])]
    fin = fin.groupby(["dataset", "model", "condition", "metric", "phase"], sort=False)["value"].mean()
    for (d, m, c), part in fin.groupby(level=[0, 1, 2], sort=False):
        part = part.droplevel([0, 1, 2])
        cells = [f"{part[(k, 'init')]:.3g} → {part[(k, 'end')]:.3g}" if (k, "end") in part.index
                 else "n/a (token features)" for k in ("consistency", "eq_t")]
        lines.append(f"| {d} | {m} | {c} | {' | '.join(cells)} |")
    lines += ["", "## Layer-type shares of L logits, init → end", ""]
    lay = t.layers.groupby(["dataset", "model", "condition", "group", "layer_type", "phase"], sort=False)[
        "share"].sum().unstack("phase")
    types = [k for k in PALETTE if k in set(t.layers["layer_type"])]
    lines += ["| data | model | condition | group | " + " | ".join(types) + " |", "|" + "---|" * (4 + len(types))]
    for key, part in lay.groupby(level=[0, 1, 2, 3], sort=False):
        part = part.droplevel([0, 1, 2, 3])
        cells = [f"{part.loc[k, 'init']:+.2f} → {part.loc[k, 'end']:+.2f}" if k in part.index else "" for k in types]
        lines.append(f"| {' | '.join(key)} | {' | '.join(cells)} |")
    lines += ["", "## The paper's claims, here", ""]
    early, fell, total = after_warmup(t)
    if total:
        lines += [f"Along training (the monitor, published LEE, central scheme, mean over groups): from the first "
                  f"measurement after initialisation (step {early}) to the end, the LEE fell in {fell} of "
                  f"{total} runs.", ""]
    for output, label in OUTPUTS.items():
        lines += [f"With the {label} (central scheme):", ""]
        lines += [f"- **{c.name}**: {c.verdict} ({c.agree} of {c.total}). {c.detail}."
                  for c in claims(t, output=output)]
        lines.append("")
    lines += ["Figures: `lee_vs_step.png` (the monitor's published LEE along training), `shares_by_type.png`, "
              "`lee_vs_accuracy.png`.", ""]
    return "\n".join(lines)


def render(store: str | Path, out: str | Path) -> list[Path]:
    """Write the three figures (PNG) and ``SUMMARY.md`` of the store's runs into ``out``."""
    t = Tables.load(store)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in (("lee_vs_step", lee_vs_step), ("shares_by_type", shares_by_type),
                       ("lee_vs_accuracy", lee_vs_accuracy)):
        path = folder / f"{name}.png"
        draw(t).savefig(path)
        written.append(path)
    path = folder / "SUMMARY.md"
    path.write_text(summary(t, (st.manifest(store) or {}).get("spec")))
    written.append(path)
    return written
