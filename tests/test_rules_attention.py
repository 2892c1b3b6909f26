"""The hand-written linearizations of the ops that dominate a transformer's tangent program
(matmul, layer norm, add/sub, mul): each equals ``torch.func.jvp`` of the op for every set of
arguments that carries a tangent and for broadcasting operands (references), and each check fails
with one term dropped (tests/test_engine.py shows that a raw timm ViT takes these rules)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

import layerlie as ll
from layerlie.core import ops
from layerlie.core.engine import Call, linearize
from layerlie.testing import TOL, rel


K = 3


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def _call(fn: Callable[..., Any], args: tuple, kwargs: dict | None = None) -> Call:
    flat, spec = pytree.tree_flatten((args, kwargs or {}))
    return Call(fn, flat, spec, fn(*args, **(kwargs or {})))


def _error(rule: ops.Rule, fn: Callable[..., Any], args: tuple, where: tuple[int, ...],
           kwargs: dict | None = None) -> float:
    """``||rule - jvp|| / ||jvp||`` with K tangents on the flat arguments ``where``."""
    call = _call(fn, args, kwargs)
    stacks = {i: torch.randn((K, *call.flat[i].shape), dtype=torch.float64) for i in where}
    got = rule(call, stacks)
    assert got is not NotImplemented

    def f(*primals: torch.Tensor) -> Any:
        leaves = list(call.flat)
        for i, p in zip(where, primals):
            leaves[i] = p
        return call(leaves)

    want = torch.stack([torch.func.jvp(f, tuple(call.flat[i] for i in where),
                                       tuple(stacks[i][k] for i in where))[1] for k in range(K)])
    assert got.shape == want.shape
    return rel(got, want)


MATMUL = [((5, 4), (2, 3, 4, 6)), ((2, 3, 5, 4), (4, 6)), ((2, 1, 5, 4), (3, 4, 6)), ((3, 5, 4), (3, 4, 6))]
WHERE = [(0,), (1,), (0, 1)]


@pytest.mark.parametrize("shapes", MATMUL, ids=str)
@pytest.mark.parametrize("where", WHERE, ids=str)
@pytest.mark.parametrize("fn", [operator.matmul, torch.matmul], ids=["operator", "torch"])
def test_matmul_rule_equals_jvp(fn, where, shapes):
    args = tuple(_randn(*s) for s in shapes)
    assert _error(ops.get_rule(fn), fn, args, where) < TOL[torch.float64]


def _bmm_method(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """As the engine calls a method node."""
    return a.bmm(b)


@pytest.mark.parametrize("where", WHERE, ids=str)
def test_bmm_and_its_method_equal_jvp(where):
    args = (_randn(3, 5, 4), _randn(3, 4, 6))
    assert _error(ops.get_rule(torch.bmm), torch.bmm, args, where) < TOL[torch.float64]
    assert _error(ops.get_rule("bmm"), _bmm_method, args, where) < TOL[torch.float64]


def test_matmul_of_a_vector_goes_to_the_fallback():
    """matmul treats 1-D operands apart (no stack axis can lead); the engine's jvp takes them."""
    a, b = _randn(5, 4), _randn(4)
    call, stacks = _call(torch.matmul, (a, b)), {0: torch.randn(K, 5, 4, dtype=torch.float64)}
    assert ops.get_rule(torch.matmul)(call, stacks) is NotImplemented
    assert linearize(call, stacks, torch.matmul).shape == (K, 5)


LAYER_NORMS = [
    (nn.LayerNorm(10), (2, 7, 10)),
    (nn.LayerNorm(10, elementwise_affine=False), (2, 7, 10)),
    (nn.LayerNorm((7, 10), eps=0.5, bias=False), (2, 7, 10)),  # eps of the order of the variance
]


@pytest.mark.parametrize("norm,shape", LAYER_NORMS, ids=["affine", "no-affine", "two-axes-big-eps"])
def test_layer_norm_module_rule_equals_jvp(norm, shape):
    norm = norm.double().eval().requires_grad_(False)
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p))
    assert _error(ops.get_rule(nn.LayerNorm), norm, (_randn(*shape),), (0,)) < TOL[torch.float64]


def test_functional_layer_norm_rule_equals_jvp():
    """Positional and keyword forms, a large eps (it enters the scale), no weight."""
    x, w, b = _randn(2, 5, 6, 4), _randn(6, 4), _randn(6, 4)
    rule = ops.get_rule(F.layer_norm)
    assert _error(rule, F.layer_norm, (x, (6, 4), w, b, 0.3), (0,)) < TOL[torch.float64]
    assert _error(rule, F.layer_norm, (x, (4,)), (0,), {"eps": 2.0}) < TOL[torch.float64]
    assert _error(ops.get_rule(torch.layer_norm), torch.layer_norm, (x, [4], None, None, 1e-5, False),
                  (0,)) < TOL[torch.float64]


def test_layer_norm_with_a_tangent_on_its_weight_goes_to_the_fallback():
    x, w = _randn(2, 5, 4), _randn(4)
    call = _call(F.layer_norm, (x, (4,), w))
    stacks = {0: torch.randn(K, 2, 5, 4, dtype=torch.float64), 2: torch.randn(K, 4, dtype=torch.float64)}
    assert ops.get_rule(F.layer_norm)(call, stacks) is NotImplemented


ELEMENTWISE = [((2, 3, 4), (2, 3, 4)), ((3, 1), (2, 3, 4)), ((2, 3, 4), (4,)), ((1, 3, 1), (2, 1, 4))]


@pytest.mark.parametrize("shapes", ELEMENTWISE, ids=str)
@pytest.mark.parametrize("where", WHERE, ids=str)
@pytest.mark.parametrize("fn", [operator.add, torch.add, operator.sub, torch.sub, operator.mul, torch.mul],
                         ids=lambda f: f.__name__)
def test_elementwise_rules_equal_jvp(fn, where, shapes):
    args = tuple(_randn(*s) for s in shapes)
    assert _error(ops.get_rule(fn), fn, args, where) < TOL[torch.float64]


def _iadd_copy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a += b`` on a copy, so that the reference's primal stays intact."""
    return operator.iadd(a.clone(), b)


@pytest.mark.parametrize("where", WHERE, ids=str)
def test_in_place_add_rule_equals_jvp(where):
    """``x += y`` (timm's residuals): the engine sees the operand before the add."""
    args = (_randn(2, 3, 4), _randn(3, 1))
    assert _error(ops.get_rule(operator.iadd), _iadd_copy, args, where) < TOL[torch.float64]


@pytest.mark.parametrize("fn", [torch.add, torch.sub], ids=lambda f: f.__name__)
def test_alpha_scales_the_second_tangent(fn):
    args = (_randn(2, 3), _randn(2, 3))
    assert _error(ops.get_rule(fn), fn, args, (0, 1), {"alpha": 2.5}) < TOL[torch.float64]


@pytest.mark.parametrize("fn", [operator.mul, operator.add, operator.sub], ids=lambda f: f.__name__)
def test_a_number_operand(fn):
    assert _error(ops.get_rule(fn), fn, (_randn(2, 3), 0.25), (0,)) < TOL[torch.float64]
    assert _error(ops.get_rule(fn), fn, (0.25, _randn(2, 3)), (1,)) < TOL[torch.float64]


def _drop_matmul_second(call: Call, tangents: ops.Tangents) -> Any:
    return ops.get_rule(torch.matmul)(call, {0: tangents[0]})


def _layer_norm_no_variance(call: Call, tangents: ops.Tangents) -> Any:
    x, t = call.flat[0], tangents[0]
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + call.fn.eps)
    return (t - t.mean(-1, keepdim=True)) * rstd * call.fn.weight


def _mul_first_only(call: Call, tangents: ops.Tangents) -> Any:
    return ops.get_rule(operator.mul)(call, {0: tangents[0]})


def _add_unbroadcast(call: Call, tangents: ops.Tangents) -> Any:
    return tangents[0]


def test_each_check_fails_with_a_term_dropped():
    """The checks above can fail: each rule with one term left out is caught."""
    norm = nn.LayerNorm(10).double().requires_grad_(False)
    assert _error(_drop_matmul_second, torch.matmul, (_randn(3, 5, 4), _randn(3, 4, 6)), (0, 1)) > 0.1
    assert _error(_layer_norm_no_variance, norm, (_randn(2, 7, 10),), (0,)) > 0.1
    assert _error(_mul_first_only, operator.mul, (_randn(2, 3), _randn(2, 3)), (0, 1)) > 0.1
    with pytest.raises(AssertionError):  # a tangent left at its operand's (broadcast) shape
        _error(_add_unbroadcast, operator.add, (_randn(3, 1), _randn(1, 4)), (0,))


def test_a_half_operand_gives_the_output_dtype():
    """float32 + float16 is float32: so is its tangent."""
    a, b = torch.randn(2, 3), torch.randn(3, dtype=torch.float16)
    call = _call(operator.add, (a, b))
    got = ops.get_rule(operator.add)(call, {1: torch.randn(K, 3, dtype=torch.float16)})
    assert got.dtype == torch.float32 and got.shape == (K, 2, 3)
