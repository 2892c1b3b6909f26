"""The memory plan: one meaning of ``memory_budget``, one footprint measure, one planner
(docs/design.md §7).

``memory_budget`` is the bytes a pass may add to the device's resident memory at its peak,
beside its inputs, its weights and the values it was given. By default (:func:`budget_bytes`)
it is :data:`MARGIN` times what the device has free (:func:`free_bytes`), so a pass that fits
is never cut. A pass's resident bytes are counted by :func:`peak_bytes`: on the CPU, the
tensors alive after each op plus one scratch copy of the op's operands and results that the
pass created (:class:`LiveBytes`); on CUDA, also the caching allocator's own peak. The
footprint is that count, taken where the pass can be seen:

- a callable (:func:`footprint`): measured on one image with one, two and three tangents; a
  pass with ``k`` tangents of ``b`` images holds about
  ``b * max_i(base[i] + k * per_tangent[i])``, one line per operation; :func:`plan_chunks`
  picks the images and tangents of each pass;
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

import difflib
import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from layerlie.core.engine import coarsest, propagate
from layerlie.errors import LayerlieError

MARGIN = 0.5
"""The share of the device's free memory that the default ``memory_budget`` takes: the rest
covers what a pass's count cannot see (the host allocator's fragmentation, the CUDA allocator's
rounding, libraries' caches) and other processes that allocate while the pass runs."""

MEMINFO = "/proc/meminfo"
"""Where Linux says how much memory can be allocated without swapping (``MemAvailable``)."""


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
    ``trace`` holds, for each operation, a bound on what is resident while it runs: the total
    plus one scratch copy of every operand and result of the operation that the mode counts,
    which its kernel may hold unseen (a CPU backend reorders them into its own layouts, e.g.
    oneDNN's blocked formats); ``resident`` is its largest entry. Scratch copies of weights
    are left out: they are one at a time, whatever the number of images.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0
        self.trace: list[int] = []
        self.ops: list[str] = []

    @property
    def resident(self) -> int:
        """The largest resident bound of any operation (0 before the first)."""
        return max(self.trace, default=0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ptr, (ref, size) in list(self._live.items()):
            if ref.expired():
                del self._live[ptr]
                self.current -= size
        inputs = storages((args, kwargs))
        outputs = storages(out)
        for t in _tensors(out):
            storage = t.untyped_storage()
            ptr, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or ptr in self._live or ptr in inputs:
                continue
            self._live[ptr] = (StorageWeakRef(storage), size)
            self.current += size
        self.peak = max(self.peak, self.current)
        self.trace.append(self.current + sum(size for ptr, size in (inputs | outputs).items() if ptr in self._live))
        self.ops.append(str(func))
        return out


class Footprint(NamedTuple):
    """Resident bytes per image of a tangent pass (:func:`peak_bytes`), as lines in the number
    of tangents ``k``: the pass holds ``max_i(base[i] + k * per_tangent[i])`` per image, one line
    per operation (what is alive there grows with ``k`` at its own rate). A pass with one
    tangent can take other operations: ``one`` is its peak when measured. ``forward`` is the
    peak of a no-grad forward, the unit to state a budget in."""

    forward: int
    base: torch.Tensor | float
    per_tangent: torch.Tensor | float
    one: float | None = None

    def per_image(self, tangents: int) -> float:
        """The predicted peak of one image's pass with ``tangents`` tangents."""
        if tangents == 1 and self.one is not None:
            return self.one
        lines = torch.as_tensor(self.base, dtype=torch.float64) + tangents * torch.as_tensor(
            self.per_tangent, dtype=torch.float64)
        return float(lines.max())

    def bytes(self, images: int, tangents: int) -> float:
        """The predicted peak of a pass with ``tangents`` tangents of ``images`` images."""
        return images * self.per_image(tangents)

    def tangents_within(self, budget: float, most: int) -> int:
        """The most tangents, up to ``most``, that one image's pass may push under ``budget``
        bytes (0 if none)."""
        base = torch.as_tensor(self.base, dtype=torch.float64)
        slope = torch.as_tensor(self.per_tangent, dtype=torch.float64).expand_as(base)
        if bool((base > budget).any()):
            return 0
        rising = slope > 0
        fit = ((budget - base[rising]) / slope[rising]).floor().min() if bool(rising.any()) else most
        return int(min(fit, most))


def _profile(fn: Callable[[], object], device: torch.device) -> tuple[LiveBytes, int]:
    """What ``fn()`` holds resident: :class:`LiveBytes`' record, and on CUDA the caching
    allocator's peak beyond what was allocated before (its peak statistic is reset for it)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with LiveBytes() as live:
        fn()
    if not cuda:
        return live, 0
    torch.cuda.synchronize(device)
    return live, torch.cuda.max_memory_allocated(device) - before


def peak_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """The resident bytes that ``fn()`` adds on ``device`` at its peak (docs/design.md §7):
    :class:`LiveBytes`' ``resident`` bound, and on CUDA at least the caching allocator's peak."""
    live, allocator = _profile(fn, torch.device(device))
    return max(live.resident, allocator)


def measure_footprint(forward: Callable[[], object], push: Callable[[int], object],
                      device: torch.device | str = "cpu") -> Footprint:
    """Measure a footprint on one image, on ``device``: a no-grad forward, and ``push(k)``, the
    pass with ``k`` tangents, for ``k = 1, 2, 3`` (docs/design.md §7). Each operation's resident
    bound with two and with three tangents gives its line (the difference is the cost of one
    more tangent there), and so do the peaks, and on CUDA the allocator's peaks; a pass with one
    tangent can take other operations, so its peak is kept apart."""
    device = torch.device(device)
    (l1, c1), (l2, c2), (l3, c3) = (_profile(lambda: push(k), device) for k in (1, 2, 3))
    # The same operation in both passes: a third tangent can add a few views between them.
    same = difflib.SequenceMatcher(None, l2.ops, l3.ops, autojunk=False).get_matching_blocks()
    pairs = [(l2.trace[i + d], l3.trace[j + d]) for i, j, n in same for d in range(n)]
    second = torch.tensor([l2.resident, c2] + [a for a, _ in pairs], dtype=torch.float64)
    third = torch.tensor([l3.resident, c3] + [b for _, b in pairs], dtype=torch.float64)
    per_tangent = (third - second).clamp(min=0)  # more tangents never hold less: a drop is noise
    return Footprint(forward=max(peak_bytes(forward, device), 1), base=second - 2 * per_tangent,
                     per_tangent=per_tangent, one=float(max(l1.resident, c1)))


_FOOTPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def footprint(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tangents: torch.Tensor,
              fast: bool = False) -> tuple[Footprint, bool]:
    """The footprint per image of the engine's pass of ``f`` at ``x`` (its coarsest graph,
    :func:`layerlie.core.engine.coarsest`), measured on the first image and up to three tangents
    (:func:`measure_footprint`), and
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
            # The tangents are made inside, as a pass's caller makes them: they are resident too.
            fp = measure_footprint(lambda: f(x1), lambda k: propagate(gm, x1, t1.expand(k, *t1.shape[1:]).clone(),
                                                                      fast=fast), x.device)
        cache[where] = fp, y.ndim > 0 and y.shape[0] == 1
    return cache[where]


def check_budget(memory_budget: float | None) -> None:
    """A budget is a positive number of bytes, ``float("inf")`` or None (the default)."""
    if memory_budget is not None and not memory_budget > 0:
        raise LayerlieError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}; "
                            f"pass None for {MARGIN:g} of the device's free memory, or float('inf') for no limit")


def free_bytes(device: torch.device | str) -> float:
    """The bytes ``device`` can still give (docs/design.md §7): on CUDA, the driver's free
    memory plus what PyTorch's allocator holds unused; on the CPU, the kernel's
    ``MemAvailable`` (:data:`MEMINFO`), or psutil's where there is no such file; elsewhere,
    or where neither can be read, no limit (``inf``)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return math.inf
    try:
        with open(MEMINFO) as f:
            kib = next((int(line.split()[1]) for line in f if line.startswith("MemAvailable:")), None)
        if kib is not None:
            return 1024.0 * kib
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return math.inf
    return float(psutil.virtual_memory().available)


def budget_bytes(memory_budget: float | None, device: torch.device | str) -> float:
    """``memory_budget``, or by default :data:`MARGIN` times what ``device`` has free
    (:func:`free_bytes`), read when the pass is planned (docs/design.md §7)."""
    check_budget(memory_budget)
    return MARGIN * free_bytes(device) if memory_budget is None else memory_budget


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
    return 1, max(1, footprint.tangents_within(budget, tangents))


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
