"""Stride-1 twins and module forms of strided ops (docs/method.md §6): the dense output that the
alias measure reads, and a functional pool as the module that surgery replaces.

Example:
    >>> from torch import nn
    >>> stride_one(nn.Conv2d(3, 8, 3, stride=2)).stride
    (1, 1)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch.fx as fx
from torch import nn

from layerlie.core.geometry import given

if TYPE_CHECKING:
    from layerlie.core.ops import Call


def stride_one(layer: nn.Module) -> nn.Module:
    """A shallow twin of ``layer`` at stride 1: the same class (so the same forward, timm's conv
    subclasses included), sharing its parameter and buffer tensors."""
    twin = copy.copy(layer)
    twin.__dict__.update({k: copy.copy(v) for k, v in layer.__dict__.items() if isinstance(v, dict)})
    twin.stride = (1, 1) if isinstance(layer.stride, tuple) else 1
    return twin


def module_dense(call: Call) -> Any:
    args, kwargs = call.rebuild()
    return stride_one(call.fn)(*args, **kwargs)


def functional_dense(names: Sequence[str]) -> Callable[[Call], Any]:
    where = names.index("stride") + 1

    def dense(call: Call) -> Any:
        args, kwargs = call.rebuild()
        if len(args) > where:
            args = (*args[:where], 1, *args[where + 1:])
        else:
            kwargs = {**kwargs, "stride": 1}
        return call.fn(*args, **kwargs)

    return dense


def pool_module(cls: type[nn.Module], names: Sequence[str]) -> Callable[[tuple, dict], nn.Module | None]:
    def module(args: tuple, kwargs: dict) -> nn.Module | None:
        named = given(names, args, kwargs)
        if any(isinstance(v, fx.Node) for v in named.values()) or named.pop("return_indices", False):
            return None
        return cls(**named)

    return module

