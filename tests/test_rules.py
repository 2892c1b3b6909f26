"""The op table's rules inside a whole-callable jvp (FastRules): references (each fast rule
against PyTorch's own jvp, with and without stacked tangents), the fall-back for weights
computed from the input, and the fast and eager end-to-end paths, which must agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import layerlie as ll
from layerlie.core import ops
from layerlie.core.rules import FastRules
from layerlie.testing import TOL, rel, timm_model


def _examples() -> dict:
    g = torch.Generator().manual_seed(0)
    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    w, b = r(6, 2, 3, 3), r(6)
    mean, var, scale, shift = r(4), r(4).exp(), r(4), r(4)
    return {
        F.conv2d: (lambda x: F.conv2d(x, w, b, stride=2, padding=1, groups=2), r(2, 4, 9, 9)),
        F.linear: (lambda x: F.linear(x, LIN, LIN_B), r(2, 3, 7)),
        F.batch_norm: (lambda x: F.batch_norm(x, mean, var, scale, shift, False, 0.1, 1e-3)
                       + F.batch_norm(x, mean, var, None, None, False, 0.1, 1e-3), r(2, 4, 5, 5)),
    }


LIN, LIN_B = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
FAST = [op.key for op in map(ops.get_op, ops.list_ops()) if op.fast is not None]


def test_every_rule_has_an_example():
    assert set(FAST) == set(_examples())


@pytest.mark.parametrize("fn", FAST, ids=lambda f: f.__name__)
def test_rule_equals_pytorchs_jvp_with_and_without_stacked_tangents(fn):
    f, x = _examples()[fn]
    tangents = torch.randn(3, *x.shape, dtype=x.dtype)
    want_y, want = torch.func.jvp(f, (x,), (tangents[0],))
    with torch.no_grad(), FastRules():
        y, got = torch.func.jvp(f, (x,), (tangents[0],))
        _, stacked = torch.func.vmap(lambda t: torch.func.jvp(f, (x,), (t,)), out_dims=(None, 0))(tangents)
    assert rel(y, want_y) < TOL[torch.float64] and rel(got, want) < TOL[torch.float64]
    for k in range(3):
        assert rel(stacked[k], torch.func.jvp(f, (x,), (tangents[k],))[1]) < TOL[torch.float64]


def test_weights_computed_from_the_input_keep_their_tangent():
    """A convolution whose kernel depends on x (dynamic convolution) has a weight term
    in its derivative; the rules must not drop it."""
    x = torch.randn(1, 2, 8, 8, dtype=torch.float64)
    w0 = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    def f(z):
        return F.conv2d(z, w0 * z.mean(), padding=1)

    t = torch.randn_like(x)
    want = torch.func.jvp(f, (x,), (t,))[1]
    with torch.no_grad(), FastRules():
        got = torch.func.jvp(f, (x,), (t,))[1]
    assert rel(got, want) < TOL[torch.float64]


def _convolutions(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as p:
        fn()
    return sum(e.count for e in p.key_averages() if e.key == "aten::_convolution")


def test_fast_path_runs_each_convolution_once_per_pass_and_agrees_with_eager():
    """PyTorch's formula runs a convolution three times for one tangent (primal, tangent,
    and the primal against the weights' zero tangent); the rule runs it twice. Both give
    the same Lie derivative to 1e-5 relative (float32, a timm model as users load it)."""
    model = timm_model("resnet18")
    x = ll.photos(model, n=1)[..., ::4, ::4].contiguous()
    def f(z):
        return model(z).softmax(-1)

    n = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    eager = _convolutions(lambda: ll.lie_derivative(f, x, "rotate", fast=False, memory_budget=float("inf")))
    fast = _convolutions(lambda: ll.lie_derivative(f, x, "rotate", memory_budget=float("inf")))
    assert (eager, fast) == (3 * n, 2 * n)
    groups = ["translate_x", "rotate", "scale"]
    a = ll.lie_derivative(f, x, groups, fast=False, memory_budget=float("inf"))
    b = ll.lie_derivative(f, x, groups, memory_budget=float("inf"))
    assert rel(b, a) < 1e-5
