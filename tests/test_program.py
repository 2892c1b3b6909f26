"""Programs: a pass captured once and replayed (docs/design.md §8).

references: the compiled pass (``torch.compile`` with a cheap backend) against the eager one, for
``lee`` and exact attribution. invariants of the cache and of replays, through a fake capture
backend that keeps the CUDA-graph contract on the CPU (inputs copied into static buffers, outputs
overwritten by every replay): hits, misses, the bound, the eager fallback, fresh inputs, and
outputs the next replay leaves alone. Each invariant is a check that also runs under an injected
fault, which it must catch.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import layerlie as ll
from layerlie.core import program
from layerlie.core.program import CaptureNote, Compiled, Programs, StaticReplay
from layerlie.testing import RTOL, rel, small_cnn, timm_model

GROUPS = "translate_x,rotate"


class HostSyncsFail(TorchDispatchMode):
    """Makes an op that reads a tensor's value on the host (``.item()``, ``bool(t)``, ``float(t)``)
    raise, as it does while a CUDA graph is being captured."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise RuntimeError(f"{func} syncs with the host")
        return func(*args, **(kwargs or {}))


class FakeGraph:
    """A capture backend with the CUDA-graph contract, on any device: the pass is recorded at
    static copies of the inputs, where a host sync fails, and a replay recomputes it from those
    buffers into the outputs recorded at capture. It counts captures and replays."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def __call__(self, fn: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> StaticReplay:
        self.captures += 1
        static = [t.detach().clone() for t in inputs]
        with HostSyncsFail():
            out = fn(*static)

        def launch() -> None:
            self.replays += 1
            for kept, new in zip(pytree.tree_leaves(out), pytree.tree_leaves(fn(*static))):
                kept.copy_(new)

        return StaticReplay(launch, static, out)


class Refusing:
    """A backend that cannot capture (as a CUDA graph refuses a host sync)."""

    def __init__(self) -> None:
        self.tries = 0

    def __call__(self, fn: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> StaticReplay:
        self.tries += 1
        raise RuntimeError("operation not permitted when stream is capturing")


def double(t: torch.Tensor) -> torch.Tensor:
    return 2 * t


def _runs(cache: Programs, backend: Any, *shapes: tuple[int, ...], device: str = "cpu") -> None:
    for shape in shapes:
        cache.run(double, (torch.ones(shape, device=device),), owner=double, key="double", backend=backend)


@pytest.fixture
def cnn() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return small_cnn(torch.float32), torch.randn(2, 3, 16, 16)


@pytest.fixture(autouse=True)
def fresh_cache():
    program.PROGRAMS.clear()
    yield
    program.PROGRAMS.clear()


@contextlib.contextmanager
def compiling() -> Iterator[None]:
    """Quiet dynamo's notes on the functorch calls it leaves to Python (graph breaks: the pass is
    still exact), and drop what it compiled afterwards."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Dynamo does not know how to trace")
        warnings.filterwarnings("ignore", category=UserWarning, module="torch._dynamo")
        try:
            yield
        finally:
            torch._dynamo.reset()


# --- references: compiled against eager -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case, groups", [("small_cnn", GROUPS), ("test_resnet", "translate_x")])
def test_compiled_lee_equals_eager(case, groups):
    """references: ``lee`` whose pass is compiled (``torch.compile``, eager backend) gives the eager
    numbers to :data:`RTOL` ``captured``: two groups (the engine's ``vmap`` of ``jvp``) on a small
    conv net, one (a plain ``jvp``) on a timm model."""
    model = small_cnn(torch.float32) if case == "small_cnn" else timm_model("test_resnet")
    x = F.interpolate(ll.photos(model, n=2), size=(32, 32), mode="bilinear") if case != "small_cnn" \
        else torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    eager = ll.lee(model, x, groups, capture=False)["lee"].to_numpy()
    with compiling():
        for _ in range(2):  # seen (eager), then compiled
            compiled = ll.lee(model, x, groups, capture=Compiled("eager"))["lee"].to_numpy()
            assert rel(torch.tensor(compiled), torch.tensor(eager)) <= RTOL["captured"]
    assert len(program.PROGRAMS) == 1


@pytest.mark.slow
@pytest.mark.parametrize("case", ["small_cnn", "test_resnet"])
def test_compiled_exact_attribution_equals_eager(case):
    """references: exact attribution whose propagation of the defects is compiled gives the
    eager contributions and total to :data:`RTOL` ``captured``."""
    model = small_cnn(torch.float32) if case == "small_cnn" else timm_model("test_resnet")
    x = F.interpolate(ll.photos(model, n=1), size=(32, 32), mode="bilinear")
    gm = ll.trace(model, x)
    eager = ll.attribute(gm, x, "translate_x", capture=False)
    with compiling():
        for _ in range(2):  # seen (eager), then compiled
            compiled = ll.attribute(gm, x, "translate_x", capture=Compiled("eager"))
    assert len(program.PROGRAMS) >= 1
    a, b = (torch.tensor(t.nodes["contribution_norm"].to_numpy()) for t in (compiled, eager))
    assert rel(a, b) <= RTOL["captured"]
    assert compiled.residual <= ll.testing.TOL[torch.float32]


# --- the measurements through a capture backend -----------------------------------------------


def test_lee_replayed_equals_eager_and_new_images_give_new_numbers(cnn):
    """invariants: ``lee`` through the fake CUDA graph equals eager on the images of every call,
    including new images replayed through buffers captured with the old ones."""
    model, x = cnn
    fake = FakeGraph()
    for images in (x, x + 0.5, x.flip(-1)):
        got = ll.lee(model, images, GROUPS, capture=fake)["lee"]
        want = ll.lee(model, images, GROUPS, capture=False)["lee"]
        assert rel(torch.tensor(got.to_numpy()), torch.tensor(want.to_numpy())) <= RTOL["captured"]
    assert (fake.captures, fake.replays) == (1, 2)


def test_lie_derivative_keys_on_group_count_and_batch(cnn):
    """invariants: the number of groups and the batch are part of the key; groups of one count
    share a program (their tangents are inputs) and give their own numbers."""
    model, x = cnn
    fake = FakeGraph()
    for groups, images in [(GROUPS, x), (GROUPS, x), ("translate_y,scale", x), ("translate_x", x),
                           ("translate_x", x), (GROUPS, x[:1]), (GROUPS, x[:1])]:
        got = ll.lie_derivative(model, images, groups.split(","), capture=fake)
        want = ll.lie_derivative(model, images, groups.split(","), capture=False)
        assert rel(got, want) <= RTOL["captured"]
    assert fake.captures == 3


def test_exact_attribution_replayed_equals_eager():
    """invariants: exact attribution through the fake CUDA graph: the same contributions, a
    completeness residual as small, and new images give their own numbers."""
    model = small_cnn(torch.float32)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    gm = ll.trace(model, x)
    fake = FakeGraph()
    for images in (x, x, x + 0.5):
        got = ll.attribute(gm, images, "translate_x", capture=fake)
        want = ll.attribute(gm, images, "translate_x", capture=False)
        a, b = (torch.tensor(t.nodes["contribution_norm"].to_numpy()) for t in (got, want))
        assert rel(a, b) <= RTOL["captured"]
        assert got.residual <= ll.testing.TOL[torch.float32]
    assert (fake.captures, fake.replays) == (1, 2)


def test_capture_defaults_by_device():
    """The default captures on CUDA only; True asks for the device's capturing backend."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert program.backend(None, cpu) is program.eager and program.backend(None, cuda) is program.cuda_graph
    assert program.backend(False, cuda) is program.eager
    assert program.backend(True, cuda) is program.cuda_graph and isinstance(program.backend(True, cpu), Compiled)
    with pytest.raises(ll.LayerlieError, match="unknown capture backend 'graph'; valid capture backends: compile"):
        program.backend("graph", cpu)


def test_cuda_graph_on_cpu_tensors_falls_back_with_one_note(cnn):
    """A CUDA graph of CPU tensors is refused: the pass runs eagerly, with one note."""
    model, x = cnn
    want = ll.lie_derivative(model, x, "rotate", capture=False)
    with pytest.warns(CaptureNote, match="could not be captured .*a CUDA graph needs CUDA tensors") as notes:
        for _ in range(3):
            assert rel(ll.lie_derivative(model, x, "rotate", capture="cuda_graph"), want) == 0
    assert len(notes) == 1


# --- the cache's invariants, each also under the fault it must catch --------------------------


def check_hits_and_misses(cache: Programs) -> None:
    """A key is captured once (after one eager run) and then replayed; a new shape or device is
    a new key."""
    fake = FakeGraph()
    _runs(cache, fake, (2,), (2,), (2,), (2,))
    assert (fake.captures, fake.replays) == (1, 3), "the same key should be captured once, then replayed"
    _runs(cache, fake, (3,), (3,))
    _runs(cache, fake, (2,), (2,), device="meta")
    assert fake.captures == 3, "a new shape or device should be a new program"


def check_bounded(cache: Programs) -> None:
    """At most ``maxsize`` programs; the least recently used goes first."""
    fake = FakeGraph()
    for shape in [(1,), (2,), (3,)]:
        _runs(cache, fake, shape, shape)
    assert len(cache) == cache.maxsize == 2, "the cache should hold at most maxsize programs"
    _runs(cache, fake, (3,))
    assert fake.captures == 3, "a recent key should still be held"
    _runs(cache, fake, (1,), (1,))
    assert fake.captures == 4, "the oldest key should have been evicted"


def check_failure_remembered(cache: Programs) -> None:
    """A capture that fails runs eagerly, with one note, and is not tried again."""
    refusing = Refusing()
    with pytest.warns(CaptureNote, match="could not be captured") as notes:
        for _ in range(4):
            out = cache.run(double, (torch.ones(2),), owner=double, key="double", backend=refusing)
            assert torch.equal(out, torch.full((2,), 2.0)), "the eager fallback should give the pass's value"
    assert refusing.tries == 1 and len(notes) == 1, "a failed capture should be remembered"


def check_fresh_inputs(cache: Programs) -> None:
    """A replay computes on its own inputs, not on those the program was captured with."""
    fake = FakeGraph()
    for value in (1.0, 1.0, 5.0, -3.0):
        out = cache.run(double, (torch.full((2,), value),), owner=double, key="double", backend=fake)
        assert torch.equal(out, torch.full((2,), 2 * value)), "a replay should read its new inputs"


def check_outputs_kept(cache: Programs) -> None:
    """An output handed to the caller is not overwritten by the next replay."""
    fake = FakeGraph()
    outs = [cache.run(double, (torch.full((2,), v),), owner=double, key="double", backend=fake)
            for v in (1.0, 2.0, 3.0)]
    assert [o[0].item() for o in outs] == [2.0, 4.0, 6.0], "a later replay should not change earlier outputs"


def check_uncaptured_where_not_replayed(cache: Programs) -> None:
    """The eager form of a pass runs where it is not replayed: a key's first run and after a
    failed capture; the captured form only inside the program."""
    ran: list[str] = []

    def pass_as(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda t: ran.append(name) or 2 * t

    for backend in (FakeGraph(), Refusing()):
        ran.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CaptureNote)
            for _ in range(3):
                cache.run(pass_as("captured"), (torch.ones(2),), owner=pass_as, key=type(backend).__name__,
                          backend=backend, uncaptured=pass_as("eager"))
        want = ["eager", "captured", "captured", "captured"] if isinstance(backend, FakeGraph) else ["eager"] * 3
        assert ran == want, f"{type(backend).__name__}: ran {ran}, expected {want}"


CHECKS = [check_hits_and_misses, check_bounded, check_failure_remembered, check_fresh_inputs, check_outputs_kept,
          check_uncaptured_where_not_replayed]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_cache_invariants(check):
    check(Programs(maxsize=2))


def _ignores_shapes(self: Programs, fn, inputs, *, owner, key, backend):
    full = (key, backend)  # the fault: shapes and devices left out of the key
    program_ = self._entries.get(full)
    if program_ is None:
        program_ = self._capture(fn, inputs, backend, full)
    return program_(*inputs)


_run = Programs.run


def _drops_uncaptured(self: Programs, fn, inputs, *, owner, key, backend, uncaptured=None):
    return _run(self, fn, inputs, owner=owner, key=key, backend=backend)  # the fault: one form for all


def _skips_copy(self: StaticReplay, *inputs):
    self.launch()  # the fault: the static buffers keep the inputs of the capture
    return program._clone(self.out)


FAULTS = {
    check_hits_and_misses: lambda mp: mp.setattr(Programs, "run", _ignores_shapes),
    check_bounded: lambda mp: mp.setattr(Programs, "_evict", lambda self, table: None),
    check_failure_remembered: lambda mp: mp.setattr(program, "_FAILED", None),
    check_fresh_inputs: lambda mp: mp.setattr(StaticReplay, "__call__", _skips_copy),
    check_outputs_kept: lambda mp: mp.setattr(program, "_clone", lambda out: out),
    check_uncaptured_where_not_replayed: lambda mp: mp.setattr(Programs, "run", _drops_uncaptured),
}


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_each_check_catches_its_fault(check, monkeypatch):
    """Each invariant's check fails when the fault it guards against is put in."""
    FAULTS[check](monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureNote)
        with pytest.raises((AssertionError, RuntimeError)):
            check(Programs(maxsize=2))


def test_programs_go_with_their_owner():
    """The owner is held weakly: its programs are dropped when it is collected."""
    cache = Programs()
    fake = FakeGraph()
    owner = torch.nn.Identity()
    for _ in range(2):
        cache.run(double, (torch.ones(2),), owner=owner, key="k", backend=fake)
    assert len(cache) == 1
    del owner
    gc.collect()
    assert len(cache) == 0


def test_shares_replayed_equal_eager():
    """invariants: the shares estimator's reverse pass through the fake CUDA graph gives the eager
    shares, and new images their own."""
    model = small_cnn(torch.float32)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    gm = ll.trace(model, x)
    fake = FakeGraph()
    for images in (x, x, x + 0.5):
        got = ll.attribute(gm, images, "translate_x", estimator="shares", capture=fake)
        want = ll.attribute(gm, images, "translate_x", estimator="shares", capture=False)
        assert rel(torch.tensor(got.nodes["share"].to_numpy()), torch.tensor(want.nodes["share"].to_numpy())) \
            <= RTOL["captured"]
    assert (fake.captures, fake.replays) == (1, 2)


@pytest.mark.parametrize("name", ["resnet10t", pytest.param("vit_tiny_patch16_224", marks=pytest.mark.slow)])
def test_passes_hold_no_host_sync(name):
    """invariants: the passes that a program captures (``lee``'s, exact attribution's propagation of
    the defects, the shares' reverse pass) read no value on the host, so a CUDA graph can hold
    them: each is captured by the fake graph, where a host sync fails (warnings are errors here,
    so a capture note would fail the test)."""
    model = timm_model(name, **({"img_size": 32} if name.startswith("vit") else {}))
    x = F.interpolate(ll.photos(model, n=1), size=(32, 32), mode="bilinear")
    gm = ll.trace(model, x)
    for run in (lambda c: ll.lee(model, x, GROUPS, capture=c),
                lambda c: ll.attribute(gm, x, "translate_x", capture=c, memory_budget=float("inf")),
                lambda c: ll.attribute(gm, x, "translate_x", estimator="shares", capture=c)):
        fake = FakeGraph()
        for _ in range(2):
            run(fake)
        assert fake.captures == 1


class Branching(torch.nn.Module):
    """A model whose forward branches on a value: its pass cannot be captured."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = h.relu() if h.mean() > 0 else h.tanh()
        return self.head(h.mean((2, 3)))


def test_a_pass_that_syncs_runs_eagerly_with_one_note():
    """A pass with data-dependent control flow fails to capture: ``lee`` gives the eager numbers,
    with one note naming the cause, and capture is not tried again."""
    model, x = Branching().eval(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    want = ll.lee(model, x, GROUPS, capture=False)["lee"].to_numpy()
    fake = FakeGraph()
    with pytest.warns(CaptureNote, match="could not be captured .*syncs with the host") as notes:
        for _ in range(4):
            got = ll.lee(model, x, GROUPS, capture=fake)["lee"].to_numpy()
            assert rel(torch.tensor(got), torch.tensor(want)) == 0
    assert len(notes) == 1 and fake.captures == 1
