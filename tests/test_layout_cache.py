"""The value-and-layout pass runs once per (graph, input shape, dtype, device): measurements on
the same graph and images read its layouts back (analytic: pass counts), and read them back
unchanged (references: the stored layouts equal a fresh inference)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import layerlie as ll
from layerlie.core.layout import LayoutProp


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2, padding=1),
                         nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()


@pytest.fixture
def inferred(monkeypatch) -> list[str]:
    """The nodes whose layout the pass infers (``LayoutProp.infer``), in order."""
    names: list[str] = []
    infer = LayoutProp.infer

    def counting(self, n, out):
        names.append(n.name)
        return infer(self, n, out)

    monkeypatch.setattr(LayoutProp, "infer", counting)
    return names


def test_with_aliasing_after_attribute_does_not_run_the_pass_again(inferred):
    gm, x = ll.trace(_net()), torch.randn(1, 3, 32, 32)
    a = ll.attribute(gm, x, "rotate", estimator="shares")
    assert inferred
    count = len(inferred)
    ll.with_aliasing(a, gm, x)
    ll.infer_layouts(gm, x)
    assert len(inferred) == count
    ll.aliasing(gm, torch.randn(1, 3, 48, 48))
    assert len(inferred) > count


def test_stored_layouts_equal_a_fresh_pass():
    gm, x = ll.trace(_net()), torch.randn(2, 3, 32, 32)
    stored = ll.infer_layouts(gm, x)
    assert ll.infer_layouts(gm, x) == stored == ll.infer_layouts(ll.trace(_net()), x)
    assert ll.infer_layouts(gm, x[:1]) == stored  # another key: inferred again, the same layouts


def test_a_rewritten_graph_is_inferred_again(inferred):
    """Surgery changes the layouts below what it replaces: they are not read back."""
    gm, x = ll.trace(_net()), torch.randn(1, 3, 32, 32)
    ll.infer_layouts(gm, x)
    new = ll.antialias(gm, example=x)
    count = len(inferred)
    ll.infer_layouts(new, x)
    assert len(inferred) > count
