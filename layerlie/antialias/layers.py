"""The anti-aliased substitutes, as leaf modules with their linearization rules (docs/method.md §6).

- :class:`BlurPool2d` (Zhang 2019): a binomial blur that subsamples;
- :class:`PolyphaseSample` (Chaman and Dokmanic 2021): adaptive polyphase sampling, exactly
  invariant to circular integer shifts;
- :class:`FilteredActivation` (Karras et al. 2021): a pointwise nonlinearity at twice the
  resolution, between a binomial interpolation filter and a binomial blur;
- :class:`Resampled`: a strided layer taken apart into the layer at stride 1 and a sampler.

The samplers subclass the layer kind whose layout rule places their samples (docs/method.md §5):
:class:`BlurPool2d` is an ``nn.Conv2d`` (kernel, stride, padding before), and
:class:`PolyphaseSample` is a 1 x 1 ``nn.AvgPool2d``. :class:`FilteredActivation` keeps its input's
shape and layout; its twice-as-fine grid lives inside the leaf, where no layout rule has to follow it.

Why not kornia's blur pools: kornia's BlurPool2D and MaxBlurPool2D pad with zeros only and
``filter2d`` has no stride, while a substitute must keep the convolution's padding mode (reflect,
circular) and subsample in the same step. :class:`BlurPool2d` is kornia's ``blur_pool2d`` (the same
taps, the same split of the padding for even sizes; the tests check it against kornia) with a
padding mode; importing kornia would also add seconds to ``import layerlie`` for two lines of code.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import _fx as timm_fx
from torch import nn

from layerlie.antialias.filters import (axis_matrix, binomial, blur1d, coarse_padding, downsample1d, too_small,
                                        upsample1d)
from layerlie.core.engine import Call
from layerlie.core.layout import Layout
from layerlie.core.examples import module_example
from layerlie.core.geometry import pair
from layerlie.core.ops import Tangents, get_op, register_op
from layerlie.core.twins import stride_one
from layerlie.errors import LayerlieError


@timm_fx.register_notrace_module
class BlurPool2d(nn.Conv2d):
    """A binomial blur that subsamples by ``stride``, channel by channel (Zhang 2019).

    A fixed depthwise ``nn.Conv2d``, so that layerlie's layout rule for convolutions places its
    samples (docs/method.md §5); its kernel is a non-persistent buffer, not a parameter. ``padding`` is
    the padding before each axis, ``(filter_size - 1) // 2``; an even size pads one more after,
    as antialiased-cnns and kornia do, which moves the samples half a pixel.

    Args:
        filter_size: taps per axis, 1 (plain subsampling) to 7.
        stride: the subsampling factor.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"circular"`` or ``"replicate"``.
        ceil_mode: pad ``stride - 1`` more after, to give a ceil-mode pool's output size.

    Shape:
        ``(..., H, W) -> (..., ceil(H / sy), ceil(W / sx))`` (one more with ceil_mode when the
        stride does not divide ``H - 1``).
    """

    def __init__(self, filter_size: int = 3, stride: int | tuple[int, int] = 2, padding_mode: str = "zeros",
                 ceil_mode: bool = False) -> None:
        # the conv's own random init, on the meta device: it draws nothing from the global RNG
        super().__init__(1, 1, filter_size, stride, (filter_size - 1) // 2, padding_mode=padding_mode, bias=False,
                         device="meta")
        taps = binomial(filter_size)
        del self.weight
        self.register_buffer("weight", torch.outer(taps, taps).float()[None, None], persistent=False)
        self.ceil_mode = ceil_mode

    @property
    def filter_size(self) -> int:
        return self.kernel_size[0]

    def matrices(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The blur-and-subsample matrices of the H and W axes of ``x``."""
        taps, mode = binomial(self.filter_size), self.padding_mode
        out = []
        for n, s in zip(x.shape[-2:], self.stride):
            pads = ((self.filter_size - 1) // 2, self.filter_size // 2 + (s - 1) * self.ceil_mode)
            if mode == "reflect" and n <= max(pads) or mode == "circular" and n < max(pads):
                raise too_small(f"BlurPool2d(filter_size={self.filter_size}, {mode})", n,
                                 max(pads) + (mode == "reflect"))
            out.append(axis_matrix(n, lambda z: blur1d(z, taps, s, pads, mode), x))
        return out[0], out[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        my, mx = self.matrices(x)
        return my @ x @ mx.T

    def extra_repr(self) -> str:
        return f"filter_size={self.filter_size}, stride={self.stride}, padding_mode={self.padding_mode}"


@timm_fx.register_notrace_module
class PolyphaseSample(nn.AvgPool2d):
    """Adaptive polyphase sampling (Chaman and Dokmanic 2021): of the ``sy * sx`` polyphase
    components of ``x``, keep, per sample, the one with the largest l2 norm over ``(C, H, W)``.

    A circular shift of ``x`` permutes the components and shifts each circularly, so the kept one
    moves with the input: after it, circular convolutions and global pooling are exactly invariant
    to integer shifts (when the stride divides the size). A 1 x 1 ``nn.AvgPool2d`` to the layout
    rule, which places the samples at phase 0; the phase is chosen per image, from the primal only,
    so the op is linear in ``x`` for forward-mode AD and ``vmap``.

    Shape:
        ``(B, C, H, W) -> (B, C, ceil(H / sy), ceil(W / sx))``; a size the stride does not divide
        is padded after with the edge values.
    """

    def __init__(self, stride: int | tuple[int, int] = 2) -> None:
        super().__init__(kernel_size=1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sample(x, self.phase(x))

    def phase(self, x: torch.Tensor) -> torch.Tensor:
        """The index of the component with the largest norm, per sample: ``(B,)``."""
        return self._phases(x.detach()).square().sum((2, 3, 4)).argmax(1)

    def sample(self, x: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """Component ``phase[b]`` of ``x[b]``, by ``gather`` (so ``vmap`` and forward-mode AD see
        an index, not a branch)."""
        phases = self._phases(x)
        index = phase.view(-1, 1, 1, 1, 1).expand(-1, 1, *phases.shape[2:])
        return phases.gather(1, index).squeeze(1)

    def _phases(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, sy * sx, C, ceil(H / sy), ceil(W / sx))``."""
        sy, sx = pair(self.stride)
        pad_y, pad_x = -x.shape[-2] % sy, -x.shape[-1] % sx
        if pad_y or pad_x:  # edge values: a LayerNorm after would be singular at an all-zero pixel
            x = F.pad(x, (0, pad_x, 0, pad_y), mode="replicate")
        phases = x.unflatten(-1, (-1, sx)).unflatten(-3, (-1, sy))  # (B, C, h, sy, w, sx)
        return phases.permute(0, 3, 5, 1, 2, 4).flatten(1, 2)

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


class Pointwise(nn.Module):
    """A functional nonlinearity with its constant arguments, as a module."""

    def __init__(self, fn: Callable[..., torch.Tensor], args: tuple = (), kwargs: dict | None = None) -> None:
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, dict(kwargs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.args, **self.kwargs)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


@timm_fx.register_notrace_module
class FilteredActivation(nn.Module):
    """A pointwise nonlinearity at twice the resolution, between low-pass filters (Karras et al. 2021).

    Upsample by 2 with the binomial interpolation filter, apply ``act``, blur with the binomial
    filter and keep every other sample. Borders are reflected. The spatial axes are a grid
    (``y_dim``, ``x_dim``) or a token axis (``token_dim``: ``prefix`` position-less tokens, then
    an ``hw`` grid, row-major); prefix tokens go through the plain ``act``.

    Args:
        act: the nonlinearity, a module applied elementwise.
        filter_size: taps of both filters, 2 to 7 (2 is nearest-neighbour up, box down: ``act``).
        y_dim, x_dim / token_dim, prefix, hw: where the grid is, from the node's :class:`Layout`.

    Shape:
        ``x`` of any shape with those axes; the output has the same shape.
    """

    def __init__(self, act: nn.Module, filter_size: int = 3, y_dim: int | None = None, x_dim: int | None = None,
                 token_dim: int | None = None, prefix: int = 0, hw: tuple[int, int] | None = None) -> None:
        super().__init__()
        if (token_dim is None) == (y_dim is None or x_dim is None):
            raise LayerlieError("FilteredActivation takes a grid (y_dim and x_dim) or tokens (token_dim and hw)")
        self.act = act
        self.filter_size = filter_size
        self.y_dim, self.x_dim, self.token_dim, self.prefix = y_dim, x_dim, token_dim, prefix
        self.hw = tuple(hw) if hw is not None else None

    @classmethod
    def from_activation(cls, act: nn.Module | Callable[..., torch.Tensor], layout: Layout,
                        filter_size: int = 3) -> FilteredActivation:
        """The filtered form of ``act`` (a module, or a function of one tensor) for a tensor of
        ``layout`` (grid or tokens)."""
        act = act if isinstance(act, nn.Module) else Pointwise(act)
        if layout.kind == "grid":
            return cls(act, filter_size, y_dim=layout.y_dim, x_dim=layout.x_dim)
        if layout.kind == "tokens":
            return cls(act, filter_size, token_dim=layout.token_dim, prefix=layout.prefix, hw=layout.hw)
        raise LayerlieError(f"a filtered nonlinearity needs a grid or token layout, got {layout.describe()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid, prefix = self._split(x)
        (uy, ux), (dy, dx) = self.matrices(grid)
        out = dy @ self.act(uy @ grid @ ux.T) @ dx.T
        return self._join(out, self.act(prefix) if prefix is not None else None)

    def linear(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The Jacobian at ``x`` applied to a stack of tangents ``t: (K, *x.shape)``: the slope of
        the nonlinearity is taken once, on the fine grid, for all K."""
        grid, prefix = self._split(x)
        t_grid, t_prefix = self._split(t, lead=1)
        (uy, ux), (dy, dx) = self.matrices(grid)
        out = dy @ (self._slope(uy @ grid @ ux.T) * (uy @ t_grid @ ux.T)) @ dx.T
        return self._join(out, t_prefix * self._slope(prefix) if prefix is not None else None, lead=1)

    def matrices(self, grid: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The upsampling ``(2n, n)`` and the downsampling ``(n, 2n)`` matrices of the H and W axes."""
        m, taps = self.filter_size, binomial(self.filter_size)
        need = coarse_padding(m) + 1
        if min(grid.shape[-2:]) < need:
            raise too_small(f"FilteredActivation(filter_size={m})", min(grid.shape[-2:]), need)
        up = tuple(axis_matrix(n, lambda z: upsample1d(z, taps), grid) for n in grid.shape[-2:])
        down = tuple(axis_matrix(2 * n, lambda z: downsample1d(z, taps), grid) for n in grid.shape[-2:])
        return up, down

    def _slope(self, z: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(self.act, (z,), (torch.ones_like(z),))[1]

    def _split(self, x: torch.Tensor, lead: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The grid of ``x`` with its spatial axes last, and the prefix tokens (None for a grid);
        ``lead`` extra axes come first (a tangent stack)."""
        if self.token_dim is None:
            return x.movedim((self.y_dim + lead, self.x_dim + lead), (-2, -1)), None
        d, p, (h, w) = self.token_dim + lead, self.prefix, self.hw
        if x.shape[d] != p + h * w:
            raise LayerlieError(f"FilteredActivation was built for {p} prefix tokens and a {h} x {w} grid "
                                f"({p + h * w} tokens), got {x.shape[d]}; rerun antialias with x= "
                                "of this input size")
        grid = x.narrow(d, p, h * w).unflatten(d, (h, w)).movedim((d, d + 1), (-2, -1))
        return grid, x.narrow(d, 0, p)

    def _join(self, grid: torch.Tensor, prefix: torch.Tensor | None, lead: int = 0) -> torch.Tensor:
        if self.token_dim is None:
            return grid.movedim((-2, -1), (self.y_dim + lead, self.x_dim + lead))
        d = self.token_dim + lead
        return torch.cat([prefix, grid.movedim((-2, -1), (d, d + 1)).flatten(d, d + 1)], d)

    def extra_repr(self) -> str:
        where = (f"grid(y={self.y_dim},x={self.x_dim})" if self.token_dim is None
                 else f"tokens(dim={self.token_dim},P={self.prefix},{self.hw[0]}x{self.hw[1]})")
        return f"filter_size={self.filter_size}, {where}"


def is_patch_embedding(conv: nn.Conv2d) -> bool:
    """A convolution over non-overlapping patches: kernel == stride > 1, no padding."""
    return pair(conv.kernel_size) == pair(conv.stride) and max(pair(conv.stride)) > 1 \
        and pair(conv.padding) == (0, 0)


class Resampled(nn.Sequential):
    """A strided layer taken apart (docs/method.md §6): the layer at stride 1 with its own weights (child
    ``layer``), then a sampler with the old stride: ``blur`` (:class:`BlurPool2d`) or, for APS, an
    optional ``blur`` at stride 1 and ``aps`` (:class:`PolyphaseSample`). A patch embedding keeps
    its stride and gets a ``blur`` at stride 1 before it. Convolutions pad the blur in their own
    padding mode; pools pad it with zeros, as their own (average) padding does.

    :func:`antialias` inlines the children as nodes: ``layer`` keeps the old node's name and
    module path, the others become ``<name>_blur`` and ``<name>_aps``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="reflect")
        >>> new = Resampled.from_conv(conv)
        >>> new(torch.randn(1, 3, 16, 16)).shape, new.layer.weight is conv.weight
        (torch.Size([1, 8, 8, 8]), True)
    """

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, filter_size: int = 3, aps: bool = False, blur: bool = True) -> Resampled:
        """The substitute of a strided convolution (any ``nn.Conv2d`` subclass)."""
        if is_patch_embedding(conv) and not aps:
            return cls(OrderedDict(blur=BlurPool2d(filter_size, 1, conv.padding_mode), layer=conv))
        return cls._split(stride_one(conv), pair(conv.stride), conv.padding_mode, filter_size, aps, blur)

    @classmethod
    def from_pool(cls, pool: nn.MaxPool2d | nn.AvgPool2d, filter_size: int = 3, aps: bool = False,
                  blur: bool = True) -> Resampled:
        """The substitute of a strided max- or average-pool (kornia's MaxBlurPool2D for a max-pool)."""
        stride = pair(pool.stride if pool.stride is not None else pool.kernel_size)
        return cls._split(stride_one(pool), stride, "zeros", filter_size, aps, blur, pool.ceil_mode)

    @classmethod
    def _split(cls, layer: nn.Module, stride: tuple[int, int], mode: str, filter_size: int, aps: bool,
               blur: bool, ceil_mode: bool = False) -> Resampled:
        stages: OrderedDict[str, nn.Module] = OrderedDict(layer=layer)
        if not aps:
            stages["blur"] = BlurPool2d(filter_size if blur else 1, stride, mode, ceil_mode)
            return cls(stages)
        if blur and filter_size > 1:
            stages["blur"] = BlurPool2d(filter_size, 1, mode)
        stages["aps"] = PolyphaseSample(stride)
        return cls(stages)

    def describe(self) -> str:
        parts = []
        for name, m in self.named_children():
            inner = f"stride={m.stride}" if name == "layer" else m.extra_repr()
            parts.append(f"{type(m).__name__}({inner})")
        return " -> ".join(parts)


# The substitutes as ops. Their linearization rules (docs/design.md §7) fold the K tangents into the batch
# and compute the primal-dependent parts (slope, phase) once; no surgery replaces them again.

def _blurpool_rule(call: Call, tangents: Tangents) -> torch.Tensor:
    my, mx = call.fn.matrices(call.flat[0])
    return my @ tangents[0] @ mx.T


def _polyphase_rule(call: Call, tangents: Tangents) -> torch.Tensor:
    t = tangents[0]
    phase = call.fn.phase(call.flat[0]).repeat(t.shape[0])
    return call.fn.sample(t.flatten(0, 1), phase).unflatten(0, t.shape[:2])


def _filtered_rule(call: Call, tangents: Tangents) -> torch.Tensor:
    return call.fn.linear(call.flat[0], tangents[0])


register_op(BlurPool2d, layer_type="conv", linearize=_blurpool_rule, window=get_op(nn.Conv2d).window,
            dense=get_op(nn.Conv2d).dense, example=module_example(3, 2, "reflect"))
register_op(PolyphaseSample, layer_type="strided/downsampling", linearize=_polyphase_rule,
            window=get_op(nn.AvgPool2d).window, dense=get_op(nn.AvgPool2d).dense, example=module_example(2))
register_op(FilteredActivation, layer_type="nonlinearity", linearize=_filtered_rule,
            example=lambda cls: (cls(nn.GELU(), 3, 2, 3).double(), (torch.randn(2, 3, 9, 8, dtype=torch.float64),)))

