"""Anti-aliased substitutes by graph surgery, with the weights kept (docs/method.md §6).

:func:`antialias` returns a new traced model in which chosen nodes are replaced:

- ``blurpool`` (Zhang 2019): a strided convolution or pool becomes the same layer at stride 1,
  then a binomial blur that subsamples by the old stride (for a max-pool, kornia's MaxBlurPool2D);
  a patch embedding (kernel == stride) keeps its stride and gets a blur at stride 1 before it.
- ``aps`` (Chaman and Dokmanic 2021): the layer at stride 1 (blurred at stride 1 too when
  ``blurpool``), then adaptive polyphase sampling; exactly invariant to circular integer shifts.
- ``activations="filtered"`` (Karras et al. 2021): a pointwise nonlinearity on an image-like tensor
  runs at twice the resolution, between a binomial interpolation filter and a binomial blur.

Which nodes are replaced, and by what, is a policy (STYLE 4): a registered function from a node to
its substitute or None (:func:`register_policy`). A substitute holds the layer's own parameter
tensors, and the layer that holds them keeps its module path and its node's name, so
``named_parameters()`` and ``state_dict()`` of the new model are the original's (an original
checkpoint loads as is). ``meta["layerlie.surgery"]`` records, for each replaced node, the new
nodes that compute its output, so the attribution tables before and after can be compared.

The samplers are leaf modules that subclass the layer kind whose layout rule places their samples
(docs/method.md §5): :class:`BlurPool2d` is an ``nn.Conv2d`` (kernel, stride, padding before), and
:class:`PolyphaseSample` is a 1 x 1 ``nn.AvgPool2d``. :class:`FilteredActivation` keeps its input's
shape and layout; its twice-as-fine grid lives inside the leaf, where no layout rule has to follow it.

Why not kornia's blur pools: kornia's BlurPool2D and MaxBlurPool2D pad with zeros only and
``filter2d`` has no stride, while a substitute must keep the convolution's padding mode (reflect,
circular) and subsample in the same step. :class:`BlurPool2d` is kornia's ``blur_pool2d`` (the same
taps, the same split of the padding for even sizes; the tests check it against kornia) with a
padding mode; importing kornia would also add seconds to ``import layerlie`` for two lines of code.

Example:
    >>> import layerlie as ll
    >>> new = ll.antialias(ll.load_model("resnet18"))
    >>> new.meta["layerlie.surgery"]["maxpool"].nodes
    ('maxpool', 'maxpool_blur')
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.layers import _fx as timm_fx
from torch import nn

from layerlie.model.contract import Output, eval_copy, prepare
from layerlie.deprecation import renamed
from layerlie.errors import LayerlieError
from layerlie.core.layout import Layout, LayoutProp
from layerlie.model.loading import input_channels
from layerlie.core.ops import (LAYER_TYPES, Tangents, get_op, layer_type, module_example, pair, register_op, stride_one,
                          strided)
from layerlie.core.engine import Call, Recorder
from layerlie.model.trace import input_size, trace

class NothingToReplace(LayerlieError):
    """A surgery found no node to replace."""


MAX_FILTER_SIZE = 7
_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "circular": "circular", "replicate": "replicate"}
Where = Union[None, Callable[[fx.Node], bool], str, Iterable[str], range, slice]


def binomial(size: int) -> torch.Tensor:
    """The normalized binomial filter of ``size`` taps, ``C(size - 1, i) / 2^(size - 1)``: (size,)."""
    return torch.tensor([math.comb(size - 1, i) for i in range(size)], dtype=torch.float64) / 2 ** (size - 1)


def _too_small(what: str, n: int, need: int) -> LayerlieError:
    return LayerlieError(f"{what} needs feature maps of at least {need} x {need}, got a side of {n}; use a "
                         "smaller filter_size or a larger input, or leave these nodes out with where=")


def _axis_matrix(n: int, op: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The matrix ``(n_out, n)`` of a linear 1-D ``op`` on ``(N, 1, n)``, from its response to
    each impulse. The 2-D filters here are separable, so ``M_y @ x @ M_x.T`` applies them to the
    last two axes of ``x`` whatever comes before (a batch, channels, a stack of tangents): one
    matmul, faster on small maps than a convolution over ``B * C`` one-channel images."""
    eye = torch.eye(n, dtype=like.dtype, device=like.device)[:, None]
    return op(eye)[:, 0].T


def _blur1d(z: torch.Tensor, taps: torch.Tensor, stride: int, pads: tuple[int, int], mode: str) -> torch.Tensor:
    return F.conv1d(F.pad(z, pads, mode=_PAD_MODES[mode]), taps.to(z)[None, None], stride=stride)


def _upsample1d(z: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """``(N, 1, L) -> (N, 1, 2L)``: zeros between the samples, then ``2 * taps`` (the binomial
    interpolation filter), the borders reflected at the coarse resolution. An even size puts the
    fine samples half a fine pixel after their place; :func:`_downsample1d` takes it back."""
    m = taps.numel()
    before = (m - 1) // 2
    q = _coarse_padding(m)
    full = F.conv_transpose1d(F.pad(z, (q, q), mode="reflect"), 2 * taps.to(z)[None, None], stride=2)
    start = 2 * q - before + m - 1
    return full[..., start:start + 2 * z.shape[-1]]


def _downsample1d(z: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """``(N, 1, 2L) -> (N, 1, L)``: the binomial blur at stride 2, the borders reflected."""
    m = taps.numel()
    return _blur1d(z, taps, 2, (m // 2, m - 1 - m // 2), "reflect")


def _coarse_padding(m: int) -> int:
    """The coarse padding that gives every kept fine sample of :func:`_upsample1d` a full window."""
    return -(-(m - 1 - (m - 1) // 2) // 2)


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
                raise _too_small(f"BlurPool2d(filter_size={self.filter_size}, {mode})", n,
                                 max(pads) + (mode == "reflect"))
            out.append(_axis_matrix(n, lambda z: _blur1d(z, taps, s, pads, mode), x))
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


class _Pointwise(nn.Module):
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
        act = act if isinstance(act, nn.Module) else _Pointwise(act)
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
        need = _coarse_padding(m) + 1
        if min(grid.shape[-2:]) < need:
            raise _too_small(f"FilteredActivation(filter_size={m})", min(grid.shape[-2:]), need)
        up = tuple(_axis_matrix(n, lambda z: _upsample1d(z, taps), grid) for n in grid.shape[-2:])
        down = tuple(_axis_matrix(2 * n, lambda z: _downsample1d(z, taps), grid) for n in grid.shape[-2:])
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


def _is_patch_embedding(conv: nn.Conv2d) -> bool:
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
        if _is_patch_embedding(conv) and not aps:
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


# --- policies: what to replace, and by what (STYLE 4) -----------------------------------------

@dataclass(frozen=True)
class Options:
    """What a policy needs besides the node: filter size, whether samplers blur, and the layouts
    of an example pass (None without ``x``)."""

    filter_size: int = 3
    blur: bool = True
    layouts: dict[str, Layout] | None = None


Factory = Callable[[fx.GraphModule, fx.Node, Options], Union[nn.Module, None]]


@dataclass(frozen=True)
class Policy:
    """A surgery: a function from a node to its substitute, or None to keep the node.

    Attributes:
        name: the registry key (``antialias(activations=name)`` for activation policies).
        looks_for: what it replaces, for messages.
        substitute: ``(gm, node, options) -> nn.Module | None``.
        activation: selected by ``activations=``, not by a flag.
        needs_layouts: needs an example pass (``x=``, or the model's input size).
    """

    name: str
    looks_for: str
    substitute: Factory
    activation: bool = False
    needs_layouts: bool = False


_POLICIES: dict[str, Policy] = {}


def register_policy(name: str, looks_for: str, activation: bool = False,
                    needs_layouts: bool = False) -> Callable[[Factory], Factory]:
    """Register a surgery policy under ``name``."""

    def deco(fn: Factory) -> Factory:
        _POLICIES[name] = Policy(name, looks_for, fn, activation, needs_layouts)
        return fn

    return deco


def get_policy(name: str) -> Policy:
    if name not in _POLICIES:
        raise LayerlieError(f"unknown surgery policy {name!r}; registered: {', '.join(list_policies())}")
    return _POLICIES[name]


def list_policies() -> list[str]:
    return sorted(_POLICIES)


def _strided_layer(gm: fx.GraphModule, node: fx.Node, policy: str) -> nn.Module | None:
    """The strided convolution or pool that ``node`` applies (a functional pool as a module) when
    its op lists ``policy`` among its substitutes, or None; a patch embedding already blurred is
    left alone, so reapplying is safe (the samplers list no substitute)."""
    op = get_op(gm, node)
    if op is None or policy not in op.substitutes:
        return None
    if node.op == "call_module":
        layer = gm.get_submodule(node.target)
        source = node.args[0] if node.args else None
        if isinstance(layer, nn.Conv2d) and _is_patch_embedding(layer) and isinstance(source, fx.Node) \
                and source.op == "call_module" and isinstance(gm.get_submodule(source.target), BlurPool2d):
            return None
    elif op.module is not None:
        layer = op.module(node.args, node.kwargs)
    else:
        return None
    return layer if layer is not None and strided(layer) else None


def _resampled(layer: nn.Module, options: Options, aps: bool) -> Resampled:
    make = Resampled.from_conv if isinstance(layer, nn.Conv2d) else Resampled.from_pool
    return make(layer, options.filter_size, aps=aps, blur=options.blur)


@register_policy("blurpool", "strided convolutions and pools (blurpool)")
def _blurpool(gm: fx.GraphModule, node: fx.Node, options: Options) -> nn.Module | None:
    layer = _strided_layer(gm, node, "blurpool")
    return _resampled(layer, options, aps=False) if layer is not None else None


@register_policy("aps", "strided convolutions and pools (aps)")
def _aps(gm: fx.GraphModule, node: fx.Node, options: Options) -> nn.Module | None:
    layer = _strided_layer(gm, node, "aps")
    return _resampled(layer, options, aps=True) if layer is not None else None


@register_policy("filtered", "pointwise nonlinearities on image-like tensors (activations='filtered')",
                 activation=True, needs_layouts=True)
def _filtered(gm: fx.GraphModule, node: fx.Node, options: Options) -> nn.Module | None:
    op = get_op(gm, node)
    if op is None or "filtered" not in op.substitutes:
        return None
    layout = options.layouts.get(node.name)
    extra = [*node.args[1:], *node.kwargs.values()]
    if layout is None or not layout.spatial or any(isinstance(a, fx.Node) for a in extra):
        return None
    if node.op == "call_module":
        act = gm.get_submodule(node.target)
    else:
        fn = getattr(torch.Tensor, node.target) if node.op == "call_method" else node.target
        act = _Pointwise(fn, tuple(node.args[1:]), node.kwargs)
    return FilteredActivation.from_activation(act, layout, options.filter_size)


# --- the surgery ----------------------------------------------------------------------------

class Replacement(NamedTuple):
    """What replaced a node: the substitute, described, and the nodes that now compute it (the
    last gives the old node's output; the one that holds the layer's weights keeps its name)."""

    substitute: str
    nodes: tuple[str, ...]


@renamed(example="x")
def antialias(model: nn.Module | fx.GraphModule, *, blurpool: bool = True, activations: str | None = None,
              aps: bool = False, filter_size: int = 3, where: Where = None,
              x: torch.Tensor | None = None, output: Output = None) -> fx.GraphModule:
    """A copy of ``model`` with anti-aliased substitutes, the weights kept (docs/method.md §6).

    Args:
        model: a model (traced here with :func:`layerlie.trace`, in eval mode) or a traced
            GraphModule; it is never modified. The new model shares its parameter tensors with a
            GraphModule given.
        blurpool: blur before every strided subsampling (Zhang 2019); with ``aps``, a blur at
            stride 1 before the polyphase sampling.
        activations: ``"filtered"``: pointwise nonlinearities on grids and token maps run at twice
            the resolution between low-pass filters (Karras et al. 2021); needs ``x``,
            or a model that states its input size (a timm model, or a GraphModule traced from one).
        aps: adaptive polyphase sampling in every strided convolution and pool.
        filter_size: binomial taps per axis, 1 to 7 (1: no blur; filtered nonlinearities need 2).
        where: the nodes to consider, so an ablation can go layer by layer: None (all), a
            function ``node -> bool``, a string or strings matched (``fnmatch``) against node
            names and layer types (e.g. ``"layer2_*"``, ``"nonlinearity"``,
            ``"strided/downsampling"``), or a ``range``/``slice`` of node depths (positions in
            ``gm.graph.nodes``, the ``depth`` column of :func:`layerlie.attribute`).
        x: an input batch ``(B, C, H, W)``: gives the layouts, and checks that the new
            model runs on it and that every replaced node keeps its output shape. Without it,
            ``activations`` uses a zero image of the model's input size (timm's data config) and
            channels (:func:`layerlie.model.loading.input_channels`); a model that states no size needs it.
        output: the tensor of a tuple, dict or ``.logits`` output the new model returns (the
            output rule of :mod:`layerlie.model.contract`).

    Returns:
        A new GraphModule whose forward returns what the model's does (the logits of a
        classifier). ``meta["layerlie.surgery"]`` maps each replaced node's name to a
        :class:`Replacement` (earlier surgeries' records kept); ``meta["layerlie.outputs"]`` as
        from :func:`layerlie.trace`.

    Raises:
        LayerlieError: bad options, a filter larger than a tensor can take, a substitute that
            changes a shape; :class:`NothingToReplace` when no node qualifies.

    Example:
        >>> import layerlie as ll
        >>> new = ll.antialias(ll.load_model("resnet18"), where="layer2_*")
        >>> sorted(new.meta["layerlie.surgery"])
        ['layer2_0_conv1', 'layer2_0_downsample_0']
    """
    policies = _policies(blurpool, activations, aps)
    _check_filter_size(filter_size, activations)
    if x is None and any(p.needs_layouts for p in policies):
        x = _default_example(model, activations)
    model = eval_copy(model, quiet=True)  # the result is a new model in eval mode
    if x is not None:
        model, x, output, _ = prepare(model, x, output)
    work = _working_copy(model, x, output)
    select = _selector(work, where)
    layouts, shapes = _example_pass(work, x) if x is not None else (None, None)
    options = Options(filter_size, blurpool, layouts)
    subs: dict[fx.Node, nn.Module] = {}
    for depth, node in enumerate(work.graph.nodes):
        if node.op in ("placeholder", "output", "get_attr") or not select(depth, node):
            continue
        for policy in policies:
            sub = policy.substitute(work, node, options)
            if sub is not None:
                subs[node] = sub
                break
    if not subs:
        scope = "" if where is None else f" among the nodes that where={where!r} selects"
        raise NothingToReplace(f"nothing to replace in {type(model).__name__}: looked for "
                            f"{' and '.join(p.looks_for for p in policies)}{scope}")
    record = _rewrite(work, subs)
    if shapes is not None:
        _check_shapes(work, x, shapes, record)
    return work


def _default_example(model: nn.Module, activations: str | None) -> torch.Tensor:
    """A zero batch of one image of the model's input size and channels: the layouts need only
    the shapes."""
    size = input_size(model)
    if size is None:
        raise LayerlieError(f"activations={activations!r} needs x= (an input batch (B, C, H, W), e.g. "
                            f"x=images[:1]): {type(model).__name__} does not state its input size")
    like = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
    return torch.zeros(1, input_channels(model) or size[0], *size[1:], dtype=like.dtype if like is not None else None,
                       device=like.device if like is not None else None)


def _policies(blurpool: bool, activations: str | None, aps: bool) -> list[Policy]:
    valid = [name for name in list_policies() if _POLICIES[name].activation]
    if activations is not None and activations not in valid:
        raise LayerlieError(f"unknown activations={activations!r}; valid: None, {', '.join(map(repr, valid))}")
    names = (["aps"] if aps else ["blurpool"] if blurpool else []) + ([activations] if activations else [])
    if not names:
        raise LayerlieError("nothing to do: blurpool=False, aps=False and activations=None; "
                            "choose blurpool=True, aps=True or activations='filtered'")
    return [get_policy(name) for name in names]


def _check_filter_size(filter_size: int, activations: str | None) -> None:
    if isinstance(filter_size, bool) or not isinstance(filter_size, int) \
            or not 1 <= filter_size <= MAX_FILTER_SIZE:
        raise LayerlieError(f"filter_size must be an integer from 1 to {MAX_FILTER_SIZE} (binomial taps; "
                            f"3 is the usual choice), got {filter_size!r}")
    if activations is not None and filter_size < 2:
        raise LayerlieError(f"activations={activations!r} needs filter_size >= 2: one tap interpolates "
                            "nothing when upsampling; use 3")


def _working_copy(model: nn.Module | fx.GraphModule, example: torch.Tensor | None,
                  output: Output) -> fx.GraphModule:
    """A GraphModule with its own graph and its own intermediate modules, whose leaves (and so
    parameters) are the input GraphModule's, or a fresh trace of a plain model."""
    if not isinstance(model, fx.GraphModule):
        return trace(model, example, output=output)
    work = fx.GraphModule(model, copy.deepcopy(model.graph), class_name=type(model).__name__)
    work.meta = dict(model.meta)
    _own_called_parents(work)
    return work


def _own_called_parents(gm: fx.GraphModule) -> None:
    """fx shares the called modules with the source GraphModule, and a module that is called and
    also holds a called child (a norm and its activation, :mod:`layerlie.model.normact`) would take a
    substitute set below it back to the source: give ``gm`` its own shallow twin (same tensors)."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for path in sorted(called & {t.rpartition(".")[0] for t in called}, key=len):
        twin = copy.copy(gm.get_submodule(path))
        twin.__dict__.update({k: copy.copy(v) for k, v in twin.__dict__.items() if isinstance(v, dict)})
        _set_module(gm, path, twin)


def _example_pass(gm: fx.GraphModule, x: torch.Tensor) -> tuple[dict[str, Layout], dict[str, torch.Size]]:
    prop = LayoutProp(gm)
    prop.propagate(x, None)
    shapes = {n.name: v.shape for n, v in prop.values.items() if isinstance(v, torch.Tensor)}
    return prop.layouts, shapes


def _selector(gm: fx.GraphModule, where: Where) -> Callable[[int, fx.Node], bool]:
    """``where`` as a predicate on (depth, node)."""
    nodes = list(gm.graph.nodes)
    if where is None:
        return lambda depth, node: True
    if isinstance(where, (range, slice)):
        depths = set(range(len(nodes))[where]) if isinstance(where, slice) else set(where)
        return lambda depth, node: depth in depths
    if callable(where):
        return lambda depth, node: bool(where(node))
    patterns = [where] if isinstance(where, str) else list(where)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise LayerlieError(f"where must be None, a function of a node, node-name or layer-type patterns, "
                            f"or a range/slice of depths; got {where!r}")
    types = {n.name: layer_type(gm, n) for n in nodes}
    for p in patterns:
        if not any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(kind, p) for name, kind in types.items()):
            raise LayerlieError(f"where pattern {p!r} matches no node name and no layer type; layer types: "
                                f"{', '.join(LAYER_TYPES)}; node names look like {nodes[1].name!r}, "
                                f"{nodes[len(nodes) // 2].name!r}")
    return lambda depth, node: any(fnmatch.fnmatchcase(node.name, p) or fnmatch.fnmatchcase(types[node.name], p)
                                   for p in patterns)


def _rewrite(gm: fx.GraphModule, subs: dict[fx.Node, nn.Module]) -> dict[str, Replacement]:
    """Replace ``gm``'s graph by one in which each node of ``subs`` is its substitute's stages,
    each a ``call_module`` node; record what was replaced in ``gm.meta``."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    taken = {n.name for n in gm.graph.nodes}
    like = next((t for t in [*gm.parameters(), *gm.buffers()] if t.is_floating_point()), None)
    record: dict[str, Replacement] = {}
    for node in gm.graph.nodes:
        sub = subs.get(node)
        if sub is None:
            env[node] = graph.node_copy(node, env.__getitem__)
            continue
        path = node.target if node.op == "call_module" else _free(node.name, lambda p: _has_attr(gm, p))
        stages = list(sub.named_children()) if isinstance(sub, Resampled) else [("layer", sub)]
        out, names = env[node.args[0]], []
        for stage, module in stages:
            main = stage == "layer"
            target = path if main else _free(f"{path}_{stage}", lambda p: _has_attr(gm, p))
            if not main and like is not None:  # a new sampler's buffers go where the model is
                module.to(device=like.device, dtype=like.dtype)
            _set_module(gm, target, module.eval())  # the layers it holds are the model's, in eval mode already
            name = node.name if main else _free(f"{node.name}_{stage}", taken.__contains__)
            taken.add(name)
            out = graph.create_node("call_module", target, (out,), {}, name=name)
            out.meta = {k: v for k, v in node.meta.items() if not k.startswith("layerlie.")}
            names.append(out.name)
        env[node] = out
        what = sub.describe() if isinstance(sub, Resampled) else f"{type(sub).__name__}({sub.extra_repr()})"
        record[node.name] = Replacement(what, tuple(names))
    graph.lint()
    gm.graph = graph
    gm.recompile()
    gm.meta["layerlie.surgery"] = {**gm.meta.get("layerlie.surgery", {}), **record}
    outputs = gm.meta.get("layerlie.outputs", {})
    gm.meta["layerlie.outputs"] = {k: record[v].nodes[-1] if v in record else v for k, v in outputs.items()}
    return record


def _free(name: str, used: Callable[[str], bool]) -> str:
    candidate, i = name, 0
    while used(candidate):
        i += 1
        candidate = f"{name}_{i}"
    return candidate


def _has_attr(gm: fx.GraphModule, path: str) -> bool:
    parent, _, attr = path.rpartition(".")
    try:
        return hasattr(gm.get_submodule(parent) if parent else gm, attr)
    except AttributeError:
        return False


def _set_module(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, attr, module)


def _check_shapes(gm: fx.GraphModule, x: torch.Tensor, before: dict[str, torch.Size],
                  record: dict[str, Replacement]) -> None:
    run = Recorder(gm, lambda n, v: v.shape if isinstance(v, torch.Tensor) else None)
    with torch.no_grad():
        run.run(x)
    for old, rep in record.items():
        new = run.kept.get(rep.nodes[-1])
        if new != before.get(old):
            raise LayerlieError(f"the substitute {rep.substitute} changes node {old}'s output from "
                                f"{tuple(before.get(old, ()))} to {tuple(new or ())}; leave it out with where=")
