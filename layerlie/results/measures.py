"""The measures a sweep runs, as a registry (docs/design.md §4).

A measure turns a model, its prepared images and one task's group into the rows of one store
table. It calls layerlie's public measurements (:func:`layerlie.lee`, :func:`layerlie.attribute`,
:func:`layerlie.metrics`, :func:`layerlie.ablate`) with the options its spec table gives
(``[layers]``, ``[metrics]``, ``[ablation]``); an option the table leaves out keeps the
measurement's own default.

Example:
    >>> import layerlie as ll
    >>> ll.list_measures()
    ['ablation', 'e2e', 'layers', 'metrics']
    >>> ll.get_measure("layers").per_group
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Optional

import pandas as pd
import torch
from torch import nn

from layerlie.antialias.ablation import ablate
from layerlie.core.registry import Registry
from layerlie.errors import LayerlieError
from layerlie.measure.aliasing import with_aliasing
from layerlie.measure.attribution import attribute
from layerlie.measure.lie import lee
from layerlie.measure.metrics import metrics
from layerlie.results import store as st

Run = Callable[[nn.Module, torch.Tensor, list[str], Optional[str], Mapping[str, Any]], pd.DataFrame]
"""``(model, x, names, group, spec) -> rows``: the measure at images ``x: (B, C, H, W)`` named
``names``, for one group (None unless the measure is per group), under a checked spec."""


@dataclass(frozen=True)
class Measure:
    """How a sweep measure runs, and what it writes (docs/design.md §4).

    Attributes:
        name: the registry key, as a spec's ``measures`` lists it.
        run: computes one task's rows (:data:`Run`).
        table: the store table the rows go to.
        options: the keys of its spec table ``[name]``; none: the spec has no such table.
        per_group: one task per group (the table's ``groups``, else the spec's); otherwise one
            task that reads the groups it needs from the spec.
    """

    name: str
    run: Run
    table: str
    options: tuple[str, ...] = ()
    per_group: bool = False


_MEASURES: Registry[Measure] = Registry("measure")


def register_measure(name: str, *, table: str | None = None, options: tuple[str, ...] = (),
                     per_group: bool = False) -> Callable[[Run], Run]:
    """Register a function as the sweep measure ``name``, writing the store table ``table``
    (default: ``name``).

    Raises:
        LayerlieError: a table that a store does not hold.
    """
    table = table or name
    if table not in st.TABLES:
        raise LayerlieError(f"measure {name!r} would write table {table!r}, which a store does not hold; "
                            f"tables: {', '.join(st.TABLES)}")

    def deco(run: Run) -> Run:
        _MEASURES.add(name, Measure(name, run, table, tuple(options), per_group))
        return run

    return deco


get_measure = _MEASURES.get
"""The measure registered under a name; an unknown name raises a :class:`layerlie.LayerlieError`
that lists the valid ones."""

list_measures = _MEASURES.names
"""The registered measures' names, sorted."""


def _given(options: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    """The options among ``keys`` that the spec table gives; the others keep their defaults."""
    return {k: options[k] for k in keys if k in options}


@register_measure("e2e", per_group=True)
def _e2e(model: nn.Module, x: torch.Tensor, names: list[str], group: str | None,
         spec: Mapping[str, Any]) -> pd.DataFrame:
    """The end-to-end LEE of one group (docs/method.md §2)."""
    return lee(model, x, [group], scheme=spec["scheme"], names=names, batch_size=spec["batch_size"])


@register_measure("layers", options=("estimator", "groups", "top", "output", "samples", "probes", "alias"), per_group=True)
def _layers(model: nn.Module, x: torch.Tensor, names: list[str], group: str | None,
            spec: Mapping[str, Any]) -> pd.DataFrame:
    """The attribution of one group to the nodes (docs/method.md §3-4), joined to the alias flags
    with ``alias`` (docs/method.md §6), the ``top`` largest with ``top``."""
    opts = spec["layers"]
    a = attribute(model, x, group, scheme=spec["scheme"], seed=spec["seed"],
                  **_given(opts, "estimator", "output", "samples"),
                  **({"samples": opts["probes"]} if "probes" in opts and "samples" not in opts else {}))  # the old key
    granularity = a.settings.get("granularity", "node")
    if opts.get("alias") and granularity == "node":
        a = with_aliasing(a, model, x)
    estimator = a.settings["estimator"]
    table = a.nodes.assign(group=group, estimator=estimator, check=a.check, residual=a.residual,
                           granularity=granularity)
    if "top" in opts:
        key = "share" if estimator == "shares" else "contribution_norm"
        table = table.sort_values(key, ascending=False, key=lambda c: c.abs()).head(opts["top"])
    return table


@register_measure("metrics", options=("which", "options"))
def _metrics(model: nn.Module, x: torch.Tensor, names: list[str], group: str | None,
             spec: Mapping[str, Any]) -> pd.DataFrame:
    """The finite metrics (docs/method.md §7): ``invariance`` once per group of the spec (or once,
    for the group its options name), the others once."""
    opts = spec["metrics"]
    options = dict(opts.get("options", {}))
    shared = dict(names=names, seed=spec["seed"], batch_size=spec["batch_size"])
    which = opts.get("which")
    finite = None if which is None else [w for w in which if w != "invariance"]
    frames = []
    if finite is None or finite:
        chosen = {} if finite is None else {"which": finite}
        kept = {k: v for k, v in options.items() if k != "invariance" and (finite is None or k in finite)}
        frames.append(metrics(model, x, **chosen, **shared, **kept).assign(group=None))
    if which is not None and "invariance" in which:
        inv = dict(options.get("invariance", {}))
        for g in [inv.pop("group")] if "group" in inv else spec["groups"]:
            frames.append(metrics(model, x, ["invariance"], **shared, invariance={**inv, "group": g}).assign(group=g))
    return pd.concat(frames, ignore_index=True)


@register_measure("ablation", options=("variants", "estimator", "filter_size", "groups"))
def _ablation(model: nn.Module, x: torch.Tensor, names: list[str], group: str | None,
              spec: Mapping[str, Any]) -> pd.DataFrame:
    """The before/after ablation (docs/method.md §6) over its table's groups, else the spec's."""
    opts = spec["ablation"]
    ab = ablate(model, x, groups=opts.get("groups", spec["groups"]), scheme=spec["scheme"],
                **_given(opts, "variants", "estimator", "filter_size"))
    return ab.table.assign(group=ab.settings["group"])
