"""Attribution at module granularity with forward hooks, for models fx cannot trace (docs/method.md §3).

Without a graph, the nodes are the calls of the model's leaf modules, and the model's own
code between them (the glue) is one more node in front of every module input and one at
the output. Each hooked tensor ``h_s`` gets a representation ``G_s`` from its layout: a leaf
module's output by probing the module's receptive field on its input (:mod:`layerlie.core.probe`,
docs/method.md §5), a tensor that reaches a module unchanged keeps its layout, and any other glue output
gets a guessed one (a ``(B, C, H, W)`` tensor whose grid divides the input's evenly, sample
centres as in ``align_corners=False`` resizing; anything else is ``unknown`` and ``G_s = 0``). One
forward-mode pass in which every hook replaces the arriving tangent by ``G_s h_s`` gives
every site's defect ``e_s = (arriving tangent) - G_s h_s``, and the chain rule gives
``L F = sum_s J_{out<-s}[e_s]`` exactly, as on the graph. The hooks are where the engine's
sources would enter (docs/design.md §7); the tangents cross the glue inside the model's own code,
as dual tensors, because without a trace the glue has no dataflow that a walk could replay.

Example:
    >>> import torch, layerlie as ll
    >>> from layerlie.measure.hooks import module_defects
    >>> m = ll.load_model("resnet18")
    >>> sites, y, total = module_defects(m, torch.randn(1, 3, 64, 64), ll.group("rotate"))
    >>> sites[0].name, sites[0].kind
    ('conv1:in0', 'input')
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.autograd.forward_ad as fwAD
from timm.layers import _fx as timm_fx
from torch import nn

from layerlie.errors import LayerlieError
from layerlie.core.groups import Group
from layerlie.core.layout import NONE, UNKNOWN, Coords, Layout, layout_tangent
from layerlie.measure.lie import jvp_ready
from layerlie.core.probe import probe_axes
from layerlie.core.tangent import tangent

Head = Callable[[torch.Tensor], torch.Tensor]
Visit = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass
class ModuleSite:
    """One hooked tensor: a module call's input (the glue in front of it) or its output."""

    name: str
    module: str
    kind: Literal["input", "module", "output"]
    layout: Layout
    defect: torch.Tensor


def leaf_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules with no children, and timm's fx leaf modules (whose children are skipped)."""
    leaves: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if not name or any(name.startswith(f"{p}.") for p in leaves):
            continue
        if timm_fx.is_notrace_module(type(m)) or not any(m.children()):
            leaves[name] = m
    return leaves


def guessed_layout(h: torch.Tensor, input_hw: tuple[int, int]) -> Layout:
    """A ``(B, C, H, W)`` grid when ``H``, ``W`` divide the input's by one factor, else unknown."""
    if not h.is_floating_point() or h.ndim < 3:
        return NONE
    if h.ndim == 4:
        (hi, wi), (ho, wo) = input_hw, h.shape[-2:]
        if ho and wo and hi % ho == 0 and wi % wo == 0 and hi // ho == wi // wo:
            s = hi // ho
            pos = (float(s), (s - 1) / 2)
            return Layout("grid", y_dim=2, x_dim=3, hw=(ho, wo), y=pos, x=pos, input_hw=input_hw)
    return UNKNOWN


def _probed(module: nn.Module, entering: tuple[torch.Tensor, Layout] | None, h: torch.Tensor,
            input_hw: tuple[int, int]) -> Layout:
    """A leaf module's output layout from its receptive field on its one input (docs/method.md §5);
    guessed from the shape where the input is not a ``(B, C, H, W)`` grid or the output is not
    4-D, and ``unknown`` (probed) where the module mixes globally."""
    if entering is None or h.ndim != 4 or entering[0].ndim != 4 or entering[1].kind != "grid" \
            or (entering[1].y_dim, entering[1].x_dim) != (2, 3):
        return guessed_layout(h, input_hw)
    x, lay = entering
    axes = probe_axes(module.forward, x, (2, 3), key=lay, owner=module)
    if axes is None:
        return replace(UNKNOWN, probed=True)
    (ay, ax) = axes
    return replace(lay, hw=tuple(h.shape[-2:]), probed=True, y=(lay.y[0] * ay[0], lay.y[1] + lay.y[0] * ay[1]),
                   x=(lay.x[0] * ax[0], lay.x[1] + lay.x[0] * ax[1]))


def module_layouts(model: nn.Module, x: torch.Tensor, head: Head = lambda y: y.softmax(-1)) -> dict[str, Layout]:
    """Every site's :class:`Layout`, by site name (docs/method.md §5): module outputs by probing, a
    tensor that reaches a module unchanged (the same storage, shape and strides) with the
    layout it left with, other glue outputs guessed from their shape."""
    hw = (x.shape[-2], x.shape[-1])
    leaves = leaf_modules(model)
    layouts: dict[str, Layout] = {}

    def ident(h: torch.Tensor) -> tuple:
        return h.data_ptr(), tuple(h.shape), tuple(h.stride())

    seen = {ident(x): Layout("grid", 2, 3, hw=hw, input_hw=hw)}
    entering: dict[str, tuple[torch.Tensor, Layout] | None] = {}

    def visit(name: str, h: torch.Tensor) -> torch.Tensor:
        site, _, slot = name.partition(":")
        if slot:
            lay = seen.get(ident(h)) or guessed_layout(h, hw)
            entering[site] = (h, lay) if slot == "in0" else None  # a second input: no probing
        else:
            lay = _probed(leaves[_module_of(name)], entering.get(site), h, hw)
            seen[ident(h)] = lay
        layouts[name] = lay
        return h

    with torch.no_grad(), hooked(model, visit):
        _run(model, head, x)
    return layouts


@contextlib.contextmanager
def hooked(model: nn.Module, visit: Visit) -> Iterator[None]:
    """Route every floating tensor entering or leaving a leaf-module call through
    ``visit(site_name, tensor)``; the call's ``k``-th repetition is named ``path#k``."""
    calls: dict[str, int] = {}

    def site(path: str) -> str:
        k = calls.get(path, 0)
        return path if k == 0 else f"{path}#{k}"

    def pre(path: str):
        def hook(_: nn.Module, args: tuple) -> tuple:
            name = site(path)
            return tuple(visit(f"{name}:in{i}", a) if _is_float(a) else a for i, a in enumerate(args))
        return hook

    def post(path: str):
        def hook(_: nn.Module, args: tuple, out: object) -> object:
            name = site(path)
            calls[path] = calls.get(path, 0) + 1
            return visit(name, out) if _is_float(out) else out
        return hook

    handles = []
    for path, m in leaf_modules(model).items():
        handles += [m.register_forward_pre_hook(pre(path)), m.register_forward_hook(post(path))]
    if not handles:
        raise LayerlieError(f"{type(model).__name__} cannot be traced and has no leaf modules to hook; "
                            "wrap its computations in nn.Modules or make its forward traceable")
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _is_float(a: object) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def _module_of(site: str) -> str:
    return site.split(":")[0].split("#")[0]


def _run(model: nn.Module, head: Head, x: torch.Tensor) -> torch.Tensor:
    try:
        return head(model(x))
    except LayerlieError:
        raise
    except Exception as err:
        raise LayerlieError(f"{type(model).__name__} failed under forward hooks: "
                            f"{' '.join(str(err).split())[:200]}") from None


def module_defects(model: nn.Module, x: torch.Tensor, group: Group, scheme: str = "central",
                   coords: Coords = "receptive_field",
                   head: Head = lambda y: y.softmax(-1)) -> tuple[list[ModuleSite], torch.Tensor, torch.Tensor]:
    """Every site's defect ``e_s``, the output ``F(x)`` and ``L F(x)`` (docs/method.md §3).

    Args:
        model: the model, in eval mode.
        x: images ``(B, C, H, W)``.
        group: the group; scheme and coords as for :func:`layerlie.attribute`.
        head: maps the model's output to ``F`` (softmax, or identity for logits).

    Returns:
        ``(sites, y, total)``: the sites in call order (the last is the output glue),
        ``y = F(x)`` and ``total = L F(x)``.
    """
    hw = (x.shape[-2], x.shape[-1])
    sites: list[ModuleSite] = []
    layouts = module_layouts(model, x, head)

    def own(h: torch.Tensor, name: str = "output") -> tuple[Layout, torch.Tensor]:
        lay = layouts.get(name) or guessed_layout(h, hw)
        return lay, layout_tangent(h, lay, group, scheme, coords)

    def visit(name: str, h: torch.Tensor) -> torch.Tensor:
        primal, arriving = fwAD.unpack_dual(h)
        lay, g = own(primal, name)
        e = g.neg() if arriving is None else arriving - g
        if not torch.isfinite(e.sum()):  # NaN or inf anywhere: one reduction, not a mask
            raise LayerlieError(f"NaN or inf first appears at {name} (module {_module_of(name)}); check the "
                                "model's weights or use dtype=torch.float64")
        kind = "input" if ":in" in name else "module"
        sites.append(ModuleSite(name, _module_of(name), kind, lay, e))
        return fwAD.make_dual(primal, g)

    gx = tangent(x, group, scheme)
    with torch.no_grad(), jvp_ready(model), fwAD.dual_level():
        y_total = fwAD.unpack_dual(_run(model, head, fwAD.make_dual(x, gx)))
        with hooked(model, visit):
            y, arriving = fwAD.unpack_dual(_run(model, head, fwAD.make_dual(x, gx)))
    lay, g = own(y)
    zero = torch.zeros_like(y)
    total = (y_total.tangent if y_total.tangent is not None else zero) - g
    sites.append(ModuleSite("output", "", "output", lay, (arriving if arriving is not None else zero) - g))
    return sites, y, total


def module_contributions(model: nn.Module, x: torch.Tensor, sites: list[ModuleSite],
                         head: Head = lambda y: y.softmax(-1)) -> list[torch.Tensor]:
    """``c_s = J_{out<-s}[e_s]`` for every site: one forward-mode pass per site that has a
    defect, with ``e_s`` added to the tangent where the site's hook sees it (docs/method.md §4, exact)."""
    out: list[torch.Tensor] = []
    for s in sites:
        if s.kind == "output" or not s.defect.any():
            out.append(s.defect)
            continue

        def visit(name: str, h: torch.Tensor, s: ModuleSite = s) -> torch.Tensor:
            if name != s.name:
                return h
            primal, arriving = fwAD.unpack_dual(h)
            return fwAD.make_dual(primal, s.defect if arriving is None else arriving + s.defect)

        with torch.no_grad(), jvp_ready(model), fwAD.dual_level(), hooked(model, visit):
            y, c = fwAD.unpack_dual(_run(model, head, fwAD.make_dual(x, torch.zeros_like(x))))
        out.append(c if c is not None else torch.zeros_like(y))
    return out


def module_cotangents(model: nn.Module, x: torch.Tensor, sites: list[ModuleSite], weights: list[torch.Tensor],
                      head: Head = lambda y: y.softmax(-1)) -> list[list[torch.Tensor]]:
    """``J_{out<-s}^T w`` for every site and every output cotangent ``w`` (docs/method.md §4)."""
    kept: dict[str, torch.Tensor] = {}

    def visit(name: str, h: torch.Tensor) -> torch.Tensor:
        kept[name] = h.view_as(h)  # a tensor of this site's own, seen by this consumer only
        return kept[name]

    with torch.enable_grad(), jvp_ready(model), hooked(model, visit):
        y = _run(model, head, x.detach().requires_grad_(True))
    leaves = [kept[s.name] if s.kind != "output" else y for s in sites]
    results = []
    for i, w in enumerate(weights):
        grads = torch.autograd.grad(y, leaves, w, retain_graph=i < len(weights) - 1, allow_unused=True)
        results.append([g if g is not None else torch.zeros_like(s.defect) for g, s in zip(grads, sites)])
    return results
