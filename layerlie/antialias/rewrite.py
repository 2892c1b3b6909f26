"""Anti-aliased substitutes by graph surgery, with the weights kept (docs/method.md §6).

:func:`antialias` returns a new traced model in which chosen nodes are replaced:

- ``blurpool`` (Zhang 2019): a strided convolution or pool becomes the same layer at stride 1,
  then a binomial blur that subsamples by the old stride (for a max-pool, kornia's MaxBlurPool2D);
  a patch embedding (kernel == stride) keeps its stride and gets a blur at stride 1 before it.
- ``aps`` (Chaman and Dokmanic 2021): the layer at stride 1 (blurred at stride 1 too when
  ``blurpool``), then adaptive polyphase sampling; exactly invariant to circular integer shifts.
- ``activations="filtered"`` (Karras et al. 2021): a pointwise nonlinearity on an image-like tensor
  runs at twice the resolution, between a binomial interpolation filter and a binomial blur.

Which nodes are replaced, and by what, is a policy (:mod:`layerlie.antialias.policies`). A
substitute holds the layer's own parameter tensors, and the layer that holds them keeps its module
path and its node's name, so ``named_parameters()`` and ``state_dict()`` of the new model are the
original's (an original checkpoint loads as is). ``meta["layerlie.surgery"]`` records, for each
replaced node, the new nodes that compute its output, so the attribution tables before and after
can be compared.

Example:
    >>> import layerlie as ll
    >>> new = ll.antialias(ll.load_model("resnet18"))
    >>> new.meta["layerlie.surgery"]["maxpool"].nodes
    ('maxpool', 'maxpool_blur')
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable
from typing import NamedTuple, Union

import torch
import torch.fx as fx
from torch import nn

from layerlie.antialias.filters import MAX_FILTER_SIZE
from layerlie.antialias.layers import Resampled
from layerlie.antialias.policies import Options, Policy, get_policy, list_policies
from layerlie.core.engine import Recorder
from layerlie.core.layout import Layout, LayoutProp
from layerlie.core.ops import LAYER_TYPES, layer_type
from layerlie.errors import LayerlieError
from layerlie.model.contract import Output, eval_copy, prepare
from layerlie.deprecation import renamed
from layerlie.model.loading import input_channels
from layerlie.model.trace import input_size, trace


class NothingToReplace(LayerlieError):
    """A surgery found no node to replace."""


Where = Union[None, Callable[[fx.Node], bool], str, Iterable[str], range, slice]
"""The nodes a surgery considers: None (all), a predicate, name or layer-type patterns, or depths."""


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
    valid = [name for name in list_policies() if get_policy(name).activation]
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
    work.meta = dict(model.meta)  # shares the model's stored layouts, if any (infer_layouts)
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
