"""Models as a user writes them, importable as ``usernets:NAME`` (tests/ is on sys.path)."""

from __future__ import annotations

import torch
from torch import nn


class Tiny(nn.Module):
    """A small CNN of one's own: conv, batch norm, ReLU, pooling, a linear head."""

    def __init__(self, in_chans: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.head(h.mean((2, 3)))


class Fixed(nn.Module):
    """A model that runs at one input size only: its head reads the flattened feature map."""

    def __init__(self, height: int, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4 * (height // 2) * (width // 2), 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(torch.relu(self.conv(x))).flatten(1))


def tiny() -> nn.Module:
    return Tiny()


def gray() -> nn.Module:
    return Tiny(in_chans=1)


def fixed32() -> nn.Module:
    return Fixed(32, 32)


def fixed24x32() -> nn.Module:
    return Fixed(24, 32)
