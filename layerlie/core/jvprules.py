"""Cheaper forward-mode rules for the ops that dominate a model's tangent pass (docs/method.md §2).

PyTorch's generated forward-mode formulas treat an input without a tangent as a zero
tensor and still run the term that multiplies it. For a convolution or a linear layer
the weights have no tangent, so ``conv(x_t, w) + conv(x, 0)`` costs a second primal
convolution per layer; a BatchNorm pays primal-sized products with the zero tangents of
its statistics; and GELU's derivative is recomputed for every stacked tangent. Here each
such op gets a rule that computes only the terms that are there: the derivative of the
op is applied to the tangents, and what depends on the primal alone is computed once.

The rules are ``torch.autograd.Function``s with a ``jvp`` (and a generated ``vmap`` rule,
so stacked tangents stay one batched op), swapped in for the functional calls by
:class:`FastRules`, a ``TorchFunctionMode``. They serve forward mode only: the mode is for
no-grad tangent passes. A registry (:func:`register_jvp_rule`) holds them by function.

Example:
    >>> import torch, torch.nn.functional as F
    >>> w, x, t = torch.randn(4, 3, 3, 3), torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    >>> with torch.no_grad(), FastRules():
    ...     _, fast = torch.func.jvp(lambda z: F.conv2d(z, w), (x,), (t,))
    >>> torch.allclose(fast, F.conv2d(t, w), atol=1e-6)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_RULES: dict[Callable, Callable] = {}


def register_jvp_rule(fn: Callable) -> Callable[[Callable], Callable]:
    """Register ``rule(*args, **kwargs)`` to stand in for ``fn`` under :class:`FastRules`;
    it must return ``fn``'s value and carry its exact forward-mode derivative."""
    def add(rule: Callable) -> Callable:
        _RULES[fn] = rule
        return rule
    return add


def get_jvp_rule(fn: Callable) -> Callable | None:
    """The rule registered for ``fn``, or None."""
    return _RULES.get(fn)


def list_jvp_rules() -> list[Callable]:
    """The functions that have a rule."""
    return list(_RULES)


class FastRules(TorchFunctionMode):
    """Run the registered rules in place of their functions (forward mode, no grad)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # The mode is off while this runs, so the rule's own calls are the plain functions.
        rule = _RULES.get(func, func)
        return rule(*args, **kwargs)


class _Linear(torch.autograd.Function):
    """``y = op(x)`` for an op linear in ``x`` up to a constant (its weights and bias are
    closed over, not inputs, so no zero tangent is made for them): ``d = op_t(x_t)``, the
    op without the constant."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, op: Callable, op_t: Callable) -> torch.Tensor:
        return op(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op_t = inputs[2]

    @staticmethod
    def jvp(ctx, x_t, _op, _op_t):
        return ctx.op_t(x_t)


def _constant(*tensors: torch.Tensor | None) -> bool:
    """Whether none of the tensors is wrapped by a function transform, i.e. none carries a
    tangent (or a batch) of its own: model weights, not weights computed from the input."""
    return not any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if not _constant(weight, bias):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    kw = dict(weight=weight, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return _Linear.apply(x, partial(F.conv2d, bias=bias, **kw), partial(F.conv2d, **kw))


def _linear(x, weight, bias=None):
    if not _constant(weight, bias):
        return F.linear(x, weight, bias)
    return _Linear.apply(x, partial(F.linear, weight=weight, bias=bias), partial(F.linear, weight=weight))


def _batch_norm(x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    if training or running_mean is None or not _constant(running_mean, running_var, weight, bias):
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    # Eval mode: y = x * a + c per channel.
    a = torch.rsqrt(running_var + eps) if weight is None else weight * torch.rsqrt(running_var + eps)
    a = a.reshape(-1, *([1] * (x.ndim - 2)))
    return _Linear.apply(x, partial(F.batch_norm, running_mean=running_mean, running_var=running_var, weight=weight,
                                    bias=bias, training=False, momentum=0.0, eps=eps), a.mul)


register_jvp_rule(F.conv2d)(_conv2d)
register_jvp_rule(F.linear)(_linear)
register_jvp_rule(F.batch_norm)(_batch_norm)
