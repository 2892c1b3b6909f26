"""Paper figures drawn from a results store's tables, never from a live model (docs/design.md §4, STYLE 11).

Each function takes store tables (DataFrames, as :func:`layerlie.load` returns them) and an
optional ``ax``, and returns a matplotlib ``Figure`` one paper column wide. Layer types keep
one colour everywhere (:data:`PALETTE`). Each is registered with the tables it reads
(:func:`register_figure`); :func:`render` writes every figure a store can feed.

Example:
    >>> import layerlie as ll
    >>> from layerlie.views import figures
    >>> fig = figures.depth(ll.load("out/", "layers"))  # doctest: +SKIP
    >>> ll.get_figure("depth").tables
    ('layers',)
    >>> figures.render("out/", "figs/")  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import NullFormatter
from scipy import stats

from layerlie.results import store as st
from layerlie.errors import LayerlieError
from layerlie.core.ops import LAYER_TYPES
from layerlie.core.registry import Registry

PALETTE: dict[str, str] = dict(zip(LAYER_TYPES, ("#d62728", "#1f77b4", "#7f7f7f", "#8c564b", "#2ca02c",
                                                 "#9467bd", "#ff7f0e", "#bcbd22", "#17becf")))
"""One colour per layer type, in every figure."""

COLUMN = (3.4, 2.6)
"""One column of a two-column paper, in inches."""

_BINS = 20
"""Depth bins of the contribution-by-depth line."""

_CHECKPOINT = re.compile(r"checkpoint \((.+), sha256 ([0-9a-f]{64})\)")
"""A checkpoint's provenance, as :class:`layerlie.results.sweep.Source` writes it."""

_LEGEND_ROW = 0.12
"""Inches per row of a legend below the axes, at the legend's font size."""

_STYLE = {"font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "legend.fontsize": 6,
          "xtick.labelsize": 6, "ytick.labelsize": 6, "lines.markersize": 4, "savefig.dpi": 200,
          # twenty colours, tab10's first and their light shades next, so that up to twenty models differ
          "axes.prop_cycle": mpl.cycler(color=[*mpl.colormaps["tab20"].colors[0::2],
                                               *mpl.colormaps["tab20"].colors[1::2]])}


class FigureError(LayerlieError):
    """A table that cannot feed a figure: one line that names the missing table or column."""


@dataclass(frozen=True)
class Plot:
    """A paper figure: the function that draws it, and the store tables it reads (docs/design.md §4).

    Attributes:
        name: the registry key, and the file name :func:`render` gives it.
        draw: the figure function; it takes the tables in order, then keyword options.
        tables: the tables it takes, by store table name (``accuracy`` is a table of the caller's).
        per_model: takes ``model=``, the one model to draw.
        in_store: drawn by :func:`for_store`, and so by :func:`render` and the report.
    """

    name: str
    draw: Callable[..., Figure]
    tables: tuple[str, ...]
    per_model: bool = False
    in_store: bool = True


_FIGURES: Registry[Plot] = Registry("figure")


def register_figure(name: str, *, tables: tuple[str, ...], per_model: bool = False,
                    in_store: bool = True) -> Callable[[Callable[..., Figure]], Callable[..., Figure]]:
    """Register a figure function under ``name``, with the tables it takes in order."""

    def deco(draw: Callable[..., Figure]) -> Callable[..., Figure]:
        _FIGURES.add(name, Plot(name, draw, tuple(tables), per_model, in_store))
        return draw

    return deco


get_figure = _FIGURES.get
"""The figure registered under a name; an unknown name raises a :class:`layerlie.LayerlieError`
that lists the valid ones."""

list_figures = _FIGURES.names
"""The registered figures' names, sorted."""


def _paper(draw: Callable[..., Figure]) -> Callable[..., Figure]:
    """Draw under the paper's font sizes; text keeps its size once created."""
    @functools.wraps(draw)
    def wrapped(*args: Any, **kwargs: Any) -> Figure:
        with mpl.rc_context(_STYLE):
            return draw(*args, **kwargs)
    return wrapped


def _axes(ax: Axes | None, size: tuple[float, float] = COLUMN) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _need(frame: pd.DataFrame, table: str, columns: tuple[str, ...]) -> None:
    if frame is None or frame.empty:
        raise FigureError(f"the {table} table is empty; run a sweep with measures = [..., {table!r}]")
    missing = [c for c in columns if c not in frame]
    if missing:
        raise FigureError(f"the {table} table has no {missing[0]!r} column; pass a store's {table} table")


def settings(frame: pd.DataFrame, spec: Mapping[str, Any] | None = None) -> str:
    """The title lines of settings: scheme and images from the table (or the sweep spec), and
    where the weights came from, from the table's ``weights`` column (docs/design.md §4)."""
    spec = spec or {}
    scheme = ", ".join(sorted(frame["scheme"].astype(str).unique())) if "scheme" in frame else spec.get("scheme", "?")
    n = frame["image"].nunique() if "image" in frame else spec.get("n")
    return f"{scheme} scheme, n={n if n is not None else '?'}\n{weights(frame)}"


def weights(frame: pd.DataFrame) -> str:
    """Where the table's weights came from, short enough for a title: a checkpoint by its file
    name and the first 12 digits of its sha256; several sources counted by kind."""
    if "weights" not in frame:
        return "weights not recorded"
    said = [_CHECKPOINT.sub(lambda m: f"checkpoint ({Path(m[1]).name}, sha256 {m[2][:12]})", w)
            for w in frame["weights"].dropna().astype(str).unique()]
    if len(said) <= 2:
        return "; ".join(said) or "weights not recorded"
    kinds = pd.Series([re.match(r"random init|\w+", w)[0] for w in said]).value_counts()
    return f"weights: {', '.join(f'{k} x{c}' for k, c in kinds.items())}"


def _group(frame: pd.DataFrame, group: str | None) -> str:
    """The group to show: the one asked for, else the first in the table."""
    groups = list(frame["group"].dropna().unique())
    if group is None:
        if not groups:
            raise FigureError("the table has no group; pass a layers or e2e table of a sweep")
        return groups[0]
    if group not in groups:
        raise FigureError(f"group {group!r} is not in the table; it holds {', '.join(groups)}")
    return group


def _magnitude(layers: pd.DataFrame) -> tuple[pd.Series, str]:
    """A node's size: ``||c_v||`` (exact) or ``|share|`` when the estimator gives no norms (docs/method.md §4)."""
    if layers["contribution_norm"].notna().any():
        return layers["contribution_norm"], "||c_v|| (output units)"
    return layers["share"].abs(), "|share| (fraction of ||L F||)"


@register_figure("depth", tables=("layers",))
@_paper
def depth(layers: pd.DataFrame, *, group: str | None = None, spec: Mapping[str, Any] | None = None,
          ax: Axes | None = None) -> Figure:
    """Contribution by depth: one line per model (the largest node in each of :data:`_BINS` depth
    bins) over depth normalised to [0, 1], with a marker per node coloured by layer type (docs/method.md §3)."""
    _need(layers, "layers", ("model", "depth", "layer_type", "contribution_norm", "share", "group"))
    g = _group(layers, group)
    rows = layers[layers["group"] == g]
    value, unit = _magnitude(rows)
    rows = rows.assign(value=value)[value > 0]
    entries = rows["model"].nunique() + rows["layer_type"].nunique()
    fig, ax = _axes(ax, (COLUMN[0], 2.4 + _LEGEND_ROW * math.ceil(entries / 2)))
    for model, part in rows.groupby("model", sort=False):
        part = part.sort_values("depth")
        span = max(part["depth"].max() - part["depth"].min(), 1)
        t = (part["depth"] - part["depth"].min()) / span
        # a per-bin maximum: a node-by-node line zigzags between e_v = 0 nodes and hides the trend
        envelope = part.groupby(np.minimum((t * _BINS).astype(int), _BINS - 1))["value"].max()
        ax.plot((envelope.index + 0.5) / _BINS, envelope, lw=0.9, label=model)
        ax.scatter(t, part["value"], s=5, c=[PALETTE.get(k, "k") for k in part["layer_type"]], zorder=3,
                   linewidths=0)
    ax.set(xlabel="depth (node index / last node, 0-1)", ylabel=unit, yscale="log", xlim=(0, 1),
           title=f"contribution by depth, {g}\n{settings(layers, spec)}")
    types = [k for k in LAYER_TYPES if k in set(rows["layer_type"])]
    markers = [Line2D([], [], ls="", marker="o", ms=3, color=PALETTE[k], label=k) for k in types]
    fig.legend(handles=[*ax.get_lines(), *markers], ncols=2, loc="outside lower center", frameon=False)
    return fig


@register_figure("by_type", tables=("layers",))
@_paper
def by_type(layers: pd.DataFrame, *, spec: Mapping[str, Any] | None = None, ax: Axes | None = None) -> Figure:
    """Share of the Lie derivative by layer type: one stacked bar per model and group (docs/method.md §3-4).

    The share of a type is its nodes' sum of ``||c_v||`` over all nodes' (``|share|`` for the
    shares estimator), so each bar sums to 1.
    """
    _need(layers, "layers", ("model", "group", "layer_type", "contribution_norm", "share"))
    value, unit = _magnitude(layers)
    sums = layers.assign(value=value).pivot_table(index=["model", "group"], columns="layer_type",
                                                  values="value", aggfunc="sum", sort=False).fillna(0)
    sums = sums.div(sums.sum(axis=1), axis=0)
    sums = sums[[k for k in LAYER_TYPES if k in sums and sums[k].any()]]
    fig, ax = _axes(ax, (COLUMN[0], 1.6 + 0.22 * len(sums)))
    left = np.zeros(len(sums))
    labels = [f"{m} / {g}" for m, g in sums.index]
    for kind in sums:
        ax.barh(labels, sums[kind], left=left, color=PALETTE[kind], label=kind, height=0.7)
        left += sums[kind].to_numpy()
    ax.invert_yaxis()
    ax.set(xlabel=f"fraction of the sum of {unit.split(' (')[0]} (0-1)", xlim=(0, 1))
    # right-aligned: the model labels leave the axes too narrow for a centred title
    ax.set_title(f"share of the Lie derivative by layer type\n{settings(layers, spec)}", x=1.0, ha="right")
    fig.legend(handles=ax.get_legend_handles_labels()[0], ncols=3, loc="outside lower center", frameon=False)
    return fig


@register_figure("e2e_groups", tables=("e2e",))
@_paper
def e2e_groups(e2e: pd.DataFrame, *, spec: Mapping[str, Any] | None = None, ax: Axes | None = None) -> Figure:
    """End-to-end LEE per group across models: each image a dot, each model's mean a marker
    with a bar over the images' range (docs/method.md §2)."""
    _need(e2e, "e2e", ("model", "group", "image", "lee"))
    groups = list(e2e["group"].unique())
    models = list(e2e["model"].unique())
    fig, ax = _axes(ax, (COLUMN[0], COLUMN[1] + _LEGEND_ROW * math.ceil(len(models) / 2)))
    width = 0.7 / max(len(models), 1)
    for i, (model, part) in enumerate(e2e.groupby("model", sort=False)):
        stats_ = part.groupby("group")["lee"].agg(["mean", "min", "max"]).reindex(groups)
        x = np.arange(len(groups)) - 0.35 + width * (i + 0.5)
        line = ax.errorbar(x, stats_["mean"], yerr=[stats_["mean"] - stats_["min"], stats_["max"] - stats_["mean"]],
                           fmt="o", capsize=2, lw=0.8, label=model)
        xs = x[[groups.index(g) for g in part["group"]]]
        ax.scatter(xs, part["lee"], s=4, alpha=0.4, color=line.lines[0].get_color(), zorder=1)
    ax.set_xticks(range(len(groups)), groups)
    ax.set(ylabel="LEE ||L F(x)|| (output units)", xlabel="group", yscale="log",
           title=f"end-to-end LEE per group (dots: images, bars: range)\n{settings(e2e, spec)}")
    fig.legend(handles=ax.get_legend_handles_labels()[0], ncols=2, loc="outside lower center", frameon=False)
    return fig


def _mean_lee(e2e: pd.DataFrame, group: str) -> pd.Series:
    return e2e[e2e["group"] == group].groupby("model", sort=False)["lee"].mean()


@register_figure("lee_vs_accuracy", tables=("e2e", "accuracy"))
@_paper
def lee_vs_accuracy(e2e: pd.DataFrame, accuracy: pd.DataFrame, *, group: str | None = None,
                    spec: Mapping[str, Any] | None = None, ax: Axes | None = None) -> Figure:
    """Mean end-to-end LEE against top-1 accuracy, one point per model (docs/method.md §7).

    Args:
        e2e: the store's e2e table.
        accuracy: one row per model, with ``model`` and ``accuracy`` (a fraction) columns.
    """
    _need(e2e, "e2e", ("model", "group", "lee"))
    if accuracy is None or "accuracy" not in accuracy or "model" not in accuracy:
        raise FigureError("no accuracy column; pass a table with model and accuracy columns")
    g = _group(e2e, group)
    joined = _mean_lee(e2e, g).rename("lee").to_frame().join(accuracy.groupby("model")["accuracy"].mean(),
                                                              how="inner")
    if joined.empty:
        raise FigureError("no model is in both the e2e and the accuracy tables; match their model names")
    fig, ax = _axes(ax)
    for model, row in joined.iterrows():
        ax.scatter(row["lee"], 100 * row["accuracy"], label=model)
    ax.set(xlabel=f"mean LEE, {g} (output units)", ylabel="top-1 accuracy (%)", xscale="log",
           title=f"LEE against accuracy\n{settings(e2e, spec)}")
    ax.legend(frameon=False)
    return fig


def spearman(x: pd.Series, y: pd.Series) -> tuple[float, float]:
    """Spearman's rank correlation and its two-sided p-value (scipy)."""
    if len(x) < 3 or x.nunique() < 2 or y.nunique() < 2:
        return math.nan, math.nan
    result = stats.spearmanr(x, y)
    return float(result.statistic), float(result.pvalue)


@register_figure("lee_vs_metrics", tables=("e2e", "metrics"))
@_paper
def lee_vs_metrics(e2e: pd.DataFrame, metrics: pd.DataFrame, *, group: str | None = None,
                   spec: Mapping[str, Any] | None = None) -> Figure:
    """Per-image LEE against each finite metric, one panel per metric, with Spearman's rho and
    its p-value over all (model, image) points (docs/method.md §7).

    A per-group metric (invariance) is paired with the LEE of its own group; the others with ``group``.
    """
    _need(e2e, "e2e", ("model", "group", "image", "lee"))
    _need(metrics, "metrics", ("model", "image", "metric", "value"))
    g = _group(e2e, group)
    names = list(metrics["metric"].unique())
    rows = math.ceil(metrics["model"].nunique() / 2)
    fig = Figure(figsize=(COLUMN[0], 1.9 * len(names) + 0.4 + _LEGEND_ROW * rows), layout="constrained")
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    for ax, name in zip(axes, names):
        m = metrics[metrics["metric"] == name]
        pair_group = g
        if "group" in m and m["group"].notna().any():
            pair_group = g if g in set(m["group"]) else m["group"].dropna().iloc[0]
            m = m[m["group"] == pair_group]
        pts = e2e[e2e["group"] == pair_group].merge(m, on=["model", "image"])
        pts = pts[np.isfinite(pts["value"]) & np.isfinite(pts["lee"])]
        for model, part in pts.groupby("model", sort=False):
            ax.scatter(part["lee"], part["value"], s=8, label=model)
        rho, p = spearman(pts["lee"], pts["value"])
        said = f"rho = {rho:.2f}, p = {p:.2g}" if math.isfinite(rho) else "rho undefined (ties or n < 3)"
        ax.text(0.02, 0.95, f"Spearman {said} (n = {len(pts)})", transform=ax.transAxes, va="top")
        ax.set(xlabel=f"LEE, {pair_group} (output units)", ylabel=f"{name} (metric units)", xscale="log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks collide on short spans
    axes[0].set_title(f"LEE against each metric\n{settings(e2e, spec)}")
    fig.legend(handles=axes[0].get_legend_handles_labels()[0], ncols=2, loc="outside lower center", frameon=False)
    return fig


@register_figure("ablation", tables=("ablation",))
@_paper
def ablation(table: pd.DataFrame, *, group: str | None = None, spec: Mapping[str, Any] | None = None,
             ax: Axes | None = None) -> Figure:
    """Before/after ablation: per variant, the LEE reduction against the output change, one
    point per model (docs/method.md §6)."""
    _need(table, "ablation", ("model", "variant", "output_change"))
    factors = [c.removeprefix("factor_") for c in table if c.startswith("factor_")]
    if not factors:
        raise FigureError("the ablation table has no factor_<group> column; pass a store's ablation table")
    g = group or (table["group"].iloc[0] if "group" in table else factors[0])
    if g not in factors:
        raise FigureError(f"group {g!r} is not in the ablation table; it holds {', '.join(factors)}")
    variants = table[table["variant"] != "original"]
    # fifteen filled markers, reused beyond: a sweep may hold more models than that
    shapes = dict(zip(variants["model"].unique(), itertools.cycle("os^DvP*Xph<>8Hd")))
    entries = variants["variant"].nunique() + len(shapes)
    fig, ax = _axes(ax, (COLUMN[0], COLUMN[1] + _LEGEND_ROW * math.ceil(entries / 2)))
    for variant, part in variants.groupby("variant", sort=False):
        color = None
        for model, row in part.set_index("model").iterrows():
            dot = ax.scatter(100 * row["output_change"], row[f"factor_{g}"], marker=shapes[model], color=color,
                             label=variant if color is None else None)
            color = dot.get_facecolor()
    ax.axhline(1, color="k", lw=0.5, ls=":")
    ax.set(xlabel="output change (total variation of softmax, %)",
           ylabel=f"LEE reduction, {g} (before / after, x)", yscale="log",
           title=f"anti-aliasing: LEE reduction against output change\n{settings(table, spec)}")
    model_keys = [Line2D([], [], ls="", marker=s, color="k", ms=3, label=m) for m, s in shapes.items()]
    fig.legend(handles=[*ax.get_legend_handles_labels()[0], *model_keys], ncols=2, loc="outside lower center",
               frameon=False)
    return fig


@register_figure("top_layers", tables=("layers",), per_model=True)
@_paper
def top_layers(layers: pd.DataFrame, *, model: str | None = None, group: str | None = None, k: int = 15,
               spec: Mapping[str, Any] | None = None, ax: Axes | None = None) -> Figure:
    """The ``k`` nodes of one model with the largest contribution, coloured by layer type; an
    alias-flagged node (docs/method.md §6) is hatched and starred when the table has a ``flagged`` column."""
    _need(layers, "layers", ("model", "node", "layer_type", "contribution_norm", "share", "group"))
    model = model or layers["model"].iloc[0]
    rows = layers[layers["model"] == model]
    if rows.empty:
        raise FigureError(f"model {model!r} is not in the layers table; it holds "
                          f"{', '.join(layers['model'].unique())}")
    g = _group(rows, group)
    rows = rows[rows["group"] == g]
    value, unit = _magnitude(rows)
    top = rows.assign(value=value).nlargest(k, "value").iloc[::-1]
    flagged = top["flagged"].fillna(False).astype(bool) if "flagged" in top else pd.Series(False, top.index)
    fig, ax = _axes(ax, (COLUMN[0], 1.4 + 0.16 * len(top)))
    ax.barh(top["node"], top["value"], color=[PALETTE.get(t, "k") for t in top["layer_type"]],
            hatch=["////" if f else "" for f in flagged], edgecolor="k", linewidth=0.3)
    for y, (v, f) in enumerate(zip(top["value"], flagged)):
        if f:
            ax.text(v, y, " *", va="center")
    ax.set(xlabel=unit, xscale="log", title=f"top {len(top)} nodes of {model}, {g}\n{settings(rows, spec)}")
    handles = [Patch(color=PALETTE[t], label=t) for t in LAYER_TYPES if t in set(top["layer_type"])]
    if "flagged" in top:
        handles.append(Patch(facecolor="w", edgecolor="k", hatch="////", label="* alias-flagged"))
    fig.legend(handles=handles, frameon=False, ncols=2, loc="outside lower center")
    return fig


@register_figure("monitor", tables=("monitor",), in_store=False)
@_paper
def monitor(table: pd.DataFrame, *, run: str | None = None, ax: Axes | Sequence[Axes] | None = None) -> Figure:
    """Equivariance along training: the e2e LEE per group against the step on a log scale
    (docs/method.md §2) and, when the table has layer shares, the signed share of ``L F`` of each layer
    type against the step, one line style per group (docs/method.md §4).

    Args:
        table: :meth:`layerlie.Monitor.table`, or a store's ``monitor`` table.
        run: the run to draw, when the table holds several.
        ax: the LEE's axes, or the LEE's and the shares' axes (default: a new figure with both).
    """
    _need(table, "monitor", ("step", "group", "lee"))
    runs = list(table["run"].dropna().unique()) if "run" in table else []
    if run is not None and run not in runs:
        held = ", ".join(map(str, runs)) or "no run column"
        raise FigureError(f"run {run!r} is not in the monitor table; it holds {held}")
    if run is None and len(runs) > 1:
        raise FigureError(f"the monitor table holds several runs ({', '.join(map(str, runs))}); pass run= one of them")
    rows = table[table["run"] == run] if run is not None else table
    types = [t for t in LAYER_TYPES if f"share_{t}" in rows and rows[f"share_{t}"].fillna(0).any()]
    if ax is None:
        panels = 2 if types else 1
        fig = Figure(figsize=(COLUMN[0], 2.2 * panels + _LEGEND_ROW * math.ceil((len(types) + 2) / 3)),
                     layout="constrained")
        axes = list(fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0])
    else:
        axes = [ax] if isinstance(ax, Axes) else list(ax)
        fig = axes[0].figure
    styles = dict(zip(rows["group"].unique(), itertools.cycle(["-", "--", ":", "-."])))
    for group, part in rows.groupby("group", sort=False):
        part = part.sort_values("step")
        axes[0].plot(part["step"], part["lee"], marker="o", lw=0.9, label=group)
    scheme = ", ".join(sorted(rows["scheme"].astype(str).unique())) if "scheme" in rows else "?"
    axes[0].set(ylabel="mean LEE (output units)", yscale="log",
                title=f"LEE along training{f', {run}' if run else ''}\n{scheme} scheme, {rows['step'].nunique()} "
                      "measured steps")
    axes[0].legend(frameon=False)
    if types and len(axes) > 1:
        for group, part in rows.groupby("group", sort=False):
            part = part.sort_values("step")
            for t in types:
                axes[1].plot(part["step"], part[f"share_{t}"], ls=styles[group], lw=0.9, color=PALETTE[t])
        axes[1].axhline(0, color="k", lw=0.5)
        axes[1].set(ylabel="signed share of L F (sums to 1)", title="share by layer type")
        handles = [Patch(color=PALETTE[t], label=t) for t in types]
        handles += [Line2D([], [], color="k", ls=styles[g], label=g) for g in styles]
        fig.legend(handles=handles, ncols=3, loc="outside lower center", frameon=False)
    axes[-1].set(xlabel="training step")
    return fig


def for_store(tables: Mapping[str, pd.DataFrame], spec: Mapping[str, Any] | None = None,
              model: str | None = None) -> dict[str, Figure | str]:
    """Every registered figure drawn from a store (``in_store``) that the tables can feed, by
    name, in the order they were registered; a figure whose table is absent is a one-line note
    instead. ``model`` restricts the figures to one model."""
    if model is not None:
        tables = {k: v[v["model"] == model] if "model" in v else v for k, v in tables.items()}
    out: dict[str, Figure | str] = {}
    for _, plot in _FIGURES.items():
        if not plot.in_store:
            continue
        options = {"model": model} if plot.per_model else {}
        try:
            out[plot.name] = plot.draw(*(tables.get(t) for t in plot.tables), spec=spec, **options)
        except FigureError as err:
            out[plot.name] = f"{plot.name}: skipped, {err}"
    return out


def render(store: str | Path, out: str | Path) -> tuple[list[Path], list[str]]:
    """Write every figure a store can feed to ``out/<name>.png`` and ``.pdf`` (docs/design.md §4).

    Returns:
        The files written, and a one-line note per figure skipped for an absent table.
    """
    spec = (st.manifest(store) or {}).get("spec")
    tables = {t: st.load(store, t) for t in st.TABLES}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    written, notes = [], []
    for name, fig in for_store(tables, spec).items():
        if isinstance(fig, str):
            notes.append(fig)
            continue
        for suffix in (".png", ".pdf"):
            fig.savefig(folder / f"{name}{suffix}")
            written.append(folder / f"{name}{suffix}")
    return written, notes
