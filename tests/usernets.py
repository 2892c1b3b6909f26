"""Models as a user names them, ``usernets:NAME`` (tests/ is on sys.path)."""

from __future__ import annotations

import time

import torch
from torch import nn

from layerlie.testing import Fixed, Tiny


def tiny() -> nn.Module:
    return Tiny()


def gray() -> nn.Module:
    return Tiny(in_chans=1)


def fixed32() -> nn.Module:
    return Fixed(32, 32)


def fixed24x32() -> nn.Module:
    return Fixed(24, 32)


SLOW_S = 2.0
"""Seconds that ``usernets:slow`` takes to build: long enough to kill a node or a driver mid-task."""


def slow() -> nn.Module:
    time.sleep(SLOW_S)
    return Tiny()


class _Hungry(Tiny):
    """Tiny, but its forward runs out of memory with ``error``."""

    def __init__(self, error: type[BaseException]) -> None:
        super().__init__()
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise self.error(f"out of memory in forward of a {tuple(x.shape)} batch (injected)")


def out_of_memory() -> nn.Module:
    return _Hungry(MemoryError)


def gpu_out_of_memory() -> nn.Module:
    return _Hungry(torch.OutOfMemoryError)
