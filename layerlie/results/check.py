"""Check a sweep spec before a cluster runs it: every model built at random init and traced,
nothing measured (docs/design.md §4).

Each model is built on the ``meta`` device (shapes without storage, so a large model costs no
memory), traced with torch.fx (which needs no values), and its graph run on a meta batch of
the spec's size, which checks every shape, then through the layout pass the measures run
(:func:`layerlie.infer_layouts`). Where a step fails on ``meta`` (an op without a meta
kernel, or code that reads a value), the model is built again on the CPU at random init and
that step runs on a one-image batch, so that only a real failure is reported. One model is
held at a time.

Example:
    >>> from layerlie.results.check import check
    >>> [r.ok for r in check({"models": ["resnet18"], "size": 32})]
    [True]
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from layerlie.core.layout import infer_layouts
from layerlie.model.loading import input_channels, load_model
from layerlie.model.trace import input_size, trace
from layerlie.results.spec import Source, image_size, read_spec, sources


@dataclass(frozen=True)
class Checked:
    """One model's check: ``step`` is where it failed (``build``, ``trace``, ``shapes`` or ``layouts``) or
    ``ok``; ``device`` where the last step ran (``meta``, or ``cpu`` after a fallback)."""

    model: str
    step: str
    reason: str
    device: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.step == "ok"


def check(spec: str | Path | Mapping[str, Any], *,
          each: Callable[[Checked], None] | None = None) -> list[Checked]:
    """Build every model of ``spec`` at random init, trace it, and propagate shapes and layouts,
    running no measure (docs/design.md §4).

    Args:
        spec: a TOML file or a mapping; its weights are named, not fetched.
        each: called with each model's result as it comes (a progress line).

    Returns:
        One :class:`Checked` per model, in the spec's order.
    """
    checked = read_spec(spec, weights=False)
    size = image_size(checked)
    out = []
    for label, source in sources(checked).items():
        start = time.perf_counter()
        torch.manual_seed(checked["seed"])
        step, reason, device = _check_one(source, size)
        result = Checked(label, step, reason, device, time.perf_counter() - start)
        out.append(result)
        if each is not None:
            each(result)
        gc.collect()
    return out


def _check_one(source: Source, size: int | tuple[int, int] | None) -> tuple[str, str, str]:
    """``(step, reason, device)`` of one model: meta first, the CPU where meta fails."""
    failed: tuple[str, str] = ("", "")
    for device in ("meta", "cpu"):
        step = "build"
        try:
            with torch.device(device):
                model = _build(source, size)
            step = "trace"
            gm = trace(model)
            step = "shapes"
            x = _batch(model, size, device)
            with torch.no_grad():
                gm(x)
            step = "layouts"
            infer_layouts(gm, x)
            return "ok", "", device
        except Exception as err:  # any failure is the model's reason, reported in one line
            failed = (step, " ".join(str(err).split())[:240] or type(err).__name__)
        finally:
            model = gm = None
    return (*failed, device)


def _build(source: Source, size: int | tuple[int, int] | None) -> nn.Module:
    """The model at random init: the architecture of pretrained weights, or the callable's or
    given module (a checkpoint is not read)."""
    if isinstance(source.build, nn.Module):
        return load_model(source.build)
    return load_model(source.build, size=size)


def _batch(model: nn.Module, size: int | tuple[int, int] | None, device: str) -> torch.Tensor:
    """One image of the spec's size, or of the size the model says, else 224 x 224."""
    said = input_size(model)
    if size is not None:
        h, w = (size, size) if isinstance(size, int) else size
    elif said is not None:
        h, w = said[1:]
    else:
        h = w = 224
    channels = input_channels(model) or (said[0] if said else 3)
    if device == "meta":
        return torch.empty(1, channels, h, w, device="meta")
    return torch.rand(1, channels, h, w)


def failures(results: list[Checked]) -> list[str]:
    """The failed models as one line each: ``model: step: reason`` (docs/design.md §4)."""
    return [f"{r.model}: {r.step}: {r.reason}" for r in results if not r.ok]

