"""The memory budget: live-byte accounting on known allocations (analytic), the chunk
plan, and chunked against unchunked Lie derivatives (they must be equal)."""

from __future__ import annotations

import pytest
import torch

import layerlie as ll
import layerlie.measure.lie as lie
from layerlie.core.memory import Footprint, LiveBytes, peak_bytes, plan_chunks
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


def test_measured_footprint_predicts_a_larger_pass():
    """The linear model fitted on one image and two tangents predicts the peak of two
    images and four tangents within 25%."""
    model = timm_model("resnet18")
    x = ll.photos(model, n=2)[..., ::4, ::4].contiguous()
    f = lie.probabilities(model)
    tangents = torch.stack([ll.tangent(x, ll.group(g)) for g in ["translate_x", "rotate", "scale", "shear_x"]])
    fp, per_image = lie.footprint(f, x, tangents)
    measured = peak_bytes(lambda: lie.push_tangents(f, x, tangents))
    assert per_image and abs(fp.bytes(2, 4) / measured - 1) < 0.25, (fp, measured)


def test_chunked_equals_unchunked_and_a_tiny_budget_pushes_one_group_of_one_image(monkeypatch):
    model = timm_model("resnet18")
    x = ll.photos(model, n=3)[..., ::4, ::4].contiguous()
    groups = ["translate_x", "rotate", "saturate"]
    calls = []
    push = lie.push_tangents
    def spy(f, x0, tangents, fast=True):
        calls.append(tuple(tangents.shape[:2]))
        return push(f, x0, tangents, fast)

    monkeypatch.setattr(lie, "push_tangents", spy)
    whole = ll.lee(model, x, groups, memory_budget=float("inf"))
    assert calls == [(3, 3)]
    calls.clear()
    chunked = ll.lee(model, x, groups, memory_budget=1)
    assert calls == [(1, 1)] * 9
    assert rel(torch.tensor(chunked["lee"].values), torch.tensor(whole["lee"].values)) < TOL[torch.float32]
    calls.clear()
    default = ll.lie_derivative(small_cnn(), torch.randn(4, 3, 12, 12, dtype=torch.float64), groups)
    assert len(calls) >= 2 + 1 and default.shape == (3, 4, 5)  # the footprint's probes, then the chunks


def test_bad_budget_is_rejected():
    with pytest.raises(ll.LayerlieError, match="memory_budget must be a positive"):
        ll.lie_derivative(small_cnn(), torch.randn(1, 3, 8, 8, dtype=torch.float64), "rotate", memory_budget=0)
