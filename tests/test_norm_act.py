"""timm's norm+activation leaves split into a norm node and an activation node (docs/method.md §3, 6).

References: every split reproduces its leaf bit for bit, with the model's own tensors and
state_dict keys. Invariants: an eval norm has no defect, so the activation carries what the
leaf carried. Completeness on the families that use the leaves most. The alias measure and
the filtered substitute reach the activations, on raw ``timm.create_model`` models.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
import timm
from timm.layers import BatchNormAct2d, DropBlock2d, GroupNormAct, LayerNormAct2d, convert_sync_batchnorm, \
    freeze_batch_norm_2d
from timm.layers import _fx as timm_fx
from timm.layers.norm_act import FrozenBatchNormAct2d, SyncBatchNormAct
from torch import nn

import layerlie as ll
from layerlie.model.normact import get_norm_act, list_norm_acts, norm_part
from layerlie.antialias.layers import FilteredActivation
from layerlie.testing import TOL

# EfficientNet, MobileNet and RegNet; in mobilenetv2_100 and regnetx_002 every norm-act leaf has an activation too.
FAMILIES = ["efficientnet_b0", "mobilenetv3_small_100", "mobilenetv2_100", "regnetx_002"]
# Families whose only activations on feature maps are those of norm-act leaves (the others act on
# 1 x 1 squeeze-excitation maps or after the global pool); regnetx_002 has ReLUs after its adds.
ONLY_NORM_ACT = {"efficientnet_b0", "mobilenetv3_small_100", "mobilenetv2_100"}


@functools.lru_cache(maxsize=4)
def raw(name: str) -> nn.Module:
    """A model as a user makes it: ``timm.create_model``, in-place activations and all."""
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def image(hw: int) -> torch.Tensor:
    return torch.randn(1, 3, hw, hw, generator=torch.Generator().manual_seed(0))


def leaves(model: nn.Module) -> dict[str, nn.Module]:
    """The norm-act leaves of ``model`` by module path."""
    return {path: m for path, m in model.named_modules() if type(m).__name__ in ll.list_norm_acts()}


def act_nodes(model: nn.Module) -> set[str]:
    """The node names the leaves' activations get (fx names ``a.b.act`` as ``a_b_act``)."""
    return {f"{path.replace('.', '_')}_act" for path, m in leaves(model).items() if not isinstance(m.act, nn.Identity)}


def test_timm_norm_act_leaves_are_all_registered():
    in_timm = {c for c in timm_fx.get_notrace_modules() if c.__module__ == "timm.layers.norm_act"}
    assert in_timm and all(ll.get_norm_act(c) is ll.get_norm_act(c.__name__) for c in in_timm)


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_100"])
def test_split_reproduces_every_leaf_bit_for_bit(name):
    model = raw(name)
    x = image(64)
    inplace = {path: m.act.inplace for path, m in leaves(model).items() if hasattr(m.act, "inplace")}
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(path, module, args, out):
        seen[path] = (args[0].clone(), out.clone())

    gm = ll.trace(model, x)  # checks the traced output against the model's
    handles = [m.register_forward_hook(functools.partial(record, path)) for path, m in leaves(model).items()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    run = ll.Propagator(gm, keep=True)
    run.propagate(x, None)
    values = {n.name: v for n, v in run.values.items()}
    assert len(seen) == len(leaves(model)) > 20
    for path, (inp, out) in seen.items():
        node = path.replace(".", "_")
        last = f"{node}_act" if f"{node}_act" in values else node
        norm_only = copy.deepcopy(model.get_submodule(path))
        norm_only.act = nn.Identity()
        assert torch.equal(values[node], norm_only(inp)), path  # the norm alone, kept by the engine
        assert torch.equal(values[last], out), path
    # the user's model is not touched
    assert all(type(m) is not ll.get_norm_act(type(m)) for m in leaves(model).values())
    assert {p: m.act.inplace for p, m in leaves(model).items() if hasattr(m.act, "inplace")} == inplace


@pytest.mark.parametrize("name", FAMILIES)
def test_parameters_and_state_dict_keys_are_the_models(name):
    model = raw(name)
    gm = ll.trace(model)
    mine, theirs = gm.state_dict(), model.state_dict()
    assert list(mine) == list(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert all(type(gm.get_submodule(path)) is ll.get_norm_act(type(m)) for path, m in leaves(model).items())


@pytest.mark.parametrize("convert", [lambda m: m, convert_sync_batchnorm, freeze_batch_norm_2d],
                         ids=["BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"])
def test_the_norm_twin_holds_the_leafs_own_tensors(convert):
    leaf = convert(nn.Sequential(BatchNormAct2d(4, act_layer=nn.SiLU)))[0].eval()
    with torch.no_grad():
        for t in (leaf.weight, leaf.bias, leaf.running_mean, leaf.running_var):
            t.uniform_(0.5, 1.5)
    twin = norm_part(leaf)
    assert type(twin) is ll.get_norm_act(type(leaf))
    assert dict(twin.named_parameters()).keys() == dict(leaf.named_parameters()).keys()
    assert all(t is dict(leaf.named_parameters())[k] for k, t in twin.named_parameters())
    assert all(t is dict(leaf.named_buffers())[k] for k, t in twin.named_buffers())
    assert twin.act is leaf.act
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(twin.act(twin(x)), leaf(x))


@pytest.mark.parametrize(("convert", "cls"), [(convert_sync_batchnorm, SyncBatchNormAct),
                                              (freeze_batch_norm_2d, FrozenBatchNormAct2d)],
                         ids=["SyncBatchNormAct", "FrozenBatchNormAct2d"])
def test_converted_leaves_split_with_completeness(convert, cls):
    torch.manual_seed(0)
    model = ll.load_model(convert(timm.create_model("mobilenetv3_small_050", pretrained=False))).double()
    x = image(32).double()
    gm = ll.trace(model, x)
    assert {type(m) for m in leaves(model).values()} == {cls}
    names = {n.name for n in gm.graph.nodes}
    assert act_nodes(model) <= names and list(gm.state_dict()) == list(model.state_dict())
    a = ll.attribute(gm, x, "translate_x", output="logits")
    assert not a.degenerate and a.residual <= TOL[torch.float64]
    assert (a.nodes.set_index("node")["layer_type"][sorted(act_nodes(model))] == "nonlinearity").all()


def test_norm_part_of_an_unregistered_class_names_the_fix():
    with pytest.raises(ll.LayerlieError, match=r"GroupNormAct is not a registered .*register_norm_act\(cls, norm\)"):
        norm_part(GroupNormAct(8, 4))


def test_norm_act_registry_lists_sorted_names_and_names_them_in_its_error():
    names = ll.list_norm_acts()
    assert names == sorted(names) and "BatchNormAct2d" in names
    assert ll.get_norm_act(BatchNormAct2d) is ll.get_norm_act("BatchNormAct2d") is nn.BatchNorm2d
    with pytest.raises(ll.LayerlieError, match=f"registered: {', '.join(names)}"):
        ll.get_norm_act("GroupNormAct")


class NormActs(nn.Module):
    """A norm with no activation, one with a DropBlock, and the norm-acts fx traces through."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.plain = BatchNormAct2d(8, apply_act=False)
        self.dropped = BatchNormAct2d(8, act_layer=nn.SiLU, drop_layer=functools.partial(DropBlock2d, drop_prob=0.1))
        self.group = GroupNormAct(8, 4, act_layer=nn.SiLU, inplace=False)
        self.layer = LayerNormAct2d(8, act_layer=nn.GELU)

    def forward(self, x):
        return self.layer(self.group(self.dropped(self.plain(self.conv(x))))).mean((2, 3))


def test_identity_activations_make_no_node_and_drop_comes_first():
    torch.manual_seed(0)
    model = NormActs().double().eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    gm = ll.trace(model, x)
    names = [n.name for n in gm.graph.nodes]
    assert "plain_act" not in names and "plain_drop" not in names
    assert names[names.index("dropped"):names.index("dropped") + 3] == ["dropped", "dropped_drop", "dropped_act"]
    a = ll.attribute(gm, x, "rotate", output="logits")
    assert a.residual <= TOL[torch.float64]
    types = a.nodes.set_index("node")["layer_type"]
    assert types["plain"] == types["dropped"] == "norm"
    assert {types[n] for n in ("dropped_act", "group_act", "layer_act")} == {"nonlinearity"}


@pytest.mark.parametrize("name", FAMILIES)
def test_aliasing_lists_the_activations(name):
    model = raw(name)
    table = ll.aliasing(model, image(128)).set_index("node")  # the last stage is 4 x 4, large enough
    acts = table.loc[sorted(act_nodes(model))]
    assert len(acts) > 10
    assert (acts["layer_type"] == "nonlinearity").all()
    assert (acts["alias_kind"] == "nonlinearity").all() and (acts["alias_ratio"] > 0).all()


@pytest.mark.parametrize("name", FAMILIES)
def test_filtered_substitute_replaces_the_activations(name):
    model = raw(name)
    new = ll.antialias(model, blurpool=False, activations="filtered", x=image(64))
    replaced = set(new.meta["layerlie.surgery"])
    if name in ONLY_NORM_ACT:
        assert replaced == act_nodes(model)
    else:
        assert replaced >= act_nodes(model)
    for path, m in leaves(model).items():
        if not isinstance(m.act, nn.Identity):
            sub = new.get_submodule(f"{path}.act")
            assert isinstance(sub, FilteredActivation) and type(sub.act) is type(m.act)
    assert list(new.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize("name", ["efficientnet_b0", "mobilenetv3_small_100"])
def test_attribution_charges_the_activation_not_the_norm(name):
    model = raw(name)
    x = F.interpolate(ll.photos(model, n=1), size=(64, 64), mode="bilinear", align_corners=False)
    a = ll.attribute(model, x, "translate_x")
    assert not a.degenerate and a.residual <= TOL[torch.float32]
    types = a.nodes.set_index("node")["layer_type"]
    assert (types[sorted(act_nodes(model))] == "nonlinearity").all()
    by_type = a.by_type()["contribution_norm"]
    # an eval norm is affine: e_v = 0 (docs/method.md §3), so what the leaf carried is the activation's
    assert by_type["norm"] < 1e-4 * by_type["nonlinearity"]


def test_antialias_of_a_traced_model_leaves_it_alone():
    model = raw("mobilenetv3_small_100")
    x = image(64)
    gm = ll.trace(model)
    before = gm(x)
    new = ll.antialias(gm, blurpool=False, activations="filtered", x=x)
    assert isinstance(new.get_submodule("bn1.act"), FilteredActivation)
    assert all(not isinstance(m, FilteredActivation) for m in gm.modules())
    assert torch.equal(gm(x), before)
    assert new.get_submodule("bn1").weight is gm.get_submodule("bn1").weight  # the weights stay shared


class LeafNormAct(BatchNormAct2d):
    """A user's fused norm+activation, a leaf of the trace."""


timm_fx.register_notrace_module(LeafNormAct)


def test_a_registered_norm_act_is_split_by_trace():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), LeafNormAct(4, act_layer=nn.ReLU)).eval()
    ll.register_norm_act(LeafNormAct, nn.BatchNorm2d)
    assert "LeafNormAct" in ll.list_norm_acts()
    gm = ll.trace(model, image(16))
    assert [n.name for n in gm.graph.nodes if n.op == "call_module"] == ["_0", "_1", "_1_act"]
    assert type(gm.get_submodule("1")) is nn.BatchNorm2d
