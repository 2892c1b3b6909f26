"""Shared fixtures and the one tolerance table of the suite."""

from __future__ import annotations

import functools

import pytest
import torch

import layerlie as ll

# Relative tolerances keyed by dtype: float precision of a whole computation.
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return float((a - b).norm() / b.norm())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@functools.lru_cache(maxsize=8)
def timm_model(name: str, **kwargs: object) -> torch.nn.Module:
    """A random-init timm model with a fixed seed, built once per session."""
    torch.manual_seed(0)
    return ll.load_model(name, **kwargs)


def smooth_image(b: int = 2, c: int = 3, h: int = 24, w: int = 28, dtype: torch.dtype = torch.float64,
                 max_freq: int = 3) -> torch.Tensor:
    """A band-limited periodic image: a few low-frequency cosines per channel."""
    g = torch.Generator().manual_seed(1)
    yy = torch.arange(h, dtype=dtype)[:, None] * 2 * torch.pi / h
    xx = torch.arange(w, dtype=dtype)[None, :] * 2 * torch.pi / w
    out = torch.zeros(b, c, h, w, dtype=dtype)
    for ky in range(max_freq + 1):
        for kx in range(max_freq + 1):
            a = torch.randn(b, c, 1, 1, generator=g, dtype=dtype)
            ph = torch.rand(b, c, 1, 1, generator=g, dtype=dtype) * 2 * torch.pi
            out = out + a * torch.cos(ky * yy + kx * xx + ph)
    return out
