"""The end-to-end Lie derivative of a model and the published LEE metric (docs/method.md §2).

``L f(x) = J_f(x)[G x] - G f(x)`` (the second term only for image-like outputs). The
Jacobian-vector product is forward-mode AD (``torch.func.jvp``), one primal pass shared
by all groups: the tangents of several groups are stacked and pushed through together
with ``torch.func.vmap``. The published two-reverse-pass trick is kept as
``method="double_backward"``, a baseline for tests and benchmarks.

Example:
    >>> import torch, layerlie as ll
    >>> f = lambda x: x.mean(dim=(2, 3))          # invariant to circular shifts
    >>> x = torch.randn(2, 3, 16, 16)
    >>> d = ll.lie_derivative(f, x, ll.group("translate_x"), scheme="spectral")
    >>> bool(d.abs().max() < 1e-6)
    True
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal

import pandas as pd
import torch
from torch import nn

from layerlie.core.attention import differentiable_attention
from layerlie.model.contract import Output, check_images, prepare
from layerlie.errors import LayerlieError
from layerlie.core.groups import Group, resolve_groups
from layerlie.core.rules import FastRules
from layerlie.core.memory import Footprint, measure_footprint, plan_chunks
from layerlie.core.tangent import IMAGE, Frame, base_point, check_scheme, tangent

Method = Literal["jvp", "double_backward"]
METHODS: tuple[str, ...] = ("jvp", "double_backward")


def check_finite(y: torch.Tensor, what: str) -> torch.Tensor:
    if not torch.isfinite(y).all():
        raise LayerlieError(f"the {what} contains NaN or inf values; check the model's weights and "
                            "input normalization, or try dtype=torch.float64")
    return y


@contextlib.contextmanager
def jvp_ready(model: nn.Module | Callable) -> Iterator[None]:
    """Switch off timm's fused attention, and run torch's own attention through differentiable
    kernels (:func:`layerlie.core.attention.differentiable_attention`), for the duration: the fused
    kernels have no forward-mode derivative. Everything is restored afterwards."""
    saved = []
    if isinstance(model, nn.Module):
        for m in model.modules():
            if isinstance(getattr(m, "fused_attn", None), bool):
                saved.append((m, m.fused_attn))
                m.fused_attn = False
    try:
        with differentiable_attention():
            yield
    finally:
        for m, flag in saved:
            m.fused_attn = flag


@contextlib.contextmanager
def exact_math() -> Iterator[None]:
    """Switch off TF32 matmuls and convolutions on CUDA for the duration: completeness and
    finite-difference checks need float32 products, not 10-bit mantissas."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _image_like(y: torch.Tensor) -> bool:
    return y.ndim == 4 and y.shape[-1] > 1 and y.shape[-2] > 1


def push_tangents(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  tangents: torch.Tensor, fast: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One primal pass of ``f`` at ``x`` and the Jacobian applied to every tangent.

    Args:
        f: a function of one tensor.
        x: the primal point.
        tangents: ``(K, *x.shape)``, K directions.
        fast: use the cheaper rules of :mod:`layerlie.core.rules` for convolutions, linear
            layers and batch norms (the same derivative, without the weights' zero terms).
            None: on the CPU only. They save arithmetic, which is what a CPU pass spends
            its time on; on a GPU at benchmark batches the pass is bound by the host's
            per-op work, which their dispatch mode adds to (benchmarks/RESULTS.md).

    Returns:
        ``(f(x), J_f(x)[tangents])`` with shapes ``out`` and ``(K, *out)``.
    """
    if fast is None:
        fast = x.device.type == "cpu"
    with torch.no_grad(), warnings.catch_warnings(), FastRules() if fast else contextlib.nullcontext():
        # functorch's notice that an op falls back to a loop (as_strided_, in timm's global
        # pooling): slower, still exact.
        warnings.filterwarnings("ignore", message="There is a performance drop")
        if tangents.shape[0] == 1:
            y, jv = torch.func.jvp(f, (x,), (tangents[0],))
            return y, jv[None]
        y, jv = torch.func.vmap(lambda t: torch.func.jvp(f, (x,), (t,)), out_dims=(None, 0))(tangents)
        return y, jv


def _double_backward(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                     direction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``J_f(x)[direction]`` by the published trick: differentiate the VJP with respect to
    its (dummy) cotangent."""
    with torch.enable_grad():
        s = torch.zeros((), dtype=x.dtype, device=x.device, requires_grad=True)
        y = f(x + s * direction)
        v = torch.ones_like(y, requires_grad=True)
        (vj,) = torch.autograd.grad(y, s, v, create_graph=True)
        (jv,) = torch.autograd.grad(vj, v, torch.ones_like(vj))
    return y.detach(), jv


_FOOTPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def footprint(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              tangents: torch.Tensor, fast: bool | None = None) -> tuple[Footprint, bool]:
    """The memory footprint per image of pushing tangents through ``f`` at ``x``, measured
    on the first image and two tangents (see :mod:`layerlie.core.memory`), and whether ``f``
    keeps the batch axis (so that chunks of images can run apart).

    Cached by ``f`` (weakly), the image shape, dtype and device, and ``fast``.
    """
    where = (tuple(x.shape[1:]), x.dtype, x.device, fast)
    try:
        cache = _FOOTPRINTS.setdefault(f, {})
    except TypeError:  # not weakly referenceable: measured on every call
        cache = {}
    if where not in cache:
        x1, t1 = x[:1], tangents[:1, :1]
        with torch.no_grad():
            y = f(x1)
            fp = measure_footprint(lambda: f(x1), lambda: push_tangents(f, x1, t1, fast),
                                   lambda: push_tangents(f, x1, t1.expand(2, *t1.shape[1:]), fast))
        cache[where] = fp, y.ndim > 0 and y.shape[0] == 1
    return cache[where]


def lie_derivative(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   group: Group | str | Sequence[Group | str], *, scheme: str = "central",
                   output_frame: Frame | None | Literal["auto"] = "auto",
                   method: Method = "jvp", memory_budget: float | None = None,
                   fast: bool | None = None, output: Output = None) -> torch.Tensor:
    """The Lie derivative ``L f(x) = J_f(x)[G x] - G f(x)`` (docs/method.md §2).

    Args:
        f: the map, e.g. a model or ``lambda x: model(x).softmax(-1)`` (wrap a lambda over
            a timm ViT in ``with jvp_ready(model):`` so that its fused attention is off).
            It must treat the images of a batch independently (a model in eval mode does)
            when the computation is split into chunks of images. An ``nn.Module`` is taken
            by the model contract (:mod:`layerlie.model.contract`).
        x: images ``(B, C, H, W)``.
        group: a group, its name, or a list of them (then the groups share one primal pass).
        scheme: derivative scheme of ``G`` (see :mod:`layerlie.core.tangent`).
        output_frame: how ``T`` acts on the output. ``"auto"`` treats a 4-D output with
            spatial size above 1 as an image at its own resolution; None means ``T`` acts
            trivially on the output (logits, pooled features).
        method: ``"jvp"`` (forward mode) or ``"double_backward"`` (published baseline).
        memory_budget: bytes that the forward-mode pass may hold beside its inputs and
            weights. The images and groups are split into chunks that fit, by a footprint
            measured on one image (:func:`footprint`). None: three times what a no-grad
            forward of the batch holds; ``float("inf")``: everything in one pass.
        fast: the cheaper forward-mode rules of :mod:`layerlie.core.rules` (same numbers);
            False runs PyTorch's own formulas throughout; None, the default, uses the
            rules on the CPU only (see :func:`push_tangents`).
        output: for an ``nn.Module``, the tensor of its output to differentiate (the output
            rule of :mod:`layerlie.model.contract`).

    Returns:
        ``L f(x)`` shaped like ``f(x)``, or ``(K, *f(x).shape)`` for a list of K groups.
    """
    check_scheme(scheme)
    if method not in METHODS:
        raise LayerlieError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if memory_budget is not None and not memory_budget > 0:
        raise LayerlieError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}; "
                            "pass None for three times a forward's memory, or float('inf') for no limit")
    if isinstance(f, nn.Module):
        p = prepare(f, x, output)
        f, x = p.selected, p.x
    check_images(x)
    groups = resolve_groups(group, channels=x.shape[1])
    single = isinstance(group, Group) or (isinstance(group, str) and len(groups) == 1)
    results: dict[int, torch.Tensor] = {}
    # Groups that share a base point share one primal pass.
    by_base: dict[int | None, list[int]] = {}
    for i, g in enumerate(groups):
        by_base.setdefault(None if g.origin is None else i, []).append(i)
    with jvp_ready(f):
        for idx in by_base.values():
            x0 = base_point(x, groups[idx[0]])
            if method == "jvp":
                images, per_chunk = _plan(f, x0, [groups[i] for i in idx], scheme, memory_budget, fast)
                for chunk in _split(idx, per_chunk):
                    parts = [_push(f, x0[s:s + images], x[s:s + images], [groups[i] for i in chunk], scheme,
                                   output_frame, fast) for s in range(0, len(x), images)]
                    d = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
                    for k, i in enumerate(chunk):
                        results[i] = d[k]
            else:
                try:
                    pairs = [_double_backward(f, x0, tangent(x, groups[i], scheme)) for i in idx]
                except RuntimeError as err:
                    raise LayerlieError(
                        f"the double-backward baseline fails on this model ({str(err).splitlines()[0]}); "
                        "use method='jvp', which needs no second derivative") from None
                y = check_finite(pairs[0][0], "model output")
                for (_, jv), i in zip(pairs, idx):
                    results[i] = _subtract_output_tangent(jv, y, groups[i], scheme, output_frame)
    return results[0] if single else torch.stack([results[i] for i in range(len(groups))])


def _split(idx: list[int], size: int) -> list[list[int]]:
    return [idx[j:j + size] for j in range(0, len(idx), size)]


def _plan(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, groups: list[Group], scheme: str,
          memory_budget: float | None, fast: bool | None) -> tuple[int, int]:
    """``(images, groups)`` per chunk under the budget (all of both without a limit)."""
    if memory_budget == float("inf"):
        return len(x0), len(groups)
    fp, per_image = footprint(f, x0, tangent(x0[:1], groups[0], scheme)[None], fast)
    budget = 3 * fp.forward * len(x0) if memory_budget is None else memory_budget
    images, per_chunk = plan_chunks(fp, len(x0), len(groups), budget)
    return (images if per_image else len(x0)), per_chunk


def _push(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, x: torch.Tensor, groups: list[Group],
          scheme: str, output_frame: Frame | None | Literal["auto"], fast: bool | None) -> torch.Tensor:
    """``L f`` of a chunk of images ``x`` (base point ``x0``) for a chunk of groups: ``(k, *f(x0).shape)``."""
    y, jv = push_tangents(f, x0, torch.stack([tangent(x, g, scheme) for g in groups]), fast)
    check_finite(y, "model output")
    return torch.stack([_subtract_output_tangent(jv[k], y, g, scheme, output_frame) for k, g in enumerate(groups)])


def _subtract_output_tangent(jv: torch.Tensor, y: torch.Tensor, group: Group, scheme: str,
                             output_frame: Frame | None | Literal["auto"]) -> torch.Tensor:
    frame = (IMAGE if _image_like(y) else None) if output_frame == "auto" else output_frame
    return jv if frame is None else jv - tangent(y, group, scheme, frame)


_PROBABILITIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def probabilities(model: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> softmax(model(x))``, one function object per model, so that the footprint
    measured for it is kept between calls. It holds the model weakly."""
    try:
        return _PROBABILITIES[model]
    except KeyError:
        ref = weakref.ref(model)
    except TypeError:  # not weakly referenceable: a new function, measured on every call
        return lambda z: model(z).softmax(-1)

    def f(z: torch.Tensor) -> torch.Tensor:
        return ref()(z).softmax(-1)

    _PROBABILITIES[model] = f
    return f


def lee(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
        groups: str | Iterable[str | Group] = "all", *, output: Output = None, scheme: str = "central",
        method: Method = "jvp", names: Sequence[str] | None = None,
        batch_size: int | None = None, memory_budget: float | None = None, fast: bool | None = None,
        progress: Callable[[int], None] | None = None) -> pd.DataFrame:
    """The published end-to-end LEE: per image and group, the mean over classes of
    ``|L softmax(model(x))|`` (docs/method.md §2).

    Args:
        model: a classifier returning logits ``(B, K)``, or a structure that holds them; taken
            by the model contract (:mod:`layerlie.model.contract`): never changed, measured in eval mode.
        x: images ``(B, C, H, W)``, normalized as the model expects.
        groups: ``"all"``, names, or groups; ``"all"`` leaves out the channel groups that do not
            fit the images' channels, with a note.
        output: the tensor whose softmax is measured (the output rule of :mod:`layerlie.model.contract`).
        scheme, method, memory_budget, fast: as in :func:`lie_derivative`.
        names: one name per image (default: the image index).
        batch_size: images per pass (default: all at once).
        progress: called with the number of images done after each pass.

    Returns:
        A DataFrame with columns ``image, group, lee``; ``.attrs`` holds the settings.

    Example:
        >>> import timm, layerlie as ll
        >>> m = ll.load_model("resnet18")
        >>> t = ll.lee(m, ll.photos(m, n=2), groups="translate_x,rotate")
        >>> sorted(t.group.unique())
        ['rotate', 'translate_x']
    """
    p = prepare(model, x, output)
    model, x = p.selected, p.x
    gs = resolve_groups(groups, channels=x.shape[1])
    names = [str(i) for i in range(len(x))] if names is None else list(names)
    step = batch_size or len(x)
    f = probabilities(model)
    rows = []
    for start in range(0, len(x), step):
        xb = x[start:start + step]
        with jvp_ready(model):
            d = lie_derivative(f, xb, gs, scheme=scheme, output_frame=None, method=method,
                               memory_budget=memory_budget, fast=fast)
        per_image = d.abs().flatten(2).mean(-1).tolist()  # (K, B)
        for k, g in enumerate(gs):
            rows += [(names[start + b], g.name, v) for b, v in enumerate(per_image[k])]
        if progress is not None:
            progress(xb.shape[0])
    table = pd.DataFrame(rows, columns=["image", "group", "lee"])
    table.attrs.update(scheme=scheme, method=method, groups=[g.name for g in gs])
    return table


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and count of ``lee`` over images, per group (in order)."""
    order = list(dict.fromkeys(table["group"]))
    out = table.groupby("group", sort=False)["lee"].agg(["mean", "std", "count"])
    return out.reindex(order)
