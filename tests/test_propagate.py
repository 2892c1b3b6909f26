"""Tangent propagation (SPEC 7): every linearization rule against ``torch.func.jvp`` of its op
(references), and the whole walk against ``torch.func.jvp`` of the model (references)."""

from __future__ import annotations

import operator
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import layerlie as ll
from layerlie.lie import jvp_ready
from layerlie.propagate import Call, linearize
from layerlie.surgery import BlurPool2d, FilteredActivation, PolyphaseSample
from torch.utils import _pytree as pytree

from conftest import TOL, rel, timm_model

K = 3  # tangents per stack: the rules must treat the stack axis as a batch of tangents
GRID = (2, 3, 9, 8)


def _rules() -> dict[Any, Callable]:
    return sys.modules["layerlie.propagate"]._RULES


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def _module(m: nn.Module) -> nn.Module:
    """Random parameters and running statistics, in eval mode, in float64."""
    m = m.double().eval().requires_grad_(False)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn_like(m.running_mean))
            m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return m


def _method(name: str) -> Callable[..., Any]:
    return lambda obj, *a, **k: getattr(obj, name)(*a, **k)


# One tiny example per rule key: (callable, positional arguments). A key added to the rule
# registry without an example here fails ``test_every_rule_has_an_example``.
EXAMPLES: dict[Any, Callable[[], tuple[Callable[..., Any], tuple]]] = {
    nn.Conv1d: lambda: (_module(nn.Conv1d(3, 4, 3, stride=2, padding=1)), (_randn(2, 3, 9),)),
    nn.Conv2d: lambda: (_module(nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect")), (_randn(*GRID),)),
    nn.Linear: lambda: (_module(nn.Linear(5, 4)), (_randn(2, 7, 5),)),
    nn.BatchNorm1d: lambda: (_module(nn.BatchNorm1d(3)), (_randn(2, 3, 6),)),
    nn.BatchNorm2d: lambda: (_module(nn.BatchNorm2d(3)), (_randn(*GRID),)),
    nn.AvgPool2d: lambda: (nn.AvgPool2d(3, 2, 1), (_randn(*GRID),)),
    nn.AdaptiveAvgPool2d: lambda: (nn.AdaptiveAvgPool2d(3), (_randn(*GRID),)),
    nn.AvgPool1d: lambda: (nn.AvgPool1d(2), (_randn(2, 3, 9),)),
    nn.AdaptiveAvgPool1d: lambda: (nn.AdaptiveAvgPool1d(2), (_randn(2, 3, 9),)),
    nn.Flatten: lambda: (nn.Flatten(), (_randn(*GRID),)),
    nn.Dropout: lambda: (nn.Dropout(0.5).eval(), (_randn(*GRID),)),
    nn.Identity: lambda: (nn.Identity(), (_randn(*GRID),)),
    F.avg_pool2d: lambda: (F.avg_pool2d, (_randn(*GRID), 2)),
    F.adaptive_avg_pool2d: lambda: (F.adaptive_avg_pool2d, (_randn(*GRID), 1)),
    torch.flatten: lambda: (torch.flatten, (_randn(*GRID), 1)),
    F.dropout: lambda: (lambda z: F.dropout(z, 0.5, training=False), (_randn(*GRID),)),
    BlurPool2d: lambda: (BlurPool2d(3, 2, "reflect").double(), (_randn(*GRID),)),
    PolyphaseSample: lambda: (PolyphaseSample(2), (_randn(*GRID),)),
    FilteredActivation: lambda: (FilteredActivation(nn.GELU(), 3, 2, 3).double(), (_randn(*GRID),)),
}
_ACTIVATION_MODULES = [k for k in _rules() if isinstance(k, type) and issubclass(k, nn.Module)
                       and k.__module__ == "torch.nn.modules.activation"]
for _cls in _ACTIVATION_MODULES:
    EXAMPLES[_cls] = lambda cls=_cls: (cls(), (_randn(*GRID),))
for _key in _rules():
    if callable(_key) and not isinstance(_key, type) and _key not in EXAMPLES and _key is not operator.getitem:
        EXAMPLES[_key] = lambda fn=_key: (fn, (_randn(*GRID),))  # the remaining functional activations
    if isinstance(_key, str):
        EXAMPLES[_key] = lambda name=_key: (_method(name), (_randn(*GRID),))


def test_every_rule_has_an_example():
    missing = [k for k in _rules() if k not in EXAMPLES and k is not operator.getitem]
    assert not missing, f"add a conformance example for {missing}"


def _jvp_stack(fn: Callable[..., Any], args: tuple, stack: torch.Tensor) -> torch.Tensor:
    """The reference: ``torch.func.jvp`` of the op in its first argument, one tangent at a time."""
    return torch.stack([torch.func.jvp(lambda z: fn(z, *args[1:]), (args[0],), (t,))[1] for t in stack])


@pytest.mark.parametrize("key", list(EXAMPLES), ids=lambda k: getattr(k, "__name__", str(k)))
def test_rule_equals_jvp(key):
    """references: each registered linearization equals forward-mode AD of the op (float64)."""
    torch.manual_seed(0)
    fn, args = EXAMPLES[key]()
    flat, spec = pytree.tree_flatten((args, {}))
    call = Call(fn, flat, spec, fn(*args))
    stack = torch.randn((K, *args[0].shape), dtype=args[0].dtype)
    got = linearize(call, {0: stack}, key)
    want = _jvp_stack(fn, args, stack)
    assert got.shape == want.shape
    assert rel(got, want) < TOL[torch.float64]


def test_a_wrong_rule_fails_conformance(monkeypatch):
    """The conformance check can fail: a rule off by 10% is caught."""
    right = _rules()[nn.GELU]
    monkeypatch.setitem(_rules(), nn.GELU, lambda call, tangents: 1.1 * right(call, tangents))
    fn, args = EXAMPLES[nn.GELU]()
    flat, spec = pytree.tree_flatten((args, {}))
    stack = torch.randn((K, *args[0].shape), dtype=torch.float64)
    got = linearize(Call(fn, flat, spec, fn(*args)), {0: stack}, nn.GELU)
    assert rel(got, _jvp_stack(fn, args, stack)) > 0.05


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
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
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
