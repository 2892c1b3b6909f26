"""The engine (layerlie.core.engine, docs/design.md §7): the ops that have a rule take it, not the
generic ``torch.func.jvp`` fallback, and the walk still equals ``torch.func.jvp`` of the model
(references)."""

from __future__ import annotations

import operator
from typing import Any

import timm
import torch
import torch.nn.functional as F

import layerlie as ll
from layerlie.core import engine
from layerlie.core.engine import Call, propagate
from layerlie.core.ops import Tangents
from layerlie.measure.lie import jvp_ready
from layerlie.testing import TOL, rel


def test_a_raw_vit_takes_the_rules_and_matches_jvp(monkeypatch):
    """A raw timm ViT (in-place ops and all): no matmul, layer norm, add or mul node goes to the
    generic jvp, and the walk equals ``torch.func.jvp`` of the model."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              num_classes=10).double().eval()
    gm = ll.trace(model)
    fallback = []
    generic = engine.jvp_stack

    def spy(call: Call, tangents: Tangents, fast: bool = False) -> Any:
        fallback.append(call.fn)
        return generic(call, tangents, fast)

    monkeypatch.setattr(engine, "jvp_stack", spy)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    tangents = torch.randn(2, 1, 3, 32, 32, dtype=torch.float64)
    _, got = propagate(gm, x, tangents)
    ruled = {operator.matmul, F.layer_norm, operator.add, operator.mul}
    assert not ruled & set(fallback), [f for f in fallback if f in ruled]
    with torch.no_grad(), jvp_ready(model):
        want = torch.stack([torch.func.jvp(model, (x,), (t,))[1] for t in tangents])
    assert rel(got, want) < TOL[torch.float64]
