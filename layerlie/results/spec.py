"""A sweep's spec: what it reads, and how it is checked before anything runs (docs/design.md §4).

A spec is TOML (or a dict) with fixed keys::

    models = ["resnet18", "convnext_*"]   # timm names, fnmatch patterns, or "pkg.module:factory",
                                          # or a table per model (below)
    groups = ["translate_x", "rotate"]    # or "all"
    measures = ["e2e", "layers"]          # names from ll.list_measures()
    n = 8                                 # embedded photos; or images = "DIR" with n as a cap
    seed = 0                              # random-init weights, and every metric's generator
    scheme = "central"                    # optional
    batch_size = 8                        # optional: images per pass
    size = 64                             # optional: images of 64 x 64 pixels (or [h, w]), and
                                          # img_size=size for models that take it (ViTs)
    device = "cpu"                        # optional: "cuda" (each task asks Ray for a GPU) or
                                          # "auto" (a GPU when the cluster has them)
    gpus_per_task = 0.25                  # optional: the GPU share a task asks for (default 1)
    [layers]                              # optional: estimator, groups, top, output, samples, and
                                          # alias = true to join the alias flags (docs/method.md §6)
    [metrics]                             # optional: which, options = {eq_r = {max_angle = 45}}
    [ablation]                            # optional: variants, estimator, filter_size, groups

A model's table says where its weights come from, and may name it (``label``, the ``model``
column; by default the timm name with its pretrained tag, or the name and the checkpoint's
file)::

    models = [{ name = "resnet50", pretrained = true },          # timm's weights: resnet50.a1_in1k
              { name = "resnet50", checkpoint = "w.safetensors" },  # a state dict, read strictly
              { callable = "pkg.mod:fn", checkpoint = "w.pth" },    # the callable's model, these weights
              "resnet50"]                                           # random init from the seed

A dict spec may also hold ``{ module = an_nn_Module }`` and ``images = a (B, C, H, W) tensor``;
the manifest records their class, shape and hash. Every row records where its weights came
from (``weights``: ``random init (seed N)``, ``pretrained (timm arch.tag)``, ``checkpoint
(path, sha256 H)``, ``callable pkg.mod:fn`` or ``module Name (given)``), the ``host``,
``ray_node`` (the Ray node id) and ``pid`` its task ran on, and the ``device`` it measured on;
the manifest records the weights per model.

Each measure (:mod:`layerlie.results.measures`) that takes options has a table of its name.

Example:
    >>> from layerlie.results.spec import read_spec
    >>> read_spec({"models": ["resnet18"]})["groups"]
    ['translate_x', 'rotate']
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerlie.antialias.ablation import list_variants
from layerlie.core.groups import DEFAULT_GROUPS, list_groups, resolve_groups
from layerlie.core.tangent import list_schemes
from layerlie.errors import LayerlieError
from layerlie.measure.estimators import list_estimators
from layerlie.measure.metrics import list_metrics
from layerlie.model.loading import load_model, pretrained_name, pretrained_weights, read_state_dict
from layerlie.results.measures import get_measure, list_measures

KEYS = ("models", "groups", "measures", "n", "images", "seed", "scheme", "batch_size", "size", "device",
        "gpus_per_task")
"""The settings a spec may hold; besides them, one table per measure that takes options."""

MODEL_KEYS = ("name", "callable", "module", "pretrained", "checkpoint", "label")
"""The keys of a model's table."""

DEFAULTS: dict[str, Any] = dict(groups=list(DEFAULT_GROUPS), measures=["e2e"], n=8, images=None, seed=0,
                                scheme="central", batch_size=None, size=None, device="cpu", gpus_per_task=1)

DEVICES = ("cpu", "cuda", "auto")
"""Where a spec's tasks measure: the CPU, a GPU each (refused on a cluster without one), or a
GPU where the cluster has them and the CPU where it has none."""


class SpecError(LayerlieError):
    """A sweep spec that cannot run: one line that names the key."""


@dataclass(frozen=True)
class Source:
    """One model of a checked spec: what builds it, and where its weights come from (docs/design.md §4)."""

    label: str
    build: str | torch.nn.Module
    pretrained: str | None = None
    checkpoint: str | None = None
    sha256: str | None = None

    def weights(self, seed: int) -> str:
        """The provenance of the weights, as the ``weights`` column and the manifest say it."""
        if self.checkpoint is not None:
            return f"checkpoint ({self.checkpoint}, sha256 {self.sha256})"
        if self.pretrained is not None:
            return f"pretrained (timm {self.pretrained})"
        if isinstance(self.build, torch.nn.Module):
            return f"module {type(self.build).__name__} (given)"
        if ":" in self.build:
            return f"callable {self.build}"
        return f"random init (seed {seed})"

    def load(self, size: int | tuple[int, int] | None, device: str | torch.device | None = None) -> torch.nn.Module:
        """The model, built for ``size`` (:func:`image_size`) where its constructor takes one, with
        its weights, on ``device``."""
        if self.checkpoint is not None and _sha256_file(self.checkpoint) != self.sha256:
            raise LayerlieError(f"checkpoint {self.checkpoint!r} changed after the sweep began (its sha256 is no "
                                f"longer {self.sha256}); run the sweep again with --force-new")
        return load_model(self.pretrained or self.build, pretrained=self.pretrained is not None,
                          checkpoint=self.checkpoint, size=size, device=device)


def read_spec(spec: str | Path | Mapping[str, Any], *, weights: bool = True) -> dict[str, Any]:
    """Parse and check a spec, before anything runs (docs/design.md §4).

    Args:
        spec: a TOML file, or the same data as a mapping.
        weights: check that pretrained weights and checkpoints are at hand; without, they are
            only named (what a check at random init, or a listing of the tasks, needs).

    Returns:
        The spec with its defaults filled in, as plain data.

    Raises:
        SpecError: an unreadable file, an unknown key, group, measure or option, a model pattern
            that matches nothing, or a value of the wrong kind; one line that names the key.
    """
    where = ""
    if not isinstance(spec, Mapping):
        path = Path(spec)
        where = f"{path}: "
        try:
            spec = tomllib.loads(path.read_text())
        except OSError as err:
            raise SpecError(f"cannot read the spec {str(path)!r} ({err.strerror})") from None
        except tomllib.TOMLDecodeError as err:
            raise SpecError(f"{where}not valid TOML ({err})") from None
    try:
        return _checked(dict(spec), weights)
    except SpecError as err:
        raise SpecError(f"{where}{err}") from None


def sources(spec: Mapping[str, Any]) -> dict[str, Source]:
    """The models of a checked spec by label, the ``model`` column of their rows (docs/design.md §4)."""
    out = {}
    for entry in spec["models"]:
        if isinstance(entry, str):
            out[entry] = Source(entry, entry)
        else:
            build = entry.get("module", entry.get("callable", entry.get("name")))
            out[entry["label"]] = Source(entry["label"], build, entry.get("pretrained"), entry.get("checkpoint"),
                                         entry.get("sha256"))
    return out


def without_hashes(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A plain spec (:func:`plain`) as :func:`read_spec` gives it without ``weights``: the
    checkpoints' hashes left out, so that a stored spec compares with one read that way."""
    return {**spec, "models": [{k: v for k, v in m.items() if k != "sha256"} if isinstance(m, dict) else m
                               for m in spec["models"]]}


def plain(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec as JSON data, as the manifest stores it: a module or a tensor by its class or
    shape and the hash of its values (docs/design.md §4)."""
    def described(value: object) -> str:
        if isinstance(value, torch.nn.Module):
            return f"{type(value).__name__} (state sha256 {_sha256_tensors(value.state_dict().items())})"
        if isinstance(value, torch.Tensor):
            return (f"tensor {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')} "
                    f"(sha256 {_sha256_tensors([('', value)])})")
        raise TypeError(f"{type(value).__name__} is not JSON data")

    return json.loads(json.dumps(spec, default=described))


def image_size(spec: Mapping[str, Any]) -> int | tuple[int, int] | None:
    """The checked spec's ``size``, as :func:`layerlie.load_model` and the image readers take it."""
    size = spec["size"]
    return tuple(size) if isinstance(size, list) else size


def _sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """One hash of named tensors' bytes, whatever their dtype or device."""
    digest = hashlib.sha256()
    for name, t in tensors:
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _checked(spec: dict[str, Any], weights: bool = True) -> dict[str, Any]:
    """The spec with defaults filled in; a bad key or value is a one-line :class:`SpecError` (docs/design.md §4)."""
    tables = [m for m in list_measures() if get_measure(m).options]
    unknown = [k for k in spec if k not in (*KEYS, *tables)]
    if unknown:
        raise SpecError(f"spec key {unknown[0]!r} is unknown; valid keys: {', '.join([*KEYS, *tables])}")
    if "models" not in spec:
        raise SpecError("spec key 'models' is missing; give timm names or patterns, e.g. models = ['resnet18']")
    out = {**DEFAULTS, **spec}
    out["models"] = _models(out["models"], weights)
    out["groups"] = _groups("groups", out["groups"])
    out["measures"] = _strings("measures", out["measures"])
    bad = [m for m in out["measures"] if m not in list_measures()]
    if bad:
        raise SpecError(f"spec key 'measures': unknown measure {bad[0]!r}; valid: {', '.join(list_measures())}")
    for key in ("n", "batch_size", "size"):
        value = out[key]
        if key == "size" and isinstance(value, (list, tuple)) and len(value) == 2 and all(_positive(v) for v in value):
            out[key] = list(value)
        elif value is not None and not _positive(value):
            said = " or [height, width]" if key == "size" else ""
            raise SpecError(f"spec key {key!r}: expected a positive integer{said}, got {value!r}")
    if not isinstance(out["seed"], int) or isinstance(out["seed"], bool):
        raise SpecError(f"spec key 'seed': expected an integer, got {out['seed']!r}")
    if out["scheme"] not in list_schemes():
        raise SpecError(f"spec key 'scheme': unknown scheme {out['scheme']!r}; valid: {', '.join(list_schemes())}")
    if out["device"] not in DEVICES:
        raise SpecError(f"spec key 'device': expected one of {', '.join(DEVICES)}, got {out['device']!r}")
    share = out["gpus_per_task"]
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not (
            0 < share <= 1 or (share > 1 and float(share).is_integer())):
        raise SpecError(f"spec key 'gpus_per_task': expected a fraction in (0, 1] or a whole number of GPUs, "
                        f"got {share!r}")
    given = out["images"]
    if isinstance(given, torch.Tensor):
        if given.ndim != 4 or not given.is_floating_point():
            raise SpecError(f"spec key 'images': a tensor must be a float batch (B, C, H, W), got shape "
                            f"{tuple(given.shape)} {given.dtype}")
    elif given is not None and not (isinstance(given, (str, Path)) and Path(given).is_dir()):
        raise SpecError(f"spec key 'images': {_shown(given)} is not a folder; give a folder of images or "
                        "leave it out for the embedded photos")
    elif given is not None:
        out["images"] = str(given)
    for measure in tables:
        allowed = get_measure(measure).options
        table = out.get(measure, {})
        if not isinstance(table, Mapping):
            raise SpecError(f"spec key {measure!r}: expected a table [{measure}], got {table!r}")
        extra = [k for k in table if k not in allowed]
        if extra:
            raise SpecError(f"spec key '{measure}.{extra[0]}' is unknown; valid keys: {', '.join(allowed)}")
        out[measure] = dict(table)
    _options(out)
    return out


def _options(out: dict[str, Any]) -> None:
    """Check the measures' own tables: estimators, groups, metrics, variants (docs/design.md §4)."""
    layers, mets, abl = out["layers"], out["metrics"], out["ablation"]
    for key, opts in (("layers", layers), ("ablation", abl)):
        if "estimator" in opts and opts["estimator"] not in list_estimators():
            raise SpecError(f"spec key '{key}.estimator': unknown estimator {opts['estimator']!r}; valid: "
                            f"{', '.join(list_estimators())}")
    for key, opts in (("layers", layers), ("ablation", abl)):
        if "groups" in opts:
            opts["groups"] = _groups(f"{key}.groups", opts["groups"])
    if not isinstance(layers.get("alias", False), bool):
        raise SpecError(f"spec key 'layers.alias': expected true or false, got {layers['alias']!r}")
    if "top" in layers and (not isinstance(layers["top"], int) or layers["top"] < 1):
        raise SpecError(f"spec key 'layers.top': expected a positive integer, got {layers['top']!r}")
    which = _strings("metrics.which", mets["which"]) if "which" in mets else []
    named = [*which, *mets.get("options", {})]
    if any(w not in list_metrics() for w in named):
        bad = next(w for w in named if w not in list_metrics())
        raise SpecError(f"spec key 'metrics.which': unknown metric {bad!r}; valid: {', '.join(list_metrics())}")
    variants = _strings("ablation.variants", abl["variants"]) if "variants" in abl else []
    bad_variants = [v for v in variants if v not in list_variants()]
    if bad_variants:
        raise SpecError(f"spec key 'ablation.variants': unknown variant {bad_variants[0]!r}; valid: "
                        f"{', '.join(list_variants())}")


def _strings(key: str, value: Any) -> list[str]:
    """A string or a list of strings, as a list (docs/design.md §4)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise SpecError(f"spec key {key!r}: expected a string or a non-empty list of strings, got {value!r}")
    return list(items)


def _groups(key: str, value: Any) -> list[str]:
    """Group names, ``"all"`` expanded (docs/design.md §4)."""
    names = _strings(key, value)
    if names == ["all"]:
        return [g.name for g in resolve_groups("all")]
    valid = list_groups(compat=True)
    bad = [g for g in names if g not in valid]
    if bad:
        raise SpecError(f"spec key {key!r}: unknown group {bad[0]!r}; valid groups: all, {', '.join(valid)}")
    return names


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _shown(value: object) -> str:
    """A value in an error message: a module or a tensor by its kind, never its whole repr."""
    if isinstance(value, torch.nn.Module):
        return f"a {type(value).__name__} module"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value)


def _models(value: Any, weights: bool = True) -> list[str | dict[str, Any]]:
    """The models of a spec, in order, each once: timm names from names and fnmatch patterns,
    ``pkg.module:factory`` as given, and checked tables (docs/design.md §4)."""
    import timm

    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise SpecError("spec key 'models': the list is empty; give timm names or patterns, e.g. models = ['resnet18']")
    out: list[str | dict[str, Any]] = []
    every = None
    for item in items:
        if isinstance(item, str) and ":" not in item:
            every = every if every is not None else timm.list_models()
            found = fnmatch.filter(every, item)
            if not found:
                raise SpecError(f"spec key 'models': {item!r} matches no timm model; list them with "
                                "`layerlie models PATTERN`")
        else:
            found = [_table(item, weights)]
        out += [m for m in found if m not in out]
    labels = [m if isinstance(m, str) else m["label"] for m in out]
    twice = next((label for label in labels if labels.count(label) > 1), None)
    if twice is not None:
        raise SpecError(f"spec key 'models': two models are labelled {twice!r}; give one a label = '...'")
    return out


def _table(item: Any, weights: bool = True) -> str | dict[str, Any]:
    """One model given as a callable, a module or a table, checked: its weights at hand (a
    checkpoint readable and hashed, its path taken from the working directory; pretrained
    weights cached or reachable) and its label (docs/design.md §4). A table that only names a model is
    that name."""
    import timm

    if isinstance(item, (str, torch.nn.Module)):
        item = {"callable" if isinstance(item, str) else "module": item}
    if not isinstance(item, Mapping):
        raise SpecError(f"spec key 'models': expected a timm name, 'pkg.module:fn' or a table, got {_shown(item)}")
    unknown = [k for k in item if k not in MODEL_KEYS]
    kinds = [k for k in ("name", "callable", "module") if k in item]
    if unknown or len(kinds) != 1:
        said = f"unknown key {unknown[0]!r}" if unknown else f"{' and '.join(kinds) or 'no model'}"
        raise SpecError(f"spec key 'models': a model's table takes one of name, callable or module, and "
                        f"pretrained, checkpoint, label; got {said}")
    kind, build = kinds[0], item[kinds[0]]
    entry: dict[str, Any] = {kind: build}
    if kind == "module" and not isinstance(build, torch.nn.Module):
        raise SpecError(f"spec key 'models': module = expects a torch.nn.Module, got {_shown(build)}")
    if kind == "name" and not (isinstance(build, str) and timm.is_model(build)):
        raise SpecError(f"spec key 'models': name = {_shown(build)} is not a timm model; list them with "
                        "`layerlie models PATTERN`")
    if kind == "callable" and not (isinstance(build, str) and ":" in build):
        raise SpecError(f"spec key 'models': callable = {_shown(build)}; give 'package.module:callable'")
    pretrained, checkpoint, label = item.get("pretrained", False), item.get("checkpoint"), item.get("label")
    if not isinstance(pretrained, bool):
        raise SpecError(f"spec key 'models': pretrained = expects true or false, got {_shown(pretrained)}")
    if pretrained and (kind != "name" or checkpoint is not None):
        raise SpecError("spec key 'models': pretrained = true takes timm's weights for a timm name, without a "
                        "checkpoint; a callable or module brings its own, a checkpoint replaces them")
    if pretrained:
        try:
            entry["pretrained"] = pretrained_weights(build)[0] if weights else pretrained_name(build)
        except LayerlieError as err:
            raise SpecError(f"spec key 'models': {err}") from None
    if checkpoint is not None:
        if not isinstance(checkpoint, (str, Path)):
            raise SpecError(f"spec key 'models': checkpoint = expects a path, got {_shown(checkpoint)}")
        path = Path(checkpoint).absolute()
        entry["checkpoint"] = str(path)
        if weights:
            try:
                read_state_dict(path)  # a missing or unreadable file is refused before anything runs
            except LayerlieError as err:
                raise SpecError(f"spec key 'models': {err}") from None
            entry["sha256"] = _sha256_file(path)
    if label is not None and not (isinstance(label, str) and label.strip()):
        raise SpecError(f"spec key 'models': label = expects a non-empty string, got {_shown(label)}")
    named = type(build).__name__ if kind == "module" else build
    if label is None and len(entry) == 1 and kind != "module":
        return build
    entry["label"] = label or entry.get("pretrained") or (
        f"{named} ({Path(checkpoint).name})" if checkpoint is not None else named)
    return entry
