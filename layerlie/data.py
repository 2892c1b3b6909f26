"""Images for measurement: the embedded photos, or any image folder, prepared with the
model's timm data config (resize, centre crop, normalize).

Example:
    >>> import layerlie as ll
    >>> m = ll.load_model("resnet18")
    >>> ll.photos(m, n=2).shape
    torch.Size([2, 3, 224, 224])
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

from layerlie.errors import LayerlieError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Images:
    """A prepared batch: ``x (B, C, H, W)``, a name per image, and labels when known."""

    x: torch.Tensor
    names: list[str]
    labels: list[str] | None = None


def eval_transform(model: nn.Module) -> Callable[[Image.Image], torch.Tensor]:
    """timm's eval transform for the model's data config."""
    cfg = resolve_data_config({}, model=model)
    return create_transform(**cfg, is_training=False)


def photo_paths() -> list[Path]:
    """The embedded photos, in a fixed order (see ``layerlie/assets/SOURCES.md``)."""
    folder = resources.files("layerlie") / "assets"
    return sorted(Path(str(p)) for p in folder.iterdir() if Path(str(p)).suffix == ".jpg")


def photos(model: nn.Module, *, n: int = 8) -> torch.Tensor:
    """``n`` embedded real photos prepared for ``model``: ``(n, C, H, W)``, on the
    model's device and in its dtype. Nothing is downloaded."""
    return photo_batch(model, n=n).x


def photo_batch(model: nn.Module, *, n: int = 8) -> Images:
    """As :func:`photos`, with the photos' names."""
    paths = photo_paths()
    if not 1 <= n <= len(paths):
        raise LayerlieError(f"n must be between 1 and {len(paths)} (the embedded photos), got {n}; "
                            "pass a folder of your own with images(folder) / --images DIR")
    return _prepare(model, paths[:n], [p.stem for p in paths[:n]])


def images(folder: str | Path, model: nn.Module, *, n: int | None = None) -> Images:
    """Images from a folder, prepared for ``model``. Labels come from subfolder names where
    the images sit in subfolders. Unreadable files are skipped with a warning."""
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
    return _prepare(model, paths, names, labels)


def _prepare(model: nn.Module, paths: list[Path], names: list[str],
             labels: list[str] | None = None) -> Images:
    transform = eval_transform(model)
    kept, kept_names, kept_labels = [], [], []
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                kept.append(transform(img.convert("RGB")))
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
