"""Layouts of a graph's tensors and where their samples sit in the input (docs/method.md §5).

A :class:`Layout` says which axes of a node's tensor are spatial (``grid``: an H and a W
axis; ``tokens``: one axis of ``P + H * W`` tokens; ``pair``: two token axes, as in an
attention map; ``windows``: a grid cut into windows, rolled, or both, :mod:`layerlie.core.windows`),
and the input-pixel position of every sample, as a stride and an offset per axis found by
receptive-field arithmetic. Layouts are inferred by propagating the input's geometry through
the graph (convolution, pooling, flatten, transpose, permute, reshape, roll, window partition
and reverse, patch merging, cat of prefix tokens or of channels, slicing, ``q @ k^T`` and
``A @ V`` as ``matmul`` or ``einsum``); a tensor whose layout cannot be inferred is
``unknown``, and ``G`` acts on it as zero.

Example:
    >>> import torch, layerlie as ll
    >>> gm = ll.trace(ll.load_model("resnet18"))
    >>> lay = ll.infer_layouts(gm, torch.randn(1, 3, 64, 64))
    >>> lay["conv1"].x                     # stride 2, first sample centred on pixel 0
    (2.0, 0.0)
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.layers import _fx as timm_fx
from torch import nn

from layerlie.core.groups import Group
from layerlie.core import ops
from layerlie.core.geometry import Axes, Window
from layerlie.core.table import MATMULS
from layerlie.core.probe import probe_axes, relabelled_axes
from layerlie.core.engine import Propagator, node_callable
from layerlie.core.tangent import Frame, central_difference, get_scheme, tangent
from layerlie.core.windows import Windows

Kind = Literal["grid", "tokens", "none", "unknown", "tuple", "pair", "windows"]
Coords = Literal["receptive_field", "published"]


@dataclass(frozen=True)
class Layout:
    """Spatial structure of a tensor (docs/method.md §5).

    Attributes:
        kind: ``grid`` (axes ``y_dim``, ``x_dim``), ``tokens`` (axis ``token_dim`` holds
            ``prefix`` position-less tokens then an ``hw`` grid, row-major), ``none`` (no
            spatial axes), ``unknown``, ``tuple`` (a tuple of tensors), ``pair``: a map
            indexed by two token sets, e.g. attention ``(B, heads, N_q, N_k)``, whose query
            axis is described like ``tokens`` and whose key axis is ``key``, or ``windows`` (a
            relabelling of a grid's samples, described by ``windows``).
        y, x: ``(stride, offset)`` in input pixels: sample j sits at ``offset + stride * j``.
        input_hw: the input's spatial size.
        key: for a ``pair``, the ``tokens`` layout of its key axis (its own prefix, grid and
            sample positions: queries and keys may sit on different grids).
        windows: for ``windows``, how the tensor's axes are cut from the grid (axes
            ``y_dim``, ``x_dim``, size ``hw``) whose samples it holds (docs/method.md §5, Windows).
        key_windows: for an attention map inside windows, the same for its key axis,
            ``windows`` holding the query axis: ``G`` is the sum of the two (docs/method.md §5, Pair
            layouts). The key index counts within the window, so at a window border ``G``
            compares the attention paid to the neighbouring window's keys: where windows break
            equivariance.
        probed: the sample positions (or their absence) come from probing the op's receptive
            field (:mod:`layerlie.core.probe`), not from a rule; not part of the layout's identity.
    """

    kind: Kind
    y_dim: int | None = None
    x_dim: int | None = None
    token_dim: int | None = None
    prefix: int = 0
    hw: tuple[int, int] = (0, 0)
    y: tuple[float, float] = (1.0, 0.0)
    x: tuple[float, float] = (1.0, 0.0)
    input_hw: tuple[int, int] = (0, 0)
    item: Layout | None = None
    key: Layout | None = None
    windows: Windows | None = None
    key_windows: Windows | None = None
    probed: bool = field(default=False, compare=False)

    @property
    def spatial(self) -> bool:
        return self.kind in ("grid", "tokens")

    @property
    def moves(self) -> bool:
        """Whether ``G`` acts on the tensor: image-like, a pair of token axes, or windowed
        (docs/method.md §5)."""
        return self.spatial or self.kind in ("pair", "windows")

    @property
    def query(self) -> Layout:
        """The ``tokens`` layout of a pair's query axis."""
        return replace(self, kind="tokens", key=None)

    def describe(self) -> str:
        return f"{self._describe()}, probed" if self.probed else self._describe()

    def _describe(self) -> str:
        if self.kind == "pair":
            q, k = self.query, self.key
            return (f"pair(q=dim{q.token_dim},P={q.prefix},{q.hw[0]}x{q.hw[1]}; "
                    f"k=dim{k.token_dim},P={k.prefix},{k.hw[0]}x{k.hw[1]})")
        if self.kind == "grid":
            return f"grid(y={self.y_dim},x={self.x_dim})"
        if self.kind == "tokens":
            return f"tokens(dim={self.token_dim},P={self.prefix},{self.hw[0]}x{self.hw[1]})"
        if self.kind == "windows":
            pair = ",pair" if self.key_windows is not None else ""
            return f"windows({self.hw[0]}x{self.hw[1]},roll={self.windows.roll}{pair})"
        return self.kind

    def frame(self, coords: Coords = "receptive_field") -> Frame:
        """The :class:`Frame` of the grid view (for tokens: after :meth:`to_grid`; for windows:
        of the assembled grid)."""
        y_dim, x_dim = (self.y_dim, self.x_dim) if self.kind != "tokens" else (self.token_dim, self.token_dim + 1)
        if coords == "published":
            return Frame(y_dim=y_dim, x_dim=x_dim, channel_dim=None)
        (hy, wx) = self.input_hw

        def axis(s: tuple[float, float], n: int) -> tuple[float, float]:
            return (2 * s[0] / (n - 1), -1 + 2 * s[1] / (n - 1)) if n > 1 else (1.0, 0.0)

        return Frame(y_dim=y_dim, x_dim=x_dim, channel_dim=None, y=axis(self.y, hy), x=axis(self.x, wx))


NONE = Layout("none")
UNKNOWN = Layout("unknown")
TUPLE = Layout("tuple")


def layout_tangent(h: torch.Tensor, layout: Layout, group: Group, scheme: str = "central",
                   coords: Coords = "receptive_field") -> torch.Tensor:
    """``G_v h`` for a tensor of known layout (docs/method.md §5); zero for non-spatial layouts and
    for channel groups, which act on the input alone. On a pair map ``G A = G_q A + G_k A``:
    the derivative along each token axis at that axis's own sample positions."""
    if not layout.moves or not group.spatial:
        return torch.zeros_like(h)
    if layout.kind == "pair":
        return layout_tangent(h, layout.query, group, scheme, coords).add_(
            layout_tangent(h, layout.key, group, scheme, coords))
    fused = get_scheme(scheme).derivative is central_difference and group.origin is None
    if layout.kind == "grid":
        frame = layout.frame(coords)
        return _central_tangent(h, group, frame, torch.empty_like(h)) if fused else tangent(h, group, scheme, frame)
    if layout.kind == "windows":
        frame = layout.frame(coords)
        views = (layout.windows,) if layout.key_windows is None else (layout.windows, layout.key_windows)
        return sum(w.partition(tangent(w.assemble(h), group, scheme, frame), h.shape) for w in views)
    d, p = _norm_dim(layout.token_dim, h.ndim), layout.prefix
    n = p + layout.hw[0] * layout.hw[1]
    if h.shape[d] != n:  # several sequences folded into the token axis: one at a time
        folded = replace(layout, token_dim=d + 1)
        return layout_tangent(h.unflatten(d, (-1, n)), folded, group, scheme, coords).flatten(d, d + 1)
    grid = h.narrow(d, p, h.shape[d] - p).unflatten(d, layout.hw)
    if fused:
        out = torch.empty(h.shape, dtype=h.dtype, device=h.device)  # contiguous: its grid part is a view
        out.narrow(d, 0, p).zero_()
        _central_tangent(grid, group, layout.frame(coords), out.narrow(d, p, h.shape[d] - p).unflatten(d, layout.hw))
        return out
    g = tangent(grid, group, scheme, layout.frame(coords)).flatten(d, d + 1)
    return torch.cat([torch.zeros_like(h.narrow(d, 0, p)), g], d)


def _central_tangent(h: torch.Tensor, group: Group, frame: Frame, out: torch.Tensor) -> torch.Tensor:
    """``tangent(h, group, "central", frame)`` written into ``out`` (a view of ``h``'s shape) in
    about two passes over ``h`` per moving axis, where the general path allocates and copies
    some eight times: ``G h = v . grad h`` with the central difference (docs/method.md §1). The defects
    pass takes ``G_v h_v`` of every node, so this is most of its cost beyond the forward."""
    moving = _fields(tuple(group.generator.flatten().tolist()), frame, tuple(h.shape), h.dtype, h.device)
    if not moving:
        return out.zero_()
    for k, (dim, v) in enumerate(moving):
        target = out if k == 0 else torch.empty_like(out)
        _difference(h, dim, target)
        target.mul_(v)
        if k:
            out.add_(target)
    return out


@functools.lru_cache(maxsize=512)
def _fields(m: tuple[float, ...], frame: Frame, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> list[tuple[int, torch.Tensor]]:
    """The axes along which the field of generator ``m`` (2x3, row-major) moves the samples of a
    tensor of ``shape`` in ``frame``, each with its velocity component times ``1 / (2 scale)``: the
    central difference's half and the axis's spacing (:func:`layerlie.core.tangent.tangent`). They
    depend on the geometry alone, and the defects pass meets the same geometry at many nodes."""
    uy, ux = frame.positions(torch.empty((), dtype=dtype, device=device).expand(shape))  # no storage
    probe = torch.empty(shape, dtype=dtype, device="meta")
    fields = ((m[0] * ux + m[1] * uy + m[2], frame.x_dim, frame.axis_map(probe, "x")[0]),
              (m[3] * ux + m[4] * uy + m[5], frame.y_dim, frame.axis_map(probe, "y")[0]))
    return [(dim, v * (0.5 / scale)) for v, dim, scale in fields if bool((v != 0).any())]


def _difference(h: torch.Tensor, dim: int, out: torch.Tensor) -> None:
    """``h[j+1] - h[j-1]`` along ``dim`` into ``out``, with zeros beyond the border."""
    n = h.shape[dim]
    if n == 1:
        out.zero_()
        return
    torch.sub(h.narrow(dim, 2, n - 2), h.narrow(dim, 0, n - 2), out=out.narrow(dim, 1, n - 2))
    out.narrow(dim, 0, 1).copy_(h.narrow(dim, 1, 1))
    torch.neg(h.narrow(dim, n - 2, 1), out=out.narrow(dim, n - 1, 1))


def _norm_dim(d: int, ndim: int) -> int:
    return d % ndim


def _joins_channels(lays: list[Layout], dim: int, ndim: int) -> bool:
    """Parts of one layout up to sample positions, concatenated along a non-spatial axis
    (``cat`` then makes every spatial size agree)."""
    first = lays[0]
    spatial = (first.y_dim, first.x_dim) if first.kind == "grid" else (first.token_dim,)
    return _norm_dim(dim, ndim) not in {_norm_dim(d, ndim) for d in spatial} \
        and all(replace(lay, y=first.y, x=first.x) == first for lay in lays)


class LayoutProp(Propagator):
    """A primal pass that records every node's value and :class:`Layout`
    (``node.meta["layerlie.layout"]``), inferring the layouts once per graph and input shape,
    dtype and device (:func:`infer_layouts`): a later pass of any measurement on the same graph,
    or on a copy of it from :func:`layerlie.trace.with_output`, reads them back."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, keep=True)
        self.layouts: dict[str, Layout] = {}
        self.mismatches: dict[str, str] = {}
        self.probed: set[str] = set()
        self._stored: dict[tuple[str, int], _Stored] | None = None
        self._fingerprints = _fingerprints(gm)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if self._stored is None:  # the first node: the images
            self._stored = layout_cache(self.module).setdefault(_input_key(out), {})
        key = (n.name, self._fingerprints[n])
        stored = self._stored.get(key)
        if n.op == "output":  # a copy from with_output differs here alone
            lay, mismatch = NONE, None
        elif stored is not None:
            lay, mismatch = stored.layout, stored.mismatch
            if mismatch:
                self.mismatches[n.name] = mismatch
        else:
            lay = self.infer(n, out)
            mismatch = self.mismatches.get(n.name)
            self._stored[key] = _Stored(lay, mismatch)
        n.meta["layerlie.layout"] = lay
        if mismatch:
            n.meta["layerlie.mismatch"] = mismatch
        else:
            n.meta.pop("layerlie.mismatch", None)
        self.layouts[n.name] = lay
        return out

    def infer(self, n: fx.Node, out: Any) -> Layout:
        """The layout of ``n``, whose value is ``out``, from the layouts of its inputs: the pass
        calls it once per node where no stored layout fits."""
        lay = self._infer(n, out)
        if lay.probed and n.name not in self.probed:
            lay = replace(lay, probed=False)  # a rule placed it, from a probed input
        if lay.spatial:
            self._check_positions(n, lay)
        return lay

    def _check_positions(self, n: fx.Node, lay: Layout) -> None:
        """Inputs of one op whose samples sit at different input positions (docs/method.md §5: e.g. the
        avg-pool shortcut of resnet-d): the output takes the first's, and ``e_v`` carries the rest."""
        inputs = [a for a in n.all_input_nodes if self._lay(a).spatial and self._lay(a).hw == lay.hw]
        where = {(self._lay(a).y, self._lay(a).x) for a in inputs}
        if len(inputs) > 1 and len(where) > 1:
            desc = "; ".join(f"{a.name} at y={self._lay(a).y}, x={self._lay(a).x}" for a in inputs)
            self.mismatches[n.name] = f"inputs disagree on sample positions (stride, offset): {desc}"

    def _lay(self, a: Any) -> Layout:
        return self.layouts.get(a.name, NONE) if isinstance(a, fx.Node) else NONE

    def _infer(self, n: fx.Node, out: Any) -> Layout:
        if isinstance(out, (tuple, list)) and not isinstance(out, torch.Size):  # a shape is not a tensor
            return self._split(n, out)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return NONE
        if n.op == "placeholder":
            h, w = out.shape[-2:]
            return Layout("grid", 2, 3, hw=(h, w), input_hw=(h, w))
        if n.op == "get_attr":
            return NONE
        if n.target is torch.cat:
            return self._cat(n, out) or UNKNOWN
        if n.target is torch.stack:
            return _stack([self._lay(p) for p in n.args[0]], n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0),
                          out.ndim)
        if n.target is operator.getitem and self._lay(n.args[0]).kind == "tuple":
            return self._lay(n.args[0]).item or UNKNOWN
        # nested too: slice bounds read from a shape (PiT's x[:, :n_cls]) are values
        args = list(fx.node.map_arg(n.args, lambda a: self.env.get(a, a)))
        lays = [self._lay(a) for a in n.args]
        first = next((i for i, lay in enumerate(lays) if lay.moves), None)
        if first is None:  # a (B, C) tensor has no spatial axes, whatever came before it
            none = all(lay.kind in ("none", "tuple") for lay in lays) or isinstance(out, torch.Tensor) and out.ndim <= 2
            return NONE if none else UNKNOWN
        lay, src = lays[first], args[first]
        fn = node_callable(self.module, n)
        method = n.target if n.op == "call_method" else None
        try:
            relabels = lay.kind == "windows" or _is_roll(fn, method)
            if fn is torch.einsum:
                got = self._einsum(args, lays, out)
            elif fn in MATMULS:
                got = self._matmul(args, lays, out)
            else:
                got = None if relabels else self._rule(n, fn, method, args, lay, src, out, lays)
            if got is None:
                got = self._windowed(n, fn, method, args, lay, src, out, lays)
        except (IndexError, TypeError, ValueError, ZeroDivisionError):
            got = None
        if got is None:
            got = self._probed(n, fn, args, first, lay, out)
        if got is not None:
            return got
        return UNKNOWN if out.ndim >= 3 else NONE

    def _probed(self, n: fx.Node, fn: Any, args: list, first: int, lay: Layout, out: torch.Tensor) -> Layout | None:
        """The layout of an op that no rule knows, from its receptive field (docs/method.md §5,
        :mod:`layerlie.core.probe`): the grid stays on the same axes; an op that mixes globally gets
        ``unknown``, said as probed."""
        if n.op not in ("call_module", "call_function", "call_method") or not isinstance(out, torch.Tensor) \
                or not out.is_floating_point():
            return None
        kwargs = fx.node.map_arg(n.kwargs, lambda a: self.env.get(a, a))
        relabelled = self._relabelled(fn, args, kwargs, first, lay)
        if relabelled is not None:
            self.probed.add(n.name)
        if relabelled is not None or lay.kind != "grid" or out.ndim != args[first].ndim:
            return relabelled
        rest = args[:first] + args[first + 1:]
        constant = not any(isinstance(a, torch.Tensor) for a in [*rest, *kwargs.values()])
        owner = fn if isinstance(fn, nn.Module) else None
        key = (lay, n.target if owner is None else None, repr((rest, kwargs))) if constant or owner else None
        dims = (_norm_dim(lay.y_dim, out.ndim), _norm_dim(lay.x_dim, out.ndim))
        axes = probe_axes(lambda z: fn(*args[:first], z, *args[first + 1:], **kwargs), args[first], dims, key, owner)
        self.probed.add(n.name)
        if axes is None:
            return replace(UNKNOWN, probed=True)
        (ay, ax) = axes
        return replace(lay, hw=(out.shape[dims[0]], out.shape[dims[1]]), probed=True,
                       y=(lay.y[0] * ay[0], lay.y[1] + lay.y[0] * ay[1]),
                       x=(lay.x[0] * ax[0], lay.x[1] + lay.x[0] * ax[1]))

    def _relabelled(self, fn: Any, args: list, kwargs: dict, first: int, lay: Layout) -> Layout | None:
        """The layout of an op that only moves samples around (a reshape fx could not open),
        found by applying it to each sample's grid row and column (:func:`relabelled_axes`)."""
        src = args[first]
        win = _windows_of(lay, src.shape)
        if win is None or isinstance(fn, nn.Module) or src.numel() > 2 ** 22:  # modules compute
            return None
        rows = torch.arange(win.grid[win.y_dim], dtype=torch.float64).reshape(
            [-1 if d == win.y_dim else 1 for d in range(len(win.grid))]).expand(win.grid)
        cols = torch.arange(win.grid[win.x_dim], dtype=torch.float64).reshape(
            [-1 if d == win.x_dim else 1 for d in range(len(win.grid))]).expand(win.grid)
        found = relabelled_axes(lambda z: fn(*args[:first], z, *args[first + 1:], **kwargs),
                                win.partition(rows, src.shape), win.partition(cols, src.shape))
        if found is None:
            return None
        kind, a, b = found
        grid = Layout("grid", hw=(win.grid[win.y_dim], win.grid[win.x_dim]), y=lay.y, x=lay.x,
                      input_hw=lay.input_hw, probed=True)
        return replace(grid, y_dim=a, x_dim=b) if kind == "grid" else replace(grid, kind="tokens", token_dim=a)

    def _rule(self, n: fx.Node, fn: Any, method: str | None, args: list, lay: Layout, src: Any,
              out: torch.Tensor, lays: list[Layout]) -> Layout | None:
        if lay.kind == "grid" and out.ndim == src.ndim and max(src.shape[lay.y_dim], src.shape[lay.x_dim]) > 1 \
                and out.shape[lay.y_dim] == out.shape[lay.x_dim] == 1:
            return NONE  # global pooling: no spatial axes left (docs/method.md §3)
        if any(a.kind == "pair" for a in lays):
            return _attention_rule(fn, method, args, n.kwargs, lays, out) or UNKNOWN
        window = ops.window(fn, args, n.kwargs)
        if window is not None and lay.kind == "grid" and (lay.y_dim, lay.x_dim) == (2, 3):
            (ky, kx), (sy, sx), (py, px), (dy, dx) = window

            def rf(axis: tuple[float, float], k: int, s: int, p: int, d: int) -> tuple[float, float]:
                return axis[0] * s, axis[1] + axis[0] * (d * (k - 1) / 2 - p)

            return replace(lay, hw=tuple(out.shape[-2:]), y=rf(lay.y, ky, sy, py, dy), x=rf(lay.x, kx, sx, px, dx))
        moved = ops.resample(fn, args, n.kwargs, out) if lay.spatial else None
        if moved is not None:
            return _resampled(lay, moved, src, out)
        if fn is F.scaled_dot_product_attention:
            return lays[0] if lays[0].kind == "tokens" else None
        if fn in (operator.getitem,) and isinstance(src, torch.Tensor):
            return self._getitem(lay, args[1], src, out) or _index_tokens(lay, args[1], src)
        if _permutes(fn, method):
            return self._permute(lay, _axis_order(args, method or fn.__name__, src.ndim), src.ndim)
        if method in ("flatten", "view", "reshape", "reshape_as", "view_as") or fn in (torch.flatten, torch.reshape):
            return self._reshape(lay, src, out) or _fold_tokens(lay, src, out)
        if method in ("mean", "sum", "amax") or fn in (torch.mean, torch.sum):
            return _reduced(lay, args, n.kwargs, src, out)
        if lay.kind == "tokens" and _norm_dim(lay.token_dim, src.ndim) == src.ndim - 1 \
                and (isinstance(fn, nn.Linear) or fn is F.linear) and out.shape[-1] != src.shape[-1]:
            # a token-mixing layer (MLP-Mixer) to hidden units: they sit at no position, and the
            # mixing weight's own defect is charged here (docs/method.md §5: a fixed pair map is genuine)
            return NONE
        return self._same_positions(lay, src, out)

    @staticmethod
    def _same_positions(lay: Layout, src: torch.Tensor, out: torch.Tensor) -> Layout | None:
        """Ops that keep the spatial axes where they are (pointwise, norms, linear layers on
        the channel axis, residual adds, channel-mixing)."""
        if out.ndim != src.ndim:
            return None
        dims = (lay.y_dim, lay.x_dim) if lay.kind == "grid" else (lay.token_dim,)
        if all(out.shape[d] == src.shape[d] for d in dims) and out.shape[0] == src.shape[0]:
            return lay
        return None

    @staticmethod
    def _getitem(lay: Layout, index: Any, src: torch.Tensor, out: torch.Tensor) -> Layout | None:
        if lay.kind == "grid":
            return LayoutProp._slice_grid(lay, index, src, out)
        if lay.kind != "tokens" or not isinstance(index, tuple):
            return None
        d = _norm_dim(lay.token_dim, src.ndim)
        if len(index) <= d or any(i != slice(None) for i in index[:d]):
            return None
        sel = index[d]
        if isinstance(sel, int):  # x[:, -1] is the last grid token, not a prefix token
            return NONE if sel % src.shape[d] < lay.prefix else None
        if isinstance(sel, slice) and sel.step in (None, 1) and (sel.stop is None or sel.stop >= src.shape[d]):
            start = sel.start or 0
            if start <= lay.prefix and out.ndim == src.ndim:
                return replace(lay, prefix=lay.prefix - start)
        return None

    @staticmethod
    def _slice_grid(lay: Layout, index: Any, src: torch.Tensor, out: torch.Tensor) -> Layout | None:
        """Basic slicing of a grid, ``h[..., a::s, b::s]``: the samples kept move and thin out."""
        index = index if isinstance(index, tuple) else (index,)
        if sum(i is Ellipsis for i in index) > 1 or not all(isinstance(i, slice) or i is Ellipsis for i in index):
            return None
        if Ellipsis in index:
            k = index.index(Ellipsis)
            index = index[:k] + (slice(None),) * (src.ndim - len(index) + 1) + index[k + 1:]
        index = index + (slice(None),) * (src.ndim - len(index))
        axes = {}
        for name, d in (("y", lay.y_dim), ("x", lay.x_dim)):
            start, _, step = index[_norm_dim(d, src.ndim)].indices(src.shape[d])
            stride, offset = getattr(lay, name)
            axes[name] = (stride * step, offset + stride * start)
        return replace(lay, hw=(out.shape[lay.y_dim], out.shape[lay.x_dim]), **axes)

    @staticmethod
    def _permute(lay: Layout, perm: Sequence[int], ndim: int) -> Layout | None:
        """The layout after ``permute(perm)`` of a grid, tokens or a pair map."""
        where = {old: new for new, old in enumerate(perm)}
        if lay.kind == "pair":
            return replace(lay, token_dim=where[_norm_dim(lay.token_dim, ndim)],
                           key=replace(lay.key, token_dim=where[_norm_dim(lay.key.token_dim, ndim)]))
        if lay.kind == "grid":
            return replace(lay, y_dim=where[_norm_dim(lay.y_dim, ndim)], x_dim=where[_norm_dim(lay.x_dim, ndim)])
        return replace(lay, token_dim=where[_norm_dim(lay.token_dim, ndim)])

    @staticmethod
    def _reshape(lay: Layout, src: torch.Tensor, out: torch.Tensor) -> Layout | None:
        s, o = list(src.shape), list(out.shape)
        if lay.kind == "grid":
            y, x = _norm_dim(lay.y_dim, src.ndim), _norm_dim(lay.x_dim, src.ndim)
            if x == y + 1 and o[:y] == s[:y] and len(o) > y and o[y] == s[y] * s[x] \
                    and math.prod(o[y + 1:]) == math.prod(s[x + 1:]):
                return replace(lay, kind="tokens", token_dim=y, y_dim=None, x_dim=None, prefix=0, hw=(s[y], s[x]))
            if o[:x + 1] == s[:x + 1]:
                return lay
            return None
        d = _norm_dim(lay.token_dim, src.ndim)
        if o[:d + 1] == s[:d + 1]:
            return lay
        if lay.prefix == 0 and o[:d] == s[:d] and len(o) > d + 1 and (o[d], o[d + 1]) == lay.hw:
            return replace(lay, kind="grid", y_dim=d, x_dim=d + 1, token_dim=None)
        return None

    def _split(self, n: fx.Node, out: Sequence[Any]) -> Layout:
        """unbind / chunk / split along a non-spatial axis: every item keeps the layout."""
        src = n.args[0] if n.args else None
        lay = self._lay(src)
        if lay.kind == "windows" and all(isinstance(o, torch.Tensor) for o in out):
            return replace(TUPLE, item=self._split_windows(n, out, lay))
        if not lay.spatial or not all(isinstance(o, torch.Tensor) for o in out):
            return replace(TUPLE, item=NONE if lay.kind == "none" else UNKNOWN)
        ndim = self.env[src].ndim
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        default = 0 if name == "unbind" else (-1 if name in ("chunk", "split") else None)
        dim = n.kwargs.get("dim", n.args[-1] if len(n.args) > 2 or name == "unbind" and len(n.args) > 1 else default)
        if dim is None or not isinstance(dim, int):
            return replace(TUPLE, item=UNKNOWN)
        dim = _norm_dim(dim, ndim)
        spatial = (lay.y_dim, lay.x_dim) if lay.kind == "grid" else (lay.token_dim,)
        spatial = tuple(_norm_dim(d, ndim) for d in spatial)
        if dim in spatial:
            return replace(TUPLE, item=UNKNOWN)
        if name != "unbind":
            return replace(TUPLE, item=lay)
        shift = {d: d - (d > dim) for d in spatial}
        if lay.kind == "grid":
            return replace(TUPLE, item=replace(lay, y_dim=shift[spatial[0]], x_dim=shift[spatial[1]]))
        return replace(TUPLE, item=replace(lay, token_dim=shift[spatial[0]]))

    def _windowed(self, n: fx.Node, fn: Any, method: str | None, args: list, lay: Layout, src: Any,
                  out: torch.Tensor, lays: list[Layout]) -> Layout | None:
        """Window partitions and reverses, rolls and space-to-depth (docs/method.md §5, Windows), and
        the ops that act on windowed tensors without moving their samples."""
        win = _windows_of(lay, src.shape) if isinstance(src, torch.Tensor) else None
        if win is None:
            return None
        s, o = tuple(src.shape), tuple(out.shape)
        if _is_roll(fn, method):
            shifts = n.kwargs.get("shifts", args[1] if len(args) > 1 else None)
            dims = n.kwargs.get("dims", args[2] if len(args) > 2 else None)
            if dims is None:
                return None
            shifts, dims = ((shifts,), (dims,)) if isinstance(dims, int) else (shifts, dims)
            return _relabelled(lay, win, lambda w: w.rolled(s, shifts, dims), o)
        if method in ("view", "reshape", "flatten", "unflatten") or fn in (torch.reshape, torch.flatten):
            return _relabelled(lay, win, lambda w: w.reshaped(s, o), o)
        if _permutes(fn, method):
            perm = _axis_order(args, method or fn.__name__, len(s))
            return _relabelled(lay, win, lambda w: w.permuted(s, perm), o)
        if n.op == "call_function" and timm_fx.is_notrace_function(fn):
            return self._opened(n, fn, args, lay)
        if lay.kind != "windows":
            return None
        if fn is operator.getitem:
            return lay if _whole(args[1], s) else None
        return _relabelled(lay, win, lambda w: w.resized(s, o), o)

    def _matmul(self, args: list, lays: list[Layout], out: torch.Tensor) -> Layout | None:
        """A matrix product: attention's ``q @ k^T`` and ``A @ V`` (docs/method.md §5, pair layouts), their
        windowed forms, a weight acting on channels or a fixed map acting across tokens."""
        (a, b), (la, lb) = args[:2], lays[:2]
        if la.kind == "windows" or lb.kind == "windows":
            return self._windowed_matmul(args, lays)
        got = _attention_rule(torch.matmul, None, args, {}, lays, out)
        if got is not None or la.kind == "pair" or lb.kind == "pair":
            return got or UNKNOWN
        if lb.kind == "tokens" and _norm_dim(lb.token_dim, b.ndim) == b.ndim - 2 and out.shape[-2] == b.shape[-2] \
                and la.kind != "tokens":
            return lb
        if la.kind == "tokens" and _norm_dim(la.token_dim, a.ndim) == a.ndim - 2 and out.ndim == a.ndim \
                and out.shape[-2] == a.shape[-2]:
            return la if lb.kind != "tokens" else UNKNOWN
        return None

    def _einsum(self, args: list, lays: list[Layout], out: torch.Tensor) -> Layout | None:
        """``torch.einsum`` of two operands that is a batched matrix product (MaxViT's attention,
        ``"BGHID,BGHJD->BGHIJ"``): the operands permuted into ``matmul`` form, the layout of the
        product (:meth:`_matmul`), and its axes permuted into the equation's output. Any other
        equation is left to the receptive-field probe."""
        form = _matmul_form(args[0], args[1:])
        if form is None:
            return None
        (pa, pb, po), (a, b) = form, args[1:]
        pa_lay, pb_lay = self._permuted(lays[1], a, pa), self._permuted(lays[2], b, pb)
        inverse = sorted(range(len(po)), key=po.__getitem__)
        product = out.permute(inverse)
        got = None if pa_lay is None or pb_lay is None else \
            self._matmul([a.permute(pa), b.permute(pb)], [pa_lay, pb_lay], product)
        return None if got is None else self._permuted(got, product, po)

    def _permuted(self, lay: Layout, t: torch.Tensor, perm: Sequence[int]) -> Layout | None:
        """``lay`` after ``t.permute(perm)``, for every kind of layout."""
        if lay.kind in ("none", "unknown"):
            return lay
        if lay.kind == "windows":
            shape = tuple(t.shape)
            return _relabelled(lay, lay.windows, lambda w: w.permuted(shape, perm), tuple(shape[p] for p in perm))
        return self._permute(lay, perm, t.ndim)

    def _windowed_matmul(self, args: list, lays: list[Layout]) -> Layout | None:
        """``A @ v`` with ``A`` a map over the window's tokens takes ``v``'s layout; ``h @ W``
        with ``W`` a weight acts on channels; ``q @ k^T`` is a pair map over the window's
        tokens (docs/method.md §5, Pair layouts), whose ``G`` acts on both token axes."""
        (a, b), (la, lb) = args[:2], lays[:2]
        out = (*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
        if lb.kind == "windows" and lb.key_windows is None and (la.key_windows is not None or not la.moves) \
                and out == tuple(b.shape):
            return lb
        if la.kind == "windows" and la.key_windows is None and not lb.moves and b.ndim == 2:
            return _relabelled(la, la.windows, lambda w: w.resized(tuple(a.shape), out), out)
        if la.kind == lb.kind == "windows" and la.key_windows is None and lb.key_windows is None \
                and tuple(a.shape[:-2]) == tuple(b.shape[:-2]) == out[:-2]:
            queries = la.windows.resized(tuple(a.shape), out)
            keys = lb.windows.resized(tuple(b.shape), out)
            if queries is not None and keys is not None and queries.same_grid(keys):
                return replace(la, windows=queries, key_windows=keys)
        return None

    def _opened(self, n: fx.Node, fn: Any, args: list, lay: Layout) -> Layout | None:
        """A function that timm keeps out of the trace (``window_reverse``, ``grid_reverse``):
        traced here at its constant arguments, and its layout inferred on its own graph."""
        if not isinstance(args[0], torch.Tensor) or self._lay(n.args[0]) is not lay or n.kwargs \
                or any(isinstance(a, torch.Tensor) for a in args[1:]):
            return None
        try:
            sub = fx.symbolic_trace(_Bound(fn, tuple(args[1:])))
        except Exception:  # fx raises many types for untraceable code: the layout stays unknown
            return None
        prop = _Seeded(sub, lay)
        prop.propagate(args[0], None)
        result = next(m for m in sub.graph.nodes if m.op == "output").args[0]
        return prop.layouts.get(result.name) if isinstance(result, fx.Node) else None

    def _split_windows(self, n: fx.Node, out: Sequence[torch.Tensor], lay: Layout) -> Layout:
        """unbind / chunk / split of a windowed tensor along channels."""
        src = self.env[n.args[0]]
        shapes = {tuple(o.shape) for o in out}
        if len(shapes) != 1:
            return UNKNOWN
        (shape,) = shapes
        if len(shape) == src.ndim:
            new = lay.windows.resized(tuple(src.shape), shape)
        else:
            dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
            new = lay.windows.dropped(tuple(src.shape), dim % src.ndim)
        return (_windows_layout(lay, new, shape) if new is not None else None) or UNKNOWN

    def _cat(self, n: fx.Node, out: torch.Tensor) -> Layout | None:
        parts = n.args[0]
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
        lays = [self._lay(p) for p in parts]
        last = lays[-1]
        if all(lay.kind == "none" for lay in lays):
            return NONE
        if any(lay.kind == "windows" for lay in lays):
            return None
        if all(lay.spatial for lay in lays) and _joins_channels(lays, dim, out.ndim):
            return lays[0]  # DenseNet, Inception; like an add, it takes the first input's positions
        if last.kind != "tokens" or any(lay.spatial for lay in lays[:-1]):
            return None
        if _norm_dim(dim, out.ndim) != _norm_dim(last.token_dim, out.ndim):
            return None
        extra = sum(self.env[p].shape[_norm_dim(dim, out.ndim)] for p in parts[:-1])
        return replace(last, prefix=last.prefix + extra)


class _Bound(nn.Module):
    """``fn(x, *constants)`` as a module, for fx to trace."""

    def __init__(self, fn: Any, constants: tuple) -> None:
        super().__init__()
        self.fn, self.constants = fn, constants

    def forward(self, x: torch.Tensor) -> Any:
        return self.fn(x, *self.constants)


class _Seeded(LayoutProp):
    """Layouts of a sub-graph whose input has a given layout."""

    def __init__(self, gm: fx.GraphModule, seed: Layout) -> None:
        super().__init__(gm)
        self.seed = seed

    def _infer(self, n: fx.Node, out: Any) -> Layout:
        return self.seed if n.op == "placeholder" else super()._infer(n, out)


def _resampled(lay: Layout, moved: Axes, src: torch.Tensor, out: torch.Tensor) -> Layout | None:
    """The layout after an op that moves samples (``ops.Op.resample``): each grid axis maps
    output sample ``j`` to input sample ``shift + scale * j``; padding before the tokens adds
    position-less tokens to the prefix (CoaT's ``F.pad`` of a class-token slot)."""
    if out.ndim != src.ndim:
        return None
    if lay.kind == "tokens":
        d = _norm_dim(lay.token_dim, src.ndim)
        if d not in moved:
            return lay if out.shape[d] == src.shape[d] else None
        scale, shift = moved[d]
        if scale == 1 and shift <= 0 and out.shape[d] - src.shape[d] == -shift:
            return replace(lay, prefix=lay.prefix - int(shift))
        return None
    axes = {}
    for name, d in (("y", _norm_dim(lay.y_dim, src.ndim)), ("x", _norm_dim(lay.x_dim, src.ndim))):
        stride, offset = getattr(lay, name)
        scale, shift = moved.get(d, (1.0, 0.0))
        if d not in moved and out.shape[d] != src.shape[d]:
            return None
        axes[name] = (stride * scale, offset + stride * shift)
    return replace(lay, hw=(out.shape[_norm_dim(lay.y_dim, out.ndim)], out.shape[_norm_dim(lay.x_dim, out.ndim)]),
                   **axes)


def _reduced(lay: Layout, args: list, kwargs: dict, src: torch.Tensor, out: torch.Tensor) -> Layout | None:
    """A sum, mean or max over some axes: over every spatial axis, no positions are left;
    over channel axes only (ResNeSt's sum over the radix), the spatial axes keep their
    samples and move up past the axes removed."""
    dims = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dims is None:
        return NONE
    keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
    dims = {_norm_dim(int(d), src.ndim) for d in ((dims,) if isinstance(dims, int) else dims)}
    spatial = [_norm_dim(d, src.ndim) for d in ((lay.y_dim, lay.x_dim) if lay.kind == "grid" else (lay.token_dim,))]
    if set(spatial) <= dims:
        return NONE
    if dims & set(spatial):
        return None

    def moved(d: int | None) -> int | None:
        if d is None or keep:
            return d
        return _norm_dim(d, src.ndim) - sum(r < _norm_dim(d, src.ndim) for r in dims)

    return replace(lay, y_dim=moved(lay.y_dim), x_dim=moved(lay.x_dim), token_dim=moved(lay.token_dim))


def _matmul_form(equation: Any, operands: Sequence[Any]) -> tuple[list[int], list[int], list[int]] | None:
    """Permutations ``(pa, pb, po)`` with ``einsum(equation, a, b) ==
    (a.permute(pa) @ b.permute(pb)).permute(po)``, or None when the equation is no batched
    matrix product: two operands, one free index in each, one index summed, the rest batch."""
    if not isinstance(equation, str) or len(operands) != 2 or "->" not in equation or "." in equation \
            or not all(isinstance(t, torch.Tensor) for t in operands):
        return None
    ins, res = equation.replace(" ", "").split("->")
    terms = ins.split(",")
    if len(terms) != 2 or any(len(set(t)) != len(t) or len(t) != o.ndim for t, o in zip(terms, operands)) \
            or len(set(res)) != len(res):
        return None
    a, b = terms
    batch = [c for c in res if c in a and c in b]
    summed = [c for c in a if c in b and c not in res]
    free_a, free_b = [c for c in a if c not in b], [c for c in b if c not in a]
    if len(summed) != 1 or len(free_a) != 1 or len(free_b) != 1 or set(res) != {*batch, *free_a, *free_b}:
        return None
    product = batch + free_a + free_b
    return ([a.index(c) for c in batch + free_a + summed], [b.index(c) for c in batch + summed + free_b],
            [product.index(c) for c in res])


def _is_roll(fn: Any, method: str | None) -> bool:
    return fn is torch.roll or method == "roll"


_SWAPS = ("transpose", "swapaxes", "swapdims")


def _permutes(fn: Any, method: str | None) -> bool:
    """Whether the op permutes axes: ``permute``, or one of :data:`_SWAPS` (MaxViT's
    ``torch.swapaxes``), as a function or a tensor method."""
    return method in ("permute", *_SWAPS) or fn in (torch.permute, torch.transpose, torch.swapaxes, torch.swapdims)


def _axis_order(args: list, name: str, ndim: int) -> list[int]:
    """The axis order of ``permute(*dims)`` or ``transpose(a, b)`` (and its aliases)."""
    if name in _SWAPS:
        a, b = (_norm_dim(int(v), ndim) for v in args[1:3])
        perm = list(range(ndim))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    perm = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    return [_norm_dim(int(p), ndim) for p in perm]


def _whole(index: Any, shape: tuple[int, ...]) -> bool:
    """An index that keeps every element (``x[:, :H, :W]`` with ``H, W`` the full size)."""
    index = index if isinstance(index, tuple) else (index,)
    full = [i for i in index if i is not Ellipsis]
    if len(full) > len(shape) or not all(isinstance(i, slice) for i in full):
        return False
    dims = range(len(full)) if Ellipsis not in index else \
        [*range(index.index(Ellipsis)), *range(len(shape) - len(full) + index.index(Ellipsis), len(shape))]
    return all(i.indices(shape[d]) == (0, shape[d], 1) for i, d in zip(full, dims))


def _windows_of(lay: Layout, shape: Sequence[int]) -> Windows | None:
    """``lay`` as a relabelling of a grid; None for tokens with prefix tokens."""
    if lay.kind == "windows":
        return lay.windows
    if lay.kind == "grid":
        return Windows.of_grid(shape, _norm_dim(lay.y_dim, len(shape)), _norm_dim(lay.x_dim, len(shape)))
    if lay.kind == "tokens" and lay.prefix == 0:
        d = _norm_dim(lay.token_dim, len(shape))
        return Windows.of_grid((*shape[:d], *lay.hw, *shape[d + 1:]), d, d + 1)
    return None


def _relabelled(lay: Layout, win: Windows, op: Callable[[Windows], Windows | None],
                shape: Sequence[int]) -> Layout | None:
    """The layout after an op that ``op`` applies to a relabelling (to both of a pair map's)."""
    if lay.kind == "windows" and lay.key_windows is not None:
        queries, keys = op(lay.windows), op(lay.key_windows)
        return replace(lay, windows=queries, key_windows=keys) if queries is not None and keys is not None else None
    new = op(win)
    return _windows_layout(lay, new, shape) if new is not None else None


def _windows_layout(lay: Layout, win: Windows, shape: Sequence[int]) -> Layout | None:
    """The layout of a tensor of ``shape`` cut from ``lay``'s grid as ``win`` says: a plain grid
    or tokens when the relabelling leaves the spatial axes whole, a grid of coarser stride for
    space-to-depth (patch merging), else ``windows``."""
    groups = win.groups(shape)
    if groups is None:
        return None
    ys, xs, batch = win.atoms_of(win.y_dim), win.atoms_of(win.x_dim), win.atoms_of(0)
    hw = (win.grid[win.y_dim], win.grid[win.x_dim])
    base = Layout("grid", hw=hw, y=lay.y, x=lay.x, input_hw=lay.input_hw)
    clean = not any(win.roll) and groups[0] == batch and ys and xs
    if clean and ys in groups and xs in groups:
        return replace(base, y_dim=groups.index(ys), x_dim=groups.index(xs))
    if clean and ys + xs in groups:
        return replace(base, kind="tokens", token_dim=groups.index(ys + xs))
    if clean and [ys[0]] in groups and [xs[0]] in groups and len(ys) > 1 and len(xs) > 1 \
            and all(any(win.is_channel(i) for i in g) for g in groups if set(g) & set(ys[1:] + xs[1:])):
        fy, fx = math.prod(win.atoms[i][1] for i in ys[1:]), math.prod(win.atoms[i][1] for i in xs[1:])

        def merged(axis: tuple[float, float], f: int) -> tuple[float, float]:
            return axis[0] * f, axis[1] + axis[0] * (f - 1) / 2  # the centre of the merged samples

        return replace(base, y_dim=groups.index([ys[0]]), x_dim=groups.index([xs[0]]),
                       hw=(win.atoms[ys[0]][1], win.atoms[xs[0]][1]), y=merged(lay.y, fy), x=merged(lay.x, fx))
    return replace(base, kind="windows", y_dim=win.y_dim, x_dim=win.x_dim, windows=win)


def _tokens_at(lay: Layout, t: Any, dim: int) -> bool:
    """Whether tensor ``t`` of layout ``lay`` holds tokens on axis ``dim`` (negative: from the end)."""
    return lay.kind == "tokens" and isinstance(t, torch.Tensor) and _norm_dim(lay.token_dim, t.ndim) == dim % t.ndim


def _on_axis(lay: Layout, dim: int) -> Layout:
    return replace(lay, token_dim=dim, key=None)


def _index_tokens(lay: Layout, index: Any, src: torch.Tensor) -> Layout | None:
    """Basic indexing of tokens: integers and slices on other axes keep the tokens (an integer
    drops its axis); on the token axis, a slice of prefix tokens alone has no positions, and a
    slice that keeps every grid token drops the prefix tokens before its start."""
    index = index if isinstance(index, tuple) else (index,)
    if lay.kind != "tokens" or sum(i is Ellipsis for i in index) > 1 \
            or not all(isinstance(i, (int, slice)) or i is Ellipsis for i in index):
        return None
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (src.ndim - len(index) + 1) + index[k + 1:]
    index = index + (slice(None),) * (src.ndim - len(index))
    d = _norm_dim(lay.token_dim, src.ndim)
    if isinstance(index[d], int):
        return NONE if index[d] % src.shape[d] < lay.prefix else None
    start, stop, step = index[d].indices(src.shape[d])
    if step == 1 and stop <= lay.prefix:
        return NONE  # prefix tokens only: no positions, G acts as zero
    if step != 1 or start > lay.prefix or stop < src.shape[d]:
        return None
    dropped = sum(isinstance(i, int) for i in index[:d])
    return replace(lay, token_dim=d - dropped, prefix=lay.prefix - start)


def _fold_tokens(lay: Layout, src: torch.Tensor, out: torch.Tensor) -> Layout | None:
    """A reshape that merges the axes before the token axis into it (LeViT's ``(B * N, C)``
    around a BatchNorm1d), or splits the sequences of a folded token axis apart again."""
    if lay.kind != "tokens":
        return None
    s, o, d = list(src.shape), list(out.shape), _norm_dim(lay.token_dim, src.ndim)
    k = d + len(o) - len(s)
    n = lay.prefix + lay.hw[0] * lay.hw[1]
    if k < 0 or o[k + 1:] != s[d + 1:]:
        return None
    if k <= d and o[:k] == s[:k] and o[k] == math.prod(s[k:d + 1]) and o[k] % n == 0:
        return replace(lay, token_dim=k)  # leading axes merged into the tokens
    if k > d and o[:d] == s[:d] and o[k] == n and math.prod(o[d:k + 1]) == s[d]:
        return replace(lay, token_dim=k)  # the sequences split out again
    return None


def _stack(lays: list[Layout], dim: int, ndim: int) -> Layout:
    """``torch.stack`` of tensors of one layout (up to sample positions) along a new axis: the
    spatial axes at or after it move by one."""
    first = lays[0]
    if all(lay.kind == "none" for lay in lays):
        return NONE
    if first.kind not in ("grid", "tokens") or any(replace(lay, y=first.y, x=first.x) != first for lay in lays):
        return UNKNOWN
    dim = _norm_dim(dim, ndim)

    def moved(d: int | None) -> int | None:
        return None if d is None else _norm_dim(d, ndim - 1) + (_norm_dim(d, ndim - 1) >= dim)

    return replace(first, y_dim=moved(first.y_dim), x_dim=moved(first.x_dim), token_dim=moved(first.token_dim))


def _attention_rule(fn: Any, method: str | None, args: list, kwargs: dict, lays: list[Layout],
                    out: torch.Tensor) -> Layout | None:
    """Attention (docs/method.md §5, pair layouts): ``q @ k^T`` makes a pair map, the ops on it (scale,
    additive bias, softmax over keys, dropout, permutes, a mean over heads) keep it, ``A @ V``
    gives tokens on the query axis; a product that sums over the tokens (``q^T k`` of
    cross-covariance attention) leaves a map with no spatial axes, and a channel map times
    tokens keeps the tokens."""
    if fn in MATMULS and len(args) >= 2:
        (a, b), (la, lb), nd = args[:2], lays[:2], out.ndim
        if _tokens_at(la, a, -2) and _tokens_at(lb, b, -1):
            return replace(_on_axis(la, nd - 2), kind="pair", key=_on_axis(lb, nd - 1))
        if la.kind == "pair" and _norm_dim(la.key.token_dim, a.ndim) == a.ndim - 1 and _tokens_at(lb, b, -2) \
                and a.shape[-1] == b.shape[-2]:
            return _on_axis(la.query, _norm_dim(la.token_dim, a.ndim) + nd - a.ndim)
        if _tokens_at(la, a, -1) and _tokens_at(lb, b, -2):
            return NONE  # contracted over the tokens: a channel x channel map
        if la.kind == "none" and _tokens_at(lb, b, -1) and b.ndim == nd:
            return lb
        return None
    pairs = [lay for lay in lays if lay.kind == "pair"]
    if not pairs:
        return None
    lay = pairs[0]
    src = args[lays.index(lay)]
    if _permutes(fn, method):
        return LayoutProp._permute(lay, _axis_order(args, method or fn.__name__, src.ndim), src.ndim)
    if method in ("mean", "sum") or fn in (torch.mean, torch.sum):
        return _reduced_pair(lay, args, kwargs, src, out)
    if method in ("flatten", "view", "reshape") or fn in (torch.flatten, torch.reshape):
        q, k = _norm_dim(lay.token_dim, src.ndim), _norm_dim(lay.key.token_dim, src.ndim)
        first, shift = min(q, k), out.ndim - src.ndim
        if first + shift >= 0 and out.shape[first + shift:] == src.shape[first:]:  # only leading axes merge
            return replace(lay, token_dim=q + shift, key=replace(lay.key, token_dim=k + shift))
        return None
    if out.shape == src.shape and all(a.kind in ("none", "pair") for a in lays):
        return lay  # scale, additive bias (no layout of its own), softmax, dropout: pointwise on the map
    return None


def _reduced_pair(lay: Layout, args: list, kwargs: dict, src: torch.Tensor, out: torch.Tensor) -> Layout | None:
    """A mean or sum of a pair map: over other axes (the heads) it stays a pair; over one token
    axis, the other one's tokens are left."""
    q, k = _reduced(lay.query, args, kwargs, src, out), _reduced(lay.key, args, kwargs, src, out)
    if q is None or k is None:
        return None
    if q.kind == k.kind == "tokens":
        return replace(q, kind="pair", key=k)
    return q if k.kind == "none" else k


class _Stored(NamedTuple):
    """A node's inferred layout and the disagreement of its inputs' positions, if any."""

    layout: Layout
    mismatch: str | None


CACHE = "layerlie.layouts"
"""The ``gm.meta`` key of the stored layouts: ``{(input shape, dtype, device): {(node name,
fingerprint): _Stored}}``, shared with the graph's copies (:func:`layerlie.trace.with_output`,
surgery's working copy); the fingerprint of the graph up to the node tells a rewritten node apart."""


def layout_cache(gm: fx.GraphModule) -> dict:
    """The layouts stored for ``gm`` (:data:`CACHE`), made empty where there are none yet."""
    return gm.meta.setdefault(CACHE, {})


def _input_key(x: Any) -> tuple:
    return (tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else (type(x).__name__,)


def _fingerprints(gm: fx.GraphModule) -> dict[fx.Node, int]:
    """A hash of each node and everything upstream of it: op, name, target (for a module call, the
    module's class and configuration, its ``repr``) and arguments. Equal in a copy of the graph
    (:func:`layerlie.trace.with_output`, surgery's working copy), changed by a rewrite at or
    above the node, so a stored layout is read back only where it still holds."""
    prints: dict[fx.Node, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            module = gm.get_submodule(n.target)
            target: Any = (type(module), repr(module))
        else:
            target = n.target if isinstance(n.target, str) else id(n.target)
        args = fx.node.map_arg((n.args, n.kwargs), lambda a: f"%{prints[a]}")
        prints[n] = hash((n.op, n.name, target, repr(args)))
    return prints


def infer_layouts(gm: fx.GraphModule, x: torch.Tensor) -> dict[str, Layout]:
    """Every node's :class:`Layout` for input ``x`` (docs/method.md §5), by name: the one entry
    of the value-and-layout pass. The pass runs once per (graph, input shape, dtype, device);
    its layouts are kept in ``node.meta["layerlie.layout"]`` and in ``gm.meta[CACHE]``, which
    hands them back here and to the
    passes of :func:`layerlie.attribute`, :func:`layerlie.aliasing`, :func:`layerlie.with_aliasing`,
    :func:`layerlie.antialias` and :func:`layerlie.ablate` (:class:`LayoutProp`)."""
    stored = layout_cache(gm).get(_input_key(x), {})
    prints = _fingerprints(gm)
    found = {n.name: stored.get((n.name, prints[n])) for n in gm.graph.nodes if n.op != "output"}
    if None not in found.values():
        return {n.name: found[n.name].layout if n.op != "output" else NONE for n in gm.graph.nodes}
    prop = LayoutProp(gm)
    prop.propagate(x, None)
    return prop.layouts


def unknown_layouts(gm: fx.GraphModule, x: torch.Tensor) -> tuple[list[fx.Node], int]:
    """The tensor-valued op nodes whose layout is ``unknown`` on input ``x``, and the number of
    tensor-valued op nodes: the rows of the attribution table that hold tensors (shapes, sizes
    and other non-tensors are not counted, nor the input and the parameters)."""
    prop = LayoutProp(gm)
    prop.propagate(x, None)
    calls = ("call_module", "call_function", "call_method")
    tensors = [n for n in gm.graph.nodes if n.op in calls and isinstance(prop.values.get(n), torch.Tensor)]
    return [n for n in tensors if prop.layouts[n.name].kind == "unknown"], len(tensors)

