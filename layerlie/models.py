"""Models from timm names, local checkpoints, ``package.module:callable`` specs, or as given.

Every model comes back in eval mode, with in-place activations switched off (forward-mode
AD and the graph analyses read each activation's input after the op has run).

Example:
    >>> import layerlie as ll
    >>> m = ll.load_model("resnet18")
    >>> m.training
    False
"""

from __future__ import annotations

import difflib
import importlib
import pickle
import zipfile
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from layerlie.errors import LayerlieError


def load_model(spec: str | nn.Module, pretrained: bool = False, checkpoint: str | Path | None = None,
               device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               **kwargs: object) -> nn.Module:
    """A model ready for measurement.

    Args:
        spec: a timm name (``"resnet18"``), a ``"package.module:callable"`` that returns a
            model, or an ``nn.Module``.
        pretrained: let timm fetch its pretrained weights (needs network access).
        checkpoint: a local state dict (``.safetensors``, or a file ``torch.load`` reads
            with ``weights_only=True``), loaded strictly.
        device, dtype: where and in what precision to put the model (default: as built).
        **kwargs: passed to ``timm.create_model`` (e.g. ``num_classes``, ``img_size``).

    Returns:
        The model in eval mode, with in-place activations made out-of-place.
    """
    if isinstance(spec, nn.Module):
        model = spec
    elif ":" in spec and not Path(spec).exists():
        model = _from_callable(spec)
    else:
        model = _from_timm(spec, pretrained, **kwargs)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    model.eval()
    for m in model.modules():
        if getattr(m, "inplace", None) is True:
            m.inplace = False
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _from_timm(name: str, pretrained: bool, **kwargs: object) -> nn.Module:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; list them with `layerlie models PATTERN`"
        raise LayerlieError(f"unknown model {name!r}{hint}")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        if pretrained:
            raise LayerlieError(
                f"cannot download pretrained weights for {name!r} ({type(err).__name__}); without "
                "network access, pass a local file instead: --checkpoint PATH "
                "(load_model(name, checkpoint=PATH))") from None
        raise LayerlieError(f"timm could not build {name!r}: {err}") from None


def _from_callable(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise LayerlieError(f"cannot import {spec!r} ({err}); give 'package.module:callable' "
                            "with the package on PYTHONPATH") from None
    model = factory()
    if not isinstance(model, nn.Module):
        raise LayerlieError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.load(weights_only=True)`` file,
    unwrapped from ``{"state_dict": ...}`` / ``{"model": ...}`` and ``module.`` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise LayerlieError(f"checkpoint {str(path)!r} does not exist; give the path of a "
                            ".safetensors or .pth state dict")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile, SafetensorError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LayerlieError(f"checkpoint {str(path)!r} is corrupt or not a state dict ({first}); "
                            "re-export it with torch.save(model.state_dict()) or safetensors") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LayerlieError(f"checkpoint {str(path)!r} holds no state dict of tensors; save one with "
                            "torch.save(model.state_dict(), path)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a local checkpoint into ``model`` strictly, with a clear error on mismatch."""
    state = read_state_dict(path)
    missing, unexpected = _mismatch(model, state)
    if missing or unexpected:
        raise LayerlieError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:3]}); check the model name or its num_classes")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise LayerlieError(f"checkpoint {str(path)!r} does not fit {type(model).__name__}: "
                            f"{detail}; check the model name or its num_classes") from None
    return model


def _mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = set(model.state_dict())
    return sorted(own - set(state)), sorted(set(state) - own)


def input_channels(model: nn.Module) -> int | None:
    """The number of input channels the model expects, when it says (timm's config)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size")
    in_chans = getattr(model, "in_chans", None)
    if isinstance(in_chans, int):
        return in_chans
    return int(size[0]) if size else None
