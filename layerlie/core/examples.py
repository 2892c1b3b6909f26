"""Tiny float64 instances of the ops in the op table, on which the conformance tests check each
entry's knowledge (docs/design.md §7): an entry's ``example`` maps its key to ``(callable, args)``.

Example:
    >>> from torch import nn
    >>> fn, (x,) = module_example(3, 4, 3)(nn.Conv2d)
    >>> tuple(fn(x).shape)
    (2, 4, 9, 8)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

Example = Callable[[Any], tuple[Callable[..., Any], tuple]]
"""``key -> (callable, args)``: a tiny float64 instance of the op ``key``."""


def randn(*shape: int) -> torch.Tensor:
    """A standard normal tensor in float64."""
    return torch.randn(*shape, dtype=torch.float64)


def image() -> torch.Tensor:
    """``(B, C, H, W)`` with an odd H and an even W, so 'same' paddings differ per axis."""
    return randn(2, 3, 11, 10)


def _ready(m: nn.Module) -> nn.Module:
    """Random parameters and running statistics, in eval mode, in float64."""
    m = m.double().eval().requires_grad_(False)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn_like(m.running_mean))
            m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return m


def module_example(*args: Any, shape: Sequence[int] | None = None, **kwargs: Any) -> Example:
    """An example that builds the key class with ``args`` and runs it on a random tensor."""
    return lambda cls: (_ready(cls(*args, **kwargs)), (randn(*shape) if shape else image(),))


def call_example(*args: Any) -> Example:
    """An example that calls the key (a function) on an image and then ``args``."""
    return lambda fn: (fn, (image(), *args))


def method(name: str) -> Callable[..., Any]:
    """The tensor method ``name`` as a function of the tensor and its arguments."""

    def bound(obj: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(obj, name)(*args, **kwargs)

    return bound


def method_example(*args: Any) -> Example:
    """An example that calls the key (a tensor-method name) on an image with ``args``."""
    return lambda name: (method(name), (image(), *args))


def second_image(fn: Any) -> tuple[Callable[..., Any], tuple]:
    """An example that calls the key (a function) on two images."""
    return fn, (image(), image())
