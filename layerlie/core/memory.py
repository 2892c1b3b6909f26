"""Measured memory footprints, and the chunk plan that keeps a tangent pass within a budget.

A forward-mode pass that pushes ``k`` tangents of ``b`` images through a model holds, at
its peak, about ``b * (base + k * per_tangent)`` bytes beside the inputs and weights: the
primal activations and one copy of them per tangent. The two numbers are measured, not
guessed: :class:`LiveBytes` counts the bytes of the tensors an operation creates and that
are still alive, and :func:`measure_footprint` runs one image through the pass with one
and with two tangents. :func:`plan_chunks` then picks the largest chunks that fit.

Example:
    >>> import torch
    >>> from layerlie.core.memory import LiveBytes
    >>> with LiveBytes() as live:
    ...     y = torch.ones(1024).mul(2).add(1)   # 4 KiB tensors, one at a time alive
    >>> live.peak <= 2 * 4096
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _tensors(tree: object) -> list[torch.Tensor]:
    # Forward-mode AD's zero tangents of the weights are storage-less placeholders.
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and not t._is_zerotensor()]


class LiveBytes(TorchDispatchMode):
    """Track the bytes of the storages created under the mode that are still referenced.

    Storages that existed before (inputs, weights) are not counted. ``peak`` is the
    largest total seen right after any operation; ``current`` the total at exit.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ptr, (ref, size) in list(self._live.items()):
            if ref.expired():
                del self._live[ptr]
                self.current -= size
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or ptr in self._live or ptr in inputs:
                continue
            self._live[ptr] = (StorageWeakRef(storage), size)
            self.current += size
        self.peak = max(self.peak, self.current)
        return out


class Footprint(NamedTuple):
    """Bytes per image of a tangent pass: ``base`` whatever the number of tangents, and
    ``per_tangent`` for each tangent pushed beside the others. ``forward`` is the peak of
    a no-grad forward, the unit of the default budget."""

    forward: int
    base: int
    per_tangent: int

    def bytes(self, images: int, tangents: int) -> int:
        """The predicted peak of a pass with ``tangents`` tangents of ``images`` images."""
        return images * (self.base + tangents * self.per_tangent)


def peak_bytes(fn: Callable[[], object]) -> int:
    """The peak of the bytes created and alive while ``fn()`` runs (see :class:`LiveBytes`)."""
    with LiveBytes() as live:
        fn()
    return live.peak


def measure_footprint(forward: Callable[[], object], one: Callable[[], object],
                      two: Callable[[], object]) -> Footprint:
    """Measure a footprint on one image: a no-grad forward, the pass with one tangent, and
    the pass with two (their difference is the cost of one more tangent)."""
    p0, p1, p2 = peak_bytes(forward), peak_bytes(one), peak_bytes(two)
    per_tangent = max(p2 - p1, 1)
    return Footprint(forward=max(p0, 1), base=max(p1 - per_tangent, 0), per_tangent=per_tangent)


def plan_chunks(footprint: Footprint, images: int, tangents: int, budget: float) -> tuple[int, int]:
    """``(images per chunk, tangents per chunk)``: all tangents together when one image's
    pass with all of them fits (a chunk of groups repeats the primal pass, a chunk of
    images does not), with as many images as fit; otherwise one image and as many tangents
    as fit. Never less than one of each, whatever the budget."""
    if footprint.bytes(images, tangents) <= budget:
        return images, tangents
    if footprint.bytes(1, tangents) <= budget:
        return max(1, int(budget // footprint.bytes(1, tangents))), tangents
    fit = int((budget - footprint.base) // footprint.per_tangent)
    return 1, max(1, min(tangents, fit))
