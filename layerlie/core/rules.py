"""The op table's linearization rules (docs/design.md §7) and the mode that runs them inside a
whole-callable ``torch.func.jvp`` (docs/method.md §2).

A rule gets a node's :class:`~layerlie.core.engine.Call` and the ``(K, *shape)`` tangent stacks
of some of its flat arguments, and returns the output's tangent stack, or ``NotImplemented``
to let the engine take ``torch.func.jvp`` under ``vmap``. Each rule computes only the terms
whose factor carries a tangent, and what depends on the primal alone once for all K tangents.
PyTorch's generated formulas treat an input without a tangent as a zero tensor and still run
its term: ``conv(x_t, w) + conv(x, 0)`` costs a second primal convolution per layer, and a
batch norm pays primal-sized products with the zero tangents of its statistics.

The same rules serve the engine's graph walk and, through :class:`FastRules`, a jvp of a whole
callable: there an op whose entry is marked ``fast`` runs as itself and takes its rule as its
derivative (its weights held constant).

Example:
    >>> import torch, torch.nn.functional as F
    >>> w, x, t = torch.randn(4, 3, 3, 3), torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    >>> with torch.no_grad(), FastRules():
    ...     _, fast = torch.func.jvp(lambda z: F.conv2d(z, w), (x,), (t,))
    >>> torch.allclose(fast, F.conv2d(t, w), atol=1e-6)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from layerlie.core.geometry import CONV_ARGS, conv_window, given
from layerlie.core.ops import Call, Rule, Tangents, find_op

if TYPE_CHECKING:
    from layerlie.core.layout import Layout


def _fold(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(0, 1)


def _unfold(t: torch.Tensor, k: int) -> torch.Tensor:
    return t.unflatten(0, (k, -1))


def _only_first(call: Call, tangents: Tangents) -> torch.Tensor | None:
    """The tangent of the first argument when it is the only one, and a plain tensor."""
    t = tangents.get(0)
    ok = list(tangents) == [0] and isinstance(t, torch.Tensor) and isinstance(call.flat[0], torch.Tensor)
    return t if ok else None


def conv_rule(call: Call, tangents: Tangents) -> Any:
    """The convolution of the tangents without the bias, K folded into the batch: a module (its
    own ``_conv_forward``) or ``F.conv2d``."""
    t = _only_first(call, tangents)
    if t is None:
        return NotImplemented
    if isinstance(call.fn, nn.Module):
        return _unfold(call.fn._conv_forward(_fold(t), call.fn.weight, None), t.shape[0])
    args, kwargs = call.rebuild()
    return _unfold(call.fn(_fold(t), **{**given(CONV_ARGS, args, kwargs), "bias": None}), t.shape[0])


def linear_rule(call: Call, tangents: Tangents) -> Any:
    """``t W^T``, a module's or ``F.linear``'s weight, without the bias."""
    t = _only_first(call, tangents)
    if t is None:
        return NotImplemented
    weight = call.fn.weight if isinstance(call.fn, nn.Module) else given(("weight",), *call.rebuild())["weight"]
    return F.linear(t, weight)


_BATCH_NORM_ARGS = ("running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")


def batch_norm_scale(call: Call) -> torch.Tensor | None:
    """The per-channel scale ``weight / sqrt(running_var + eps)`` of a batch norm in eval mode
    with running statistics (a module or ``F.batch_norm``), where it is a channel-wise affine
    map; None otherwise."""
    if isinstance(call.fn, nn.Module):
        fn = call.fn
        training, var, weight, eps = fn.training, fn.running_var, fn.weight, fn.eps
    else:
        g = given(_BATCH_NORM_ARGS, *call.rebuild())
        training, var, weight, eps = g.get("training", False), g.get("running_var"), g.get("weight"), g.get("eps", 1e-5)
    if training or var is None:
        return None
    scale = torch.rsqrt(var + eps)
    return scale if weight is None else scale * weight


def batch_norm_rule(call: Call, tangents: Tangents) -> Any:
    """``t * scale`` per channel (:func:`batch_norm_scale`): the statistics are constants."""
    t, scale = _only_first(call, tangents), batch_norm_scale(call)
    if t is None or scale is None:
        return NotImplemented
    return t * scale.reshape(-1, *[1] * (t.ndim - 3))


def batch_linear_rule(call: Call, tangents: Tangents) -> Any:
    """Ops linear in their first argument that treat the batch axis as a batch."""
    t = _only_first(call, tangents)
    args, kwargs = call.rebuild()
    if t is None or _flattens_batch(call.fn, args, kwargs):
        return NotImplemented
    return _unfold(call.fn(_fold(t), *args[1:], **kwargs), t.shape[0])


def _flattens_batch(fn: Any, args: tuple, kwargs: dict) -> bool:
    """A flatten that merges the batch axis with others cannot take K folded into it."""
    if isinstance(fn, nn.Flatten):
        return fn.start_dim % args[0].ndim == 0
    if fn is torch.flatten:
        start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
        return start % args[0].ndim == 0
    return False


def getitem_rule(call: Call, tangents: Tangents) -> Any:
    """Indexing a tuple output (``unbind``, ``chunk``) indexes its tangent tuple."""
    if isinstance(call.flat[0], torch.Tensor):
        return NotImplemented
    return tangents[0][call.flat[1]] if 0 in tangents else None


def pointwise_rule(call: Call, tangents: Tangents) -> Any:
    """``s'(h) * t``: the derivative is computed once, for all K tangents."""
    t = _only_first(call, tangents)
    if t is None:
        return NotImplemented
    h = call.flat[0]
    slope = torch.func.jvp(lambda z: call([z, *call.flat[1:]]), (h,), (torch.ones_like(h),))[1]
    return slope * t


def softmax_jvp(p: torch.Tensor, t: torch.Tensor, dim: int) -> torch.Tensor:
    """``J_softmax[t] = p * (t - <p, t>)`` along ``dim`` at the output ``p``; ``t`` may carry extra
    leading (stack) axes. ``t`` is first shifted by its value at the most likely entry.

    The shift leaves the product unchanged (it is zero on constants along ``dim``). Without it,
    a nearly one-hot ``p`` makes the top entry's term the difference of two numbers of the size
    of ``t``: in float32 that rounding is larger than the result (dla34's random-init softmax
    lost four digits of its completeness to it)."""
    dim = dim - p.ndim if dim >= 0 else dim  # from the end, so that leading stack axes do not count
    top = p.argmax(dim, keepdim=True)
    t = t - t.gather(dim, top.expand(*t.shape[:t.ndim - p.ndim], *top.shape))
    return p * (t - (p * t).sum(dim, keepdim=True))


def softmax_rule(call: Call, tangents: Tangents) -> Any:
    t = _only_first(call, tangents)
    args, kwargs = call.rebuild()
    dim = call.fn.dim if isinstance(call.fn, nn.Softmax) else kwargs.get("dim", args[1] if len(args) > 1 else None)
    if t is None or not isinstance(dim, int) or kwargs.get("dtype") is not None or len(args) > 2:
        return NotImplemented
    return softmax_jvp(call.out, t, dim)


def _lifted(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A ``(K, *shape)`` stack with unit axes after K, up to ``ndim`` axes besides K, so that it
    broadcasts against operands of ``ndim`` axes as its primal does."""
    return t.reshape(t.shape[0], *[1] * (ndim + 1 - t.ndim), *t.shape[1:])


def _tensor_tangents(call: Call, tangents: Tangents, arity: int) -> bool:
    """Whether the tangents sit on plain tensors among the first ``arity`` arguments."""
    return all(i < arity and isinstance(t, torch.Tensor) and isinstance(call.flat[i], torch.Tensor)
               for i, t in tangents.items())


def matmul_rule(call: Call, tangents: Tangents) -> Any:
    """``tA @ B + A @ tB``, only the terms whose factor carries a tangent; the stack axis leads
    and broadcasting does the rest (vectors, which matmul treats apart, go to the fallback)."""
    args, kwargs = call.rebuild()
    if kwargs or len(args) != 2 or not _tensor_tangents(call, tangents, 2) or min(a.ndim for a in args) < 2:
        return NotImplemented
    a, b = args
    ndim = call.out.ndim
    terms = []
    if 0 in tangents:
        terms.append(torch.matmul(_lifted(tangents[0], ndim), b))
    if 1 in tangents:
        terms.append(torch.matmul(a, _lifted(tangents[1], ndim)))
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def layer_norm_rule(call: Call, tangents: Tangents) -> Any:
    """``w * rstd * (t - mean(t) - xhat * mean(t * xhat))`` over the normalized axes: the
    statistics of the primal input are computed once, for all K tangents (weight and bias are
    constants; a tangent on them goes to the fallback)."""
    t = _only_first(call, tangents)
    if t is None:
        return NotImplemented
    args, kwargs = call.rebuild()
    if isinstance(call.fn, nn.LayerNorm):
        norm = call.fn
        k, weight, eps = len(norm.normalized_shape), norm.weight, norm.eps
    else:
        named = given(("normalized_shape", "weight", "bias", "eps"), args, kwargs)
        shape = named["normalized_shape"]
        k = 1 if isinstance(shape, int) else len(shape)
        weight, eps = named.get("weight"), named.get("eps", 1e-5)
    x = args[0]
    dims = tuple(range(-k, 0))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (x - mean) * rstd
    out = t - t.mean(dims, keepdim=True) - xhat * (t * xhat).mean(dims, keepdim=True)
    scale = rstd if weight is None else rstd * weight
    return out * scale


def _as_output(total: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A tangent stack broadcast (and materialized) to ``(K, *out.shape)`` in ``out``'s dtype, as
    the op's value is: an operand that broadcasts carries a tangent of its own smaller shape."""
    shape = (total.shape[0], *out.shape)
    total = total if total.shape == shape else total.expand(shape).contiguous()
    return total if total.dtype == out.dtype else total.to(out.dtype)


def sum_rule(sign: int) -> Rule:
    """``t_a + sign * alpha * t_b`` (add, sub), only the tangents present, broadcast to the
    output's shape (a tangent of an operand that broadcasts is repeated, as its value is)."""

    def rule(call: Call, tangents: Tangents) -> Any:
        args, kwargs = call.rebuild()
        if len(args) != 2 or set(kwargs) - {"alpha"} or not _tensor_tangents(call, tangents, 2):
            return NotImplemented
        out = call.out
        total = None
        for i, t in tangents.items():
            t = _lifted(t, out.ndim)
            if i == 1:
                t = t * (sign * kwargs.get("alpha", 1))
            total = t if total is None else total + t
        return _as_output(total, out)

    return rule


def mul_rule(call: Call, tangents: Tangents) -> Any:
    """``t_a * b + a * t_b`` (product rule), only the terms whose factor carries a tangent; a
    factor may be a number or a tensor that broadcasts."""
    args, kwargs = call.rebuild()
    if kwargs or len(args) != 2 or not _tensor_tangents(call, tangents, 2):
        return NotImplemented
    out = call.out
    terms = [_lifted(t, out.ndim) * args[1 - i] for i, t in tangents.items()]
    total = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return _as_output(total, out)


Offset = torch.Tensor | None


def channel_linear(fn: Any, args: Sequence[Any], lay: Layout) -> tuple[bool, Offset]:
    """A linear layer on the last axis, which is not spatial, commutes with ``G``; its bias is
    the offset (docs/method.md §3)."""
    x = args[0]
    spatial = (lay.y_dim, lay.x_dim) if lay.kind == "grid" else (lay.token_dim,)
    ok = isinstance(x, torch.Tensor) and all(d % x.ndim != x.ndim - 1 for d in spatial)
    bias = fn.bias if isinstance(fn, nn.Module) else (args[2] if len(args) > 2 else None)
    return ok, bias


def pointwise_conv(fn: nn.Conv2d, args: Sequence[Any], lay: Layout) -> tuple[bool, Offset]:
    """A 1x1 convolution at stride 1 without padding, on the grid's own axes, commutes with
    ``G``; its bias is the offset (docs/method.md §3)."""
    w = conv_window(fn, args, {})
    ok = lay.kind == "grid" and (lay.y_dim, lay.x_dim) == (2, 3) and w.kernel == (1, 1) \
        and w.stride == (1, 1) and w.padding == (0, 0)
    return ok, fn.bias.reshape(-1, 1, 1) if fn.bias is not None else None


def fixed_weights(call: Call) -> bool:
    """Whether no argument after the first is wrapped by a function transform, i.e. none carries
    a tangent (or a batch) of its own: model weights, not weights computed from the input."""
    return not any(isinstance(a, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(a)
                   for a in call.flat[1:])


def eval_batch_norm(call: Call) -> bool:
    """A batch norm that :func:`batch_norm_rule` serves, with fixed statistics."""
    return fixed_weights(call) and batch_norm_scale(call) is not None


class _Ruled(torch.autograd.Function):
    """``y = fn(x)`` whose forward-mode derivative is ``rule(x_t)``; the other arguments are
    closed over, not inputs, so no zero tangent is made for them."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, fn: Callable, rule: Callable) -> torch.Tensor:
        return fn(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.rule = inputs[2]

    @staticmethod
    def jvp(ctx, x_t, _fn, _rule):
        return ctx.rule(x_t)


class FastRules(TorchFunctionMode):
    """Run the op table's rules as the derivatives of their functions in a whole-callable
    ``torch.func.jvp`` (forward mode, no grad): for each function whose entry has a ``fast``
    test that the call passes (docs/design.md §7)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # The mode is off while this runs, so the calls below are the plain functions.
        op = find_op(func)
        if op is None or op.fast is None or not args or not isinstance(args[0], torch.Tensor):
            return func(*args, **kwargs)
        flat, spec = pytree.tree_flatten((args, kwargs))
        call = Call(func, flat, spec, None)
        if not op.fast(call):
            return func(*args, **kwargs)
        rule = op.linearize
        return _Ruled.apply(args[0], lambda z: func(z, *args[1:], **kwargs), lambda t: rule(call, {0: t[None]})[0])
