"""Sample positions by probing an op's receptive field, for ops that no rule knows (docs/method.md §5).

An op that moves samples locally (a convolution, a pool, a padding, a module of them) puts
each output sample over a compact set of input pixels. The gradient of one output sample with
respect to the input (one random cotangent over the batch and the channels, on the op's own
input and on noise inputs, so that a max pool's switches or a dead ReLU do not hide pixels) marks
that set along each spatial axis; the middle of the set is where the sample sits. A few samples
per axis, away from the borders, give the stride and the offset; they must agree with one
affine map, and their windows must not grow along the axis (a cumulative sum). A resampling
op (bilinear or bicubic resizing) has supports whose middles are quantized to half pixels;
for it, the centroid of each sample's weights (all channels and batch items summed, so that
the weights sum to one) gives the position. Where neither is one affine map, the op mixes
globally (or irregularly) and the axis has no positions.
Results are cached per (op, input layout, input shape).

An op that only relabels samples (a reshape, a permute, a window reverse that fx cannot open)
is probed by its values instead: applied to tensors that hold each sample's grid row and
column, it returns the rows and columns of its own samples (:func:`relabelled_axes`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> probe_axes(nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.randn(1, 3, 16, 16), (2, 3))
    ((2.0, 0.0), (2.0, 0.0))
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import torch

Axis = tuple[float, float]

SAMPLES = 4
"""Output samples probed per axis."""
NOISE = 8
"""Noise inputs probed besides the op's own: enough that a max pool's switches visit every
pixel of its window (a 3-wide window misses a column with odds (2/3)^(8 C))."""
FIT_TOL = 1e-3
"""How far (in input pixels) a sample's middle may sit from the fitted line."""
CENTROID_TOL = 0.1
"""The same for centroids: bicubic weights (``a = -0.75``) are not exactly centred on the
resampled position; they miss it by up to about 0.05 px."""

_MODULE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHE: dict[Hashable, Any] = {}


def _response(op: Callable[[torch.Tensor], torch.Tensor], base: torch.Tensor, dims: tuple[int, int],
              axis: int, index: int, other: int, cot: Callable[[torch.Size], torch.Tensor]) -> torch.Tensor:
    """The gradient of output sample ``index`` (at ``other`` on the other spatial axis), with
    cotangent ``cot`` over its batch items and channels, summed onto input axis ``dims[axis]``."""
    z = base.clone().requires_grad_(True)
    y = op(z + 0)  # not a leaf: in-place ops inside the op stay legal
    sel = [slice(None)] * y.ndim
    sel[dims[axis]], sel[dims[1 - axis]] = index, other
    c = torch.zeros_like(y)
    c[tuple(sel)] = cot(c[tuple(sel)].shape).to(y.dtype)
    (g,) = torch.autograd.grad(y, z, c)
    return g


def _support(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dims: tuple[int, int],
             axis: int, index: int, other: int) -> tuple[int, int, float] | None:
    """The first and last input index along ``dims[axis]`` that move output sample ``index``
    (at ``other`` on the other spatial axis), over the op's input and a noise input, and the
    centroid of its summed weights (nan where they sum to zero)."""
    first, last = None, None
    gen = torch.Generator().manual_seed(0)
    rest = [d for d in range(x.ndim) if d != dims[axis]]
    noise = [torch.randn(x.shape, generator=gen, dtype=x.dtype) for _ in range(NOISE)]
    for base in (x.detach(), *noise):
        g = _response(op, base, dims, axis, index, other, lambda shape: torch.randn(shape, generator=gen))
        mass = g.abs().sum(rest)
        hit = torch.nonzero(mass > 1e-12 * float(mass.max())).flatten() if mass.max() > 0 else mass.new_zeros(0)
        if hit.numel():
            first = int(hit[0]) if first is None else min(first, int(hit[0]))
            last = int(hit[-1]) if last is None else max(last, int(hit[-1]))
    if first is None:
        return None
    w = _response(op, x.detach(), dims, axis, index, other, torch.ones).sum(rest).double()
    where = torch.arange(w.numel(), dtype=torch.float64)
    centroid = float((w * where).sum() / w.sum()) if abs(float(w.sum())) > 1e-6 * float(w.abs().sum()) else math.nan
    return first, last, centroid


def _fit_axis(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, out_shape: torch.Size,
              dims: tuple[int, int], axis: int) -> Axis | None:
    """``(scale, shift)``: output sample ``j`` of axis ``dims[axis]`` sits at input index
    ``shift + scale * j``; None where the samples' middles do not lie on one increasing line."""
    m, other = out_shape[dims[axis]], out_shape[dims[1 - axis]] // 2
    if m < 2:
        return None
    lo, hi = m // 4, max((3 * m) // 4, m // 4 + 1)
    js = sorted({round(lo + (hi - lo) * k / (SAMPLES - 1)) for k in range(SAMPLES)})
    middles, centroids, widths = [], [], []
    for j in js:
        span = _support(op, x, dims, axis, j, other)
        if span is None or span[:2] == (0, x.shape[dims[axis]] - 1) and x.shape[dims[axis]] > 2:
            return None  # no response, or every input pixel moves it: global mixing
        middles.append((span[0] + span[1]) / 2)
        centroids.append(span[2])
        widths.append(span[1] - span[0])
    if max(widths) - min(widths) > 1:
        return None  # a window that grows along the axis (a cumulative sum) is no local window
    return _line(js, middles, FIT_TOL) or _line(js, centroids, CENTROID_TOL)


def _line(js: list[int], where: list[float], tol: float) -> Axis | None:
    """``(scale, shift)`` of the increasing line through ``(j, where)``, or None off one line."""
    j, w = torch.tensor(js, dtype=torch.float64), torch.tensor(where, dtype=torch.float64)
    if not torch.isfinite(w).all():
        return None
    scale = float(((j - j.mean()) * (w - w.mean())).sum() / ((j - j.mean()) ** 2).sum())
    shift = float(w.mean() - scale * j.mean())
    if scale <= 0 or float((w - shift - scale * j).abs().max()) > tol:
        return None
    return round(scale * 2 ** 20) / 2 ** 20, round(shift * 2 ** 20) / 2 ** 20


def probe_axes(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dims: tuple[int, int],
               key: Hashable | None = None, owner: torch.nn.Module | None = None) -> tuple[Axis, Axis] | None:
    """``((scale, shift) of y, (scale, shift) of x)`` of the op's output grid on axes ``dims``
    (the same axes as the input's), in input samples; None where the op is not local along
    both axes or cannot be probed (docs/method.md §5). ``key`` (hashable: the op's constants and the
    input's layout) caches the result per input shape; with ``owner``, the module that the op
    calls, for as long as that module lives."""
    if owner is not None:
        store, full = _MODULE_CACHE.setdefault(owner, {}), (key, tuple(x.shape), dims)
    else:
        store, full = _CACHE, (key, tuple(x.shape), dims)
    if key is not None and full in store:
        return store[full]
    training = owner is not None and owner.training
    if training:  # dozens of forward passes must not move a batch norm's statistics
        owner.eval()
    try:
        got = _probe(op, x, dims)
    finally:
        if training:
            owner.train()
    if key is not None:
        store[full] = got
    return got


def _probe(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dims: tuple[int, int]
           ) -> tuple[Axis, Axis] | None:
    try:
        with torch.enable_grad():
            out = op(x.detach().clone())
            if not isinstance(out, torch.Tensor) or not out.is_floating_point() or out.ndim != x.ndim:
                return None
            y = _fit_axis(op, x, out.shape, dims, 0)
            w = _fit_axis(op, x, out.shape, dims, 1) if y is not None else None
            return None if w is None else (y, w)
    except (RuntimeError, TypeError, ValueError, IndexError):  # the op refuses the probe: no positions
        return None


def relabelled_axes(op: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, cols: torch.Tensor
                    ) -> tuple[str, int, int] | None:
    """Where an op that only relabels samples puts the grid: ``rows`` and ``cols`` hold each
    input element's grid row and column (float64, the input's shape). Returns ``("grid", y, x)``
    when the output's axes ``y`` and ``x`` count the grid's rows and columns, ``("tokens", d,
    -1)`` when axis ``d`` counts them row-major, else None (the op computes, or scrambles)."""
    try:
        out_r, out_c = op(rows), op(cols)
    except (RuntimeError, TypeError, ValueError, IndexError):
        return None
    if not isinstance(out_r, torch.Tensor) or out_r.dtype != torch.float64 or out_r.shape != out_c.shape:
        return None
    n = int(cols.max()) + 1

    def counts(t: torch.Tensor, d: int) -> bool:
        shape = [1] * t.ndim
        shape[d] = t.shape[d]
        return bool((t == torch.arange(t.shape[d], dtype=t.dtype).reshape(shape)).all())

    for a in range(1, out_r.ndim):
        if counts(out_r * n + out_c, a):
            return "tokens", a, -1
        for b in range(a + 1, out_r.ndim):
            if counts(out_r, a) and counts(out_c, b):
                return "grid", a, b
    return None
