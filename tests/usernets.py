"""Models as a user names them, ``usernets:NAME`` (tests/ is on sys.path)."""

from __future__ import annotations

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
