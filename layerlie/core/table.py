"""The op table's entries: what layerlie knows about each op it ships with (docs/design.md §7).

Each :func:`~layerlie.core.ops.register_op` call below is one row: the layer type
(docs/method.md §3), the linearization rule and its ``fast`` test (:mod:`layerlie.core.rules`),
the window or resampling (docs/method.md §5, :mod:`layerlie.core.geometry`), the stride-1 twin
and module form (docs/method.md §6, :mod:`layerlie.core.twins`), whether the op commutes with
``G`` or relabels samples (docs/method.md §3, 5), the surgery policies that replace it, and its
example (:mod:`layerlie.core.examples`). Importing :mod:`layerlie.core.ops` fills the table.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.layers import Conv2dSame
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame
from torch import nn
from torchvision.models import swin_transformer

from layerlie.core import rules
from layerlie.core.examples import call_example, image, method, method_example, module_example, randn, second_image
from layerlie.core.geometry import (AVG_POOL_ARGS, CONV_ARGS, MAX_POOL_ARGS, always_same, centres, conv_window,
                                    functional_conv_window, functional_pad, functional_pool_window, given,
                                    interpolate_axes, pad_window, pool_window, unshuffle_window, upsample_axes)
from layerlie.core.ops import register_op
from layerlie.core.twins import functional_dense, module_dense, pool_module

WINDOW_SUBSTITUTES = ("blurpool", "aps")
"""The surgery policies that replace a strided window op."""

MATMULS = (operator.matmul, torch.matmul, torch.bmm)
"""The functions of a matrix product (``a @ b``, ``torch.matmul``, ``torch.bmm``)."""

VIEWS = ("reshape", "view", "flatten", "unflatten", "permute", "transpose", "swapaxes", "swapdims", "contiguous",
         "reshape_as", "view_as")
"""The tensor methods that change a tensor's shape or axis order and nothing else."""

# --- convolutions, linear layers, pooling ------------------------------------------------------

register_op(nn.Conv1d, layer_type="conv", linearize=rules.conv_rule,
            example=module_example(3, 4, 3, stride=2, padding=1, shape=(2, 3, 9)))
register_op(nn.Conv2d, layer_type="conv", linearize=rules.conv_rule, commutes=rules.pointwise_conv,
            window=conv_window, dense=module_dense, substitutes=WINDOW_SUBSTITUTES,
            example=module_example(3, 4, 3, stride=2, padding=2, dilation=2, padding_mode="reflect"))
register_op(Conv2dSame, layer_type="conv", window=always_same(conv_window), dense=module_dense,
            substitutes=WINDOW_SUBSTITUTES, example=module_example(3, 4, 3, stride=2))
register_op(nn.Linear, layer_type="linear", linearize=rules.linear_rule, commutes=rules.channel_linear,
            example=module_example(5, 4, shape=(2, 7, 5)))
register_op(F.conv2d, layer_type="conv", linearize=rules.conv_rule, fast=rules.fixed_weights,
            window=functional_conv_window, dense=functional_dense(CONV_ARGS),
            example=call_example(randn(4, 3, 3, 3), None, 2, 1))
register_op(F.linear, layer_type="linear", linearize=rules.linear_rule, fast=rules.fixed_weights,
            commutes=rules.channel_linear, example=lambda fn: (fn, (randn(2, 7, 5), randn(4, 5))))

register_op(nn.MaxPool2d, layer_type="strided/downsampling", window=pool_window, dense=module_dense,
            substitutes=WINDOW_SUBSTITUTES, example=module_example(3, 2, 1))
register_op(nn.AvgPool2d, layer_type="strided/downsampling", linearize=rules.batch_linear_rule, window=pool_window,
            dense=module_dense, substitutes=WINDOW_SUBSTITUTES, example=module_example(3, 2, 1))
register_op(MaxPool2dSame, AvgPool2dSame, layer_type="strided/downsampling", window=always_same(pool_window),
            dense=module_dense, substitutes=WINDOW_SUBSTITUTES, example=module_example(3, 2))
register_op(F.max_pool2d, torch.max_pool2d, layer_type="strided/downsampling",
            window=functional_pool_window(MAX_POOL_ARGS), dense=functional_dense(MAX_POOL_ARGS),
            module=pool_module(nn.MaxPool2d, MAX_POOL_ARGS), substitutes=WINDOW_SUBSTITUTES,
            example=call_example((3, 3), (2, 2), (1, 1)))
register_op(F.avg_pool2d, torch._C._nn.avg_pool2d, layer_type="strided/downsampling",
            linearize=rules.batch_linear_rule, window=functional_pool_window(AVG_POOL_ARGS),
            dense=functional_dense(AVG_POOL_ARGS), module=pool_module(nn.AvgPool2d, AVG_POOL_ARGS),
            substitutes=WINDOW_SUBSTITUTES, example=call_example(3, 2, 1))

register_op(nn.AdaptiveAvgPool2d, linearize=rules.batch_linear_rule, resample=centres,
            example=module_example((4, 5)))
register_op(F.adaptive_avg_pool2d, linearize=rules.batch_linear_rule, resample=centres, example=call_example((4, 5)))
register_op(nn.AvgPool1d, linearize=rules.batch_linear_rule, example=module_example(2, shape=(2, 3, 9)))
register_op(nn.AdaptiveAvgPool1d, linearize=rules.batch_linear_rule, example=module_example(2, shape=(2, 3, 9)))
register_op(nn.AdaptiveMaxPool2d, resample=centres, example=module_example((4, 5)))
register_op(F.adaptive_max_pool2d, resample=centres, example=call_example((4, 5)))

# --- ops that pass samples through or only relabel them (docs/method.md §5) ---------------------

register_op(nn.Identity, linearize=rules.batch_linear_rule, relabels=True, example=module_example())
register_op(nn.Flatten, linearize=rules.batch_linear_rule, example=module_example())
register_op(nn.Dropout, linearize=rules.batch_linear_rule, relabels=True, example=module_example(0.5))
register_op(F.dropout, linearize=rules.batch_linear_rule, example=call_example(0.5, False))
register_op(torch.flatten, linearize=rules.batch_linear_rule, relabels=True, example=call_example(1))
register_op(operator.getitem, linearize=rules.getitem_rule, dense=lambda call: call.flat[0],
            example=lambda fn: (fn, (image().unbind(1), 1)))
_VIEW_ARGS = {"reshape": (2, 3, 110), "view": (2, 3, 110), "flatten": (1,), "unflatten": (1, (3, 1)),
              "permute": (0, 2, 3, 1), "transpose": (1, 3), "swapaxes": (1, 2), "swapdims": (1, 2), "contiguous": (),
              "reshape_as": None, "view_as": None}
for _name in VIEWS:
    _args = _VIEW_ARGS[_name]
    register_op(_name, relabels=_args is not None,
                example=method_example(*_args) if _args is not None else
                lambda name: (method(name), (image(), randn(2, 3, 110))))
register_op(torch.reshape, relabels=True, example=call_example((2, 3, 110)))
register_op(torch.permute, relabels=True, example=call_example((0, 2, 3, 1)))
register_op(torch.transpose, relabels=True, example=call_example(1, 3))
register_op(torch.swapaxes, torch.swapdims, relabels=True, example=call_example(1, 2))

# --- norms --------------------------------------------------------------------------------------


def _module_normalizes(norm: nn.LayerNorm | nn.RMSNorm, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    return len(norm.normalized_shape)


def _functional_normalizes(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> int:
    shape = given(("normalized_shape",), args, kwargs)["normalized_shape"]
    return 1 if isinstance(shape, int) else len(shape)


register_op(nn.modules.batchnorm._BatchNorm, layer_type="norm",  # abstract: a concrete subclass stands in
            example=lambda cls: module_example(3, shape=(2, 3, 4, 5, 6))(nn.BatchNorm3d))
register_op(nn.BatchNorm2d, layer_type="norm", linearize=rules.batch_norm_rule, example=module_example(3))
register_op(nn.BatchNorm1d, layer_type="norm", linearize=rules.batch_norm_rule,
            example=module_example(3, shape=(2, 3, 6)))
_STATS = (torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
register_op(F.batch_norm, layer_type="norm", linearize=rules.batch_norm_rule, fast=rules.eval_batch_norm,
            example=call_example(*_STATS))
register_op(torch.batch_norm, layer_type="norm", example=call_example(None, None, *_STATS, False, 0.1, 1e-5, False))
register_op(nn.LayerNorm, layer_type="norm", linearize=rules.layer_norm_rule, normalizes=_module_normalizes,
            example=module_example(10))
register_op(nn.RMSNorm, layer_type="norm", normalizes=_module_normalizes, example=module_example(10))
register_op(F.layer_norm, torch.layer_norm, layer_type="norm", linearize=rules.layer_norm_rule,
            normalizes=_functional_normalizes, example=call_example((10,)))
register_op(F.rms_norm, torch.rms_norm, layer_type="norm", normalizes=_functional_normalizes,
            example=call_example((10,)))
register_op(nn.GroupNorm, layer_type="norm", example=module_example(1, 3))
register_op(F.group_norm, torch.group_norm, layer_type="norm", example=call_example(3))

# --- attention ----------------------------------------------------------------------------------

register_op(nn.Softmax, layer_type="attention", linearize=rules.softmax_rule, example=module_example(-1))
register_op(F.softmax, torch.softmax, layer_type="attention", linearize=rules.softmax_rule, example=call_example(-1))
register_op("softmax", layer_type="attention", linearize=rules.softmax_rule, example=method_example(-1))
# the factor with the tangent broadcasts: fewer axes than the other, or a unit batch axis
_MATMUL_ARGS = {operator.matmul: ((5, 4), (2, 3, 4, 6)), torch.matmul: ((2, 1, 5, 4), (3, 4, 6))}
for _key in MATMULS:
    _a, _b = _MATMUL_ARGS.get(_key, ((3, 5, 4), (3, 4, 6)))
    register_op(_key, layer_type="attention", linearize=rules.matmul_rule,
                example=lambda fn, a=_a, b=_b: (fn, (randn(*a), randn(*b))))
register_op("matmul", "bmm", layer_type="attention", linearize=rules.matmul_rule,
            example=lambda name: (method(name), (randn(3, 5, 4), randn(3, 4, 6))))
register_op(torch.einsum, layer_type="attention",  # as a batched matrix product: MaxViT's q k^T and A V
            example=lambda fn: (lambda a, b: fn("bij,bjk->bik", a, b), (randn(3, 5, 4), randn(3, 4, 6))))
# torchvision's Swin window attention (roll, partition, attention, reverse) is one node: fx cannot open it
register_op(swin_transformer.shifted_window_attention, layer_type="attention",
            example=lambda fn: (fn, (randn(1, 4, 4, 4), randn(12, 4), randn(4, 4), randn(1, 2, 4, 4), [2, 2], 2,
                                     [1, 1])))
register_op(torch.baddbmm, layer_type="attention",
            example=lambda fn: (fn, (randn(3, 5, 6), randn(3, 5, 4), randn(3, 4, 6))))
register_op(F.scaled_dot_product_attention, layer_type="attention",
            example=lambda fn: (fn, (randn(2, 3, 5, 4), randn(2, 3, 7, 4), randn(2, 3, 7, 6))))

# --- arithmetic ---------------------------------------------------------------------------------


def _residual_add(node: fx.Node) -> str:
    """Two tensors summed (a skip connection); a tensor plus a constant is not one."""
    return "residual add" if sum(isinstance(a, fx.Node) for a in node.args) == 2 else "reshape/other"


register_op(operator.add, torch.add, operator.iadd, layer_type=_residual_add, linearize=rules.sum_rule(1),
            example=second_image)
register_op("add", layer_type=_residual_add, linearize=rules.sum_rule(1),
            example=lambda name: (method(name), (image(), image())))
# a broadcast operand's tangent is repeated over the output (a bias of shape (C, 1, 1), say)
register_op(operator.sub, torch.sub, linearize=rules.sum_rule(-1), example=lambda fn: (fn, (randn(3, 1, 1), image())))
register_op("sub", linearize=rules.sum_rule(-1), example=lambda name: (method(name), (image(), 0.5)))
register_op(operator.mul, linearize=rules.mul_rule, example=lambda fn: (fn, (randn(11, 1), image())))
register_op(torch.mul, linearize=rules.mul_rule, example=lambda fn: (fn, (image(), randn(3, 1, 1))))
register_op("mul", linearize=rules.mul_rule, example=lambda name: (method(name), (image(), 0.125)))

# --- activations --------------------------------------------------------------------------------

_ACTIVATION = dict(layer_type="nonlinearity", linearize=rules.pointwise_rule, pointwise=True, substitutes=("filtered",))
register_op(nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
            nn.ELU, nn.Mish, nn.Softplus, example=module_example(), **_ACTIVATION)
register_op(F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu, F.mish, F.softplus,
            torch.relu, torch.sigmoid, torch.tanh, torch.exp, example=call_example(), **_ACTIVATION)
register_op("relu", "sigmoid", "tanh", "exp", "sin", "cos", example=method_example(), **_ACTIVATION)

# --- padding, resizing and space <-> depth: where they move the samples (docs/method.md §5) -----

_PAD = (1, 2, 0, 3)
register_op(nn.ZeroPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d, nn.CircularPad2d, window=pad_window,
            example=module_example(_PAD))
register_op(nn.ConstantPad2d, window=pad_window, example=module_example(_PAD, 0.5))
register_op(F.pad, torch._C._nn.pad, resample=functional_pad, example=call_example((1, 2, 0, 3, 1, 0), "reflect"))
register_op(nn.PixelUnshuffle, window=unshuffle_window, example=module_example(2, shape=(2, 3, 8, 10)))
register_op(F.pixel_unshuffle, window=unshuffle_window, example=lambda fn: (fn, (randn(2, 3, 8, 10), 2)))
register_op(nn.PixelShuffle, resample=centres, example=module_example(2, shape=(2, 8, 5, 4)))
register_op(F.pixel_shuffle, resample=centres, example=lambda fn: (fn, (randn(2, 8, 5, 4), 2)))
register_op(F.interpolate, resample=interpolate_axes, example=call_example(None, 2.0, "bilinear", False))
register_op(nn.Upsample, resample=upsample_axes, example=module_example(scale_factor=2, mode="bilinear",
                                                                       align_corners=True))
