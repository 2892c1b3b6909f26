"""Tangent propagation (docs/design.md §7): the whole walk against ``torch.func.jvp`` of the model
(references). Each op's own rule is checked against ``torch.func.jvp`` in test_ops.py."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
from torch import nn

import layerlie as ll
from layerlie.measure.lie import jvp_ready
from layerlie.core.engine import Call, linearize
from layerlie.testing import ATOL, TOL, rel, timm_model
from torch.utils import _pytree as pytree


K = 3  # tangents per stack: the rules must treat the stack axis as a batch of tangents


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def test_getitem_of_a_tuple_indexes_the_tangent_tuple():
    x = _randn(2, 6, 4)
    parts = x.chunk(2, dim=1)
    stacks = tuple(torch.randn((K, *p.shape), dtype=x.dtype) for p in parts)
    flat, spec = pytree.tree_flatten(((parts, 1), {}))
    call = Call(operator.getitem, [parts, 1], spec, parts[1])
    assert linearize(call, {0: stacks}, operator.getitem) is stacks[1]


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_walk_equals_jvp_of_the_model(name):
    """references: the propagated tangent stack equals ``torch.func.jvp`` of the traced model,
    slice by slice; the primal equals the model's output."""
    kwargs = {"img_size": 32} if name.startswith("vit") else {}
    model = timm_model(name, **kwargs)
    gm = ll.trace(model, softmax=False)
    x = torch.randn(1, 3, 32, 32)
    stack = torch.randn(K, *x.shape)
    out, tan = ll.propagate(gm, x, stack)
    with torch.no_grad(), jvp_ready(model):
        torch.testing.assert_close(out, model(x), rtol=TOL[torch.float32], atol=ATOL["logits"])
        for i in range(K):
            want = torch.func.jvp(model, (x,), (stack[i],))[1]
            assert rel(tan[i], want) < TOL[torch.float32]


def test_primal_reuse_and_injection():
    """With the primal given, ops are not re-run and the tangents are the same; an injected
    source adds to the tangent of its node exactly as an input tangent through the same path."""
    model = timm_model("resnet18")
    gm = ll.trace(model, softmax=False)
    x = torch.randn(1, 3, 32, 32)
    stack = torch.randn(2, *x.shape)
    keeper = ll.Propagator(gm, keep=True)
    out, tan = keeper.propagate(x, stack)
    again = ll.Propagator(gm, primal=keeper.values).propagate(x, stack)
    torch.testing.assert_close(again[1], tan, rtol=0, atol=0)
    first = next(n for n in gm.graph.nodes if n.op == "call_module")
    injected = ll.Propagator(gm, inject={first.name: lambda _: keeper.tangents[first]}).propagate(x, None)[1]
    assert rel(injected, tan) < TOL[torch.float32]


def test_a_node_that_fails_is_named():
    class Broken(nn.Module):
        def forward(self, x):
            return x.reshape(-1, 7)

    gm = fx.symbolic_trace(Broken())
    with pytest.raises(ll.LayerlieError, match=r"node .*reshape.* failed"):
        ll.propagate(gm, torch.randn(1, 3, 4, 4), torch.randn(1, 1, 3, 4, 4))
