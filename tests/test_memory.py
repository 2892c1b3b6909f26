"""The memory plan: live-byte accounting on known allocations (analytic), the chunk plans of
images, groups and sources (analytic), and chunked against unchunked Lie derivatives (they must
be equal)."""

from __future__ import annotations

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
    assert peak_bytes(lambda: torch.empty(100, dtype=torch.float32)) == 400


def test_plan_takes_all_groups_per_image_first_then_splits_groups():
    fp = Footprint(forward=10, base=100, per_tangent=50)  # one image, k tangents: 100 + 50 k
    assert plan_chunks(fp, 8, 10, float("inf")) == (8, 10)
    assert plan_chunks(fp, 8, 10, 2 * 600) == (2, 10)
    assert plan_chunks(fp, 8, 10, 600) == (1, 10)
    assert plan_chunks(fp, 8, 10, 300) == (1, 4)
    assert plan_chunks(fp, 8, 10, 1) == (1, 1)


def test_budget_defaults_to_three_forwards_and_batches_cover_the_images():
    assert memory.budget_bytes(None, 100) == memory.FORWARDS * 100 == 300
    assert memory.budget_bytes(5.0, 100) == 5.0
    assert batches(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 6)] and batches(5, None) == [slice(0, 5)]
    with pytest.raises(ll.LayerlieError, match="batch_size must be 1 or more"):
        batches(5, -1)


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
    """The linear model fitted on one image and two tangents predicts the peak of two
    images and four tangents within 25%."""
    model = timm_model("resnet18")
    x = ll.photos(model, n=2)[..., ::4, ::4].contiguous()
    f = lie.probabilities(model)
    tangents = torch.stack([ll.tangent(x, ll.group(g)) for g in ["translate_x", "rotate", "scale", "shear_x"]])
    fp, per_image = memory.footprint(f, x, tangents, fast=True)
    measured = peak_bytes(lambda: propagate(coarsest(f), x, tangents, fast=True))
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
