"""One self-contained HTML report of one model, rendered from a results store (docs/design.md §4).

:func:`report` runs a one-model sweep (:func:`layerlie.sweep`) into a store, then
:func:`render` reads that store back, as it would any other sweep's: the page holds the
settings, where the weights came from and where the tasks ran (from the store's rows),
versions and timings, the end-to-end LEE of every group measured, the layer table of one group
with its alias flags and its estimator's check (docs/method.md §4), the figures of
:mod:`layerlie.views.figures`, the before/after ablation, and the nodes of unknown layout or
mismatched positions (docs/method.md §5). CSS is inline and images are ``data:`` URIs, so the file
opens anywhere, offline, and makes no request.

Example:
    >>> import layerlie as ll
    >>> ll.report("resnet18", path="report.html", n=2)  # doctest: +SKIP
    >>> ll.report(my_module, x, path="mine.html", checkpoint="trained.safetensors")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from layerlie.views import figures
from layerlie.results import store as st
from layerlie.deprecation import renamed
from layerlie.errors import LayerlieError
from layerlie.results.measures import list_measures
from layerlie.results.spec import SpecError, read_spec
from layerlie.results.sweep import slug, sweep, tasks

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 12px; display: block; overflow-x: auto; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
.note { background: #fff4d6; border-left: 4px solid #e0a800; padding: 0.5em 1em; }
figure { display: inline-block; margin: 0.5em; } img { max-width: 100%; }
"""


class ReportError(LayerlieError):
    """A report that cannot be made: one line that names the fix."""


@renamed(positional=("path",), seed="init_seed")
def report(model: str | nn.Module, x: torch.Tensor | None = None, *, path: str | Path = "report.html",
           groups: str | Iterable[str] = "all", group: str = "translate_x", checkpoint: str | Path | None = None,
           pretrained: bool = False, n: int = 2, size: int | tuple[int, int] | None = None, init_seed: int = 0,
           images: str | Path | None = None, store: str | Path | None = None,
           variants: Iterable[str] = ("blurpool", "filtered")) -> Path:
    """Measure ``model`` with a one-model sweep and write its HTML report (docs/design.md §4).

    Args:
        model: an ``nn.Module``, a timm name or ``package.module:callable``.
        x: the images, ``(B, C, H, W)`` as the model takes them (default: ``n`` embedded photos,
            or ``images``, prepared for the model at ``size``).
        path: the HTML file to write.
        groups: the groups of the end-to-end table and the metrics: names, a comma-separated
            string of them, or ``"all"`` (default).
        group: the group of the layer table and the ablation; it is measured along with ``groups``.
        checkpoint: a state dict to load into the model; the report names it and its sha256.
        pretrained: timm's pretrained weights (a timm name only).
        n, size, images: the photos (``n`` embedded ones, or a folder), and their size in
            pixels (square or ``(h, w)``).
        init_seed: the seed of random-init weights (and of the metrics' draws: the sweep's ``seed``).
        store: keep the sweep in this store (default: a temporary one).
        variants: the anti-aliased variants of the ablation (docs/method.md §6).

    Returns:
        The path written.
    """
    if x is not None and not isinstance(x, torch.Tensor):
        raise ReportError(f"report(model, x, path=): x is an image batch (B, C, H, W) or None, got a "
                          f"{type(x).__name__}; pass the HTML file as path=, a folder of images as images=")
    entry: Any = model
    if isinstance(model, nn.Module) or checkpoint is not None or pretrained:
        kind = "module" if isinstance(model, nn.Module) else "callable" if ":" in str(model) else "name"
        entry = {kind: model, "pretrained": pretrained,
                 **({"checkpoint": str(checkpoint)} if checkpoint is not None else {})}
    names = [g.strip() for g in groups.split(",")] if isinstance(groups, str) else list(groups)
    spec: dict[str, Any] = dict(models=[entry], groups=names,
                                measures=list_measures(), n=n, seed=init_seed,
                                layers={"groups": [group], "alias": True},
                                metrics={"which": ["consistency", "invariance"]},
                                ablation={"variants": list(variants), "groups": [group]})
    for key, value in (("size", size), ("images", x if x is not None else images)):
        if value is not None:
            spec[key] = list(value) if key == "size" and not isinstance(value, int) else value
    checked = read_spec(spec)
    spec["groups"] = list(dict.fromkeys([*checked["groups"], group]))
    label = tasks(checked)[0].model
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(store) if store is not None else Path(tmp)
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                sweep(spec, root, workers=0, resume=True, progress=False)
            except SpecError as err:
                if "different spec" not in str(err):
                    raise
                raise ReportError(f"the store {str(root)!r} holds another sweep; render it with `layerlie report "
                                  f"--store {root}`, or choose another --store for {label}") from None
        elapsed = time.perf_counter() - start
        notes = list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught
                                   if issubclass(w.category, UserWarning)))
        return render(root, path, model=label, group=group, notes=notes, timings={"sweep (s)": elapsed})


def render(store: str | Path, path: str | Path = "report.html", *, model: str | None = None,
           group: str | None = None, notes: Iterable[str] = (),
           timings: Mapping[str, float] | None = None) -> Path:
    """Write the HTML report of one model of ``store`` (default: its first model) (docs/design.md §4)."""
    info = st.manifest(store)
    if info is None:
        raise ReportError(f"{str(store)!r} has no sweep; run `layerlie report MODEL --store {store}` first")
    tables = {t: st.load(store, t) for t in st.TABLES}
    models = list(dict.fromkeys(m for t in tables.values() if "model" in t for m in t["model"]))
    failed = st.failures(store)
    if model is None:
        if not models:
            raise ReportError(f"the store {str(store)!r} holds no results; see its failures/ folder")
        model = models[0]
    tables = {k: v[v["model"] == model] if "model" in v else v for k, v in tables.items()}
    spec = info["spec"]
    layers = tables["layers"]
    if group is None and not layers.empty:
        group = layers["group"].iloc[0]
    sections = [f"<h1>layerlie report: {html.escape(model)}</h1>", _notes(layers, notes, failed, model),
                _header(spec, info, timings, tables),
                _e2e(tables["e2e"]), _layers(layers, group), _figures(tables, spec, model),
                _ablation(tables["ablation"]), _layouts(layers)]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>layerlie report: "
            f"{html.escape(model)}</title><style>{_CSS}</style></head><body>{''.join(sections)}</body></html>")
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(page, encoding="utf-8")
    except OSError as err:
        raise ReportError(f"cannot write {str(out)!r} ({err.strerror}); choose a writable --out") from None
    return out


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, border=0, na_rep="", float_format=lambda v: f"{v:.3g}", escape=True)


def _header(spec: Mapping[str, Any], info: Mapping[str, Any], timings: Mapping[str, float] | None,
            tables: Mapping[str, pd.DataFrame]) -> str:
    shown = {k: spec.get(k) for k in ("n", "size", "seed", "scheme", "batch_size")}
    shown["groups"] = ", ".join(spec.get("groups", []))
    shown["images"] = spec.get("images") or "embedded photos"
    unset = "not recorded"
    for key, column, empty in (("weights", "weights", unset), ("device", "device", unset), ("host", "host", unset),
                               ("Ray nodes", "ray_node", "none (run serially)"), ("process ids", "pid", unset)):
        columns = [t[column] for t in tables.values() if column in t]
        held = list(dict.fromkeys(v for c in columns for v in c.dropna().astype(str)))
        shown[key] = ", ".join(held) or (empty if columns else unset)  # empty: recorded, with no value
    rows = [*shown.items(), *(info.get("versions") or {}).items(),
            *((k, f"{v:.1f}") for k, v in (timings or {}).items())]
    if not timings:
        rows.append(("timings", "not recorded (rendered from an existing store)"))
    frame = pd.DataFrame(rows, columns=["setting", "value"]).astype(str)
    return f"<h2>Settings, versions and timings</h2>{_table(frame)}"


def _notes(layers: pd.DataFrame, notes: Iterable[str], failed: Mapping[str, Mapping[str, str]], model: str) -> str:
    """The notices that change how the page reads, first of all the granularity (docs/method.md §3)."""
    lines = []
    if "granularity" in layers and (layers["granularity"] == "module").any():
        lines.append("torch.fx cannot trace this model, so the layer table is at module granularity: one row "
                     "per leaf module, measured with forward hooks, not per graph node.")
    lines += list(notes)
    lines += [f"task {task} failed: {err.get('type')}: {(err.get('message') or '').splitlines()[0] if err.get('message') else ''}"
              for task, err in failed.items() if f"-{slug(model)}-" in task]
    return "".join(f"<p class='note'>{html.escape(line)}</p>" for line in lines)


def _e2e(e2e: pd.DataFrame) -> str:
    if e2e.empty:
        return "<h2>End-to-end LEE</h2><p>not measured</p>"
    summary = e2e.groupby("group")["lee"].agg(["mean", "std", "min", "max", "count"]).reset_index()
    summary.columns = ["group", "mean LEE", "std", "min", "max", "images"]
    return f"<h2>End-to-end LEE per group (docs/method.md §2)</h2>{_table(summary)}"


def _layers(layers: pd.DataFrame, group: str | None) -> str:
    if layers.empty:
        return "<h2>Layer table</h2><p>not measured</p>"
    rows = layers[layers["group"] == group]
    check = f"{rows['check'].iloc[0]}: {rows['residual'].iloc[0]:.3g}" if len(rows) else "none"
    key = "contribution_norm" if rows["contribution_norm"].notna().any() else "share"
    rows = rows.sort_values(key, ascending=False, key=lambda c: c.abs())
    zero = rows[key].fillna(0) == 0
    rows = rows[~zero]
    cols = [c for c in ("node", "layer_type", "depth", "layout", "contribution_norm", "share", "alias_kind",
                        "alias_ratio", "flagged", "position_mismatch") if c in rows]
    return (f"<h2>Layer table, {html.escape(str(group))} (docs/method.md §3-4)</h2><p>estimator "
            f"{html.escape(str(rows['estimator'].iloc[0]) if len(rows) else '')}; check of the estimator, "
            f"{html.escape(check)}; {int(zero.sum())} nodes with no contribution are left out</p>"
            f"{_table(rows[cols])}")


def _figures(tables: Mapping[str, pd.DataFrame], spec: Mapping[str, Any], model: str) -> str:
    parts, skipped = [], []
    for name, fig in figures.for_store(tables, spec, model=model).items():
        if isinstance(fig, str):
            skipped.append(fig)
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        parts.append(f"<figure><img alt='{name}' src='data:image/png;base64,{data}'><figcaption>{name}"
                     "</figcaption></figure>")
    notes = "".join(f"<p>{html.escape(s)}</p>" for s in skipped)
    return f"<h2>Figures</h2>{''.join(parts)}{notes}"


def _ablation(table: pd.DataFrame) -> str:
    if table.empty:
        return "<h2>Before/after ablation</h2><p>not measured (see the notes above)</p>"
    cols = [c for c in table if c not in ("model", "scheme", "seed")]
    return f"<h2>Before/after ablation (docs/method.md §6)</h2>{_table(table[cols])}"


def _layouts(layers: pd.DataFrame) -> str:
    if layers.empty or "layout" not in layers:
        return ("<h2>Unknown layouts and position mismatches (docs/method.md §5)</h2><p>not inferred at module "
                "granularity</p>" if not layers.empty else "")
    unknown = layers[layers["layout"].astype(str).str.startswith("unknown")]
    mismatch = (layers[layers["position_mismatch"].fillna("").astype(str) != ""] if "position_mismatch" in layers
                else layers.iloc[:0].assign(position_mismatch=""))
    body = (f"<p>{len(unknown)} nodes of unknown layout, {len(mismatch)} position mismatches.</p>"
            + (_table(unknown[["group", "node", "layer_type", "layout"]]) if len(unknown) else "")
            + (_table(mismatch[["group", "node", "position_mismatch"]]) if len(mismatch) else ""))
    return f"<h2>Unknown layouts and position mismatches (docs/method.md §5)</h2>{body}"


def __getattr__(name: str) -> Any:
    if name == "MEASURES":
        warnings.warn("layerlie.views.report.MEASURES is deprecated; use layerlie.list_measures()", DeprecationWarning,
                      stacklevel=2)
        return tuple(list_measures())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
