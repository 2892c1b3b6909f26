"""Images for measurement: the embedded photos, or any image folder, prepared with the
model's timm data config (resize, centre crop, normalize).

A model without a config (a plain ``nn.Module``) gets timm's defaults: 224 px, ImageNet's
mean and std. ``size`` overrides the size; the channels follow the model's first layer
(:func:`layerlie.model.loading.input_channels`): 3 as RGB, 1 as luminance.

Example:
    >>> import layerlie as ll
    >>> m = ll.load_model("resnet18")
    >>> ll.photos(m, n=2).shape
    torch.Size([2, 3, 224, 224])
    >>> ll.photos(m, n=2, size=(32, 48)).shape
    torch.Size([2, 3, 32, 48])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config
from torch import nn

from layerlie.deprecation import renamed
from layerlie.errors import LayerlieError
from layerlie.model.loading import input_channels

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Images:
    """A prepared batch: ``x (B, C, H, W)``, a name per image, and labels when known."""

    x: torch.Tensor
    names: list[str]
    labels: list[str] | None = None


Size = int | tuple[int, int]
"""An image size in pixels: square, or ``(height, width)``."""

MODES = {1: "L", 3: "RGB"}
"""The PIL mode of the images for each number of channels they can have."""


@renamed(positional=("size", "channels"))
def eval_transform(model: nn.Module, *, size: Size | None = None,
                   channels: int | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """timm's eval transform for the model's data config, at ``size`` and with ``channels``
    (default: the model's, see :func:`layerlie.model.loading.input_channels`); it takes a PIL image of
    the mode :data:`MODES` names for the channels."""
    cfg = resolve_data_config({}, model=model)
    c = _channels(model, channels)
    mean, std = cfg["mean"], cfg["std"]
    if len(mean) != c:  # a config for RGB, one luminance channel: the channels' mean statistics
        mean, std = (sum(mean) / len(mean),) * c, (sum(std) / len(std),) * c
    h, w = _hw(size) if size is not None else cfg["input_size"][1:]
    return create_transform(**{**cfg, "input_size": (c, h, w), "mean": mean, "std": std}, is_training=False)


def _channels(model: nn.Module, channels: int | None) -> int:
    if not isinstance(model, nn.Module):
        raise LayerlieError(f"images are prepared for a model, given first: got {type(model).__name__} "
                            f"{model!r:.40}; pass the nn.Module, e.g. photos(model, n=4)")
    c = channels if channels is not None else input_channels(model) or 3
    if c not in MODES:
        said = "given" if channels is not None else f"that {type(model).__name__} takes"
        raise LayerlieError(f"photos come with 1 (luminance) or 3 (RGB) channels, not the {c} {said}; "
                            "pass a tensor of your own images, (B, C, H, W)")
    return c


def _hw(size: Size) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair):
        raise LayerlieError(f"size must be a positive integer or (height, width), got {size!r}; pass e.g. 64")
    return pair


def photo_paths() -> list[Path]:
    """The embedded photos, in a fixed order (see ``layerlie/assets/SOURCES.md``)."""
    folder = resources.files("layerlie") / "assets"
    return sorted(Path(str(p)) for p in folder.iterdir() if Path(str(p)).suffix == ".jpg")


@renamed(positional=("n",))
def photos(model: nn.Module, *, n: int = 8, size: Size | None = None, channels: int | None = None) -> torch.Tensor:
    """``n`` embedded real photos prepared for ``model``: ``(n, C, H, W)``, on the
    model's device and in its dtype. Nothing is downloaded.

    Args:
        model: the model whose data config prepares them (timm's defaults without one).
        n: how many, 1 to 12.
        size: their size in pixels, square or ``(h, w)`` (default: the config's).
        channels: 3 (RGB) or 1 (luminance) (default: what the model's first layer takes).
    """
    return photo_batch(model, n=n, size=size, channels=channels).x


@renamed(positional=("n",))
def photo_batch(model: nn.Module, *, n: int = 8, size: Size | None = None,
                channels: int | None = None) -> Images:
    """As :func:`photos`, with the photos' names."""
    paths = photo_paths()
    if not 1 <= n <= len(paths):
        raise LayerlieError(f"n must be between 1 and {len(paths)} (the embedded photos), got {n}; "
                            "pass a folder of your own with images(folder) / --images DIR")
    return _prepare(model, paths[:n], [p.stem for p in paths[:n]], size=size, channels=channels)


def images(folder: str | Path, model: nn.Module, *, n: int | None = None, size: Size | None = None,
           channels: int | None = None) -> Images:
    """Images from a folder, prepared for ``model`` as :func:`photos` prepares the embedded
    ones. Labels come from subfolder names where the images sit in subfolders. Unreadable
    files are skipped with a warning."""
    root = Path(folder)
    if not root.is_dir():
        raise LayerlieError(f"images folder {str(root)!r} does not exist; give a folder of image files")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if n is not None:
        if n < 1:
            raise LayerlieError(f"n must be at least 1, got {n}")
        paths = paths[:n]
    if not paths:
        raise LayerlieError(f"no images in {str(root)!r} (looked for {', '.join(sorted(IMAGE_SUFFIXES))}); "
                            "point --images at a folder that holds image files")
    labels = [p.parent.name for p in paths] if any(p.parent != root for p in paths) else None
    names = [str(p.relative_to(root)) for p in paths]
    return _prepare(model, paths, names, labels, size=size, channels=channels)


def _prepare(model: nn.Module, paths: list[Path], names: list[str], labels: list[str] | None = None, *,
             size: Size | None = None, channels: int | None = None) -> Images:
    c = _channels(model, channels)
    transform = eval_transform(model, size=size, channels=c)
    kept, kept_names, kept_labels = [], [], []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                kept.append(transform(img.convert(MODES[c])))
        except (OSError, UnidentifiedImageError, ValueError) as err:
            warnings.warn(f"skipping unreadable image {str(path)!r}: {err}", stacklevel=3)
            continue
        kept_names.append(names[i])
        if labels is not None:
            kept_labels.append(labels[i])
    if not kept:
        raise LayerlieError(f"none of the {len(paths)} images could be read; check the files")
    param = next(model.parameters(), None)
    x = torch.stack(kept)
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype)
    return Images(x, kept_names, kept_labels if labels is not None else None)
