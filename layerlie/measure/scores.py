"""The per-image values of a finite metric, with their table (docs/method.md §7)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch


class Scores(torch.Tensor):
    """A finite metric's values, one per image: a ``(B,)`` float64 tensor that also gives
    :attr:`table`, the rows :func:`layerlie.metrics` reports for it.

    Arithmetic on scores gives plain tensors.
    """

    metric: str
    __torch_function__ = torch._C._disabled_torch_function_impl

    @property
    def table(self) -> pd.DataFrame:
        """A DataFrame with columns ``image`` (the index), ``metric`` and ``value``."""
        return pd.DataFrame({"image": [str(i) for i in range(len(self))], "metric": self.metric,
                             "value": self.tolist()}, columns=["image", "metric", "value"])


def scored(metric: Callable[..., torch.Tensor]) -> Callable[..., Scores]:
    """A metric function that returns :class:`Scores` named after it."""
    @functools.wraps(metric)
    def call(*args: Any, **kwargs: Any) -> Scores:
        values = metric(*args, **kwargs).as_subclass(Scores)
        values.metric = metric.__name__
        return values

    return call
