"""Where an op puts its output samples (docs/method.md §5): the window of a convolution, pool,
padding module or space-to-depth, and the resampling of padding, resizing, adaptive pooling and
depth-to-space. The op table (:mod:`layerlie.core.table`) holds these functions on its entries.

Example:
    >>> from torch import nn
    >>> conv_window(nn.Conv2d(3, 8, 3, stride=2, padding=1), (), {})
    Window(kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1))
"""

from __future__ import annotations

import fractions
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn


class Window(NamedTuple):
    """A spatial window op's geometry, ``(y, x)`` pairs (docs/method.md §5); ``padding`` is before. The
    kernel of a functional convolution is None where its weight is a graph node, not a value
    (whether an op is strided needs only its stride)."""

    kernel: tuple[int, int] | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


WindowFn = Callable[[Any, Sequence[Any], Mapping[str, Any]], Window]
Axes = dict[int, tuple[float, float]]
ResampleFn = Callable[[Any, Sequence[Any], Mapping[str, Any], torch.Tensor], Axes]



def pair(v: Any) -> tuple[int, int]:
    """``(y, x)`` from an int or a one- or two-item sequence."""
    if isinstance(v, int):
        return v, v
    if not isinstance(v, Sequence) or not 1 <= len(v) <= 2:
        raise TypeError(f"expected an int or one or two ints, got {v!r}")
    return int(v[0]), int(v[-1])


def _same_before(size: int, k: int, s: int, d: int) -> int:
    """The padding before an axis under timm's dynamic 'same' padding (``pad_same``)."""
    total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2


def _same(w: Window, args: Sequence[Any]) -> Window:
    """``w`` with the padding that timm's 'same' layers add at run time, for the input in ``args``."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor):
        return w
    pad = tuple(_same_before(n, k, s, d) for n, k, s, d in zip(x.shape[-2:], w.kernel, w.stride, w.dilation))
    return w._replace(padding=pad)


def conv_window(conv: nn.Conv2d, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Window:
    pad = conv.padding
    if isinstance(pad, str):
        pad = (0, 0) if pad == "valid" else tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    w = Window(pair(conv.kernel_size), pair(conv.stride), pair(pad), pair(conv.dilation))
    return _same(w, args) if getattr(conv, "same_pad", False) else w  # timm's StdConv2dSame


def pool_window(pool: nn.MaxPool2d | nn.AvgPool2d, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Window:
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return Window(pair(pool.kernel_size), pair(stride), pair(pool.padding), pair(getattr(pool, "dilation", 1)))


def always_same(window_fn: WindowFn) -> WindowFn:
    return lambda fn, args, kwargs: _same(window_fn(fn, args, kwargs), args)


MAX_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
AVG_POOL_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
CONV_ARGS = ("weight", "bias", "stride", "padding", "dilation", "groups")


def given(names: Sequence[str], args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A functional op's arguments after the input, by name."""
    return {**dict(zip(names, args[1:])), **kwargs}


def functional_pool_window(names: Sequence[str]) -> WindowFn:
    def window_of(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Window:
        named = given(names, args, kwargs)
        k = named["kernel_size"]
        stride = named.get("stride") or k  # None or torch's [] mean the kernel size
        return Window(pair(k), pair(stride), pair(named.get("padding", 0)), pair(named.get("dilation", 1)))

    return window_of


def functional_conv_window(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Window:
    named = given(CONV_ARGS, args, kwargs)
    weight = named["weight"]
    kernel = pair(tuple(weight.shape[-2:])) if isinstance(weight, torch.Tensor) else None
    return Window(kernel, pair(named.get("stride", 1)),
                  pair(named.get("padding", 0)), pair(named.get("dilation", 1)))


def pad_window(pad: nn.modules.padding._ConstantPadNd, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Window:
    """A 2-D padding module: a kernel-1, stride-1 window whose padding is the module's (left,
    right, top, bottom) before; the padded border holds real samples of other content."""
    left, _, top, _ = pad.padding
    return Window((1, 1), (1, 1), (top, left), (1, 1))


def unshuffle_window(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Window:
    """Space-to-depth by ``r``: each output sample holds an ``r x r`` block, centred on it."""
    r = fn.downscale_factor if isinstance(fn, nn.Module) else given(("downscale_factor",), args, kwargs)[
        "downscale_factor"]
    return Window((r, r), (r, r), (0, 0), (1, 1))


def functional_pad(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any], out: torch.Tensor) -> Axes:
    """``F.pad(x, pad)``: ``pad`` lists (before, after) from the last axis backwards; every
    padded axis shifts by its padding before, in every mode."""
    pad, ndim = given(("pad",), args, kwargs)["pad"], args[0].ndim
    return {ndim - 1 - i: (1.0, -float(pad[2 * i])) for i in range(len(pad) // 2)}


def _half_pixel(n_in: int, n_out: int, scale: float | None = None) -> tuple[float, float]:
    """Output sample ``j`` at input sample ``(j + 1/2) * scale - 1/2``, ``scale = n_in / n_out``
    unless the op's scale factor says otherwise: the centres of resized pixels, of adaptive
    pooling's bins, of depth-to-space's sub-samples."""
    scale = n_in / n_out if scale is None else scale
    return scale, (scale - 1) / 2


def _nearest(n_in: int, n_out: int, scale: float | None = None) -> tuple[float, float]:
    """Legacy ``nearest`` copies pixel ``floor(j * scale)``: the line through the mean of those
    copies, ``scale * j - (q - 1) / (2 q)`` for ``scale = p / q`` (pixel centres again where the
    factor is an integer)."""
    scale = n_in / n_out if scale is None else scale
    q = fractions.Fraction(scale).limit_denominator(max(n_out, 1)).denominator
    return scale, -(q - 1) / (2 * q)


def _resized(x: torch.Tensor, out: torch.Tensor, factor: Any, align_corners: bool | None,
             recompute: bool | None, mode: str = "nearest") -> Axes:
    """Resizing of the axes after the channels (docs/method.md §5): corners on corners with
    ``align_corners``, else pixel centres, or legacy ``nearest``'s copies; a scale factor that
    is not recomputed sets the spacing itself, as in torch's source-index arithmetic."""
    axes: Axes = {}
    dims = range(2, x.ndim)
    factors = [None] * len(dims) if factor is None or recompute else \
        ([factor] * len(dims) if isinstance(factor, (int, float)) else list(factor))
    for d, f in zip(dims, factors):
        n_in, n_out = x.shape[d], out.shape[d]
        if align_corners:
            axes[d] = ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0, 0.0)
        else:
            axes[d] = (_nearest if mode == "nearest" else _half_pixel)(n_in, n_out, 1 / f if f else None)
    return axes


_INTERPOLATE_ARGS = ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias")


def interpolate_axes(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any], out: torch.Tensor) -> Axes:
    named = given(_INTERPOLATE_ARGS, args, kwargs)
    return _resized(args[0], out, named.get("scale_factor"), named.get("align_corners"),
                    named.get("recompute_scale_factor"), named.get("mode", "nearest"))


def upsample_axes(fn: nn.Upsample, args: Sequence[Any], kwargs: Mapping[str, Any], out: torch.Tensor) -> Axes:
    return _resized(args[0], out, fn.scale_factor, fn.align_corners, fn.recompute_scale_factor, fn.mode)


def centres(fn: Any, args: Sequence[Any], kwargs: Mapping[str, Any], out: torch.Tensor) -> Axes:
    """Adaptive pooling, each output sample at the centre of its bin (exact where the size
    divides, within half a pixel otherwise), and depth-to-space by ``r``, ``r`` sub-samples
    per input sample centred on it: both are pixel centres on the last two axes."""
    x = args[0]
    return {d: _half_pixel(x.shape[d], out.shape[d]) for d in (x.ndim - 2, x.ndim - 1)}

