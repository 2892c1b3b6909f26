"""A direct, per-node spectral measure of aliasing (docs/method.md §6).

Two kinds of node fold energy back below the Nyquist limit of their output grid:

- ``nonlinearity``: an op ``s`` pointwise in space (activations, LayerNorm over channels: the
  op registry says which), applied to a map ``h``. Upsample ``h`` by 2 with the ideal
  band-limited (Fourier) interpolator, apply ``s`` there, and take the share of the AC energy
  of ``s(h)`` above the input grid's Nyquist band: the energy that ``s`` applied on the input
  grid would fold back. An affine ``s`` scores exactly 0.
- ``downsampling``: an op that lowers the resolution by a factor ``f`` (strided conv,
  pooling, patch embedding). Run it at stride 1 (its effective filter, on the input grid)
  and take the share of the AC energy of that dense output above the output grid's
  Nyquist band (``1 / (2 f)`` cycles per input sample): what the subsampling folds back.
  The dense map is tapered with a Hann window first, so that the jump of its periodic
  extension at the border is not counted as aliasing.

A node is ``flagged`` when its ratio exceeds its kind's entry in :data:`ALIAS_THRESHOLDS`. Nodes are read
through their layouts (docs/method.md §5), so BNC token maps (ViT MLPs, LayerNorm) are folded back
to their grid, prefix tokens left out.

Example:
    >>> import torch, layerlie as ll
    >>> table = ll.aliasing(ll.load_model("resnet18"), torch.randn(1, 3, 64, 64))
    >>> table.set_index("node").loc["conv1", "alias_kind"]
    'downsampling'
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from layerlie.measure.attribution import Attribution
from layerlie.model.contract import Output, prepare
from layerlie.core.layout import Layout, LayoutProp
from layerlie.measure.lie import jvp_ready
from layerlie.core.ops import find_op, is_pointwise_in_space, is_strided, layer_type
from layerlie.core.engine import Call, bind
from layerlie.model.trace import trace

ALIAS_THRESHOLDS = {"nonlinearity": 0.01, "downsampling": 0.1}
"""A node is flagged when more than this share of its AC energy folds back. Band-limited
ops score 0. On the embedded photos, random-init ReLUs and GELUs score about 0.002-0.05
(most of a feature map's energy is smooth) and unblurred stride-2 convs 0.05-0.98, higher
with depth (resnet18, vit_tiny, convnext_atto)."""

MIN_SIZE = 4
"""Maps smaller than this on either axis have too few frequencies to measure."""

COLUMNS = ["node", "alias_kind", "alias_ratio", "flagged"]


def upsample(h: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Ideal band-limited upsampling of the last two axes (Fourier zero-padding); the Nyquist
    bins of even sizes are dropped, so the result is real and strictly inside the old band."""
    H, W = h.shape[-2:]
    spec = torch.fft.fftshift(torch.fft.fft2(h), dim=(-2, -1))
    if H % 2 == 0:
        spec[..., 0, :] = 0
    if W % 2 == 0:
        spec[..., :, 0] = 0
    pad_y, pad_x = (factor - 1) * H, (factor - 1) * W
    spec = F.pad(spec, (pad_x // 2, pad_x - pad_x // 2, pad_y // 2, pad_y - pad_y // 2))
    return torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1))).real * factor**2


def energy_above(g: torch.Tensor, band: tuple[float, float], window: bool = False) -> float:
    """The share of the AC energy of maps ``g: (..., H, W)`` at frequencies ``|k_y| >= band[0]``
    or ``|k_x| >= band[1]`` (integer cycles per map); 0 for a constant map."""
    g = g.to(torch.float64)
    g = g - g.mean((-2, -1), keepdim=True)
    H, W = g.shape[-2:]
    if window:
        g = g * torch.hann_window(H, periodic=False, dtype=g.dtype)[:, None] \
            * torch.hann_window(W, periodic=False, dtype=g.dtype)
    power = torch.fft.fft2(g).abs().square().reshape(-1, H, W).sum(0)
    ky, kx = (torch.fft.fftfreq(n, dtype=g.dtype).abs() * n for n in (H, W))
    above = (ky[:, None] >= band[0]) | (kx[None, :] >= band[1])
    total = float(power.sum())
    return float(power[above].sum()) / total if total > 0 else 0.0


def _to_grid(h: torch.Tensor, lay: Layout) -> torch.Tensor:
    """The spatial axes last, prefix tokens left out: ``(..., H, W)``."""
    if lay.kind == "tokens":
        d = lay.token_dim % h.ndim
        h = h.narrow(d, lay.prefix, h.shape[d] - lay.prefix).unflatten(d, lay.hw)
        return h.movedim((d, d + 1), (-2, -1))
    return h.movedim((lay.y_dim % h.ndim, lay.x_dim % h.ndim), (-2, -1))


def _from_grid(g: torch.Tensor, lay: Layout) -> torch.Tensor:
    """The inverse of :func:`_to_grid` at the grid's own (new) size, with no prefix tokens."""
    ndim = g.ndim - (lay.kind == "tokens")
    if lay.kind == "tokens":
        d = lay.token_dim % ndim
        return g.movedim((-2, -1), (d, d + 1)).flatten(d, d + 1)
    return g.movedim((-2, -1), (lay.y_dim % ndim, lay.x_dim % ndim))


def _nonlinearity_ratio(call: Call, arg: int, lay: Layout) -> float:
    h = call.flat[arg]
    grid = _to_grid(h, lay)
    leaves = list(call.flat)
    leaves[arg] = _from_grid(upsample(grid), lay)
    out = call(leaves)
    H, W = grid.shape[-2:]
    return energy_above(_to_grid(out, dataclasses.replace(lay, prefix=0, hw=(2 * H, 2 * W))), (H / 2, W / 2))


def _downsampling_ratio(call: Call, dense_output: Callable[[Call], Any] | None, src: Layout, out: Layout) -> float:
    """``dense_output``: the op's output at stride 1 (its registry entry), None where unknown."""
    if dense_output is None:
        return math.nan
    dense = dense_output(call)
    if call.fn is operator.getitem:  # the input itself, in its own layout
        dense = _to_grid(dense, src)
    H, W = dense.shape[-2:]
    fy, fx = out.y[0] / src.y[0], out.x[0] / src.x[0]
    return energy_above(dense, (H / (2 * fy), W / (2 * fx)), window=True)


class AliasProp(LayoutProp):
    """A primal pass that measures every node's aliasing (``node.meta["layerlie.alias"]``)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.rows: list[dict[str, Any]] = []

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op in ("call_module", "call_function", "call_method") and isinstance(out, torch.Tensor):
            kind, ratio = self._measure(n, out)
            row = dict(node=n.name, alias_kind=kind, alias_ratio=ratio,
                       flagged=bool(ratio > ALIAS_THRESHOLDS[kind]) if kind else False)
            n.meta["layerlie.alias"] = row
            self.rows.append(row)
        return out

    def _measure(self, n: fx.Node, out: torch.Tensor) -> tuple[str | None, float]:
        lay = self.layouts[n.name]
        inputs = [(i, a) for i, a in enumerate(n.all_input_nodes) if self.layouts.get(a.name, lay).spatial]
        if not lay.spatial or not inputs or not out.is_floating_point():
            return None, math.nan
        src = self.layouts[inputs[0][1].name]
        if min(lay.hw if lay.kind == "tokens" else (out.shape[lay.y_dim], out.shape[lay.x_dim])) < MIN_SIZE:
            return None, math.nan
        call, _ = bind(self.module, n, self.values, {}, out)
        if self.strided(n):
            op = find_op(self.module, n)
            return "downsampling", _downsampling_ratio(call, op.dense if op is not None else None, src, lay)
        spatial = (lay.token_dim,) if lay.kind == "tokens" else (lay.y_dim, lay.x_dim)
        if len(inputs) == 1 and src.kind == lay.kind \
                and is_pointwise_in_space(self.module, n, *call.rebuild(), spatial):
            arg = next(i for i, v in enumerate(call.flat) if v is self.values[inputs[0][1]])
            return "nonlinearity", _nonlinearity_ratio(call, arg, src)
        return None, math.nan

    def strided(self, n: fx.Node) -> bool:
        """Whether ``n`` lowers the resolution (the op registry's one decision)."""
        return is_strided(self.module, n, self.values, self._lay)


def aliasing(model: nn.Module | fx.GraphModule, x: torch.Tensor, *, output: Output = None) -> pd.DataFrame:
    """Alias measures of every node of ``model`` at images ``x: (B, C, H, W)`` (docs/method.md §6).

    ``model`` is taken by the model contract (:mod:`layerlie.model.contract`): never changed, traced in
    eval mode, with ``output`` the tensor the graph ends in (the output rule).

    Returns:
        One row per node: node, layer_type, alias_kind (``nonlinearity``, ``downsampling``
        or None), alias_ratio (NaN where not measured), flagged.
    """
    model, x, output, _ = prepare(model, x, output)
    gm = model if isinstance(model, fx.GraphModule) else trace(model, x, output=output)
    prop = AliasProp(gm)
    with torch.no_grad(), jvp_ready(gm):
        prop.propagate(x, None)
    nodes = {n.name: n for n in gm.graph.nodes}
    table = pd.DataFrame(prop.rows, columns=COLUMNS)
    table.insert(1, "layer_type", [layer_type(gm, nodes[name], prop.strided(nodes[name])) for name in table["node"]])
    return table


def with_aliasing(a: Attribution, model: nn.Module | fx.GraphModule, x: torch.Tensor, *,
                  output: Output = None) -> Attribution:
    """``a`` with the alias columns joined to its nodes, so that flagged nodes can be ranked
    by their contribution (docs/method.md §6). ``a`` must come from the same model's graph."""
    table = aliasing(model, x, output=output)[COLUMNS]
    nodes = a.nodes.drop(columns=[c for c in COLUMNS[1:] if c in a.nodes]).merge(table, on="node", how="left")
    nodes["flagged"] = nodes["flagged"].fillna(False).astype(bool)
    return dataclasses.replace(a, nodes=nodes)
