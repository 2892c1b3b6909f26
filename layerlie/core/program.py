"""A pass captured once and replayed (docs/design.md §8).

The engine's passes are pure functions of tensors with static shapes: ``propagate(gm, x, t)``
of a graph at one input shape, dtype and device. On a GPU such a pass is bound by the host,
which issues hundreds of small kernels and runs the rules' Python for each. A *program* is the
pass captured once by a backend and then replayed for every batch of the same key:

- ``"cuda_graph"`` (CUDA only): the pass is recorded as a CUDA graph on static input buffers;
  a replay copies the inputs into them, launches the graph, and returns clones of the outputs;
- ``"compile"``: ``torch.compile`` (opt-in: on the CPU inductor compiles for minutes and the
  pass gains nothing, benchmarks/RESULTS.md);
- ``"eager"``: the pass itself, as it runs without a program.

Programs are kept in a small LRU cache (:data:`CACHE_SIZE`) keyed by the pass's owner (held
weakly: the model or callable), what the caller says fixes the pass, the inputs' shapes, dtypes
and devices, and the backend. A key runs eagerly the first time it is seen
(:data:`SEEN_BEFORE_CAPTURE`) and is captured the next. A pass that cannot be captured (a host
sync such as ``.item()``, control flow on data, an op the backend refuses) runs eagerly with one
:class:`CaptureNote`, and the key remembers it, so capture is not tried again.

Example:
    >>> import torch
    >>> cache = Programs()
    >>> double = lambda t: 2 * t
    >>> cache.run(double, (torch.ones(2),), owner=double, key="double", backend="eager")
    tensor([2., 2.])
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils import _pytree as pytree

from layerlie.core.registry import Registry
from layerlie.errors import LayerlieError, Note, note

CACHE_SIZE = 8
"""Programs kept at once. A CUDA graph holds the memory of its pass between replays, so the
cache is small: enough for the passes of a few models, shapes and group counts in turn."""

SEEN_BEFORE_CAPTURE = 1
"""Eager runs of a key before it is captured: a pass that runs once (a one-off call, a model
copied for each call) never pays for a capture, which costs a few passes."""

WARMUP = 2
"""Eager runs of a pass before its CUDA graph is captured, on a side stream: lazy
initialisation (cuDNN's algorithm search, the allocator's first blocks) stays out of the graph."""

Replay = Callable[..., Any]


class Backend(Protocol):
    """Captures ``fn`` at example ``inputs`` and returns the function that replays it on new inputs
    of the same shapes; raises where the pass cannot be captured."""

    def __call__(self, fn: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> Replay: ...


class CaptureNote(Note):
    """A pass could not be captured and runs eagerly (docs/design.md §8)."""


def _clone(out: Any) -> Any:
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)


@dataclass(eq=False)
class StaticReplay:
    """The replay of a pass recorded on static buffers (docs/design.md §8): ``inputs`` are copied
    into ``static``, ``launch()`` recomputes ``out`` in place, and the caller gets clones of
    ``out``. The clones are small next to the pass (logits for ``lee``, a stack of output
    tangents for attribution), and the next replay overwrites ``out``, which a caller who kept it
    would see change under them."""

    launch: Callable[[], None]
    static: Sequence[torch.Tensor]
    out: Any

    def __call__(self, *inputs: torch.Tensor) -> Any:
        for buffer, t in zip(self.static, inputs):
            if buffer is not t:
                buffer.copy_(t)
        self.launch()
        return _clone(self.out)


def eager(fn: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> Replay:
    """The pass itself: nothing is captured."""
    return fn


def cuda_graph(fn: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> Replay:
    """``fn`` recorded as a CUDA graph on static copies of ``inputs`` (docs/design.md §8).

    It runs :data:`WARMUP` times on a side stream, the last time with host syncs made errors
    (``torch.cuda.set_sync_debug_mode``), so that a pass that would break the capture (``.item()``,
    a copy to the host) fails before it; then once under ``torch.cuda.graph`` on the same stream,
    whose per-stream handles (cuBLAS) the warm-up has made. A replay is a :class:`StaticReplay` of
    ``graph.replay``. The graph reads the weights where they are now: change them in place
    (``load_state_dict``, an optimizer step), or key the pass on their storage.
    """
    if not inputs or not all(t.is_cuda for t in inputs):
        raise LayerlieError("a CUDA graph needs CUDA tensors")
    with torch.cuda.device(inputs[0].device):
        static = [t.detach().clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(WARMUP):
                with _host_syncs_fail(i == WARMUP - 1):
                    fn(*static)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            out = fn(*static)
        torch.cuda.current_stream().wait_stream(side)
    return StaticReplay(graph.replay, static, out)


@contextlib.contextmanager
def _host_syncs_fail(on: bool) -> Iterator[None]:
    """Make an op that waits for the device raise, for the duration (when ``on``)."""
    saved = torch.cuda.get_sync_debug_mode()
    if on:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(saved)


@dataclass(frozen=True)
class Compiled:
    """``torch.compile`` of the pass with ``backend`` and ``mode``, compiled at capture so that
    a failure to compile is a failure to capture (docs/design.md §8)."""

    backend: str = "inductor"
    mode: str | None = None

    def __call__(self, fn: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> Replay:
        compiled = torch.compile(fn, backend=self.backend, mode=self.mode, dynamic=False)
        compiled(*inputs)
        return compiled


_BACKENDS: Registry[Backend] = Registry("capture backend")


def register_backend(name: str, backend: Backend) -> Backend:
    """Add ``backend`` under ``name``, so that ``capture=name`` selects it (docs/design.md §8)."""
    _BACKENDS.add(name, backend)
    return backend


def list_backends() -> list[str]:
    """The names of the registered capture backends, sorted."""
    return _BACKENDS.names()


register_backend("eager", eager)
register_backend("cuda_graph", cuda_graph)
register_backend("compile", Compiled())

Capture = bool | str | Backend | None
"""The ``capture`` option of the measurements (docs/design.md §8): None, the device's default
(``"cuda_graph"`` on CUDA, ``"eager"`` elsewhere); False, ``"eager"``; True, the device's capturing
backend (``"cuda_graph"`` on CUDA, ``"compile"`` elsewhere); a registered name; or a backend."""


def backend(capture: Capture, device: torch.device) -> Backend:
    """The backend that ``capture`` selects on ``device`` (see :data:`Capture`, docs/design.md §8)."""
    if capture is None or isinstance(capture, bool):
        if capture is False or (capture is None and device.type != "cuda"):
            return eager
        capture = "cuda_graph" if device.type == "cuda" else "compile"
    if isinstance(capture, str):
        return _BACKENDS.get(capture)
    if callable(capture):
        return capture
    raise LayerlieError(f"capture must be None, a bool, a backend name ({', '.join(list_backends())}) or a "
                        f"backend, got {type(capture).__name__}")


def captures(capture: Capture, device: torch.device) -> bool:
    """Whether ``capture`` on ``device`` runs a pass from a captured program (not eagerly)."""
    return backend(capture, device) is not eager


class _Failed:
    """A key whose capture failed: its pass runs eagerly."""


_FAILED = _Failed()


class Programs:
    """An LRU cache of captured passes, at most ``maxsize`` (docs/design.md §8).

    A key is ``(owner, key, the inputs' shapes, dtypes and devices, backend)``; the owner is held
    weakly, and its programs go when it does. A pass that fails to capture runs eagerly with one
    :class:`CaptureNote`, and its key remembers the failure.
    """

    def __init__(self, maxsize: int = CACHE_SIZE) -> None:
        self.maxsize = maxsize
        self._entries: OrderedDict[Hashable, Replay | _Failed] = OrderedDict()
        self._owners: dict[int, weakref.ref] = {}
        self._seen: OrderedDict[Hashable, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every program (a CUDA graph's memory is freed with it)."""
        self._entries.clear()
        self._seen.clear()

    def run(self, fn: Callable[..., Any], inputs: Sequence[torch.Tensor], *, owner: object, key: Hashable,
            backend: Backend | str, uncaptured: Callable[..., Any] | None = None) -> Any:
        """``fn(*inputs)``, replayed from the program of this key, captured once the key has run
        eagerly :data:`SEEN_BEFORE_CAPTURE` times.

        Args:
            fn: a pure function of ``inputs`` with static shapes; called only to capture it.
            inputs: its tensors.
            owner: what the pass belongs to (a model, a graph); held weakly.
            key: whatever besides the inputs' shapes fixes the pass (hashable).
            backend: a backend or its registered name.
            uncaptured: what runs where the pass is not replayed (the first run of a key, the eager
                backend, a failed capture): the same function, perhaps done another way that is
                cheaper eagerly (``fn`` by default).
        """
        capture = _BACKENDS.get(backend) if isinstance(backend, str) else backend
        uncaptured = uncaptured or fn
        if capture is eager:
            return uncaptured(*inputs)
        full = (self._owner(owner), key, tuple((tuple(t.shape), t.dtype, t.device) for t in inputs), capture)
        program = self._entries.get(full)
        if program is None:
            if self._seen.get(full, 0) < SEEN_BEFORE_CAPTURE:
                self._seen[full] = self._seen.pop(full, 0) + 1
                self._evict(self._seen)
                return uncaptured(*inputs)
            del self._seen[full]
            program = self._capture(fn, inputs, capture, full)
        else:
            self._entries.move_to_end(full)
        return uncaptured(*inputs) if program is _FAILED else program(*inputs)

    def _capture(self, fn: Callable[..., Any], inputs: Sequence[torch.Tensor], capture: Backend,
                 full: Hashable) -> Replay | _Failed:
        try:
            program: Replay | _Failed = capture(fn, inputs)
        except Exception as err:  # any capture failure: the pass still runs, eagerly
            reason = " ".join(str(err).split())[:160] or type(err).__name__
            note(f"the pass could not be captured ({reason}); it runs eagerly from now on for these inputs",
                 CaptureNote)
            program = _FAILED
        self._entries[full] = program
        self._evict(self._entries)
        return program

    def _evict(self, table: OrderedDict) -> None:
        """Drop the least recently used keys of ``table`` beyond :attr:`maxsize`."""
        while len(table) > self.maxsize:
            table.popitem(last=False)

    def _owner(self, owner: object) -> Hashable:
        """A weak reference to ``owner`` whose death drops its programs (the object itself where it
        takes no weak reference)."""
        try:
            ref = self._owners.get(id(owner))
            if ref is None or ref() is not owner:
                ref = weakref.ref(owner, self._forget)
                self._owners[id(owner)] = ref
            return ref
        except TypeError:
            return owner

    def _forget(self, ref: weakref.ref) -> None:
        for table in (self._entries, self._seen):
            for full in [k for k in table if k[0] is ref]:
                del table[full]
        for i in [i for i, r in self._owners.items() if r is ref]:
            del self._owners[i]


PROGRAMS = Programs()
"""The cache that the measurements share."""


def run(fn: Callable[..., Any], inputs: Sequence[torch.Tensor], *, owner: object, key: Hashable,
        capture: Capture = None) -> Any:
    """``fn(*inputs)`` through the shared cache :data:`PROGRAMS`, on the backend that ``capture``
    selects on the inputs' device (:data:`Capture`, docs/design.md §8)."""
    return PROGRAMS.run(fn, inputs, owner=owner, key=key, backend=backend(capture, inputs[0].device))
