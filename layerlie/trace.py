"""A model as a ``torch.fx.GraphModule`` (METHOD 3), traced with timm's own fx policy.

timm's registered leaf modules and no-trace functions go to the tracer, the model is
traced as a copy (tracing writes into some modules' caches, e.g. LeViT's attention
biases), the softmax is appended as a node, and the traced output is checked against
the model's own.

Example:
    >>> import layerlie as ll
    >>> gm = ll.trace(ll.load_model("resnet18"))
    >>> gm.meta["layerlie.outputs"]
    {'logits': 'fc', 'softmax': 'softmax'}
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from timm.layers import _fx as timm_fx
from torch import nn

from layerlie.errors import LayerlieError
from layerlie.normact import split_norm_acts


class TraceError(LayerlieError):
    """The model cannot be traced to a graph."""


class _TimmTracer(fx.Tracer):
    """fx's tracer with timm's leaf modules and no-trace functions."""

    def __init__(self) -> None:
        fns = tuple(f for f in timm_fx.get_notrace_functions() if callable(f))
        super().__init__(autowrap_functions=fns)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return timm_fx.is_notrace_module(type(m)) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, example: torch.Tensor | None = None, softmax: bool = True) -> fx.GraphModule:
    """Trace ``model`` (a copy of it) to a GraphModule.

    Args:
        model: the model, in eval mode.
        example: an input batch; when given, the traced output must equal the model's.
        softmax: append ``softmax(logits, -1)`` as the node ``softmax``.

    Returns:
        The GraphModule; ``gm.meta["layerlie.outputs"]`` names its ``logits`` and
        ``softmax`` nodes.

    Raises:
        TraceError: with the tracer's reason, in one line.
    """
    copied = copy.deepcopy(model).eval()
    for m in copied.modules():  # explicit attention: softmax and matmul nodes, forward-mode ready
        if isinstance(getattr(m, "fused_attn", None), bool):
            m.fused_attn = False
    try:
        graph = _TimmTracer().trace(copied)
    except Exception as err:  # fx raises many types for untraceable code
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise TraceError(f"torch.fx cannot trace {type(model).__name__}: {reason}") from None
    split_norm_acts(copied, graph)  # timm's norm+act leaves: the activation gets its own node
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    logits = out.args[0]
    if not isinstance(logits, fx.Node):
        raise TraceError(f"{type(model).__name__} returns {type(logits).__name__}, not one tensor; "
                         "wrap it so that forward returns the logits")
    names = {"logits": logits.name}
    if softmax:
        with graph.inserting_before(out):
            node = graph.call_function(torch.softmax, (logits, -1))
        out.args = (node,)
        names["softmax"] = node.name
    gm = fx.GraphModule(copied, graph, class_name=type(model).__name__)
    gm.meta["layerlie.outputs"] = names
    if example is not None:
        check_trace(model, gm, example, softmax)
    return gm


def check_trace(model: nn.Module, gm: fx.GraphModule, x: torch.Tensor, softmax: bool = True) -> None:
    """The traced module must give the model's output on ``x``."""
    with torch.no_grad():
        want = model(x)
        got = gm(x)
    if softmax:
        want = want.softmax(-1)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5, equal_nan=True):
        raise TraceError(f"the traced {type(model).__name__} does not reproduce the model's output "
                         f"(max difference {float((got - want).abs().max()):.2e}); it has data-dependent "
                         "control flow that fx cannot capture")


def with_output(gm: fx.GraphModule, output: str) -> tuple[fx.GraphModule, str]:
    """``gm`` cut at the node ``output`` (``"softmax"``, ``"logits"`` or a node name), as a copy
    when it is not already the graph's output, and that node's name."""
    names = gm.meta.get("layerlie.outputs", {})
    target = names.get(output, output)
    nodes = {n.name: n for n in gm.graph.nodes}
    if target not in nodes:
        raise LayerlieError(f"output {output!r} is not a node; use 'softmax', 'logits', or a node name "
                            f"such as {list(nodes)[len(nodes) // 2]!r}")
    if target == next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0].name:
        return gm, target
    cut = copy.deepcopy(gm)
    out = next(n for n in reversed(cut.graph.nodes) if n.op == "output")
    out.args = ({n.name: n for n in cut.graph.nodes}[target],)
    cut.graph.eliminate_dead_code()
    cut.recompile()
    return cut, target
