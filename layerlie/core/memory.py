"""The memory plan: one meaning of ``memory_budget``, one footprint measure, one planner
(docs/design.md §7).

``memory_budget`` is the bytes of tensors a pass may hold at its peak beside its inputs, its
weights and the values it was given: what :class:`LiveBytes` counts. By default it is
:data:`FORWARDS` times what a no-grad forward of the same images holds. The footprint is that
count, taken where the pass can be seen:

- a callable (:func:`footprint`): measured on one image with one and with two tangents; a
  pass with ``k`` tangents of ``b`` images holds about ``b * (base + k * per_tangent)``;
  :func:`plan_chunks` picks the images and tangents of each pass;
- a graph (:func:`plan_sources`): each node's recorded value, alive from its node to its last
  user; a stack holds one copy of it per source entered above, so :func:`plan_sources` groups
  consecutive sources while the live stacks fit.

:func:`batches` cuts images into passes, whatever decided their size.

Example:
    >>> import torch
    >>> from layerlie.core.memory import LiveBytes
    >>> with LiveBytes() as live:
    ...     y = torch.ones(1024).mul(2).add(1)   # 4 KiB tensors, one at a time alive
    >>> live.peak <= 2 * 4096
    True
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from layerlie.core.engine import coarsest, propagate
from layerlie.errors import LayerlieError

FORWARDS = 3
"""The default ``memory_budget``, in no-grad forwards of the same images."""


def _tensors(tree: object) -> list[torch.Tensor]:
    # Forward-mode AD's zero tangents of the weights are storage-less placeholders.
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and not t._is_zerotensor()]


def storages(tree: object) -> dict[int, int]:
    """The bytes of each storage that the tensors of ``tree`` hold, by address (views count once)."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _tensors(tree)}


def nbytes(tree: object) -> int:
    """The bytes that the tensors of ``tree`` hold: the footprint measure of every plan."""
    return sum(storages(tree).values())


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
        inputs = storages((args, kwargs))
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


_FOOTPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def footprint(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tangents: torch.Tensor,
              fast: bool = False) -> tuple[Footprint, bool]:
    """The footprint per image of the engine's pass of ``f`` at ``x`` (its coarsest graph,
    :func:`layerlie.core.engine.coarsest`), measured on the first image and two tangents, and
    whether ``f`` keeps the batch axis (so that chunks of images can run apart).

    Cached by ``f`` (weakly), the image shape, dtype and device, and ``fast``.
    """
    where = (tuple(x.shape[1:]), x.dtype, x.device, fast)
    try:
        cache = _FOOTPRINTS.setdefault(f, {})
    except TypeError:  # not weakly referenceable: measured on every call
        cache = {}
    if where not in cache:
        gm, x1, t1 = coarsest(f), x[:1], tangents[:1, :1]
        with torch.no_grad():
            y = f(x1)
            fp = measure_footprint(lambda: f(x1), lambda: propagate(gm, x1, t1, fast=fast),
                                   lambda: propagate(gm, x1, t1.expand(2, *t1.shape[1:]), fast=fast))
        cache[where] = fp, y.ndim > 0 and y.shape[0] == 1
    return cache[where]


def check_budget(memory_budget: float | None) -> None:
    """A budget is a positive number of bytes, ``float("inf")`` or None (the default)."""
    if memory_budget is not None and not memory_budget > 0:
        raise LayerlieError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}; "
                            f"pass None for {FORWARDS} times a forward's memory, or float('inf') for no limit")


def budget_bytes(memory_budget: float | None, forward: float) -> float:
    """``memory_budget``, or by default :data:`FORWARDS` times ``forward``, the bytes a no-grad
    forward of the pass's images holds."""
    check_budget(memory_budget)
    return FORWARDS * forward if memory_budget is None else memory_budget


def batches(n: int, size: int | None) -> list[slice]:
    """``n`` images cut into passes of ``size`` (all of them when None)."""
    step = size or n
    if step < 1:
        raise LayerlieError(f"batch_size must be 1 or more, got {size}")
    return [slice(start, start + step) for start in range(0, n, step)]


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


class Lifetimes(NamedTuple):
    """A graph's recorded values as the planner sees them: ``live[i, j]`` is the bytes of node
    ``j``'s value where it is alive at node ``i`` (from ``j`` to its last user), else 0."""

    live: torch.Tensor

    @classmethod
    def of(cls, sizes: Sequence[int], last_use: Sequence[int]) -> Lifetimes:
        """From each node's bytes and the index of its last user (its own for none)."""
        i = torch.arange(len(sizes))
        alive = (i[:, None] >= i[None, :]) & (i[:, None] <= torch.tensor(list(last_use))[None, :])
        return cls(alive * torch.tensor(list(sizes), dtype=torch.float64)[None, :])

    @property
    def forward(self) -> float:
        """What a no-grad walk of the graph holds at its peak."""
        return float(self.live.sum(1).max()) if len(self.live) else 0.0

    def below(self) -> torch.Tensor:
        """``[i, p]``: the bytes that one stack slice entering at node ``p`` holds at node ``i``."""
        return self.live.flip(1).cumsum(1).flip(1)


def plan_sources(lifetimes: Lifetimes, at: Sequence[int], budget: float,
                 strict: bool = True) -> list[list[int]]:
    """Consecutive sources (graph indices ``at``, in order), as many per chunk as keep the live
    stacks under ``budget`` bytes: below a source, every live value holds one more slice, so
    sources late in the graph, where little is alive after them, share chunks more cheaply than
    early ones. A budget too small for one source is an error where the caller chose it
    (``strict``), and otherwise raised to what the first source needs. Returns positions in ``at``."""
    below = lifetimes.below()
    one = float(below[:, at[0]].max()) if len(at) else 0.0  # the first source costs the most
    if one > budget and strict:
        raise LayerlieError(f"memory_budget={budget:.0f} bytes is too small for one source "
                            f"({one:.0f} bytes of stacked tangents); raise it")
    budget = max(budget, one)
    chunks: list[list[int]] = []
    held = torch.zeros(len(below), dtype=torch.float64)
    for k, p in enumerate(at):
        grown = held + below[:, p]
        if chunks and float(grown.max()) <= budget:
            chunks[-1].append(k)
            held = grown
        else:
            chunks.append([k])
            held = below[:, p].clone()
    return chunks
