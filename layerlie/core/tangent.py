"""The tangent ``G h = d/dt T_t h |_{t=0}`` of an image-like tensor (docs/method.md §1, 5).

For an affine group, ``G h = v(u) . grad_u h``: the velocity field at the samples'
normalized positions times a discrete spatial derivative. For a channel group,
``G h = A h`` along the channel axis. Nothing here differentiates ``grid_sample``.

Derivative schemes (a registry: :func:`register_scheme`, :func:`get_scheme`,
:func:`list_schemes`):

- ``"central"`` (default): ``(h[j+1] - h[j-1]) / 2``, zeros beyond the border. It is the
  symmetric derivative of the bilinear interpolant, so it equals the limit of
  ``(T_eps h - T_-eps h) / 2 eps`` with bilinear, zero-padded ``grid_sample``.
- ``"spectral"``: the derivative of the periodic band-limited (FFT) interpolant, Nyquist
  bin dropped. Exact for band-limited images; at a sharp edge it rings (Gibbs) across the
  whole axis, where ``central`` stays local.
- ``"published"``: exactly what the published code's autodiff through its hand-written
  bilinear sampler returns at ``t = 0``: a forward difference where float rounding puts
  ``affine_grid``'s coordinate on or above the pixel, a backward one where it lands just
  below, reflection at the border, and always the per-tensor ``[-1, 1]`` convention. At a
  step edge it puts the whole jump on one side of the edge, in column (row) stripes.

Example:
    >>> import torch, layerlie as ll
    >>> h = torch.arange(5.0).expand(1, 1, 5, 5)
    >>> ll.tangent(h, ll.group("translate_x"))[0, 0, 2, 1:4]  # a ramp of slope 2 per unit u_x
    tensor([2., 2., 2.])
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from layerlie.core.registry import Registry
from layerlie.errors import LayerlieError
from layerlie.core.groups import Group


@dataclass(frozen=True)
class Frame:
    """Where the samples of an image-like tensor sit (docs/method.md §5).

    Attributes:
        y_dim, x_dim: the tensor axes that are H and W.
        channel_dim: the channel axis (channel groups act along it), or None.
        y, x: ``(scale, shift)`` per axis: sample ``j`` sits at normalized position
            ``shift + scale * j`` of the *input*. None means the tensor spans ``[-1, 1]``
            at its own resolution (right for the input image itself).
    """

    y_dim: int = -2
    x_dim: int = -1
    channel_dim: int | None = 1
    y: tuple[float, float] | None = None
    x: tuple[float, float] | None = None

    def axis_map(self, h: torch.Tensor, axis: str) -> tuple[float, float]:
        dim, given = (self.y_dim, self.y) if axis == "y" else (self.x_dim, self.x)
        if given is not None:
            return given
        n = h.shape[dim]
        return (2.0 / (n - 1) if n > 1 else 1.0, -1.0)

    def positions(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized positions ``u_y, u_x`` of the samples, shaped to broadcast against h."""
        out = []
        for axis, dim in (("y", self.y_dim), ("x", self.x_dim)):
            scale, shift = self.axis_map(h, axis)
            n = h.shape[dim]
            u = shift + scale * torch.arange(n, dtype=h.dtype, device=h.device)
            shape = [1] * h.ndim
            shape[dim] = n
            out.append(u.reshape(shape))
        return out[0], out[1]


IMAGE = Frame()
"""A (B, C, H, W) tensor at its own resolution: the model's input."""

Derivative = Callable[[torch.Tensor, int], torch.Tensor]
"""``derivative(h, dim)``: dh/d(index) along ``dim``, the same shape as ``h``."""


@dataclass(frozen=True)
class Scheme:
    """A derivative scheme: how ``G h`` of an affine group is computed (docs/method.md §5).

    Attributes:
        name: registry name.
        tangent: ``tangent(h, group, frame)``, ``G h`` for an affine group.
        derivative: the axis derivative that ``tangent`` moves along the velocity field, or
            None for a scheme that is not one (``published``: the published sampler's terms).
    """

    name: str
    tangent: Callable[[torch.Tensor, Group, Frame], torch.Tensor]
    derivative: Derivative | None = None

    def __call__(self, h: torch.Tensor, dim: int) -> torch.Tensor:
        """``derivative(h, dim)``, as ``get_scheme(name)(h, dim)`` gave before schemes were
        entries; kept for one release."""
        warnings.warn("calling get_scheme(name) is deprecated; use get_scheme(name).derivative",
                      DeprecationWarning, stacklevel=2)
        if self.derivative is None:
            raise LayerlieError(f"scheme {self.name!r} has no axis derivative")
        return self.derivative(h, dim)


_SCHEMES: Registry[Scheme] = Registry("scheme")


def register_scheme(name: str, derivative: Derivative) -> Scheme:
    """Register a scheme: ``derivative(h, dim)`` is dh/d(index) along ``dim``, and ``G h`` is
    the velocity field times it along each axis (docs/method.md §5)."""
    scheme = Scheme(name, functools.partial(_along_velocity, derivative), derivative)
    _SCHEMES.add(name, scheme)
    return scheme


def get_scheme(name: str) -> Scheme:
    """The registered scheme ``name``; an unknown name raises a :class:`LayerlieError` that
    lists the valid ones.

    Example:
        >>> get_scheme("central").derivative is central_difference
        True
    """
    return _SCHEMES.get(name)


def list_schemes() -> list[str]:
    """The names of the registered schemes, sorted."""
    return _SCHEMES.names()


def check_scheme(name: str) -> str:
    """``name`` if it is a registered scheme; else :func:`get_scheme`'s error."""
    return get_scheme(name).name


def central_difference(h: torch.Tensor, dim: int) -> torch.Tensor:
    """``(h[j+1] - h[j-1]) / 2`` along ``dim``, with zeros beyond the border."""
    n = h.shape[dim]
    pad = torch.zeros_like(h.narrow(dim, 0, 1))
    p = torch.cat([pad, h, pad], dim)
    return (p.narrow(dim, 2, n) - p.narrow(dim, 0, n)) / 2


def spectral_derivative(h: torch.Tensor, dim: int) -> torch.Tensor:
    """Derivative of the periodic trigonometric interpolant along ``dim`` (Nyquist dropped)."""
    n = h.shape[dim]
    k = torch.arange(n // 2 + 1, device=h.device, dtype=h.dtype) * (2 * math.pi / n)
    if n % 2 == 0:
        k[-1] = 0
    shape = [1] * h.ndim
    shape[dim] = k.numel()
    spectrum = torch.fft.rfft(h, dim=dim) * (1j * k.reshape(shape))
    return torch.fft.irfft(spectrum, n=n, dim=dim)


def tangent(h: torch.Tensor, group: Group, scheme: str = "central",
            frame: Frame = IMAGE) -> torch.Tensor:
    """``G h`` for an image-like tensor (docs/method.md §1, 5).

    Args:
        h: image-like tensor, e.g. ``(B, C, H, W)``; ``frame`` names its axes.
        group: the one-parameter group.
        scheme: a registered scheme (:func:`list_schemes`): ``"central"``, ``"spectral"``,
            ``"published"``.
        frame: axes and sample positions of ``h``.

    Returns:
        ``G h``, the same shape as ``h``.
    """
    entry = get_scheme(scheme)
    if not group.spatial:
        return _channel_tangent(h, group, frame)
    return entry.tangent(h, group, frame)


def _along_velocity(derivative: Derivative, h: torch.Tensor, group: Group, frame: Frame) -> torch.Tensor:
    """``v(u) . grad_u h`` with ``derivative`` along each axis, scaled to normalized units."""
    if group.origin is not None:
        raise LayerlieError(f"group {group.name!r} is the published stretch map, not a group; "
                            "use it with scheme='published', or use stretch_x/stretch_y")
    m = group.generator.to(h)
    (sy, _), (sx, _) = frame.axis_map(h, "y"), frame.axis_map(h, "x")
    uy, ux = frame.positions(h)
    vx = m[0, 0] * ux + m[0, 1] * uy + m[0, 2]
    vy = m[1, 0] * ux + m[1, 1] * uy + m[1, 2]
    out = torch.zeros_like(h)
    if bool((vx != 0).any()):
        out = out + vx * derivative(h, frame.x_dim) / sx
    if bool((vy != 0).any()):
        out = out + vy * derivative(h, frame.y_dim) / sy
    return out


def _channel_tangent(h: torch.Tensor, group: Group, frame: Frame) -> torch.Tensor:
    if frame.channel_dim is None:
        return torch.zeros_like(h)
    a = group.generator.to(h)
    c = h.shape[frame.channel_dim]
    if a.shape[0] != c:
        raise LayerlieError(f"group {group.name!r} mixes {a.shape[0]} channels but the tensor has "
                            f"{c} on axis {frame.channel_dim}; define it with a {c}x{c} generator")
    return torch.movedim(torch.movedim(h, frame.channel_dim, -1) @ a.T, -1, frame.channel_dim)


def published_sampler_terms(h: torch.Tensor, origin: torch.Tensor | None = None,
                            frame: Frame = IMAGE
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The published hand-written bilinear sampler at ``affine_grid(origin)``, and its
    partial derivatives with respect to the pixel coordinates ``ix`` and ``iy``.

    The grid is built in float32, as the published code builds its matrices; floors,
    reflection at the border and weights follow that sampler exactly.

    Returns:
        ``(value, d value / d ix, d value / d iy)``, each shaped like ``h``.
    """
    hh = torch.movedim(h, (frame.y_dim, frame.x_dim), (-2, -1))
    n_y, n_x = hh.shape[-2:]
    theta = (torch.eye(2, 3) if origin is None else origin.float()).reshape(1, 2, 3)
    grid = F.affine_grid(theta, [1, 1, n_y, n_x], align_corners=True)[0].to(h.device)
    ix = (grid[..., 0] + 1) / 2 * (n_x - 1)
    iy = (grid[..., 1] + 1) / 2 * (n_y - 1)
    x0, y0 = torch.floor(ix), torch.floor(iy)
    wx0, wx1 = (x0 + 1 - ix).to(h.dtype), (ix - x0).to(h.dtype)
    wy0, wy1 = (y0 + 1 - iy).to(h.dtype), (iy - y0).to(h.dtype)

    def reflect(i: torch.Tensor, n: int) -> torch.Tensor:
        return (n - 1 - (n - 1 - i.abs()).abs()).long()

    xa, xb = reflect(x0, n_x), reflect(x0 + 1, n_x)
    ya, yb = reflect(y0, n_y), reflect(y0 + 1, n_y)
    nw, ne, sw, se = hh[..., ya, xa], hh[..., ya, xb], hh[..., yb, xa], hh[..., yb, xb]
    value = nw * wx0 * wy0 + ne * wx1 * wy0 + sw * wx0 * wy1 + se * wx1 * wy1
    d_ix = (ne - nw) * wy0 + (se - sw) * wy1
    d_iy = (sw - nw) * wx0 + (se - ne) * wx1
    back = [torch.movedim(t, (-2, -1), (frame.y_dim, frame.x_dim)) for t in (value, d_ix, d_iy)]
    return back[0], back[1], back[2]


def _published_tangent(h: torch.Tensor, group: Group, frame: Frame) -> torch.Tensor:
    n_y, n_x = h.shape[frame.y_dim], h.shape[frame.x_dim]
    # d(ix)/dt: affine_grid is linear in theta, so its t-derivative is affine_grid(M).
    flow = F.affine_grid(group.generator.float().reshape(1, 2, 3), [1, 1, n_y, n_x],
                         align_corners=True)[0].to(device=h.device, dtype=h.dtype)
    _, d_ix, d_iy = published_sampler_terms(h, group.origin, frame)
    shape = [1] * h.ndim
    shape[frame.y_dim], shape[frame.x_dim] = n_y, n_x
    vx = flow[..., 0].reshape(shape) * (n_x - 1) / 2
    vy = flow[..., 1].reshape(shape) * (n_y - 1) / 2
    return vx * d_ix + vy * d_iy


register_scheme("central", central_difference)
register_scheme("spectral", spectral_derivative)
_SCHEMES.add("published", Scheme("published", _published_tangent))


def base_point(x: torch.Tensor, group: Group) -> torch.Tensor:
    """``T_0 x``: ``x`` itself, except for the published stretch maps, whose ``t = 0`` is
    the published sampler at ``affine_grid(origin)``."""
    if group.origin is None:
        return x
    return published_sampler_terms(x, group.origin)[0]
