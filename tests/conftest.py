"""Shared fixtures and the one tolerance table of the suite."""

from __future__ import annotations

import functools
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

import layerlie as ll

# Relative tolerances keyed by dtype: float precision of a whole computation.
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||``."""
    return float((a - b).norm() / b.norm())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Empty weight caches and a Hugging Face endpoint that refuses every connection."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def cache_weights(cache: Path, repo: str, state: dict[str, torch.Tensor]) -> None:
    """Lay out weights as the Hugging Face cache holds a download of ``repo``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    save_file(state, folder / "snapshots" / commit / "model.safetensors")


@functools.lru_cache(maxsize=8)
def timm_model(name: str, **kwargs: object) -> torch.nn.Module:
    """A random-init timm model with a fixed seed, built once per session."""
    torch.manual_seed(0)
    return ll.load_model(name, **kwargs)


def smooth_image(b: int = 2, c: int = 3, h: int = 24, w: int = 28, dtype: torch.dtype = torch.float64,
                 max_freq: int = 3) -> torch.Tensor:
    """A band-limited periodic image: a few low-frequency cosines per channel."""
    g = torch.Generator().manual_seed(1)
    yy = torch.arange(h, dtype=dtype)[:, None] * 2 * torch.pi / h
    xx = torch.arange(w, dtype=dtype)[None, :] * 2 * torch.pi / w
    out = torch.zeros(b, c, h, w, dtype=dtype)
    for ky in range(max_freq + 1):
        for kx in range(max_freq + 1):
            a = torch.randn(b, c, 1, 1, generator=g, dtype=dtype)
            ph = torch.rand(b, c, 1, 1, generator=g, dtype=dtype) * 2 * torch.pi
            out = out + a * torch.cos(ky * yy + kx * xx + ph)
    return out
