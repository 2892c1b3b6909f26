"""The end-to-end Lie derivative of a model and the published LEE metric (docs/method.md §2).

``L f(x) = J_f(x)[G x] - G f(x)`` (the second term only for image-like outputs). The
Jacobian-vector product is the engine's pass over the callable's coarsest graph
(:func:`layerlie.core.engine.coarsest`, docs/design.md §7): forward-mode AD
(``torch.func.jvp``) with the tangents of several groups stacked under ``torch.func.vmap``,
so that the groups of one pass share its primal computation. The memory plan
(:mod:`layerlie.core.memory`) picks the passes. The published two-reverse-pass trick is kept
as ``method="double_backward"``, a baseline for tests and benchmarks.

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
from typing import Literal, NamedTuple

import pandas as pd
import torch
import torch.fx as fx
from torch import nn

from layerlie.core.attention import differentiable_attention
from layerlie.model.contract import Output, check_images, prepare
from layerlie.errors import LayerlieError
from layerlie.core.groups import Group, resolve_groups
from layerlie.core import memory, program
from layerlie.core.engine import coarsest, propagate
from layerlie.core.memory import Footprint
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
    """Deprecated: ``layerlie.core.engine.propagate(coarsest(f), x, tangents, fast=...)``."""
    warnings.warn("layerlie.measure.lie.push_tangents is deprecated; use "
                  "layerlie.core.engine.propagate(layerlie.core.engine.coarsest(f), x, tangents, fast=...)",
                  DeprecationWarning, stacklevel=2)
    return propagate(coarsest(f), x, tangents, fast=_fast(fast, x))


def _fast(fast: bool | None, x: torch.Tensor, captured: bool = False) -> bool:
    """The default of ``fast``: the rules of :mod:`layerlie.core.rules` on the CPU, and wherever the
    pass is captured (:mod:`layerlie.core.program`). They save arithmetic, which is what a CPU pass
    spends its time on; an eager pass on a GPU at benchmark batches is bound by the host's per-op
    work, which their dispatch mode adds to (benchmarks/RESULTS.md), while a captured one pays
    that work once, at capture."""
    return (x.device.type == "cpu" or captured) if fast is None else fast


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


def footprint(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
              tangents: torch.Tensor, fast: bool | None = None) -> tuple[Footprint, bool]:
    """Deprecated: :func:`layerlie.core.memory.footprint`."""
    warnings.warn("layerlie.measure.lie.footprint is deprecated; use layerlie.core.memory.footprint",
                  DeprecationWarning, stacklevel=2)
    return memory.footprint(f, x, tangents, _fast(fast, x))


def lie_derivative(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   group: Group | str | Sequence[Group | str], *, scheme: str = "central",
                   output_frame: Frame | None | Literal["auto"] = "auto",
                   method: Method = "jvp", memory_budget: float | None = None,
                   fast: bool | None = None, output: Output = None,
                   capture: program.Capture = None) -> torch.Tensor:
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
        memory_budget: bytes of tensors a pass may hold beside its inputs and weights
            (:mod:`layerlie.core.memory`). The images and groups are split into passes that
            fit, by a footprint measured on one image (:func:`layerlie.core.memory.footprint`).
            None: :data:`layerlie.core.memory.FORWARDS` times what a no-grad forward of the
            images holds; ``float("inf")``: everything in one pass.
        fast: the cheaper forward-mode rules of :mod:`layerlie.core.rules` (same numbers);
            False runs PyTorch's own formulas throughout; None, the default, uses the
            rules on the CPU, where a pass spends its time on arithmetic, and in a captured pass.
        output: for an ``nn.Module``, the tensor of its output to differentiate (the output
            rule of :mod:`layerlie.model.contract`).
        capture: how the engine's pass runs (:data:`layerlie.core.program.Capture`): by default
            replayed from a CUDA graph on CUDA (captured the second time a callable, input shape
            and group count come) and eagerly elsewhere; False runs it eagerly everywhere.

    Returns:
        ``L f(x)`` shaped like ``f(x)``, or ``(K, *f(x).shape)`` for a list of K groups.
    """
    check_scheme(scheme)
    if isinstance(f, nn.Module):
        p = prepare(f, x, output)
        f, x = p.selected, p.x
    check_images(x)
    groups = resolve_groups(group, channels=x.shape[1])
    single = isinstance(group, Group) or (isinstance(group, str) and len(groups) == 1)
    d = _derivative(f, x, groups, scheme, output_frame, method, memory_budget, fast, capture=capture)
    return d[0] if single else d


def _derivative(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, groups: list[Group], scheme: str,
                output_frame: Frame | None | Literal["auto"], method: Method, memory_budget: float | None,
                fast: bool | None, batch_size: int | None = None,
                progress: Callable[[int], None] | None = None, *, capture: program.Capture = None,
                weights: nn.Module | None = None) -> torch.Tensor:
    """``L f`` for every group, ``(K, *f(x).shape)``, in the passes that the memory plan picks
    (:mod:`layerlie.core.memory`): at most ``batch_size`` images each; ``progress`` is called
    with the images done after each chunk of images. Each pass runs as ``capture`` says
    (:mod:`layerlie.core.program`), keyed on ``f`` and on where the tensors of ``weights`` (the
    module ``f`` computes with, ``f`` itself by default) are stored."""
    if method not in METHODS:
        raise LayerlieError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    memory.check_budget(memory_budget)
    backend = program.backend(capture, x.device)
    run = _runner(f, weights if weights is not None else f, backend, _fast(fast, x), _fast(fast, x, True))
    fast = _fast(fast, x, backend is not program.eager)
    # Groups that share a base point share one primal pass.
    by_base: dict[int | None, list[int]] = {}
    for i, g in enumerate(groups):
        by_base.setdefault(None if g.origin is None else i, []).append(i)
    gm = coarsest(f)
    parts: list[list[torch.Tensor]] = [[] for _ in groups]
    with jvp_ready(f):
        images, per_chunk = _plan(f, x, groups, scheme, method, memory_budget, fast, batch_size)
        for images_of in memory.batches(len(x), images):
            xb = x[images_of]
            for idx in by_base.values():
                x0 = base_point(xb, groups[idx[0]])
                for chunk in (idx[j:j + per_chunk] for j in range(0, len(idx), per_chunk)):
                    gs = [groups[i] for i in chunk]
                    d = _push(gm, x0, xb, gs, scheme, output_frame, run) if method == "jvp" \
                        else _baseline(f, x0, xb, gs, scheme, output_frame)
                    for k, i in enumerate(chunk):
                        parts[i].append(d[k])
            if progress is not None:
                progress(len(xb))
    return torch.stack([torch.cat(p) if len(p) > 1 else p[0] for p in parts])


def _plan(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, groups: list[Group], scheme: str,
          method: Method, memory_budget: float | None, fast: bool, batch_size: int | None) -> tuple[int, int]:
    """``(images, groups)`` per pass: the planner's (:func:`layerlie.core.memory.plan_chunks`) under
    the budget, at most ``batch_size`` images, and all of both without a limit."""
    images = min(batch_size or len(x), len(x))
    if method != "jvp" or memory_budget == float("inf"):
        return images, len(groups)
    fp, per_image = memory.footprint(f, x, tangent(x[:1], groups[0], scheme)[None], fast)
    budget = memory.budget_bytes(memory_budget, fp.forward * images)
    fit, per_chunk = memory.plan_chunks(fp, images, len(groups), budget)
    return (fit if per_image else images), per_chunk


PassRunner = Callable[[fx.GraphModule, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _runner(f: Callable[[torch.Tensor], torch.Tensor], weights: object, backend: program.Backend,
            fast: bool, captured_fast: bool) -> PassRunner:
    """The engine's pass ``(gm, x0, tangents) -> (f(x0), J tangents)`` as ``backend`` runs it,
    from the shared program cache (:mod:`layerlie.core.program`, docs/design.md §8): keyed on
    ``f`` and the storage of ``weights``' tensors, besides the inputs' shapes. A captured pass
    runs with ``captured_fast``, an eager one (a key's first run, a failed capture) with ``fast``:
    the rules' Python is cheap once captured, not in an eager pass on a GPU."""
    stored = tuple(t.data_ptr() for t in (*weights.parameters(), *weights.buffers())) \
        if isinstance(weights, nn.Module) else ()

    def run(gm: fx.GraphModule, x0: torch.Tensor, tangents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return program.PROGRAMS.run(lambda a, t: propagate(gm, a, t, fast=captured_fast), (x0, tangents), owner=f,
                                    key=("lie derivative", captured_fast, stored), backend=backend,
                                    uncaptured=lambda a, t: propagate(gm, a, t, fast=fast))
    return run


def _push(gm: fx.GraphModule, x0: torch.Tensor, x: torch.Tensor, groups: list[Group], scheme: str,
          output_frame: Frame | None | Literal["auto"], run: PassRunner) -> torch.Tensor:
    """``L f`` of a chunk of images ``x`` (base point ``x0``) for a chunk of groups, by the engine
    on ``f``'s coarsest graph ``gm``, run by ``run`` (:func:`_runner`): ``(k, *f(x0).shape)``."""
    y, jv = run(gm, x0, torch.stack([tangent(x, g, scheme) for g in groups]))
    check_finite(y, "model output")
    return torch.stack([_subtract_output_tangent(jv[k], y, g, scheme, output_frame) for k, g in enumerate(groups)])


def _baseline(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, x: torch.Tensor, groups: list[Group],
              scheme: str, output_frame: Frame | None | Literal["auto"]) -> torch.Tensor:
    """The same by the published double backward, one group at a time: ``(k, *f(x0).shape)``."""
    try:
        pairs = [_double_backward(f, x0, tangent(x, g, scheme)) for g in groups]
    except RuntimeError as err:
        raise LayerlieError(
            f"the double-backward baseline fails on this model ({str(err).splitlines()[0]}); "
            "use method='jvp', which needs no second derivative") from None
    y = check_finite(pairs[0][0], "model output")
    return torch.stack([_subtract_output_tangent(jv, y, g, scheme, output_frame) for (_, jv), g in zip(pairs, groups)])


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
        progress: Callable[[int], None] | None = None, capture: program.Capture = None) -> pd.DataFrame:
    """The published end-to-end LEE: per image and group, the mean over classes of
    ``|L softmax(model(x))|`` (docs/method.md §2).

    Args:
        model: a classifier returning logits ``(B, K)``, or a structure that holds them; taken
            by the model contract (:mod:`layerlie.model.contract`): never changed, measured in eval mode.
        x: images ``(B, C, H, W)``, normalized as the model expects.
        groups: ``"all"``, names, or groups; ``"all"`` leaves out the channel groups that do not
            fit the images' channels, with a note.
        output: the tensor whose softmax is measured (the output rule of :mod:`layerlie.model.contract`).
        scheme, method, memory_budget, fast, capture: as in :func:`lie_derivative`.
        names: one name per image (default: the image index).
        batch_size: at most this many images per pass (default: as many as the memory plan fits).
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
    with jvp_ready(model):
        d = _derivative(probabilities(model), x, gs, scheme, None, method, memory_budget, fast, batch_size, progress,
                        capture=capture, weights=model)
    per_image = per_image_lee(d).tolist()  # (K, B)
    rows = [(names[b], g.name, v) for k, g in enumerate(gs) for b, v in enumerate(per_image[k])]
    table = pd.DataFrame(rows, columns=["image", "group", "lee"])
    table.attrs.update(scheme=scheme, method=method, groups=[g.name for g in gs])
    return table


def per_image_lee(d: torch.Tensor) -> torch.Tensor:
    """The published LEE of each group and image, ``(K, B)``, from ``L softmax``: ``(K, B, classes)``
    (docs/method.md §2)."""
    return d.abs().flatten(2).mean(-1)


class Pass(NamedTuple):
    """One pass of the memory plan, made once for images that are measured again and again: the
    ``images`` it takes, their base point ``x0``, the ``tangents`` of its ``groups`` (their indices)
    stacked, ``(k, b, C, H, W)``."""

    images: slice
    x0: torch.Tensor
    tangents: torch.Tensor
    groups: list[int]


def lee_passes(probabilities: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, groups: list[Group], *,
               scheme: str = "central", memory_budget: float | None = None, fast: bool | None = None) -> list[Pass]:
    """The passes of :func:`lee` of ``probabilities`` at ``x``, planned (one footprint, the planner
    of :mod:`layerlie.core.memory`) and with their tangents ``G x`` computed: what depends only on
    the model's architecture and on ``x``. A caller that measures the same images of a changing
    model (the :class:`layerlie.Monitor`'s probe) makes them once and replays them with
    :func:`replay_lee` (docs/method.md §2, docs/design.md §7)."""
    images, per_pass = _plan(probabilities, x, groups, scheme, "jvp", memory_budget, _fast(fast, x), None)
    by_base: dict[int | None, list[int]] = {}
    for i, g in enumerate(groups):
        by_base.setdefault(None if g.origin is None else i, []).append(i)
    passes = []
    for images_of in memory.batches(len(x), images):
        xb = x[images_of]
        for idx in by_base.values():
            x0 = base_point(xb, groups[idx[0]])
            for chunk in (idx[j:j + per_pass] for j in range(0, len(idx), per_pass)):
                passes.append(Pass(images_of, x0, torch.stack([tangent(xb, groups[i], scheme) for i in chunk]), chunk))
    return passes


def replay_lee(gm: fx.GraphModule, passes: Sequence[Pass], *, fast: bool | None = None,
               capture: program.Capture = None) -> torch.Tensor:
    """The published LEE, ``(K, B)`` by group and image, of the probabilities graph ``gm`` (e.g.
    :func:`layerlie.core.engine.coarsest` of them) over the passes of :func:`lee_passes`: the
    engine's pass and the reduction, nothing else (docs/method.md §2, docs/design.md §7). Each
    pass runs as ``capture`` says, as in :func:`lie_derivative` (docs/design.md §8), keyed on
    ``gm``: its weights are read where they are, so change them in place."""
    x = passes[0].x0
    groups = sum(len(p.groups) for p in passes if p.images == passes[0].images)
    images = sum(len(p.x0) for p in passes if p.groups == passes[0].groups)
    out = torch.empty(groups, images, dtype=x.dtype, device=x.device)
    run = _runner(gm, None, program.backend(capture, x.device), _fast(fast, x), _fast(fast, x, True))
    for p in passes:
        y, jv = run(gm, p.x0, p.tangents)
        check_finite(y, "model output")
        out[p.groups, p.images] = per_image_lee(jv)
    return out


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation and count of ``lee`` over images, per group (in order)."""
    order = list(dict.fromkeys(table["group"]))
    out = table.groupby("group", sort=False)["lee"].agg(["mean", "std", "count"])
    return out.reindex(order)
