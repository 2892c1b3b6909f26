"""A model as a ``torch.fx.GraphModule`` (docs/method.md §3), traced with timm's own fx policy.

timm's registered leaf modules and no-trace functions go to the tracer, the model is
traced as a copy (tracing writes into some modules' caches, e.g. LeViT's attention
biases), every in-place op is made out-of-place on that copy, and the traced output is
checked against the model's own. The GraphModule returns what the model returns (the
logits of a classifier); :func:`with_output` gives the softmax, or any node, as the output.

Why out-of-place: the engine keeps every node's value for the tangent passes. An in-place
activation overwrites its input, so the stored value of the layer before it would be the
activated one, and that layer would be charged with the activation's defect.

Example:
    >>> import layerlie as ll
    >>> gm = ll.trace(ll.load_model("resnet18"))
    >>> gm.meta["layerlie.outputs"]
    {'logits': 'fc'}
    >>> with_output(gm, "softmax")[1]
    'softmax'
"""

from __future__ import annotations

import copy
import inspect
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.layers import _fx as timm_fx
from torch import nn

from layerlie.core.layout import layout_cache
from layerlie.core.attention import differentiable_attention, explicit_attention_modules, scaled_dot_product_attention
from layerlie.model.contract import Output, eval_copy, prepare, select, selecting
from layerlie.deprecation import renamed
from layerlie.errors import LayerlieError, TraceError
from layerlie.model.normact import split_norm_acts


class _TimmTracer(fx.Tracer):
    """fx's tracer with timm's leaf modules and no-trace functions; each call of
    ``F.scaled_dot_product_attention`` is written as explicit ops (:mod:`layerlie.core.attention`)."""

    def __init__(self) -> None:
        fns = tuple(f for f in timm_fx.get_notrace_functions() if callable(f))
        super().__init__(autowrap_functions=fns)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return timm_fx.is_notrace_module(type(m)) or super().is_leaf_module(m, qualname)

    def create_proxy(self, kind: str, target: fx.node.Target, args: tuple, kwargs: dict, *rest, **more) -> fx.Proxy:
        if kind == "call_function" and target is F.scaled_dot_product_attention:
            return scaled_dot_product_attention(*args, **kwargs)  # the attention map as a node (docs/method.md §5)
        return super().create_proxy(kind, target, args, kwargs, *rest, **more)


@renamed(example="x")
def trace(model: nn.Module, x: torch.Tensor | None = None, *, softmax: bool = False,
          output: Output = None) -> fx.GraphModule:
    """Trace ``model`` (a copy of it) to a GraphModule whose forward returns what the model's does.

    Args:
        model: the model, traced in eval mode on a copy (it is never changed).
        x: an input batch ``(B, C, H, W)``; when given, the traced output must equal the model's.
        softmax: return ``softmax(logits, -1)`` instead of the logits (the output the published
            LEE differentiates); :func:`with_output` gives it on demand either way.
        output: the tensor of a tuple, dict or ``.logits`` output that the graph returns (the
            output rule of :mod:`layerlie.model.contract`).

    Returns:
        The GraphModule; ``gm.meta["layerlie.outputs"]`` names its ``logits`` node (and its
        ``softmax`` node when asked for); ``gm.meta["layerlie.input_size"]`` is the model's
        ``(C, H, W)`` when it says.

    Raises:
        TraceError: with the tracer's reason, in one line; or naming an in-place op that has
            no out-of-place twin.
    """
    if x is not None:  # the eager output to check against is the eval-mode one
        model, x, output, _ = prepare(eval_copy(model, quiet=True), x, output)
    copied = copy.deepcopy(model).eval()
    selecting(copied, output)
    for m in copied.modules():
        if isinstance(getattr(m, "fused_attn", None), bool):  # explicit attention: softmax and matmul nodes
            m.fused_attn = False
        if getattr(m, "inplace", None) is True:  # nn.ReLU(inplace=True) and kin, leaves included
            m.inplace = False
    tracer = _TimmTracer()
    try:
        explicit_attention_modules(copied, tracer.is_leaf_module)  # torch's attention modules as ops
        graph = tracer.trace(copied)
    except LayerlieError:  # the output rule's and the attention twins' own errors
        raise
    except Exception as err:  # fx raises many types for untraceable code
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise TraceError(f"torch.fx cannot trace {type(model).__name__}: {reason}") from None
    split_norm_acts(copied, graph)  # timm's norm+act leaves: the activation gets its own node
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    logits = out.args[0]
    out_of_place(graph, copied)
    gm = fx.GraphModule(copied, graph, class_name=type(model).__name__)
    gm.meta["layerlie.outputs"] = {"logits": logits.name}
    gm.meta["layerlie.input_size"] = input_size(model)
    if softmax:
        gm, _ = with_output(gm, "softmax")
    if x is not None:
        check_trace(model, gm, x, softmax=softmax, output=output)
    return gm


def input_size(model: nn.Module) -> tuple[int, int, int] | None:
    """The ``(C, H, W)`` a model takes, when it says: a fixed patch-embedding size (timm ViTs
    built with ``img_size=``), else timm's data config; None for a plain module."""
    if isinstance(model, fx.GraphModule):
        return model.meta.get("layerlie.input_size")
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if not cfg:
        return None
    c, h, w = resolve_data_config({}, model=model)["input_size"]
    fixed = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(fixed, (tuple, list)) and len(fixed) == 2:
        h, w = fixed
    return int(c), int(h), int(w)


def check_trace(model: nn.Module, gm: fx.GraphModule, x: torch.Tensor, *, softmax: bool = False,
                output: Output = None) -> None:
    """The traced module must give the model's selected output on ``x`` (its softmax when ``softmax``),
    as layerlie's derivatives compute it: torch's attention on its dense path (the eval-mode
    nested-tensor path of ``nn.TransformerEncoder`` returns zeros at padded positions)."""
    with torch.no_grad(), differentiable_attention():
        want = select(model(x), output)
        got = gm(x)
    if softmax:
        want = want.softmax(-1)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True):
        raise TraceError(f"the traced {type(model).__name__} does not reproduce the model's output "
                         f"(max difference {float((got - want).abs().max()):.2e}); fx cannot capture data-dependent "
                         "control flow, nor x += y on a tensor that is read again: write y = x + z there")


# Ops that return a view of their first argument: writing into the view writes into it too.
_VIEWS = {"view", "view_as", "reshape", "flatten", "unflatten", "narrow", "select", "transpose", "permute",
          "expand", "expand_as", "squeeze", "unsqueeze", "t", "movedim", "swapaxes", "diagonal", "unfold",
          "as_strided", "chunk", "split", "unbind", "getitem", "detach", "contiguous"}


def _name(n: fx.Node) -> str:
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def _trailing_underscore(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__")


def _inplace_flag(n: fx.Node) -> inspect.BoundArguments | None:
    """The bound arguments of a function call that sets ``inplace=True``, else None."""
    if n.op != "call_function" or not callable(n.target):
        return None
    try:
        bound = inspect.signature(n.target).bind(*n.args, **n.kwargs)
    except (TypeError, ValueError):  # builtins without a signature, or arguments it cannot bind
        return None
    return bound if bound.arguments.get("inplace") is True else None


def _mutates(root: nn.Module, n: fx.Node) -> bool:
    """Whether ``n`` writes into one of its arguments."""
    if n.op == "call_module":
        return getattr(root.get_submodule(n.target), "inplace", None) is True
    if n.op not in ("call_function", "call_method"):
        return False
    return (n.target is operator.setitem or _trailing_underscore(_name(n))
            or n.kwargs.get("inplace") is True or _inplace_flag(n) is not None)


def _twin(root: nn.Module, n: fx.Node) -> bool:
    """Make ``n`` its out-of-place twin; False when it has none."""
    if n.op == "call_module":
        root.get_submodule(n.target).inplace = False
    elif (bound := _inplace_flag(n)) is not None:
        bound.arguments["inplace"] = False
        n.args, n.kwargs = bound.args, bound.kwargs
    elif n.op == "call_method" and callable(getattr(torch.Tensor, _name(n)[:-1], None)):
        n.target = _name(n)[:-1]  # x.relu_() -> x.relu()
    elif n.op == "call_function" and (fn := getattr(torch, _name(n)[:-1], None) or getattr(F, _name(n)[:-1], None)):
        n.target = fn  # torch.relu_ -> torch.relu
    else:
        return False
    return True


def out_of_place(graph: fx.Graph, root: nn.Module) -> None:
    """Rewrite every in-place op of ``graph`` as its out-of-place twin, in place. The later
    users of the argument it wrote into read its result instead, which is what they saw.

    ``x += y`` needs no rewrite: fx proxies have no ``__iadd__``, so the tracer records
    ``x + y`` (and :func:`check_trace` catches a model that reads the old ``x`` afterwards).

    Raises:
        TraceError: naming a node left in place (no twin, or it writes into a view of a tensor
            that is read afterwards), and the fix.
    """
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    for n in nodes:
        if not _mutates(root, n):
            continue
        if not _twin(root, n):
            raise TraceError(f"node {n.format_node()} modifies a tensor in place and has no out-of-place "
                             "twin; write it out of place in the model (y = f(x), not x.f_())")
        written = n.args[0] if n.args else None
        if not isinstance(written, fx.Node):
            continue
        _check_no_alias(written, n, order)
        for user in list(written.users):
            if order[user] > order[n]:
                user.replace_input_with(written, n)


def _is_view(n: fx.Node) -> bool:
    return n.op in ("call_method", "call_function") and _name(n) in _VIEWS and bool(n.args) \
        and isinstance(n.args[0], fx.Node)


def _check_no_alias(written: fx.Node, n: fx.Node, order: dict[fx.Node, int]) -> None:
    """An in-place write into a tensor also changes the tensors that share its memory (the one
    it views, the views taken of it): refuse it when one of them is read after ``n``, since the
    out-of-place rewrite cannot follow."""
    shared, node = [], written
    while _is_view(node):
        node = node.args[0]
        shared.append(node)
    shared += [u for u in written.users if order[u] < order[n] and _is_view(u)]
    for other in shared:
        if any(order[u] > order[n] for u in other.users):
            raise TraceError(f"node {n.format_node()} writes in place into {written.name}, which shares memory "
                             f"with {other.name}, read afterwards; write it out of place in the model "
                             "(y = x + z, not x += z)")


def with_output(gm: fx.GraphModule, output: str) -> tuple[fx.GraphModule, str]:
    """``gm`` with the node ``output`` as its output, and that node's name.

    Args:
        gm: a GraphModule from :func:`trace` or :func:`layerlie.antialias`.
        output: ``"logits"``, ``"softmax"`` (``softmax(logits, -1)``, appended when the graph
            lacks it) or a node name.

    Returns:
        ``gm`` itself when that node is already its output, else a GraphModule that shares
        ``gm``'s modules and parameters, with its own graph.
    """
    names = gm.meta.get("layerlie.outputs", {})
    if output == "softmax" and output not in names:
        if "logits" not in names:
            raise LayerlieError("this GraphModule does not name its logits node; trace the model with "
                                "layerlie.trace, or pass output= a node name")
        cut, logits = with_output(gm, "logits")
        return _append_softmax(cut, logits)
    target = names.get(output, output)
    nodes = {n.name: n for n in gm.graph.nodes}
    if target not in nodes:
        raise LayerlieError(f"output {output!r} is not a node; use 'softmax', 'logits', or a node name "
                            f"such as {list(nodes)[len(nodes) // 2]!r}")
    if target == next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0].name:
        return gm, target
    cut = _graph_copy(gm)
    out = next(n for n in reversed(cut.graph.nodes) if n.op == "output")
    out.args = ({n.name: n for n in cut.graph.nodes}[target],)
    cut.graph.eliminate_dead_code()
    cut.recompile()
    return cut, target


def _graph_copy(gm: fx.GraphModule) -> fx.GraphModule:
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
    layout_cache(gm)  # the copy and ``gm`` share their stored layouts
    new.meta = dict(gm.meta)
    return new


def _append_softmax(gm: fx.GraphModule, logits: str) -> tuple[fx.GraphModule, str]:
    new = _graph_copy(gm)
    out = next(n for n in reversed(new.graph.nodes) if n.op == "output")
    with new.graph.inserting_before(out):
        node = new.graph.call_function(torch.softmax, ({n.name: n for n in new.graph.nodes}[logits], -1))
    out.args = (node,)
    new.recompile()
    new.meta["layerlie.outputs"] = {**new.meta.get("layerlie.outputs", {}), "softmax": node.name}
    return new, node.name
