"""The estimators of the contributions ``c_v``, a registry (docs/method.md §4).

An estimator says how attribution runs, and so which check it reports:

- ``"forward"``: every defect ``e_v`` is propagated to the output, giving ``c_v`` itself;
  checked by completeness, ``||L F - sum_v c_v|| / ||L F||``.
- ``"reverse"``: one reverse pass from ``L F`` gives the signed shares
  ``<c_v, L F> / ||L F||^2``; checked by their sum, ``|sum_v share_v - 1|``.
- ``"probes"``: ``||c_v||^2 ~ mean_z (z^T J_{out<-v} e_v)^2`` over random probes ``z``, as
  Hutchinson's estimator; norms admit no check.

The built-ins are ``exact`` (forward), ``shares`` (reverse) and ``hutchinson`` (Gaussian
probes, as published). :func:`layerlie.attribute` takes any registered name.

Example:
    >>> import layerlie as ll
    >>> ll.get_estimator("shares").check
    'share-sum residual'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from layerlie.core.registry import Registry
from layerlie.errors import LayerlieError

Runs = Literal["forward", "reverse", "probes"]

_CHECKS: dict[str, str] = {"forward": "completeness residual", "reverse": "share-sum residual",
                           "probes": "not checkable"}


@dataclass(frozen=True)
class Estimator:
    """An estimator of the contributions ``c_v`` (docs/method.md §4).

    Attributes:
        name: registry name.
        runs: ``"forward"``, ``"reverse"`` or ``"probes"``: how attribution runs it.
        probe: for ``"probes"``, draws one probe ``z`` as ``probe(shape, dtype=, device=,
            generator=)``, the signature of :func:`torch.randn`, its default.
    """

    name: str
    runs: Runs
    probe: Callable[..., torch.Tensor] = torch.randn

    def __post_init__(self) -> None:
        if self.runs not in _CHECKS:
            raise LayerlieError(f"estimator {self.name!r}: runs must be one of {', '.join(_CHECKS)}, "
                                f"got {self.runs!r}")

    @property
    def check(self) -> str:
        """The name of the check it reports: the completeness residual, the share-sum
        residual, or ``"not checkable"``."""
        return _CHECKS[self.runs]

    @property
    def column(self) -> str:
        """The column of the attribution table that ranks the nodes: ``share`` for a
        reverse estimator, which gives no norms, else ``contribution_norm``."""
        return "share" if self.runs == "reverse" else "contribution_norm"


_ESTIMATORS: Registry[Estimator] = Registry("estimator")


def register_estimator(estimator: Estimator) -> Estimator:
    """Add ``estimator`` to the registry, so that :func:`layerlie.attribute` takes its name."""
    _ESTIMATORS.add(estimator.name, estimator)
    return estimator


def get_estimator(spec: str | Estimator) -> Estimator:
    """A registered estimator by name, or the estimator itself; an unknown name raises a
    :class:`LayerlieError` that lists the valid ones."""
    if isinstance(spec, Estimator):
        return spec
    return _ESTIMATORS.get(spec)


def list_estimators() -> list[str]:
    """The names of the registered estimators, sorted."""
    return _ESTIMATORS.names()


register_estimator(Estimator("exact", "forward"))
register_estimator(Estimator("shares", "reverse"))
register_estimator(Estimator("hutchinson", "probes"))
