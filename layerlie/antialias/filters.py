"""Binomial filters as matrices along one axis (docs/method.md §6).

The taps come from a formula, ``C(size - 1, i) / 2^(size - 1)``. The 2-D filters of the
substitutes (:mod:`layerlie.antialias.layers`) are separable: each is a pair of matrices, one per
spatial axis, built from a 1-D operation's response to each impulse.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from layerlie.errors import LayerlieError

MAX_FILTER_SIZE = 7
"""The most binomial taps a substitute takes per axis."""

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "circular": "circular", "replicate": "replicate"}


def binomial(size: int) -> torch.Tensor:
    """The normalized binomial filter of ``size`` taps, ``C(size - 1, i) / 2^(size - 1)``: (size,)."""
    return torch.tensor([math.comb(size - 1, i) for i in range(size)], dtype=torch.float64) / 2 ** (size - 1)


def too_small(what: str, n: int, need: int) -> LayerlieError:
    """The error for a feature map too small for a filter: what, the side it got, the side it needs."""
    return LayerlieError(f"{what} needs feature maps of at least {need} x {need}, got a side of {n}; use a "
                         "smaller filter_size or a larger input, or leave these nodes out with where=")


def axis_matrix(n: int, op: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The matrix ``(n_out, n)`` of a linear 1-D ``op`` on ``(N, 1, n)``, from its response to
    each impulse. The 2-D filters here are separable, so ``M_y @ x @ M_x.T`` applies them to the
    last two axes of ``x`` whatever comes before (a batch, channels, a stack of tangents): one
    matmul, faster on small maps than a convolution over ``B * C`` one-channel images."""
    eye = torch.eye(n, dtype=like.dtype, device=like.device)[:, None]
    return op(eye)[:, 0].T


def blur1d(z: torch.Tensor, taps: torch.Tensor, stride: int, pads: tuple[int, int], mode: str) -> torch.Tensor:
    """``(N, 1, L)``: ``taps`` at ``stride``, after padding ``pads`` (before, after) in ``mode``."""
    return F.conv1d(F.pad(z, pads, mode=_PAD_MODES[mode]), taps.to(z)[None, None], stride=stride)


def upsample1d(z: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """``(N, 1, L) -> (N, 1, 2L)``: zeros between the samples, then ``2 * taps`` (the binomial
    interpolation filter), the borders reflected at the coarse resolution. An even size puts the
    fine samples half a fine pixel after their place; :func:`downsample1d` takes it back."""
    m = taps.numel()
    before = (m - 1) // 2
    q = coarse_padding(m)
    full = F.conv_transpose1d(F.pad(z, (q, q), mode="reflect"), 2 * taps.to(z)[None, None], stride=2)
    start = 2 * q - before + m - 1
    return full[..., start:start + 2 * z.shape[-1]]


def downsample1d(z: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """``(N, 1, 2L) -> (N, 1, L)``: the binomial blur at stride 2, the borders reflected."""
    m = taps.numel()
    return blur1d(z, taps, 2, (m // 2, m - 1 - m // 2), "reflect")


def coarse_padding(m: int) -> int:
    """The coarse padding that gives every kept fine sample of :func:`upsample1d` a full window."""
    return -(-(m - 1 - (m - 1) // 2) // 2)

