"""Models from timm names, local checkpoints, ``package.module:callable`` specs, or as given.

Every model comes back in eval mode, with in-place activations switched off (forward-mode
AD and the graph analyses read each activation's input after the op has run). A module given
is never changed: it comes back as it is when it is ready, else as a prepared copy.

Example:
    >>> import layerlie as ll
    >>> m = ll.load_model("resnet18")
    >>> m.training
    False
"""

from __future__ import annotations

import copy
import difflib
import importlib
import os
import pickle
import socket
import threading
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from layerlie.deprecation import renamed
from layerlie.errors import LayerlieError


@renamed(positional=("pretrained", "checkpoint", "device", "dtype", "size"))
def load_model(spec: str | nn.Module, *, pretrained: bool = False, checkpoint: str | Path | None = None,
               device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               size: int | tuple[int, int] | None = None, **kwargs: object) -> nn.Module:
    """A model ready for measurement.

    Args:
        spec: a timm name (``"resnet18"``), a ``"package.module:callable"`` that returns a
            model, or an ``nn.Module`` (returned as it is when it is in eval mode without in-place
            activations and nothing else is asked, else a prepared copy: it is never changed).
        pretrained: timm's pretrained weights: from the local Hugging Face or torch hub
            cache when they are there, else downloaded. Without network access this fails
            within seconds, naming ``checkpoint=``.
        checkpoint: a local state dict (``.safetensors``, or a file ``torch.load`` reads
            with ``weights_only=True``), loaded strictly.
        device, dtype: where and in what precision to put the model (default: as built).
        size: the input size it will measure, square or ``(h, w)``: a timm model whose
            constructor takes ``img_size`` (ViTs, Swins) is built for it; others run at any size.
        **kwargs: passed to ``timm.create_model`` (e.g. ``num_classes``, ``img_size``).

    Returns:
        The model in eval mode, with in-place activations made out-of-place.
    """
    if device is not None:
        _check_device(device)
    if isinstance(spec, nn.Module):
        ready = _ready(spec) and checkpoint is None and device is None and dtype is None
        model = spec if ready else copy.deepcopy(spec)
    elif ":" in spec and not Path(spec).exists():
        model = _from_callable(spec)
    else:
        model = _from_timm(spec, pretrained, size, **kwargs)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    model.eval()
    for m in model.modules():
        if getattr(m, "inplace", None) is True:
            m.inplace = False
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def _ready(model: nn.Module) -> bool:
    """In eval mode throughout, with no in-place activation: what :func:`load_model` makes."""
    return not any(m.training or getattr(m, "inplace", None) is True for m in model.modules())


def _check_device(device: str | torch.device) -> None:
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LayerlieError(f"device {str(device)!r} is not usable here ({first}); pass cpu, or cuda / "
                            "cuda:N on a machine with that GPU") from None


def _from_timm(name: str, pretrained: bool, size: int | tuple[int, int] | None, **kwargs: object) -> nn.Module:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; list them with `layerlie models PATTERN`"
        raise LayerlieError(f"unknown model {name!r}{hint}")
    if size is not None and "img_size" not in kwargs:
        try:
            return _from_timm(name, pretrained, None, img_size=size, **kwargs)
        except TypeError as err:  # a constructor without img_size runs at any size
            if "img_size" not in str(err):
                raise
    if pretrained:
        return _pretrained(name, **kwargs)
    try:
        return timm.create_model(name, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        raise LayerlieError(f"timm could not build {name!r}: {err}") from None


def pretrained_weights(name: str) -> tuple[str, str | None]:
    """Where timm's pretrained weights for ``name`` are, checked without loading them.

    Returns:
        Their full timm name (``arch.tag``, e.g. ``resnet18.a1_in1k``), and the local file
        that holds them, or None when the weights' host answers and they will be downloaded.

    Raises:
        LayerlieError: timm has no such weights, or they are neither cached nor reachable; the
            message names ``checkpoint=``. Without network this takes seconds at most.
    """
    full, cfg = _pretrained_cfg(name)
    cached = cfg.file or _cached_weights(cfg.hf_hub_id, cfg.hf_hub_filename, cfg.url)
    if cached is not None:
        return full, cached
    host = hf_constants.ENDPOINT if cfg.hf_hub_id else cfg.url
    offline = "HF_HUB_OFFLINE is set" if hf_constants.HF_HUB_OFFLINE else None
    if offline or not _reachable(host):
        reason = offline or f"no network to {urlsplit(host).hostname}"
        raise LayerlieError(f"cannot download pretrained weights for {name!r} ({reason}): pass local weights "
                            "with checkpoint=FILE (--checkpoint FILE)")
    return full, None


def pretrained_name(name: str) -> str:
    """The full timm name (``arch.tag``) of the pretrained weights ``name`` means, from timm's
    table alone: nothing is looked for on disk or the network.

    Raises:
        LayerlieError: timm has no such weights.

    Example:
        >>> pretrained_name("resnet18")
        'resnet18.a1_in1k'
    """
    return _pretrained_cfg(name)[0]


def _pretrained_cfg(name: str) -> tuple[str, object]:
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        arch = name.split(".")[0]
        raise LayerlieError(f"timm has no pretrained weights {name!r}; list them with "
                            f"timm.list_pretrained('{arch}.*')") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise LayerlieError(f"timm has no pretrained weights for {name!r}; pass local weights with "
                            "checkpoint=FILE (--checkpoint FILE)")
    return (f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture), cfg


def _pretrained(name: str, **kwargs: object) -> nn.Module:
    """timm's pretrained model: weights from the local caches when they hold them, else
    downloaded once the weights' host answers (timm alone retries for about a minute)."""
    _, cached = pretrained_weights(name)
    if cached is not None:
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, file=cached)
        return _create(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    return _create(name, pretrained=True, **kwargs)


def _create(name: str, **kwargs: object) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LayerlieError(f"cannot load pretrained weights for {name!r} ({first}); pass local weights "
                            "with checkpoint=FILE (--checkpoint FILE)") from None


def _cached_weights(hf_hub_id: str | None, hf_filename: str | None, url: str | None) -> str | None:
    """The path of weights already in the Hugging Face cache (where timm looks first) or in
    the torch hub cache, without touching the network."""
    if hf_hub_id:
        repo, _, revision = hf_hub_id.partition("@")
        for filename in [hf_filename] if hf_filename else ["model.safetensors", "pytorch_model.bin"]:
            path = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(path, str):
                return path
    if url:
        hub_file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlsplit(url).path)
        if hub_file.is_file():
            return str(hub_file)
    return None


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host (or its proxy) opens within ``timeout`` s.
    The connection runs in a thread so that a stalled DNS lookup cannot outlast it."""
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    opened: list[bool] = []

    def connect() -> None:
        try:
            socket.create_connection((parts.hostname, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(opened)


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
    """The number of input channels the model expects: timm's ``in_chans`` or data config, else
    the ``in_channels`` of its first convolution (the first in graph order for a GraphModule, in
    registration order otherwise). None where a linear layer comes first (it reads flattened
    pixels or patches, whose width does not give the channels), or where there is no such layer.

    Example:
        >>> input_channels(nn.Sequential(nn.Conv2d(1, 8, 3), nn.Flatten(), nn.LazyLinear(2)))
        1
    """
    in_chans = getattr(model, "in_chans", None)
    if isinstance(in_chans, int):
        return in_chans
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if cfg.get("input_size"):
        return int(cfg["input_size"][0])
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.in_channels or None  # 0: a lazy convolution, not built yet
        if isinstance(m, nn.Linear):
            return None
    return None
