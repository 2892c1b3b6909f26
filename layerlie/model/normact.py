"""timm's norm+activation leaves as a norm node and an activation node (docs/method.md §3, 6).

timm registers ``BatchNormAct2d`` and its kin as fx leaves, so in EfficientNet, MobileNet,
RegNet and others a whole ``norm -> drop -> act`` is one ``call_module`` node: the
nonlinearity's defect is charged to a "norm", and neither the alias measure nor the filtered
substitute can reach it. :func:`split_norm_acts` rewrites each such node into

- the norm, a ``call_module`` on the same path (a plain norm class sharing the module's
  parameters, buffers and children, so ``state_dict()`` keys and tensors are unchanged);
- ``<path>.drop`` unless it is an ``nn.Identity``;
- ``<path>.act`` unless it is an ``nn.Identity`` (``apply_act=False``).

The norm class of each leaf class is a registry entry (:func:`register_norm_act`,
:func:`get_norm_act`, :func:`list_norm_acts`): its ``forward`` must compute exactly the leaf's
norm in eval mode. timm's ``GroupNormAct``, ``LayerNormAct(2d)`` and ``RmsNormAct(2d)`` are not
leaves: fx traces through them already.

Example:
    >>> import timm, layerlie as ll
    >>> gm = ll.trace(timm.create_model("mobilenetv3_small_050").eval())
    >>> [n.name for n in gm.graph.nodes][2:4]
    ['bn1', 'bn1_act']
"""

from __future__ import annotations

import copy

import torch.fx as fx
from timm.layers.norm_act import BatchNormAct2d, FrozenBatchNormAct2d, SyncBatchNormAct
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from layerlie.errors import LayerlieError

_NORM_OF: dict[type[nn.Module], type[nn.Module]] = {}


def register_norm_act(cls: type[nn.Module], norm: type[nn.Module]) -> type[nn.Module]:
    """Split the leaf modules of class ``cls`` (exact type) into ``norm``, then their ``drop``
    and ``act`` children. ``norm.forward`` on a module with ``cls``'s attributes must give the
    leaf's output before ``drop``, in eval mode."""
    _NORM_OF[cls] = norm
    return cls


def get_norm_act(cls: type[nn.Module] | str) -> type[nn.Module]:
    """The norm class that computes the norm part of a ``cls`` leaf; ``cls`` is a registered
    class or its name. An unregistered one raises a :class:`LayerlieError` that lists them."""
    found = [norm for leaf, norm in _NORM_OF.items() if leaf is cls or leaf.__name__ == cls]
    if not found:
        name = cls if isinstance(cls, str) else cls.__name__
        raise LayerlieError(f"{name} is not a registered norm+activation class (registered: "
                            f"{', '.join(list_norm_acts())}); register its norm class with "
                            "layerlie.register_norm_act(cls, norm)")
    return found[0]


def list_norm_acts() -> list[str]:
    """The names of the leaf classes that :func:`split_norm_acts` takes apart, sorted."""
    return sorted(leaf.__name__ for leaf in _NORM_OF)


# SyncBatchNorm synchronizes batch statistics in training only; in eval it is a BatchNorm.
register_norm_act(BatchNormAct2d, nn.BatchNorm2d)
register_norm_act(SyncBatchNormAct, nn.BatchNorm2d)
register_norm_act(FrozenBatchNormAct2d, FrozenBatchNorm2d)


def norm_part(m: nn.Module) -> nn.Module:
    """A twin of the norm-act module ``m`` whose forward is only its norm: an instance of the
    registered norm class holding ``m``'s own parameter and buffer tensors and its children."""
    cls = get_norm_act(type(m))
    twin = cls.__new__(cls)
    twin.__dict__.update(m.__dict__)
    for key in ("_parameters", "_buffers", "_modules"):  # own dicts, the same tensors and modules
        twin.__dict__[key] = copy.copy(m.__dict__[key])
    return twin


def split_norm_acts(root: nn.Module, graph: fx.Graph) -> list[str]:
    """Rewrite every ``call_module`` node of ``graph`` on a registered norm-act leaf of ``root``
    into its norm, drop and activation nodes; ``root`` gets the norm twins in place of the leaves.

    ``root`` must be the graph's own copy of the model: the activations are made
    out-of-place, since the norm's output is now a value that the engine keeps.

    Returns:
        The module paths that were split.
    """
    paths = []
    for node in list(graph.nodes):
        if node.op != "call_module" or type(root.get_submodule(node.target)) not in _NORM_OF:
            continue
        module = root.get_submodule(node.target)
        last = node
        for child in ("drop", "act"):
            stage = getattr(module, child, None)
            if stage is None or isinstance(stage, nn.Identity):
                continue
            if getattr(stage, "inplace", None) is True:
                stage.inplace = False
            with graph.inserting_after(last):
                new = graph.call_module(f"{node.target}.{child}", (last,))
            new.meta = {k: v for k, v in node.meta.items() if k == "nn_module_stack"}
            last.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
            last = new
        paths.append(node.target)
    for path in dict.fromkeys(paths):  # a module called twice is replaced once
        parent, _, attr = path.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, attr, norm_part(root.get_submodule(path)))
    return paths
