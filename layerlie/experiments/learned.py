"""Is equivariance learned? Small timm models trained here, measured before, during and after.

A run is one (dataset, model, condition): a model built from a fixed seed, measured at
initialisation, trained with a :class:`layerlie.Monitor` in the loop, and measured again at
the end. Each measurement point records the held-out accuracy, the published e2e LEE per group
in the central and spectral schemes (docs/method.md §2), the signed layer shares by type (docs/method.md §4),
and the shift consistency and EQ-T (docs/method.md §7).

Data ships with the packages, nothing is downloaded (:data:`DATASETS`):

- ``digits``: scikit-learn's 1,797 handwritten 8x8 digits, upsampled to 32x32 and centred on a
  48x48 black canvas, so that every augmentation below keeps the digit inside the image;
- ``textures``: which of ten scikit-image photos a 64x64 grey crop comes from; the model sees
  the crop's central 48x48 window, so that a shifted window still holds the photo. Training
  crops come from the left three quarters of each photo and held-out crops from the right
  quarter: the two never share a pixel.

A run writes the store parts ``<run>.monitor``, ``<run>.e2e``, ``<run>.layers`` and, last,
``<run>.metrics`` (:mod:`layerlie.results.store`); a run is finished when its metrics part exists, so
``resume=True`` skips it, and a run that was killed midway is redone from the start.

Example:
    >>> from layerlie.experiments import learned
    >>> learned.experiment("out/learned", "figures/learned", config=learned.TINY)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from layerlie.results import store as st
from layerlie.measure.attribution import attribute
from layerlie.errors import LayerlieError
from layerlie.measure.lie import jvp_ready, lee, lie_derivative
from layerlie.measure.metrics import metrics
from layerlie.integrations.monitor import Monitor
from layerlie.antialias.rewrite import antialias

CANVAS = 48
"""Pixels per side of every model input."""


class ExperimentError(LayerlieError):
    """An experiment that cannot run as asked: one line that names the fix."""


@dataclass(frozen=True)
class Split:
    """A data set with its fixed held-out split.

    Attributes:
        x_train, x_test: grey images in ``[0, 1]``, ``(N, 1, S, S)`` with ``S >= CANVAS``; the
            model sees the central ``CANVAS x CANVAS`` window after augmentation.
        y_train, y_test: class indices ``(N,)``.
        classes: the class names.
        padding: how a warp fills pixels from outside the sample (``grid_sample``'s mode).
        recipe: how the split was made, as plain data (it goes into the store's manifest).
        origin_train, origin_test: where each sample comes from, ``(N, k)``: its index in the
            source (digits), or its photo, top row and left column (textures).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    padding: str
    recipe: dict[str, Any]
    origin_train: torch.Tensor
    origin_test: torch.Tensor

    @property
    def mean_std(self) -> tuple[float, float]:
        """The training windows' pixel mean and standard deviation (the normalization)."""
        window = centre(self.x_train)
        return float(window.mean()), float(window.std())

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Central window of ``x (N, 1, S, S)``, normalized: the model's input ``(N, 1, CANVAS, CANVAS)``."""
        mean, std = self.mean_std
        return (centre(x) - mean) / std


def centre(x: torch.Tensor, size: int = CANVAS) -> torch.Tensor:
    """The central ``size x size`` window of ``x (..., S, S)``."""
    top = (x.shape[-1] - size) // 2
    return x[..., top:top + size, top:top + size]


def _held_out(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of held-out samples: ``fraction`` of each class, chosen by ``seed``."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        mask[idx[:round(fraction * len(idx))]] = True
    return mask


def digits(seed: int = 0) -> Split:
    """scikit-learn's handwritten digits: 8x8 upsampled to 32x32, on a 48x48 black canvas;
    a fifth of each class held out (chosen by ``seed``)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp(0, 1)
    x = F.pad(x, [(CANVAS - 32) // 2] * 4)
    y = torch.tensor(data.target)
    test = torch.from_numpy(_held_out(data.target, 0.2, seed))
    recipe = dict(source="sklearn.datasets.load_digits", images=len(x), size="8x8 -> 32x32 bilinear, "
                  f"centred on {CANVAS}x{CANVAS} zeros", held_out="20% of each class", seed=seed)
    index = torch.arange(len(x))[:, None]
    return Split(x[~test], y[~test], x[test], y[test], [str(c) for c in range(10)], "zeros", recipe,
                 index[~test], index[test])


TEXTURE_SOURCES = ("astronaut", "camera", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "coins", "moon")
"""The scikit-image photos of the textures task, one class each."""


def textures(seed: int = 0, crop: int = 64, train_per_class: int = 150, test_per_class: int = 40) -> Split:
    """Which scikit-image photo a grey ``crop x crop`` crop comes from; training crops from the
    left three quarters of each photo, held-out crops from the right quarter."""
    import skimage.data
    from skimage.color import rgb2gray
    from skimage.util import img_as_float32

    rng = np.random.default_rng(seed)
    crops: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    origins: dict[str, list[tuple[int, int, int]]] = {"train": [], "test": []}
    for label, name in enumerate(TEXTURE_SOURCES):
        photo = getattr(skimage.data, name)()
        grey = img_as_float32(rgb2gray(photo) if photo.ndim == 3 else photo)
        cut = grey.shape[1] * 3 // 4
        for part, (start, stop), count in (("train", (0, cut), train_per_class),
                                           ("test", (cut, grey.shape[1]), test_per_class)):
            tops = rng.integers(0, grey.shape[0] - crop + 1, count)
            lefts = rng.integers(start, stop - crop + 1, count)
            crops[part] += [grey[t:t + crop, s:s + crop] for t, s in zip(tops, lefts)]
            origins[part] += [(label, int(t), int(s)) for t, s in zip(tops, lefts)]
    x_train, x_test = (torch.from_numpy(np.stack(crops[p]))[:, None] for p in ("train", "test"))
    o_train, o_test = (torch.tensor(origins[p]) for p in ("train", "test"))
    recipe = dict(source="skimage.data", photos=list(TEXTURE_SOURCES), crop=crop, grey="skimage.color.rgb2gray",
                  window=f"central {CANVAS}x{CANVAS}", train=f"{train_per_class} crops per photo, left 3/4",
                  held_out=f"{test_per_class} crops per photo, right 1/4", seed=seed)
    return Split(x_train, o_train[:, 0], x_test, o_test[:, 0], list(TEXTURE_SOURCES), "reflection", recipe,
                 o_train, o_test)


DATASETS: dict[str, Callable[[int], Split]] = {"digits": digits, "textures": textures}
"""Data set name -> ``f(seed) -> Split``."""


@functools.lru_cache(maxsize=4)
def load_split(dataset: str, seed: int) -> Split:
    """The data set's split, built once per process."""
    return DATASETS[dataset](seed)


def _resnet(in_chans: int, num_classes: int) -> nn.Module:
    # resnet10t's deep stem and average-pool shortcuts, at a sixteenth of its width
    return timm.create_model("resnet10t", pretrained=False, num_classes=num_classes, in_chans=in_chans,
                             channels=(16, 32, 64, 128), stem_width=8)


def _resnet_blurpool(in_chans: int, num_classes: int) -> nn.Module:
    # anti-aliased before training, so that training learns around the blur; the first stem
    # convolution keeps its stride, as in Zhang's anti-aliased ResNets (and at a quarter the cost)
    return antialias(_resnet(in_chans, num_classes), x=torch.zeros(1, in_chans, CANVAS, CANVAS),
                     where=lambda node: node.name != "conv1_0")


def _vit(in_chans: int, num_classes: int) -> nn.Module:
    # 6-pixel patches give the 8x8 token grid that 4-pixel patches give at 32 px
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, in_chans=in_chans,
                             img_size=CANVAS, patch_size=6, depth=4, embed_dim=64, num_heads=2,
                             class_token=False, global_pool="avg")


MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    "resnet10t": _resnet, "resnet10t_blurpool": _resnet_blurpool, "vit_tiny_p6": _vit}
"""Model name -> ``f(in_chans, num_classes)``; every model is random-init from the run's seed."""


@dataclass(frozen=True)
class Condition:
    """A training augmentation: a uniform random shift of up to ``shift`` pixels per axis
    (sub-pixel, bilinear) and a rotation of up to ``angle`` degrees either way, about the centre."""

    shift: float = 0.0
    angle: float = 0.0

    def __call__(self, x: torch.Tensor, padding: str, gen: torch.Generator) -> torch.Tensor:
        """Warp each image of ``x (N, C, S, S)`` by its own drawn transform."""
        if self.shift == 0 and self.angle == 0:
            return x
        n, size = x.shape[0], x.shape[-1]
        a, tx, ty = 2 * torch.rand(3, n, generator=gen) - 1  # uniform in [-1, 1]
        a = torch.deg2rad(self.angle * a)
        tx, ty = 2 * self.shift / size * tx, 2 * self.shift / size * ty  # pixels -> grid units
        theta = torch.stack([torch.stack([a.cos(), -a.sin(), tx], -1), torch.stack([a.sin(), a.cos(), ty], -1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


CONDITIONS: dict[str, Condition] = {"none": Condition(), "translate": Condition(shift=8.0),
                                    "translate_rotate": Condition(shift=8.0, angle=30.0)}
"""Condition name -> augmentation; 8 pixels keep a 32-pixel digit inside its 48-pixel canvas."""


@dataclass(frozen=True)
class Config:
    """The experiment's grid and sizes; it is written into the store's manifest.

    Attributes:
        datasets, models, conditions: the grid, names from :data:`DATASETS`, :data:`MODELS`,
            :data:`CONDITIONS`.
        steps, batch_size, lr: AdamW on a cosine schedule, ``steps`` steps of ``batch_size``.
        every: the monitor measures the LEE every that many steps.
        probe: held-out images of the LEE probe; ``share_images`` of them feed the shares.
        metric_images: held-out images of the consistency and EQ-T.
        test_limit: held-out images of the accuracy (None: all).
        groups: groups of the LEE; ``share_groups``: those attributed by layer type.
        schemes: derivative schemes of the LEE.
        seed: seeds the split, the weights, the batches and the augmentation.
    """

    datasets: tuple[str, ...] = tuple(DATASETS)
    models: tuple[str, ...] = tuple(MODELS)
    conditions: tuple[str, ...] = tuple(CONDITIONS)
    steps: int = 200
    batch_size: int = 32
    lr: float = 2e-3
    every: int = 50
    probe: int = 8
    share_images: int = 1
    metric_images: int = 16
    test_limit: int | None = None
    groups: tuple[str, ...] = ("translate_x", "translate_y", "rotate")
    share_groups: tuple[str, ...] = ("translate_x", "rotate")
    schemes: tuple[str, ...] = ("central", "spectral")
    seed: int = 0

    def runs(self) -> list[tuple[str, str, str]]:
        """The grid's (dataset, model, condition) triples, in run order."""
        return [(d, m, c) for d in self.datasets for m in self.models for c in self.conditions]

    def check(self) -> Config:
        """Raise on a name that no registry holds, or a size below 1; return self."""
        for kind, names, known in (("dataset", self.datasets, DATASETS), ("model", self.models, MODELS),
                                   ("condition", self.conditions, CONDITIONS)):
            unknown = [n for n in names if n not in known]
            if unknown or not names:
                raise ExperimentError(f"unknown {kind} {unknown[0] if unknown else '(none given)'!r}; "
                                      f"choose from {', '.join(known)}")
        for name in ("steps", "batch_size", "every", "probe", "share_images", "metric_images"):
            if getattr(self, name) < 1:
                raise ExperimentError(f"{name} must be 1 or more, got {getattr(self, name)}")
        if self.share_images > self.probe:
            raise ExperimentError(f"share_images ({self.share_images}) cannot exceed probe ({self.probe})")
        return self


FULL = Config()
"""The committed experiment: 18 runs of 200 steps, one or two minutes each on one core."""

TINY = Config(steps=4, batch_size=16, every=2, probe=2, share_images=1, metric_images=4, test_limit=40,
              share_groups=("translate_x",))
"""A few steps per run, for the tests."""


def run_id(dataset: str, model: str, condition: str) -> str:
    """The store name of one run."""
    return f"{dataset}-{model}-{condition}"


def accuracy(model: nn.Module, split: Split, limit: int | None = None, batch: int = 200) -> float:
    """Top-1 accuracy on the held-out split (its first ``limit`` images), in eval mode; the
    model's training flags are put back."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    x, y = split.x_test[:limit], split.y_test[:limit]
    try:
        with torch.no_grad():
            hits = sum(int((model(split.normalize(x[i:i + batch])).argmax(-1) == y[i:i + batch]).sum())
                       for i in range(0, len(x), batch))
    finally:
        for m, mode in modes:
            m.training = mode
    return hits / len(x)


def _probe_indices(split: Split, n: int, seed: int) -> torch.Tensor:
    """``n`` held-out images taken round-robin over the classes, in an order fixed by ``seed``."""
    order = torch.randperm(len(split.y_test), generator=torch.Generator().manual_seed(seed)).tolist()
    by_class: dict[int, list[int]] = {}
    for i in order:
        by_class.setdefault(int(split.y_test[i]), []).append(i)
    spread = [i for row in itertools.zip_longest(*by_class.values()) for i in row if i is not None]
    return torch.tensor(spread[:n])


def measure(model: nn.Module, split: Split, config: Config, probe: torch.Tensor) -> dict[str, pd.DataFrame]:
    """One measurement point, in eval mode: the e2e LEE per image, group and scheme; the
    signed shares by layer type (of the logits, docs/method.md §4); accuracy, consistency and EQ-T.

    Returns:
        The ``e2e``, ``layers`` and ``metrics`` rows of this point.
    """
    model.eval()
    e2e = []
    for scheme in config.schemes:
        e2e.append(lee(model, probe, config.groups, scheme=scheme).assign(scheme=scheme, output="softmax"))
        e2e.append(relative_lee(model, probe, config.groups, scheme).assign(scheme=scheme, output="logits_relative"))
    rows = []
    for g in config.share_groups:
        # the logits: a confident softmax saturates, and its shares become undefined
        a = attribute(model, probe[:config.share_images], g, estimator="shares", output="logits")
        by_type = a.nodes.groupby("layer_type", sort=False)["share"].sum()
        rows += [dict(group=g, layer_type=t, share=float(s), residual=a.residual) for t, s in by_type.items()]
    x = split.normalize(split.x_test[:config.metric_images])
    finite = ["consistency"] + (["eq_t"] if _has_feature_map(model) else [])
    table = metrics(model, x, which=finite, seed=config.seed)
    table = pd.concat([table, pd.DataFrame([dict(image="held-out", metric="accuracy",
                                                 value=accuracy(model, split, config.test_limit))])])
    return {"e2e": pd.concat(e2e, ignore_index=True), "layers": pd.DataFrame(rows),
            "metrics": table.reset_index(drop=True)}


def relative_lee(model: nn.Module, x: torch.Tensor, groups: tuple[str, ...], scheme: str) -> pd.DataFrame:
    """``||L z(x)|| / ||z(x)||`` per image and group, with ``z`` the logits centred over the
    classes (docs/method.md §2): unlike the softmax LEE it does not grow when the logits only scale up,
    as they do in training, so that a trained model and its initialisation compare.

    Returns:
        Columns ``image, group, lee``.
    """
    def centred(z: torch.Tensor) -> torch.Tensor:
        out = model(z)
        return out - out.mean(-1, keepdim=True)

    with jvp_ready(model), torch.no_grad():
        d = lie_derivative(centred, x, list(groups), scheme=scheme, output_frame=None)
        ratio = d.flatten(2).norm(dim=-1) / centred(x).flatten(1).norm(dim=-1)  # (K, B)
    return pd.DataFrame([(str(b), g, float(ratio[k, b])) for k, g in enumerate(groups) for b in range(len(x))],
                        columns=["image", "group", "lee"])


def _accuracy_of(point: dict[str, pd.DataFrame]) -> float:
    table = point["metrics"]
    return float(table.loc[table["metric"] == "accuracy", "value"].iloc[0])


def _has_feature_map(model: nn.Module) -> bool:
    # EQ-T compares feature maps on a pixel grid; a ViT's last features are tokens
    return not isinstance(model, VisionTransformer)


def train_run(split: Split, model_name: str, condition: str, config: Config) -> dict[str, pd.DataFrame]:
    """Build, measure, train (the monitor in the loop) and measure again one run.

    Returns:
        Its ``monitor``, ``e2e``, ``layers`` and ``metrics`` tables; the last three with a
        ``step`` and a ``phase`` (``init`` or ``end``) column.
    """
    torch.manual_seed(config.seed)
    model = MODELS[model_name](split.x_train.shape[1], len(split.classes))
    gen = torch.Generator().manual_seed(config.seed)
    probe = split.normalize(split.x_test[_probe_indices(split, config.probe, config.seed)])
    points = {"init": measure(model, split, config, probe)}
    model.train()
    monitors = [Monitor(model, probe, config.groups, every=config.every, scheme=s) for s in config.schemes]
    for mon in monitors:
        mon.measure(0)
    trace = [dict(step=0, accuracy=_accuracy_of(points["init"]))]
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.steps, pct_start=0.1)
    augment = CONDITIONS[condition]
    for step in range(1, config.steps + 1):
        idx = torch.randint(len(split.y_train), (config.batch_size,), generator=gen)
        x = split.normalize(augment(split.x_train[idx], split.padding, gen))
        loss = F.cross_entropy(model(x), split.y_train[idx])
        if not math.isfinite(loss.item()):
            raise ExperimentError(f"{model_name} on {condition}: the loss is {loss.item()} at step {step}; "
                                  "lower Config.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        measured = [mon.step(step) for mon in monitors]
        if any(measured) and step < config.steps:
            trace.append(dict(step=step, accuracy=accuracy(model, split, config.test_limit)))
    for mon in monitors:
        if config.steps % config.every:
            mon.measure(config.steps)
    points["end"] = measure(model, split, config, probe)
    trace.append(dict(step=config.steps, accuracy=_accuracy_of(points["end"])))
    tables = {name: pd.concat([points[p][name].assign(phase=p, step=0 if p == "init" else config.steps)
                               for p in points], ignore_index=True) for name in ("e2e", "layers", "metrics")}
    tables["monitor"] = pd.concat([m.table() for m in monitors], ignore_index=True).merge(
        pd.DataFrame(trace), on="step", how="left")
    return tables


@dataclass
class Result:
    """What :func:`experiment` did: the runs it ran and skipped, and the files it wrote."""

    store: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)


def spec(config: Config) -> dict[str, Any]:
    """The store manifest's spec: the configuration and every data set's recipe."""
    return dict(experiment="learned-equivariance", config=dataclasses.asdict(config),
                data={d: load_split(d, config.seed).recipe for d in config.datasets},
                conditions={c: dataclasses.asdict(CONDITIONS[c]) for c in config.conditions})


def experiment(store: str | Path, out: str | Path | None = None, *, config: Config = FULL, resume: bool = False,
               log: Callable[[str], None] | None = None) -> Result:
    """Run the grid of :class:`Config` into ``store``, then draw its figures and summary into ``out``.

    Args:
        store: the results store folder.
        out: where the figures and ``SUMMARY.md`` go (None: none are drawn).
        config: the grid and sizes (:data:`FULL`, :data:`TINY`, or your own).
        resume: skip the runs the store has finished; the store must hold the same config.
            Without it, the store's earlier parts are removed first.
        log: called with one line per run.

    Returns:
        A :class:`Result`.
    """
    config.check()
    wanted = _jsonable(spec(config))
    held = st.manifest(store)
    if resume and held is not None and _jsonable(held.get("spec")) != wanted:
        raise ExperimentError(f"the store {str(store)!r} holds another configuration of the experiment; "
                              "drop --resume to start afresh, or pass another --store")
    root = st.create(store, wanted, fresh=not resume)
    result = Result(root)
    finished = st.done(root)
    for dataset, model_name, condition in config.runs():
        name = run_id(dataset, model_name, condition)
        if f"{name}.metrics" in finished:
            result.skipped.append(name)
            continue
        split = load_split(dataset, config.seed)
        start = time.perf_counter()
        tables = train_run(split, model_name, condition, config)
        for table in ("monitor", "e2e", "layers", "metrics"):  # metrics last: it marks the run finished
            frame = tables[table].assign(run=name, dataset=dataset, model=model_name, condition=condition,
                                         seed=config.seed)
            st.write_part(root, f"{name}.{table}", table, frame)
        result.ran.append(name)
        if log is not None:
            log(f"{name}: {time.perf_counter() - start:.0f} s")
    if out is not None:
        from layerlie.experiments.learned_report import render

        result.written = render(root, out)
    return result


def _jsonable(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples as lists), to compare specs."""
    return json.loads(json.dumps(value, default=str))
