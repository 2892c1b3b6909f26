"""Before/after ablations of anti-aliased substitutes (docs/method.md §6).

Each variant is the model with one family of substitutes swapped in by
:func:`layerlie.antialias`, the weights kept, so the comparison isolates what aliasing
does to the Lie derivative, and to the predictions.

Example:
    >>> import layerlie as ll
    >>> m = ll.load_model("resnet18")
    >>> ab = ll.ablate(m, ll.photos(m, n=2)[..., ::2, ::2], variants=["blurpool"], groups=["translate_x"])
    >>> list(ab.table["variant"])
    ['original', 'blurpool']
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
import torch.fx as fx
from torch import nn

from layerlie.measure.attribution import attribute, two_panels
from layerlie.measure.estimators import Estimator, get_estimator
from layerlie.model.contract import Output, prepare
from layerlie.core.layout import infer_layouts
from layerlie.core.ops import LAYER_TYPES
from layerlie.core.registry import Registry
from layerlie.errors import LayerlieError
from layerlie.core.groups import DEFAULT_GROUPS, resolve_groups
from layerlie.measure.lie import lee, summarize
from layerlie.antialias.rewrite import NothingToReplace, Where, antialias
from layerlie.model.trace import trace, with_output

_VARIANTS: Registry[dict[str, Any]] = Registry("variant")


def register_variant(name: str, **options: Any) -> None:
    """Make ``name`` a variant of :func:`ablate`: the model after ``antialias(model, **options)``."""
    _VARIANTS.add(name, dict(options))


def get_variant(name: str) -> dict[str, Any]:
    """The :func:`layerlie.antialias` options of a variant.

    Raises:
        LayerlieError: an unknown name; the message lists the registered ones.
    """
    return dict(_VARIANTS.get(name))


def list_variants() -> list[str]:
    """The names :func:`ablate` accepts, sorted."""
    return _VARIANTS.names()


register_variant("blurpool", blurpool=True)
register_variant("filtered", blurpool=False, activations="filtered")
register_variant("aps", blurpool=False, aps=True)
register_variant("both", blurpool=True, activations="filtered")  # BlurPool with filtered nonlinearities
register_variant("all", blurpool=True, activations="filtered", aps=True)  # and APS after the blur

DEFAULT_VARIANTS = ("blurpool", "filtered", "aps", "all")
"""The variants :func:`ablate` compares unless told otherwise, and so a sweep's and the CLI's."""


def __getattr__(name: str) -> Any:
    if name == "VARIANTS":
        warnings.warn("layerlie.antialias.ablation.VARIANTS is deprecated; use list_variants(), get_variant(name) "
                      "and register_variant(name, **options)", DeprecationWarning, stacklevel=2)
        return dict(_VARIANTS.items())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class Ablation:
    """A before/after comparison of anti-aliased variants of one model (docs/method.md §6).

    Attributes:
        table: one row per variant (``original`` first): variant, replaced (node count),
            ``lee_<group>`` (mean end-to-end LEE), ``factor_<group>`` (original LEE / variant
            LEE), residual (completeness of its attribution), top1_agreement (with the
            original), output_change (mean total-variation distance of the softmax from the
            original's), accuracy (with labels); ``residual`` is the estimator's check
            (``settings["check"]`` names it).
        by_type: contribution to ``L F`` per layer type (rows) and variant (columns).
        settings: groups, the attributed group, estimator, check, scheme, filter size, images.
    """

    table: pd.DataFrame
    by_type: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)

    def plot(self, ax: Any = None) -> Any:
        """LEE per group and variant (left) and the contribution by layer type (right)."""
        fig, (ax_lee, ax_type) = two_panels(ax, (11, 3.8))
        lee_cols = [f"lee_{g}" for g in self.settings["groups"]]
        frame = self.table.set_index("variant")[lee_cols]
        frame.columns = list(self.settings["groups"])
        frame.T.plot.bar(ax=ax_lee, logy=True, rot=30)
        ax_lee.set(ylabel="mean LEE", title="end-to-end LEE, before and after")
        shown = self.by_type.loc[(self.by_type > 0).any(axis=1)]
        shown.plot.bar(ax=ax_type, logy=True, rot=30)
        ax_type.set(ylabel=self.settings["by_type_value"],
                    title=f"{self.settings['group']}: by layer type")
        fig.tight_layout()
        return fig


def ablate(model: nn.Module | fx.GraphModule, x: torch.Tensor, *,
           variants: Iterable[str] = DEFAULT_VARIANTS,
           groups: str | Iterable[str] = DEFAULT_GROUPS, labels: torch.Tensor | None = None,
           estimator: str | Estimator = "exact", scheme: str = "central", filter_size: int = 3,
           where: Where = None, output: Output = None) -> Ablation:
    """Compare ``model`` with its anti-aliased variants at images ``x: (B, C, H, W)`` (docs/method.md §6).

    Args:
        model: a model or a traced GraphModule, taken by the model contract
            (:mod:`layerlie.model.contract`): never modified, measured in eval mode.
        x: images, normalized as the model expects.
        variants: names from :func:`list_variants`; one that finds nothing to replace is left out
            with a warning (an error when none applies).
        groups: the groups of the end-to-end LEE; the first is also attributed per layer.
        labels: ``(B,)`` class indices, for accuracy.
        estimator: the attribution estimator for the by-type table, as in :func:`layerlie.attribute`.
        scheme: the derivative scheme everywhere.
        filter_size: binomial taps of the substitutes.
        where: which nodes to replace, as for :func:`layerlie.antialias`.
        output: the tensor of a tuple, dict or ``.logits`` output to measure (the output rule).

    Returns:
        An :class:`Ablation`.
    """
    variants = list(variants)
    unknown = [v for v in variants if v not in _VARIANTS]
    if unknown or not variants:
        raise LayerlieError(f"unknown variant(s) {unknown or variants}; valid variants: {', '.join(list_variants())}")
    est = get_estimator(estimator)
    model, x, output, _ = prepare(model, x, output)
    chosen = resolve_groups(groups, channels=x.shape[1])
    gs = [g.name for g in chosen]
    if labels is not None and tuple(labels.shape) != (x.shape[0],):
        raise LayerlieError(f"labels must have shape ({x.shape[0]},), one class index per image, "
                            f"got {tuple(labels.shape)}")
    original = model if isinstance(model, fx.GraphModule) else trace(model, x, output=output)
    infer_layouts(original, x)  # once: the variants' surgery and every attribution read them back
    models = {"original": original}
    skipped = []
    for v in variants:
        try:
            models[v] = antialias(original, **get_variant(v), filter_size=filter_size, where=where, x=x)
        except NothingToReplace as err:
            skipped.append(f"{v}: {err}")
    if skipped and len(models) == 1:
        raise LayerlieError("no variant applies; " + "; ".join(skipped))
    if skipped:
        warnings.warn("variant left out, " + "; ".join(skipped), stacklevel=2)
    value = est.column
    rows, by_type, reference = [], {}, None
    for name, gm in models.items():  # the original first: its softmax is the reference
        table = summarize(lee(with_output(gm, "logits")[0], x, chosen, scheme=scheme))
        a = attribute(gm, x, chosen[0], estimator=estimator, scheme=scheme)
        by_type[name] = a.by_type()[value]
        with torch.no_grad():
            probs = with_output(gm, "softmax")[0](x)
        reference = probs if reference is None else reference
        row: dict[str, Any] = dict(variant=name, replaced=len(gm.meta.get("layerlie.surgery", {})))
        row.update({f"lee_{g}": float(table.loc[g, "mean"]) for g in gs})
        row.update(residual=a.residual,
                   top1_agreement=float((probs.argmax(-1) == reference.argmax(-1)).double().mean()),
                   output_change=float((probs - reference).abs().sum(-1).mean() / 2))
        if labels is not None:
            row["accuracy"] = float((probs.argmax(-1) == labels.to(probs.device)).double().mean())
        rows.append(row)
    result = pd.DataFrame(rows)
    for g in gs:
        result[f"factor_{g}"] = result[f"lee_{g}"].iloc[0] / result[f"lee_{g}"]
    types = pd.DataFrame(by_type)
    types = types.reindex([t for t in LAYER_TYPES if t in types.index])
    settings = dict(groups=gs, group=gs[0], estimator=est.name, check=est.check, scheme=scheme,
                    filter_size=filter_size,
                    images=int(x.shape[0]), by_type_value=value, variants=[v for v in variants if v in models])
    return Ablation(result, types.fillna(0.0), settings)
