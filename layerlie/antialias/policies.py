"""Surgery policies: what to replace, and by what (docs/method.md §6, STYLE 4).

A policy is a registered function from a node to its substitute, or None to keep the node
(:func:`register_policy`). ``blurpool`` and ``aps`` take apart strided convolutions and pools
(:class:`layerlie.antialias.layers.Resampled`); ``filtered`` puts a pointwise nonlinearity on an
image-like tensor between low-pass filters (:class:`layerlie.antialias.layers.FilteredActivation`).

Example:
    >>> import layerlie as ll
    >>> ll.list_policies()
    ['aps', 'blurpool', 'filtered']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

import torch
import torch.fx as fx
from torch import nn

from layerlie.antialias.layers import BlurPool2d, FilteredActivation, Pointwise, Resampled, is_patch_embedding
from layerlie.core.layout import Layout
from layerlie.core.ops import find_op, strided
from layerlie.core.registry import Registry


@dataclass(frozen=True)
class Options:
    """What a policy needs besides the node: filter size, whether samplers blur, and the layouts
    of an example pass (None without ``x``)."""

    filter_size: int = 3
    blur: bool = True
    layouts: dict[str, Layout] | None = None


Factory = Callable[[fx.GraphModule, fx.Node, Options], Union[nn.Module, None]]


@dataclass(frozen=True)
class Policy:
    """A surgery: a function from a node to its substitute, or None to keep the node.

    Attributes:
        name: the registry key (``antialias(activations=name)`` for activation policies).
        looks_for: what it replaces, for messages.
        substitute: ``(gm, node, options) -> nn.Module | None``.
        activation: selected by ``activations=``, not by a flag.
        needs_layouts: needs an example pass (``x=``, or the model's input size).
    """

    name: str
    looks_for: str
    substitute: Factory
    activation: bool = False
    needs_layouts: bool = False


_POLICIES: Registry[Policy] = Registry("surgery policy", "surgery policies")


def register_policy(name: str, looks_for: str, activation: bool = False,
                    needs_layouts: bool = False) -> Callable[[Factory], Factory]:
    """Register a surgery policy under ``name``."""

    def deco(fn: Factory) -> Factory:
        _POLICIES.add(name, Policy(name, looks_for, fn, activation, needs_layouts))
        return fn

    return deco


get_policy = _POLICIES.get
"""The policy registered under a name; an unknown name raises a :class:`layerlie.LayerlieError`
that lists the valid ones."""

list_policies = _POLICIES.names
"""The registered policies' names, sorted."""


def _strided_layer(gm: fx.GraphModule, node: fx.Node, policy: str) -> nn.Module | None:
    """The strided convolution or pool that ``node`` applies (a functional pool as a module) when
    its op lists ``policy`` among its substitutes, or None; a patch embedding already blurred is
    left alone, so reapplying is safe (the samplers list no substitute)."""
    op = find_op(gm, node)
    if op is None or policy not in op.substitutes:
        return None
    if node.op == "call_module":
        layer = gm.get_submodule(node.target)
        source = node.args[0] if node.args else None
        if isinstance(layer, nn.Conv2d) and is_patch_embedding(layer) and isinstance(source, fx.Node) \
                and source.op == "call_module" and isinstance(gm.get_submodule(source.target), BlurPool2d):
            return None
    elif op.module is not None:
        layer = op.module(node.args, node.kwargs)
    else:
        return None
    return layer if layer is not None and strided(layer) else None


def _resampled(layer: nn.Module, options: Options, aps: bool) -> Resampled:
    make = Resampled.from_conv if isinstance(layer, nn.Conv2d) else Resampled.from_pool
    return make(layer, options.filter_size, aps=aps, blur=options.blur)


@register_policy("blurpool", "strided convolutions and pools (blurpool)")
def _blurpool(gm: fx.GraphModule, node: fx.Node, options: Options) -> nn.Module | None:
    layer = _strided_layer(gm, node, "blurpool")
    return _resampled(layer, options, aps=False) if layer is not None else None


@register_policy("aps", "strided convolutions and pools (aps)")
def _aps(gm: fx.GraphModule, node: fx.Node, options: Options) -> nn.Module | None:
    layer = _strided_layer(gm, node, "aps")
    return _resampled(layer, options, aps=True) if layer is not None else None


@register_policy("filtered", "pointwise nonlinearities on image-like tensors (activations='filtered')",
                 activation=True, needs_layouts=True)
def _filtered(gm: fx.GraphModule, node: fx.Node, options: Options) -> nn.Module | None:
    op = find_op(gm, node)
    if op is None or "filtered" not in op.substitutes:
        return None
    layout = options.layouts.get(node.name)
    extra = [*node.args[1:], *node.kwargs.values()]
    if layout is None or not layout.spatial or any(isinstance(a, fx.Node) for a in extra):
        return None
    if node.op == "call_module":
        act = gm.get_submodule(node.target)
    else:
        fn = getattr(torch.Tensor, node.target) if node.op == "call_method" else node.target
        act = Pointwise(fn, tuple(node.args[1:]), node.kwargs)
    return FilteredActivation.from_activation(act, layout, options.filter_size)

