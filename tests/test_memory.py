"""The memory plan: live-byte accounting on known allocations (analytic), the chunk plans of
images, groups and sources (analytic), the default budget read from the device (analytic, with
the free memory's source replaced), the resident count against the process's peak (references,
in fresh processes), and chunked against unchunked Lie derivatives (they must be equal)."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import layerlie as ll
import layerlie.measure.lie as lie
from layerlie.core import memory
from layerlie.core.engine import coarsest, propagate
from layerlie.core.memory import Footprint, Lifetimes, LiveBytes, batches, peak_bytes, plan_chunks, plan_sources
from layerlie.testing import TOL, rel, small_cnn, timm_model


def test_live_bytes_counts_what_is_created_and_alive():
    x = torch.ones(1000, dtype=torch.float64)  # exists before: not counted
    with LiveBytes() as live:
        kept = x * 2                       # 8000 bytes, kept
        for _ in range(3):
            tmp = x + 1                    # 8000 bytes, replaced each time
        del tmp
        view = kept[:10]                   # a view: no new storage
        kept.add_(1)                       # in place: no new storage
    assert live.peak == 16000 + 8000 and live.current == 8000 and view.numel() == 10
    # Resident: the peak (kept, the old tmp and the new one) and a scratch copy of the new tmp (x existed before).
    assert live.resident == 24000 + 8000 and len(live.trace) == 6
    assert peak_bytes(lambda: torch.empty(100, dtype=torch.float32)) == 2 * 400  # the result, and its scratch


def test_plan_takes_all_groups_per_image_first_then_splits_groups():
    fp = Footprint(forward=10, base=100, per_tangent=50)  # one image, k tangents: 100 + 50 k
    assert plan_chunks(fp, 8, 10, float("inf")) == (8, 10)
    assert plan_chunks(fp, 8, 10, 2 * 600) == (2, 10)
    assert plan_chunks(fp, 8, 10, 600) == (1, 10)
    assert plan_chunks(fp, 8, 10, 300) == (1, 4)
    assert plan_chunks(fp, 8, 10, 1) == (1, 1)


def test_footprint_is_the_highest_of_its_lines():
    """analytic: one operation holds 400 bytes whatever the tangents, another 100 + 50 k; with
    k tangents the pass holds the higher of the two."""
    fp = Footprint(forward=10, base=torch.tensor([400.0, 100.0]), per_tangent=torch.tensor([0.0, 50.0]))
    assert fp.bytes(1, 2) == 400 and fp.bytes(3, 10) == 3 * 600
    assert fp.tangents_within(400, 10) == 6 and fp.tangents_within(399, 10) == 0 and fp.tangents_within(1e9, 10) == 10
    assert plan_chunks(fp, 8, 10, 500) == (1, 8)


def _meminfo(tmp_path, monkeypatch, kib: int) -> None:
    """Make the CPU's free memory read ``kib`` KiB, as Linux writes it in /proc/meminfo."""
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       {4 * kib} kB\nMemFree:        {kib // 2} kB\nMemAvailable:   {kib} kB\n")
    monkeypatch.setattr(memory, "MEMINFO", str(path))


def _check_default_budget(tmp_path, monkeypatch) -> None:
    """The default budget is the margin times the free memory, read in bytes, every time."""
    for kib in (1000, 5000):
        _meminfo(tmp_path, monkeypatch, kib)
        assert memory.free_bytes("cpu") == 1024 * kib
        assert memory.budget_bytes(None, "cpu") == memory.MARGIN * 1024 * kib < 1024 * kib


def test_default_budget_is_a_margin_of_the_free_memory(tmp_path, monkeypatch):
    _check_default_budget(tmp_path, monkeypatch)
    assert memory.budget_bytes(5.0, "cpu") == 5.0 and memory.budget_bytes(float("inf"), "cpu") == float("inf")
    assert batches(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 6)] and batches(5, None) == [slice(0, 5)]
    with pytest.raises(ll.LayerlieError, match="batch_size must be 1 or more"):
        batches(5, -1)


@pytest.mark.parametrize("fault", ["margin ignored", "KiB read as bytes"])
def test_the_default_budget_check_catches_a_fault(tmp_path, monkeypatch, fault):
    free = memory.free_bytes
    if fault == "margin ignored":
        monkeypatch.setattr(memory, "budget_bytes", lambda b, device: free(device) if b is None else b)
    else:
        monkeypatch.setattr(memory, "free_bytes", lambda device: free(device) / 1024)
    with pytest.raises(AssertionError):
        _check_default_budget(tmp_path, monkeypatch)


def test_free_memory_of_cuda_and_without_meminfo(monkeypatch):
    """CUDA: the driver's free bytes plus what the allocator keeps unused; no /proc/meminfo:
    psutil's; another device: no limit."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1000, 8000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 300)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100)
    assert memory.free_bytes("cuda") == 1000 + 300 - 100
    assert memory.free_bytes("meta") == float("inf")
    psutil = pytest.importorskip("psutil")
    monkeypatch.setattr(memory, "MEMINFO", "/nonexistent/meminfo")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: collections.namedtuple("Memory", "available")(12345))
    assert memory.free_bytes("cpu") == 12345


@pytest.mark.parametrize("allocator_peak", [100 + 10_000, 100 + 50])
def test_cuda_counts_the_allocators_peak_where_higher(monkeypatch, allocator_peak):
    """analytic, with the CUDA allocator's statistics replaced: the resident bytes of a pass
    are the allocator's peak beyond what it held before (100 bytes) where that is higher than
    the dispatch mode's count (400 bytes of a result and its scratch copy = 800)."""
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: allocator_peak)
    assert peak_bytes(lambda: torch.empty(100), "cuda") == max(allocator_peak - 100, 800)


def test_default_budget_follows_the_free_memory(tmp_path, monkeypatch):
    """Plenty free: one pass of every image and group; almost nothing free: one image and one
    group a pass, and the same numbers."""
    model = timm_model("resnet18")
    x = ll.photos(model, n=3)[..., ::4, ::4].contiguous()
    groups = ["translate_x", "rotate", "saturate"]
    calls = _passes(monkeypatch)
    _meminfo(tmp_path, monkeypatch, 64 * 2**20)
    whole = ll.lee(model, x, groups)
    assert calls == [(3, 3)]
    calls.clear()
    _meminfo(tmp_path, monkeypatch, 1)
    chunked = ll.lee(model, x, groups)
    assert calls == [(1, 1)] * 9
    assert rel(torch.tensor(chunked["lee"].values), torch.tensor(whole["lee"].values)) < TOL[torch.float32]


def test_source_plan_counts_the_live_stacks():
    """analytic: a chain of four nodes of 10 bytes, each alive until the next: a forward holds 20
    bytes; a source at node p holds a slice of every later value, two at once at most."""
    lt = Lifetimes.of([10, 10, 10, 10], [1, 2, 3, 3])
    assert lt.forward == 20 and lt.below()[:, 0].tolist() == [10, 20, 20, 20]
    assert plan_sources(lt, [0, 1, 2, 3], 80) == [[0, 1, 2, 3]]  # at node 3: 10 * 4 + 10 * 4
    assert plan_sources(lt, [0, 1, 2, 3], 40) == [[0, 1], [2, 3]]
    assert plan_sources(lt, [0, 1, 2, 3], 1, strict=False) == [[0], [1], [2], [3]]
    with pytest.raises(ll.LayerlieError, match="too small for one source"):
        plan_sources(lt, [0, 1, 2, 3], 1)


def test_measured_footprint_predicts_a_larger_pass():
    """The lines measured on one image and up to three tangents predict the resident bound of
    two images and four tangents (made inside, as a pass's caller makes them) within 25%."""
    model = timm_model("resnet18")
    x = ll.photos(model, n=2)[..., ::4, ::4].contiguous()
    f = lie.probabilities(model)
    tangents = torch.stack([ll.tangent(x, ll.group(g)) for g in ["translate_x", "rotate", "scale", "shear_x"]])
    fp, per_image = memory.footprint(f, x, tangents, fast=True)
    measured = peak_bytes(lambda: propagate(coarsest(f), x, tangents.clone(), fast=True))
    assert per_image and abs(fp.bytes(2, 4) / measured - 1) < 0.25, (fp, measured)


def _passes(monkeypatch) -> list[tuple[int, int]]:
    """``(tangents, images)`` of every pass of ``lee``, as the engine receives them."""
    calls = []

    def spy(gm, x0, tangents, fast):
        calls.append(tuple(tangents.shape[:2]))
        return propagate(gm, x0, tangents, fast=fast)

    monkeypatch.setattr(lie, "propagate", spy)
    return calls


def test_chunked_equals_unchunked_and_a_tiny_budget_pushes_one_group_of_one_image(monkeypatch):
    model = timm_model("resnet18")
    x = ll.photos(model, n=3)[..., ::4, ::4].contiguous()
    groups = ["translate_x", "rotate", "saturate"]
    calls = _passes(monkeypatch)
    whole = ll.lee(model, x, groups, memory_budget=float("inf"))
    assert calls == [(3, 3)]
    calls.clear()
    chunked = ll.lee(model, x, groups, memory_budget=1)
    assert calls == [(1, 1)] * 9
    assert rel(torch.tensor(chunked["lee"].values), torch.tensor(whole["lee"].values)) < TOL[torch.float32]
    calls.clear()
    default = ll.lie_derivative(small_cnn(), torch.randn(4, 3, 12, 12, dtype=torch.float64), groups)
    assert len(calls) >= 1 and default.shape == (3, 4, 5)


def test_batch_size_caps_the_planned_passes(monkeypatch):
    """``batch_size`` bounds the images of each pass that the planner picks; ``progress`` hears of
    each pass."""
    model = timm_model("resnet18")
    x = ll.photos(model, n=3)[..., ::4, ::4].contiguous()
    calls, done = _passes(monkeypatch), []
    ll.lee(model, x, ["translate_x", "rotate"], batch_size=2, memory_budget=float("inf"), progress=done.append)
    assert calls == [(2, 2), (2, 1)] and done == [2, 1]


def test_bad_budget_is_rejected():
    with pytest.raises(ll.LayerlieError, match="memory_budget must be a positive"):
        ll.lie_derivative(small_cnn(), torch.randn(1, 3, 8, 8, dtype=torch.float64), "rotate", memory_budget=0)


_PEAK = textwrap.dedent("""
    import sys, torch, layerlie as ll
    from layerlie.core import memory
    from layerlie.measure.lie import probabilities
    from layerlie.testing import timm_model
    name, size, groups = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    def kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    model = timm_model(name)
    x = ll.photos(model, n=2, size=size)
    with ll.jvp_ready(model):
        fp, _ = memory.footprint(probabilities(model), x, ll.tangent(x, ll.group(groups[0]))[None], fast=True)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak resident set restarts from the present one
    before = kib("VmRSS")
    ll.lee(model, x, groups, memory_budget=float("inf"))
    print(1024 * (kib("VmHWM") - before), fp.bytes(len(x), len(groups)))
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable VmHWM")
@pytest.mark.parametrize("name, size", [("resnet18", 96), ("convnext_atto", 96), ("vit_tiny_patch16_224", 224)])
def test_resident_count_bounds_the_process_peak(name, size):
    """reference: in a fresh process, the peak resident set that a whole-pass lee adds stays
    under the footprint's prediction, within the default budget's margin (the host allocator's
    free lists and fragmentation are what the count does not see)."""
    groups = "translate_x,rotate,scale,saturate"
    out = subprocess.run([sys.executable, "-c", _PEAK, name, str(size), groups], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    measured, predicted = map(float, out.stdout.split())
    assert 0 < measured <= predicted / memory.MARGIN, (measured, predicted)
