"""Fixtures of the suite; what tests share besides fixtures is public, in layerlie.testing."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file


# One Ray authentication mode for every session this process opens: a driver keeps the mode of its
# first session, and a token in ~/.ray would otherwise set it for a local session and not for the
# clusters of tests/test_cluster.py (whose nodes run without), so their tasks could not reach it.
os.environ["RAY_AUTH_MODE"] = "disabled"


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


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every attempt to open a connection, refused and recorded: a test asserts there is none."""
    attempts = []

    def refuse(address: object, *args: object, **kwargs: object) -> None:
        attempts.append(address)
        raise OSError(f"no network in this test (to {address})")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", lambda sock, address: refuse(address))
    return attempts


def cache_weights(cache: Path, repo: str, state: dict[str, torch.Tensor]) -> None:
    """Lay out weights as the Hugging Face cache holds a download of ``repo``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    save_file(state, folder / "snapshots" / commit / "model.safetensors")
