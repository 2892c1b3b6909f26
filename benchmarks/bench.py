"""What the GPU, scaling and profile benchmarks share: models and photos at a chosen batch and
resolution, a timer that waits for the device, and markdown tables."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import layerlie as ll
from layerlie.model.data import photo_paths


def setup(name: str, batch: int, res: int | None = None, device: str = "cpu") -> tuple[nn.Module, torch.Tensor]:
    """A random-init model (seed 0) and ``batch`` embedded photos for it, ``(B, 3, res, res)``.

    Models with a fixed input size (ViTs) are built at ``res``; the photos are repeated when
    the batch is larger than their number, and resized to ``res``.
    """
    torch.manual_seed(0)
    model = ll.load_model(name, device=device)
    if res is not None and model.pretrained_cfg.get("fixed_input_size"):
        torch.manual_seed(0)
        model = ll.load_model(name, device=device, img_size=res)
    x = ll.photos(model, n=min(batch, len(photo_paths())))
    x = x.repeat((batch + len(x) - 1) // len(x), 1, 1, 1)[:batch]
    if res is not None and x.shape[-1] != res:
        x = F.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
    return model, x.contiguous()


def sync(device: str) -> None:
    """Wait for the device's queued work, so that wall-clock time covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn: Callable[[], object], device: str = "cpu", repeat: int = 2, min_seconds: float = 0.0,
              warmup: bool = True) -> float:
    """The fastest of at least ``repeat`` calls (more while they total under ``min_seconds``),
    after one untimed call when ``warmup``."""
    if warmup:
        fn()
    times: list[float] = []
    while len(times) < repeat or sum(times) < min_seconds:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def markdown(header: Sequence[str], rows: Sequence[Sequence[object]], right_from: int = 1) -> str:
    """A markdown table; columns from ``right_from`` on are right-aligned."""
    align = ["---" if i < right_from else "---:" for i in range(len(header))]
    lines = [header, align, *[[str(c) for c in row] for row in rows]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)
