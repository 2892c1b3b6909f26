"""The model contract: how every public function takes the model and the images it is given.

Any ``nn.Module`` that maps an image batch ``(B, C, H, W)`` to a tensor, or to a structure that
holds one, is measured as follows (docs/design.md §2):

- **The caller's module is never changed**: not its training flags, parameters, buffers,
  gradients or hooks, nor attributes such as ``inplace``. A model in training mode is measured
  in eval mode on a prepared copy (:func:`layerlie.load_model`), with a one-line note.
- **The output rule** (``output=``): a tensor is measured as it is; a tuple or list gives its
  first tensor (with a note); a dict, or an object with a ``logits`` attribute, gives
  ``logits``; ``output=1`` or ``output="name"`` picks another item by index, key or attribute.
  The published LEE is the softmax of the selected tensor, and a traced graph returns it.
- **The images fit the model**: they are cast to its dtype and device (with a note); a channel
  count the model cannot take is a one-line error that names the fix.

Notes are :class:`layerlie.errors.Note` warnings, one line each.

Example:
    >>> import torch, layerlie as ll
    >>> from layerlie.model.contract import prepare
    >>> class TwoHeads(torch.nn.Module):
    ...     def forward(self, x):
    ...         return {"logits": x.mean((2, 3)), "features": x}
    >>> p = prepare(TwoHeads().eval(), torch.randn(2, 3, 8, 8))
    >>> p.output, p.selected(p.x).shape
    ('logits', torch.Size([2, 3]))
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch import nn

from layerlie.core.attention import differentiable_attention
from layerlie.errors import LayerlieError, note
from layerlie.model.loading import input_channels, load_model

Output = int | str | None
"""``output=``: None (the rule's default), an index into a tuple or list, or a key or attribute."""

HEADS = ("softmax", "logits")
"""The heads :func:`layerlie.attribute` puts on the selected tensor by name."""


def check_images(x: torch.Tensor) -> torch.Tensor:
    """Check that ``x`` is a finite float batch ``(B, C, H, W)``; return it unchanged (the channels
    are the model's to check: :func:`prepare`)."""
    if not isinstance(x, torch.Tensor):
        raise LayerlieError(f"expected a torch.Tensor of images (B, C, H, W), got {type(x).__name__}")
    if x.ndim != 4:
        raise LayerlieError(f"expected images of shape (B, C, H, W), got shape {tuple(x.shape)}; "
                            "add a batch axis with x[None] for a single image")
    if not x.is_floating_point():
        raise LayerlieError(f"expected floating-point images, got dtype {x.dtype}; convert with "
                            "x.float() after normalizing (layerlie.photos and layerlie.images do it)")
    if not torch.isfinite(x).all():
        raise LayerlieError("the input images contain NaN or inf values; clean or re-normalize them")
    return x


class ImagesError(LayerlieError):
    """The model fails on the images it is given (their size, most often)."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what}; give images of the size and channels it was built for")
        self.what = what  # the failure without the fix, for callers that name their own fix


def _channel_error(channels: int, x: torch.Tensor) -> LayerlieError:
    """The one-line error for images with another channel count than the model's."""
    if channels == 1:
        fix = "x.mean(1, keepdim=True) gives their luminance"
    elif x.shape[1] == 1:
        fix = f"x.expand(-1, {channels}, -1, -1) repeats the one channel"
    else:
        fix = f"convert them to {channels} channels"
    plural = "s" if channels != 1 else ""
    return LayerlieError(f"the model expects {channels} input channel{plural}, the images have {x.shape[1]} "
                         f"(shape {tuple(x.shape)}); {fix}")


class Prepared(NamedTuple):
    """A model and images that fit the contract (:func:`prepare`).

    Attributes:
        model: the caller's module, or an eval-mode copy of it when it was in training mode.
        x: the images, in the model's dtype and on its device.
        output: the explicit selection, so that later calls need no note: None where the model
            returns a tensor, else an index, key or attribute.
        head: with ``heads=True``: ``"softmax"``, ``"logits"`` or a graph node name.
    """

    model: nn.Module | Callable[[torch.Tensor], Any]
    x: torch.Tensor
    output: Output
    head: str | None = None

    @property
    def selected(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The model with the selected tensor as its output."""
        return selected(self.model, self.output)


def prepare(model: nn.Module | Callable[[torch.Tensor], Any], x: torch.Tensor, output: Output = None, *,
            heads: bool = False) -> Prepared:
    """Fit ``model`` and images ``x: (B, C, H, W)`` to the contract, at a public function's entry.

    One forward of the first image (no gradients, eval mode) checks that the model takes the
    images and finds the output's structure.

    Args:
        model: the caller's model (any callable of images; the module rules apply to modules).
        x: images.
        output: the output rule's selection (see the module's docstring).
        heads: ``output`` may also name a head of the selected tensor, as in
            :func:`layerlie.attribute`: ``"softmax"`` (the default), ``"logits"`` or a graph node
            (a name that is no key nor attribute of the output); an index, key or attribute
            then selects a tensor measured as it is (``head="logits"``).

    Returns:
        A :class:`Prepared`.

    Raises:
        LayerlieError: images that are not a finite float batch, a channel count the model cannot
            take, a model that fails on the images, or an output with no tensor to select.
    """
    check_images(x)
    _check_output(output)
    head = None
    if isinstance(model, nn.Module):
        x = _cast(model, x)
        model = eval_copy(model)
    y = _probe(model, x)
    if heads:
        if output is None or output in HEADS:
            output, head = None, output or "softmax"
        elif isinstance(output, str) and not _holds(y, output):
            output, head = None, output  # a node of the traced graph
        else:
            head = "logits"
    return Prepared(model, x, resolve(y, output, _owner(model)), head)


def select(y: Any, output: Output = None, owner: str = "the model") -> Any:
    """The selected tensor (or ``fx.Proxy``, while tracing) of a model's output ``y``, silently."""
    return _pick(y, output, owner)[0]


def resolve(y: Any, output: Output = None, owner: str = "the model") -> Output:
    """The explicit selection that picks the tensor of ``y`` that ``output`` means (None for a
    tensor), with a note where the rule picks the first tensor of a tuple or list."""
    value, chosen = _pick(y, output, owner)
    if output is None and isinstance(y, (tuple, list)):
        note(f"{owner} returns a {type(y).__name__} of {len(y)}: measuring its first tensor (output={chosen}); "
             "pass output= another index to pick another")
    return chosen


def selected(model: Callable[[torch.Tensor], Any], output: Output) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` with the selected tensor as its output: the model itself where it returns one
    (``output=None`` after :func:`resolve`), else a :class:`Selected` module."""
    if output is None:
        return model
    if isinstance(model, nn.Module):
        return Selected(model, output)
    return lambda z: select(model(z), output)


class Selected(nn.Module):
    """A module whose forward returns the selected tensor of ``model``'s output."""

    def __init__(self, model: nn.Module, output: Output) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return select(self.model(x), self.output, _owner(self.model))


def selecting(copied: nn.Module, output: Output) -> None:
    """Make the forward of ``copied``, a copy the caller owns, return the selected tensor, for
    tracing: its class becomes a subclass of its own whose forward selects, so that the traced
    graph keeps the model's node names and module paths (a wrapper module would prefix them)."""
    cls = type(copied)
    forward = _selecting_forward(cls.forward, output, _owner(copied), select, resolve)
    # fx keeps as leaves the functions it finds in the globals of the root's forward (timm's
    # no-trace functions): give the new forward those of the model's own
    forward = types.FunctionType(forward.__code__, getattr(cls.forward, "__globals__", globals()), "forward",
                                 None, forward.__closure__)
    functools.update_wrapper(forward, cls.forward)  # fx reads the placeholders from the wrapped signature
    copied.__class__ = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})


def _selecting_forward(original: Callable[..., Any], output: Output, owner: str, pick: Callable[..., Any],
                       resolved: Callable[..., Output]) -> Callable[..., Any]:
    """The forward of :func:`selecting`; it reads no global name, so that it runs in any globals."""
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        y = original(self, *args, **kwargs)
        return pick(y, resolved(y, output, owner), owner)

    return forward


def _pick(y: Any, output: Output, owner: str) -> tuple[Any, Output]:
    """The selected item of ``y`` and the explicit selection that picks it."""
    if output is None:
        if _is_tensor(y):
            return y, None
        if isinstance(y, (tuple, list)):
            first = next((i for i, v in enumerate(y) if _is_tensor(v)), None)
            if first is None:
                raise LayerlieError(f"{owner} returns a {type(y).__name__} with no tensor in it; make its forward "
                                    "return the logits")
            return y[first], first
        if isinstance(y, Mapping) or hasattr(y, "logits"):
            output = "logits"
        else:
            raise LayerlieError(f"{owner} returns {type(y).__name__}, not a tensor, tuple, list, dict or object "
                                "with .logits; make its forward return the logits")
    if isinstance(output, int):
        if not isinstance(y, (tuple, list)) or not -len(y) <= output < len(y):
            raise LayerlieError(f"output={output} picks an item of a tuple or list, but {owner} returns "
                                f"{_describe(y)}; pass output= an index below its length, or a key")
        value = y[output]
    elif _holds(y, output):
        value = y[output] if isinstance(y, Mapping) else getattr(y, output)
    else:
        hint = ("one of its keys" if isinstance(y, Mapping) else "an index" if isinstance(y, (tuple, list))
                else "an attribute")
        raise LayerlieError(f"{owner} returns {_describe(y)}, with no {output!r}; pass output= {hint} that holds "
                            "the tensor to measure")
    if not _is_tensor(value):
        raise LayerlieError(f"output={output!r} of {owner} is a {type(value).__name__}, not a tensor; pass "
                            "output= the item that holds the logits")
    return value, output


def _holds(y: Any, key: str) -> bool:
    """Whether the output structure ``y`` has ``key`` as a key or an attribute (not a tensor's)."""
    if isinstance(y, Mapping):
        return key in y
    return not _is_tensor(y) and not isinstance(y, (tuple, list)) and hasattr(y, key)


def _is_tensor(v: Any) -> bool:
    return isinstance(v, (torch.Tensor, fx.Proxy))


def _describe(y: Any) -> str:
    if _is_tensor(y):
        return "a tensor"
    if isinstance(y, (tuple, list)):
        return f"a {type(y).__name__} of {len(y)}"
    if isinstance(y, Mapping):
        return f"a dict with keys {list(y)}"
    return f"a {type(y).__name__}"


def _check_output(output: Output) -> None:
    if output is not None and (isinstance(output, bool) or not isinstance(output, (int, str))):
        raise LayerlieError(f"output= takes an index, a key or an attribute name, got {output!r}")


def _in_training(model: nn.Module) -> bool:
    """Whether a module that runs in ``model``'s forward is in training mode. In a GraphModule,
    those are the called modules and their children: its generated forward reads no flag of its
    own (fx fixed ``self.training`` when it traced), nor of the containers fx adds for paths."""
    if isinstance(model, fx.GraphModule):
        called = [model.get_submodule(n.target) for n in model.graph.nodes if n.op == "call_module"]
        return any(m.training for c in called for m in c.modules())
    return any(m.training for m in model.modules())


def _owner(model: Any) -> str:
    return type(model).__name__ if isinstance(model, nn.Module) else "the model"


def _cast(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype and on the device of the model's first floating tensor, with a note."""
    like = next((t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()), None)
    if like is None or (x.dtype, x.device) == (like.dtype, like.device):
        return x
    came = f"{x.dtype}" + (f" on {x.device}" if x.device != like.device else "")
    want = f"{like.dtype}" + (f" on {like.device}" if x.device != like.device else "")
    note(f"the images are {came}, {_owner(model)} is {want}: measuring the images cast to the model's")
    return x.to(dtype=like.dtype, device=like.device)


def _probe(model: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
    """The model's output on the first image; a model that fails on the images is a one-line
    error, which names the channels where they differ from the model's. Running out of memory
    is not the images' fault: it passes as it came."""
    try:
        with torch.no_grad(), differentiable_attention():  # the path the measurements take
            return model(x[:1])
    except (LayerlieError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as err:  # any failure of the user's forward
        channels = input_channels(model) if isinstance(model, nn.Module) else None
        if channels is not None and channels != x.shape[1]:
            raise _channel_error(channels, x) from None
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImagesError(f"{_owner(model)} fails on images of shape {tuple(x.shape[1:])} ({first})") from err


def eval_copy(model: nn.Module, *, quiet: bool = False) -> nn.Module:
    """The model itself in eval mode, else an eval-mode copy, with the contract's note (``quiet``:
    without it, where the result is a new model in eval mode, as from :func:`layerlie.trace`)."""
    if not _in_training(model):
        return model
    if not quiet:
        note(f"{_owner(model)} is in training mode: measured in eval mode on a copy (the model is left as it is)")
    try:
        return load_model(model)
    except Exception as err:  # deepcopy fails on what a module may hold (locks, open files, ...)
        raise LayerlieError(f"{_owner(model)} is in training mode and cannot be copied to measure it in eval mode "
                            f"({type(err).__name__}: {err}); call model.eval() first") from None
