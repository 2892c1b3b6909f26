"""Finite equivariance metrics beside the Lie derivative (docs/method.md §7).

Each metric is one function of a model and images ``x: (B, C, H, W)`` that returns one value
per image: :class:`~layerlie.measure.scores.Scores`, a ``(B,)`` float64 tensor whose ``.table``
is a DataFrame. Each draws its transforms from a ``torch.Generator`` of its own
(``seed=``), so the global random state is left alone, and runs ``batch_size`` images per pass.

The PSNR metrics (EQ-T, EQ-T_frac, EQ-R, after StyleGAN3) compare ``f(T x)`` with ``T f(x)``
inside the valid region, the output pixels whose source lies inside the image for the drawn
transform. ``peak`` is the signal range in the PSNR ``10 log10(peak^2 / MSE)``: by default the
peak-to-peak range of ``f(x)`` per image, so that the figure does not depend on the feature
scale. An exact match has an infinite PSNR; it is reported as :data:`PSNR_CAP` (100 dB), and
every PSNR is capped there: float32 round-off alone stays near 140 dB.

The metrics are a registry (:func:`register_metric`, :func:`get_metric`, :func:`list_metrics`),
which also holds the LEE of one group (``lee``, not finite); :func:`metrics` measures several
at once, by default :data:`DEFAULT_METRICS`.

Example:
    >>> import layerlie as ll
    >>> m = ll.load_model("resnet18")
    >>> x = ll.photos(m, n=1)
    >>> ll.metrics(m, x, which=["consistency", "eq_t"]).metric.tolist()
    ['consistency', 'eq_t']
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pandas as pd
import torch
from torch import fx, nn

from layerlie.model.contract import Output, prepare, selected
from layerlie.deprecation import renamed
from layerlie.core.registry import Registry
from layerlie.errors import LayerlieError
from layerlie.core.groups import DEFAULT_GROUPS, Group, get_group
from layerlie.core.layout import Layout, LayoutProp
from layerlie.core.memory import batches
from layerlie.measure.lie import lee
from layerlie.measure.scores import Scores, scored
from layerlie.model.trace import trace, with_output

PSNR_CAP = 100.0
"""dB: the value of an exact match, and the cap of every PSNR."""

Model = Callable[[torch.Tensor], torch.Tensor]


@renamed(pairs="samples")
@scored
def consistency(model: Model, x: torch.Tensor, *, max_shift: int | None = None, samples: int = 1,
                mode: Literal["circular", "crop"] = "circular", seed: int = 0,
                batch_size: int | None = None, output: Output = None) -> Scores:
    """Shift consistency (Zhang 2019, docs/method.md §7): does the top-1 class agree at two random shifts?

    Convention: per image, ``samples`` pairs of integer offsets ``(dy, dx)`` are drawn uniformly
    in ``[0, max_shift]``. ``"circular"`` rolls the whole image by each offset (content moves
    down and right); ``"crop"`` takes the ``(H - max_shift, W - max_shift)`` window at each
    offset, as Zhang's 224 crops of 256 images, so the model sees smaller images.

    Args:
        model: a classifier returning logits ``(B, K)``.
        x: images ``(B, C, H, W)``.
        max_shift: the largest offset, in pixels (default: an eighth of the shorter side, as
            Zhang's 32 of 256).
        samples: pairs of shifts per image.
        mode: ``"circular"`` or ``"crop"``.
        seed: seeds the offsets.
        batch_size: images per pass (default: all).
        output: the tensor of a tuple, dict or ``.logits`` output to read (the output rule of
            :mod:`layerlie.model.contract`, which every metric follows).

    Returns:
        ``(B,)`` :class:`Scores`: the share of an image's pairs whose top-1 classes agree.
    """
    model, x = _measured(model, x, output)
    if mode not in ("circular", "crop"):
        raise LayerlieError(f"consistency: unknown mode {mode!r}; use 'circular' or 'crop'")
    max_shift = max(1, min(x.shape[-2:]) // 8) if max_shift is None else max_shift
    if not 1 <= max_shift < min(x.shape[-2:]):
        raise LayerlieError(f"consistency: max_shift must be between 1 and the image side - 1, got {max_shift}")
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, max_shift + 1, (x.shape[0], samples, 2, 2), generator=gen)
    h, w = x.shape[-2] - max_shift, x.shape[-1] - max_shift

    def moved(xb: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        if mode == "circular":
            return torch.stack([xi.roll((int(dy), int(dx)), (-2, -1)) for xi, (dy, dx) in zip(xb, off)])
        return torch.stack([xi[:, dy:dy + h, dx:dx + w] for xi, (dy, dx) in zip(xb, off.tolist())])

    agree = torch.zeros(x.shape[0], samples, dtype=torch.float64)
    for images in batches(len(x), batch_size):
        start, xb = images.start, x[images]
        off = offsets[start:start + len(xb)]
        with torch.no_grad():
            for p in range(samples):
                a = model(moved(xb, off[:, p, 0])).argmax(-1)
                b = model(moved(xb, off[:, p, 1])).argmax(-1)
                agree[start:start + len(xb), p] = (a == b).double().cpu()
    return agree.mean(1)


@renamed(draws="samples")
@scored
def eq_t(model: Model, x: torch.Tensor, *, max_shift: float = 0.125, samples: int = 1,
         shifts: Sequence[tuple[int, int]] | None = None, node: str | None = None,
         peak: float | None = None, seed: int = 0, batch_size: int | None = None,
         output: Output = None) -> Scores:
    """EQ-T (StyleGAN3, docs/method.md §7): PSNR in dB between ``f(shift x)`` and ``shift f(x)`` for
    integer translations of the input.

    Convention: a shift ``(dy, dx)`` is counted in input pixels and moves content down and
    right, as a circular roll of the input. The output moves by ``shift / stride`` pixels, where
    ``stride`` is a node's sample spacing in input pixels (docs/method.md §5), or for the model's own
    output the input side over the output side: a roll when that is an integer, else the
    ideal band-limited (Fourier) shift, as for a strided feature map. The band of
    ``ceil(|shift| / stride)`` output pixels that wrapped around is left out (the valid region).

    Args:
        model: an image-to-image model ``(B, C, H, W) -> (B, C', H', W')``, or a classifier with
            ``node=``.
        x: images ``(B, C, H, W)``.
        max_shift: the largest shift, as a fraction of the image side (StyleGAN3: 0.125); each
            sample is uniform over the nonzero integer shifts within it.
        samples: shifts per image; the PSNR is taken over their pooled squared error.
        shifts: explicit shifts in input pixels, used for every image instead of random samples.
        node: a feature map to measure: a node name of the traced model, or ``"features"`` for
            its last feature map with more than one sample per side (the input of a CNN's global
            pooling, a ViT's last tokens). The node's layout (docs/method.md §5) says how to read it: a
            grid ``(B, C, H, W)`` or ``(B, H, W, C)``, or tokens ``(B, P + H W, C)`` whose ``P``
            prefix tokens are left out.
        peak: the signal range of the PSNR (default: the peak-to-peak range of ``f(x)``).
        seed: seeds the shifts.
        batch_size: images per pass (default: all).
        output: as in :func:`consistency`.

    Returns:
        ``(B,)`` :class:`Scores`: PSNR in dB, capped at :data:`PSNR_CAP`.
    """
    model, x = _measured(model, x, output, node)
    f, stride = _feature_map(model, x, node, "eq_t")
    chosen = _chosen(len(x), shifts, samples, seed, int, lambda gen: _integer_shift(x.shape[-2:], max_shift, gen))

    def pair(xb: torch.Tensor, yb: torch.Tensor, s: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        out = (s[0] / stride[0], s[1] / stride[1])
        return f(xb.roll(s, (-2, -1))), fourier_shift(yb, out), _shift_mask(yb.shape[-2:], out)

    return _psnr_metric(f, x, chosen, pair, peak, batch_size)


@renamed(draws="samples")
@scored
def eq_t_frac(model: Model, x: torch.Tensor, *, max_shift: float = 0.125, samples: int = 1,
              shifts: Sequence[tuple[float, float]] | None = None, node: str | None = None,
              peak: float | None = None, seed: int = 0, batch_size: int | None = None,
              output: Output = None) -> Scores:
    """EQ-T_frac (StyleGAN3, docs/method.md §7): as :func:`eq_t` for fractional translations.

    Convention: shifts are uniform in ``[-max_shift, max_shift]`` times the image side, in input
    pixels, moving content down and right. The input is shifted by the ideal band-limited
    (Fourier phase) shift, which is circular, and the output by ``shift / stride`` the same way;
    the band of ``ceil(|shift| / stride)`` output pixels that wrapped around is left out.

    Args:
        model, x, max_shift, samples, node, peak, seed, batch_size, output: as in :func:`eq_t`.
        shifts: explicit shifts ``(dy, dx)`` in input pixels, for every image.

    Returns:
        ``(B,)`` :class:`Scores`: PSNR in dB, capped at :data:`PSNR_CAP`.
    """
    model, x = _measured(model, x, output, node)
    f, stride = _feature_map(model, x, node, "eq_t_frac")
    side = torch.tensor(x.shape[-2:], dtype=torch.float64)
    chosen = _chosen(len(x), shifts, samples, seed, float, lambda gen: tuple(
        ((torch.rand(2, generator=gen, dtype=torch.float64) * 2 - 1) * max_shift * side).tolist()))

    def pair(xb: torch.Tensor, yb: torch.Tensor, s: tuple[float, float]) -> tuple[torch.Tensor, ...]:
        out = (s[0] / stride[0], s[1] / stride[1])
        return f(fourier_shift(xb, s)), fourier_shift(yb, out), _shift_mask(yb.shape[-2:], out)

    return _psnr_metric(f, x, chosen, pair, peak, batch_size)


@renamed(draws="samples")
@scored
def eq_r(model: Model, x: torch.Tensor, *, max_angle: float = 180.0, samples: int = 1,
         angles: Sequence[float] | None = None, node: str | None = None, peak: float | None = None,
         seed: int = 0, batch_size: int | None = None, output: Output = None) -> Scores:
    """EQ-R (StyleGAN3, docs/method.md §7): PSNR in dB between ``f(R x)`` and ``R f(x)`` for rotations.

    Convention: ``R`` is the ``rotate`` group's finite transform (bilinear, zero padding) by an
    angle uniform in ``[-max_angle, max_angle]`` degrees, about the image centre, in normalized
    coordinates (a true rotation on square images). The valid region is where ``R`` of an
    all-ones image is 1 at the output's resolution.

    Args:
        model, x, samples, node, peak, seed, batch_size, output: as in :func:`eq_t`.
        max_angle: the largest angle in degrees (StyleGAN3 draws in the full circle: 180).
        angles: explicit angles in degrees, for every image.

    Returns:
        ``(B,)`` :class:`Scores`: PSNR in dB, capped at :data:`PSNR_CAP`.
    """
    model, x = _measured(model, x, output, node)
    f, _ = _feature_map(model, x, node, "eq_r")
    rotate = get_group("rotate")
    if angles is None:
        gen = torch.Generator().manual_seed(seed)
        chosen = [[float((torch.rand((), generator=gen, dtype=torch.float64) * 2 - 1) * max_angle)
                   for _ in range(samples)] for _ in range(len(x))]
    else:
        chosen = [[float(a) for a in angles]] * len(x)

    def pair(xb: torch.Tensor, yb: torch.Tensor, angle: float) -> tuple[torch.Tensor, ...]:
        t = math.radians(angle)
        ones = yb.new_ones(1, 1, *yb.shape[-2:])
        mask = rotate.transform(ones, t)[0, 0] > 1 - 1e-6
        return f(rotate.transform(xb, t)), rotate.transform(yb, t), mask

    return _psnr_metric(f, x, chosen, pair, peak, batch_size)


@renamed(draws="samples")
@scored
def invariance(model: Model, x: torch.Tensor, group: Group | str, magnitude: float, *, samples: int = 4,
               softmax: bool = True, seed: int = 0, batch_size: int | None = None,
               output: Output = None) -> Scores:
    """Finite-sample invariance (docs/method.md §7): the mean squared change of the output under the
    group's finite transform ``T_t`` with ``|t| = magnitude``.

    Convention: per sample, the sign of ``t`` is random (``t = ±magnitude``, in the group's units:
    normalized coordinates, so 1 is half the image for ``translate_x``, radians for ``rotate``);
    ``T_t`` is :meth:`Group.transform` (bilinear, zero padding). The change is averaged over the
    output's entries and the samples. A classifier's logits go through a softmax first, as in the
    published LEE, unless ``softmax=False``.

    Args:
        model: the model.
        x: images ``(B, C, H, W)``.
        group: a group or its name.
        magnitude: ``|t|``.
        samples: transforms per image.
        softmax: compare ``softmax(model(x), -1)`` rather than ``model(x)``.
        seed: seeds the signs.
        batch_size: images per pass (default: all).
        output: as in :func:`consistency`.

    Returns:
        ``(B,)`` :class:`Scores`: the mean squared change.
    """
    model, x = _measured(model, x, output)
    g = get_group(group)
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (x.shape[0], samples), generator=gen) * 2 - 1
    out = torch.zeros(x.shape[0], dtype=torch.float64)

    def f(z: torch.Tensor) -> torch.Tensor:
        y = model(z)
        return y.softmax(-1) if softmax else y

    for images in batches(len(x), batch_size):
        start, xb = images.start, x[images]
        with torch.no_grad():
            y = f(xb)
            for d in range(samples):
                s = signs[start:start + len(xb), d]
                moved = torch.cat([g.transform(xi[None], float(si) * magnitude) for xi, si in zip(xb, s)])
                change = (f(moved) - y).double().pow(2).flatten(1).mean(1)
                out[start:start + len(xb)] += change.cpu() / samples
    return out


def lee_metric(model: Model, x: torch.Tensor, *, group: Group | str = DEFAULT_GROUPS[0], scheme: str = "central",
               seed: int = 0, batch_size: int | None = None, output: Output = None) -> torch.Tensor:
    """The published LEE of one group (docs/method.md §2), as a metric: :func:`layerlie.lee`'s
    value per image. ``seed`` is taken for the metrics' common call; the LEE draws nothing.

    Returns:
        ``(B,)`` the mean over classes of ``|L softmax(model(x))|``.
    """
    table = lee(model, x, [group], output=output, scheme=scheme, batch_size=batch_size)
    return torch.tensor(table["lee"].tolist(), dtype=torch.float64)


@dataclass(frozen=True)
class Metric:
    """A measure of equivariance with one value per image (docs/method.md §2, 7).

    Attributes:
        name: registry name.
        function: ``function(model, x, *, seed, batch_size, output, **options)``, the ``(B,)``
            values.
        finite: whether it compares finite transforms (docs/method.md §7), or is the
            infinitesimal Lie derivative (docs/method.md §2).
        features: whether it reads a feature map, ``node="features"`` unless its options name
            another node, when the model is a classifier.
        options: the options it takes unless given others.
    """

    name: str
    function: Callable[..., torch.Tensor]
    finite: bool = True
    features: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


_METRICS: Registry[Metric] = Registry("metric")

DEFAULT_METRICS: tuple[str, ...] = ("consistency", "eq_t", "eq_t_frac", "eq_r")
"""The finite metrics measured when none are named: by :func:`metrics`, the Monitor's
``metrics=True`` and a sweep."""


def register_metric(metric: Metric) -> Metric:
    """Add ``metric`` to the registry, so that :func:`metrics` takes its name."""
    _METRICS.add(metric.name, metric)
    return metric


def get_metric(name: str) -> Metric:
    """The registered metric ``name``; an unknown name raises a :class:`LayerlieError` that
    lists the valid ones."""
    return _METRICS.get(name)


def list_metrics() -> list[str]:
    """The names of the registered metrics, sorted."""
    return _METRICS.names()


register_metric(Metric("consistency", consistency))
register_metric(Metric("eq_t", eq_t, features=True))
register_metric(Metric("eq_t_frac", eq_t_frac, features=True))
register_metric(Metric("eq_r", eq_r, features=True))
register_metric(Metric("invariance", invariance, options={"group": DEFAULT_GROUPS[0], "magnitude": 0.125}))
register_metric(Metric("lee", lee_metric, finite=False))


def __getattr__(name: str) -> Any:
    """``METRICS``, the table of before the registry, for one release."""
    if name != "METRICS":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn("layerlie.measure.metrics.METRICS is deprecated; use layerlie.list_metrics() and "
                  "layerlie.get_metric(name).function", DeprecationWarning, stacklevel=2)
    return {n: m.function for n, m in _METRICS.items()}


def metrics(model: Model, x: torch.Tensor, which: Iterable[str] = DEFAULT_METRICS,
            *, names: Sequence[str] | None = None, seed: int = 0, batch_size: int | None = None,
            output: Output = None, **options: dict[str, Any]) -> pd.DataFrame:
    """Several finite metrics of one model at images ``x: (B, C, H, W)`` (docs/method.md §7).

    Args:
        model: the model; a classifier's feature-map metrics (the PSNR ones) read its last
            feature map (``node="features"``) unless their options name another node.
        x: images.
        which: registered metric names (:func:`list_metrics`).
        names: one name per image (default: the image index).
        seed, batch_size, output: passed to every metric.
        **options: per metric, its keyword options, e.g. ``eq_r={"max_angle": 45}`` or
            ``invariance={"group": "rotate", "magnitude": 0.1}``, over the entry's own
            (:attr:`Metric.options`: for ``invariance`` the group ``translate_x`` and
            magnitude ``0.125``).

    Returns:
        A DataFrame with columns ``image, metric, value``; ``.attrs`` holds the options.
    """
    chosen = [get_metric(w) for w in which]
    for name in options:  # options of a metric not measured must still name one
        get_metric(name)
    if not chosen:
        raise LayerlieError(f"no metric given; valid metrics: {', '.join(list_metrics())}")
    model, x, output, _ = prepare(model, x, output)
    names = [str(i) for i in range(len(x))] if names is None else list(names)
    is_classifier = _output_ndim(model, x, output) == 2
    rows = []
    settings: dict[str, dict[str, Any]] = {}
    for metric in chosen:
        kwargs = {**metric.options, **options.get(metric.name, {})}
        if metric.features and is_classifier:
            kwargs.setdefault("node", "features")
        settings[metric.name] = dict(kwargs)
        values = metric.function(model, x, seed=seed, batch_size=batch_size, output=output, **kwargs)
        rows += [(names[i], metric.name, float(v)) for i, v in enumerate(values)]
    table = pd.DataFrame(rows, columns=["image", "metric", "value"])
    table.attrs.update(seed=seed, options=settings, psnr_cap=PSNR_CAP)
    return table


def fourier_shift(h: torch.Tensor, shift: tuple[float, float]) -> torch.Tensor:
    """The ideal band-limited circular shift of ``h: (..., H, W)`` by ``(dy, dx)`` pixels
    (content moves down and right), as EQ-T_frac uses it (docs/method.md §7); an integer shift is
    ``torch.roll``."""
    out = h
    for dim, s in zip((-2, -1), shift):
        if float(s).is_integer():  # exact, and the common case of a stride-1 map
            out = out.roll(int(s), dim)
            continue
        n = h.shape[dim]
        k = torch.fft.fftfreq(n, dtype=torch.float64, device=h.device)
        phase = torch.exp(-2j * math.pi * k * s)
        if n % 2 == 0:  # the Nyquist bin: a real shift keeps it real (cos), else the output is complex
            phase[n // 2] = math.cos(math.pi * s)
        shape = [1] * h.ndim
        shape[dim] = n
        spec = torch.fft.fft(out.double(), dim=dim) * phase.reshape(shape)
        out = torch.fft.ifft(spec, dim=dim).real.to(h.dtype)
    return out


def _capped(peak: torch.Tensor, mse: torch.Tensor) -> torch.Tensor:
    """``10 log10(peak^2 / MSE)``, capped at :data:`PSNR_CAP` (docs/method.md §7)."""
    ratio = peak.double().pow(2) / mse
    return torch.where(mse > 0, 10 * torch.log10(ratio), torch.inf).clamp(max=PSNR_CAP)


def _psnr_metric(f: Model, x: torch.Tensor, chosen: list[list[Any]],
                 pair: Callable[[torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, ...]],
                 peak: float | None, batch_size: int | None) -> torch.Tensor:
    """Pool the squared error over each image's samples, then one PSNR per image (docs/method.md §7)."""
    out = torch.zeros(x.shape[0], dtype=torch.float64)
    for images in batches(len(x), batch_size):
        start, xb = images.start, x[images]
        with torch.no_grad():
            y = f(xb)
            ranges = (y.amax((1, 2, 3)) - y.amin((1, 2, 3))).double().cpu()
            for i in range(len(xb)):
                se, count = 0.0, 0
                for s in chosen[start + i]:
                    a, b, mask = pair(xb[i:i + 1], y[i:i + 1], s)
                    se += float(((a - b).double().pow(2) * mask.to(a.device)).sum())
                    count += int(mask.sum()) * a.shape[1]
                ref = ranges[i] if peak is None else torch.tensor(float(peak), dtype=torch.float64)
                if count == 0:
                    raise LayerlieError(f"the valid region of the {tuple(y.shape[-2:])} output is empty under "
                                        f"{chosen[start + i]}; draw smaller transforms (max_shift=, max_angle=) "
                                        "or give larger images")
                out[start + i] = _capped(ref, torch.tensor(se / count, dtype=torch.float64))
    return out


def _feature_map(model: Model, x: torch.Tensor, node: str | None, metric: str) -> tuple[Model, tuple[float, float]]:
    """The function to measure, as a ``(B, C, H, W)`` map, and the spacing of its samples in input
    pixels per axis (docs/method.md §5, 7). A node's map is read through its layout; the model's own output
    must be ``(B, C, H, W)``, spaced by the input side over the output side. ``x`` has passed the
    model contract (:func:`_measured`)."""
    if node is None:
        with torch.no_grad():
            y = model(x[:1])
        if y.ndim != 4:
            raise LayerlieError(f"{metric}: the output has shape {tuple(y.shape)}, not (B, C, H, W); for a "
                                "classifier pass node= a feature map's node name, or node='features'")
        return model, (x.shape[-2] / y.shape[-2], x.shape[-1] / y.shape[-1])
    if not isinstance(model, nn.Module):
        raise LayerlieError(f"{metric}: node= needs an nn.Module to trace, got {type(model).__name__}")
    gm = model if isinstance(model, fx.GraphModule) else trace(model)
    prop = LayoutProp(gm)
    prop.propagate(x[:2], None)
    values = {n.name: v for n, v in prop.values.items()}
    name = _last_feature_map(gm, prop.layouts, values) if node == "features" else node
    f = with_output(gm, name)[0]
    lay = prop.layouts[name]
    if not _is_map(lay, values[name]):
        shape = tuple(values[name].shape) if isinstance(values[name], torch.Tensor) else type(values[name]).__name__
        raise LayerlieError(f"{metric}: node {name!r} ({shape}) has layout {lay.describe()}, not a grid "
                            "(B, C, H, W or B, H, W, C) nor tokens (B, N, C) of one image each; pass node= a "
                            "node whose layout is one of these (layerlie.infer_layouts lists them)")
    return (lambda z: as_grid(f(z), lay)), (lay.y[0], lay.x[0])


def as_grid(h: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A feature map of a ``grid`` or ``tokens`` layout as ``(B, C, H, W)`` (docs/method.md §5): the two
    spatial axes last, every other axis but the batch folded into the channels, and the prefix
    tokens, which have no position, left out. ``(B, H, W, C)`` and ``(B, P + H W, C)`` give the
    same map as the ``(B, C, H, W)`` they hold."""
    if layout.kind == "tokens":
        d = layout.token_dim % h.ndim
        h, y, x = h.narrow(d, layout.prefix, h.shape[d] - layout.prefix).unflatten(d, layout.hw), d, d + 1
    else:
        y, x = layout.y_dim % h.ndim, layout.x_dim % h.ndim
    grid = h.movedim((y, x), (-2, -1))
    return grid.reshape(h.shape[0], -1, *grid.shape[-2:]).contiguous()


def _is_map(layout: Layout, value: object) -> bool:
    """Whether a node holds one feature map per image that :func:`as_grid` can read: a grid or
    tokens, the batch on axis 0, a token axis of one sequence (docs/method.md §5)."""
    if layout.kind not in ("grid", "tokens") or not isinstance(value, torch.Tensor):
        return False
    if layout.kind == "grid":
        return 0 not in (layout.y_dim % value.ndim, layout.x_dim % value.ndim)
    d = layout.token_dim % value.ndim
    return d != 0 and value.shape[d] == layout.prefix + layout.hw[0] * layout.hw[1]


def _last_feature_map(gm: fx.GraphModule, layouts: dict[str, Layout], values: dict[str, Any]) -> str:
    """The last op node, in graph order, that holds a feature map (:func:`_is_map`) of more than
    one sample per side, with no tensor of unknown layout and three or more axes after it: a CNN's
    last ``(B, C, H, W)`` map, a Swin's last ``(B, H, W, C)`` map, a ViT's last tokens."""
    found = None
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "call_function", "call_method"):
            continue
        lay, value = layouts[n.name], values.get(n.name)
        if _is_map(lay, value) and min(as_grid(value, lay).shape[-2:]) > 1:
            found = n.name
        elif lay.kind == "unknown" and isinstance(value, torch.Tensor) and value.ndim >= 3:
            found = None
    if found is None:
        raise LayerlieError("no feature map (a grid or tokens of known layout) ends this model's graph; pass "
                            "node= a node name whose output is a feature map")
    return found

def _chosen(n: int, shifts: Sequence[tuple[float, float]] | None, samples: int, seed: int, cast: type,
            draw: Callable[[torch.Generator], tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """The shifts of each of ``n`` images: the given ``shifts`` for every image, else ``samples``
    draws each from a generator seeded with ``seed`` (image by image)."""
    if shifts is not None:
        return [[(cast(dy), cast(dx)) for dy, dx in shifts]] * n
    gen = torch.Generator().manual_seed(seed)
    return [[draw(gen) for _ in range(samples)] for _ in range(n)]



def _integer_shift(hw: tuple[int, int], max_shift: float, gen: torch.Generator) -> tuple[int, int]:
    """A nonzero integer shift, uniform within ``max_shift`` times each side, at least 1 px (docs/method.md §7)."""
    lim = [max(1, int(max_shift * s)) for s in hw]
    while True:
        dy = int(torch.randint(-lim[0], lim[0] + 1, (), generator=gen))
        dx = int(torch.randint(-lim[1], lim[1] + 1, (), generator=gen))
        if dy or dx:
            return dy, dx


def _shift_mask(hw: tuple[int, int], shift: tuple[float, float]) -> torch.Tensor:
    """``(H, W)`` True where the content did not wrap around under the circular shift: EQ-T's
    valid region (docs/method.md §7)."""
    mask = torch.ones(hw, dtype=torch.bool)
    for dim, s in zip((0, 1), shift):
        band = math.ceil(abs(s))
        if band == 0:
            continue
        idx = torch.arange(hw[dim])
        keep = idx >= band if s > 0 else idx < hw[dim] - band
        mask &= keep[:, None] if dim == 0 else keep[None, :]
    return mask


def _output_ndim(model: Model, x: torch.Tensor, output: Output) -> int:
    """2 for a classifier, 4 for an image-to-image model (docs/method.md §7: which metrics need ``node=``)."""
    with torch.no_grad():
        return selected(model, output)(x[:1]).ndim


def _measured(model: Model, x: torch.Tensor, output: Output, node: str | None = None) -> tuple[Model, torch.Tensor]:
    """The model contract at a metric's entry (:mod:`layerlie.model.contract`): the model to measure, with
    its selected output (traced, when ``node`` reads a feature map), and the images."""
    model, x, output, _ = prepare(model, x, output)
    if node is not None and isinstance(model, nn.Module) and not isinstance(model, fx.GraphModule):
        return trace(model, x, output=output), x
    return selected(model, output), x
