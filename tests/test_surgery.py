"""Anti-aliased substitutes by graph surgery (docs/method.md §6): the weights kept, the engine still
complete, the defects of the replaced nodes lowered, APS exactly shift-invariant, and the errors."""

from __future__ import annotations

import functools
from collections.abc import Mapping

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import layerlie as ll
from layerlie.core.layout import Layout
from layerlie.antialias import BlurPool2d, FilteredActivation, PolyphaseSample, Resampled, antialias, binomial
from layerlie.testing import ATOL, TOL, timm_model

VIT = ("vit_tiny_patch16_224", (("img_size", 64),))
VIT_SHALLOW = ("vit_tiny_patch16_224", (("img_size", 64), ("depth", 2)))  # local defects do not need depth


def model(spec: str | tuple) -> nn.Module:
    name, kwargs = (spec, ()) if isinstance(spec, str) else spec
    return timm_model(name, **dict(kwargs))


@functools.lru_cache(maxsize=4)
def images(spec: str | tuple) -> torch.Tensor:
    return F.interpolate(ll.photos(model(spec), n=2), size=(64, 64), mode="bilinear", align_corners=False)


@functools.lru_cache(maxsize=8)
def surgery(spec: str | tuple, **kwargs: object) -> fx.GraphModule:
    return antialias(model(spec), x=images(spec), **kwargs)


@functools.lru_cache(maxsize=8)
def local_norms(spec: str | tuple, **kwargs: object) -> tuple[ll.Attribution, dict[str, float]]:
    """The attribution (exact; the original: shares, for its local defects only) and the local
    defect of every node, by name."""
    if kwargs:
        a = ll.attribute(surgery(spec, **kwargs), images(spec), "translate_x")
    else:
        a = ll.attribute(model(spec), images(spec), "translate_x", estimator="shares")
    return a, dict(zip(a.nodes["node"], a.nodes["local_norm"]))


def circular_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="circular"), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, padding_mode="circular"), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, padding_mode="circular"), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10)).double().eval()


# --- the weights are kept -----------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["resnet18", VIT])
def test_parameters_are_bit_identical_and_the_input_is_untouched(spec):
    m = model(spec)
    strides = {n: mod.stride for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)}
    new = surgery(spec, activations="filtered")
    assert any(r.substitute.startswith("FilteredActivation") for r in new.meta["layerlie.surgery"].values())
    old, got = dict(m.named_parameters()), dict(new.named_parameters())
    assert old.keys() == got.keys() and all(torch.equal(old[k], got[k]) for k in old)
    assert new.state_dict().keys() == m.state_dict().keys()  # the original checkpoint loads as is
    assert strides == {n: mod.stride for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)}


def test_a_graph_module_keeps_its_graph_and_shares_its_parameter_tensors():
    gm = ll.trace(model("resnet18"))
    code, meta = gm.code, dict(gm.meta)
    new = antialias(gm)
    assert gm.code == code and gm.meta == meta and "layerlie.surgery" not in gm.meta
    assert gm.get_submodule("layer2.0.conv1").stride == (2, 2)
    assert all(new.get_parameter(k) is p for k, p in gm.named_parameters())
    assert new.meta["layerlie.outputs"] == gm.meta["layerlie.outputs"]


def test_one_tap_blurpool_is_the_original_model():
    m, x = model("resnet18"), images("resnet18")
    new = antialias(m, filter_size=1)
    with torch.no_grad():
        assert torch.allclose(new(x), m(x), atol=ATOL["logits"])


# --- the engine on the new graph, and what BlurPool does to the replaced nodes -----------------

def composite_defect(new: fx.GraphModule, defects: Mapping[str, torch.Tensor], nodes: tuple[str, ...]) -> torch.Tensor:
    """The local defect of a chain of stages taken as one op: ``e = J_k[e_{k-1}] + e_k``."""
    by_name = {n.name: n for n in new.graph.nodes}
    e = None
    for name in nodes:
        node = by_name[name]
        m = new.get_submodule(node.target)
        with torch.no_grad():
            own = defects.get(name)  # absent: e = 0 (a stage that commutes with G, as a 1x1 conv)
            pushed = None if e is None else m(e) - m(torch.zeros_like(e))
            e = own if pushed is None else pushed if own is None else pushed + own
    return e


@pytest.mark.parametrize("spec", ["resnet18", VIT_SHALLOW])
def test_blurpool_lowers_the_local_defect_of_every_strided_node(spec):
    a, after = local_norms(spec, blurpool=True)
    assert a.residual <= TOL[torch.float32]
    _, before = local_norms(spec)
    record = surgery(spec, blurpool=True).meta["layerlie.surgery"]
    strided = {n for n, t in zip(a.nodes["node"], a.nodes["layer_type"]) if t == "strided/downsampling"}
    assert len(record) == (8 if spec == "resnet18" else 1) and set(record) <= set(before)
    defects = a.defects
    for old, rep in record.items():
        out = rep.nodes[-1]  # the node that now gives the old node's output
        assert out in strided and after[out] < before[old], (old, before[old], after[out])
        whole = float(composite_defect(surgery(spec, blurpool=True), defects, rep.nodes).norm())
        assert whole < 0.7 * before[old], (old, before[old], whole)


@pytest.mark.parametrize("spec", ["resnet18", VIT_SHALLOW])
def test_blurpool_lowers_the_alias_ratio_of_every_strided_node(spec):
    before = ll.aliasing(model(spec), images(spec)).set_index("node")
    new = surgery(spec, blurpool=True)
    after = ll.aliasing(new, images(spec)).set_index("node")
    record = new.meta["layerlie.surgery"]
    measured = {old: rep.nodes[-1] for old, rep in record.items() if before.loc[old, "alias_kind"] == "downsampling"}
    assert len(measured) == (6 if spec == "resnet18" else 1)  # layer4's 2 x 2 maps are too small to measure
    for old, out in measured.items():  # out: the sampler, or the patch embedding behind its blur
        assert after.loc[out, "alias_kind"] == "downsampling"
        assert after.loc[out, "alias_ratio"] < before.loc[old, "alias_ratio"], (old, out)
        assert not after.loc[out, "flagged"] or before.loc[old, "flagged"]


@pytest.mark.parametrize("spec", ["resnet18", VIT_SHALLOW])
def test_filtered_nonlinearities_lower_their_local_defects(spec):
    a, after = local_norms(spec, blurpool=False, activations="filtered")
    assert a.residual <= TOL[torch.float32]
    _, before = local_norms(spec)
    record = surgery(spec, blurpool=False, activations="filtered").meta["layerlie.surgery"]
    assert len(record) == (17 if spec == "resnet18" else 2) and all(r.nodes == (k,) for k, r in record.items())
    assert sum(after[k] for k in record) < 0.7 * sum(before[k] for k in record)
    layouts = dict(zip(a.nodes["node"], a.nodes["layout"]))
    # every node on a grid of 4 x 4 or more; on resnet18's 2 x 2 maps (layer4) the reflected borders
    # are most of the map and one of the four nonlinearities gets worse
    lower = [k for k in record if after[k] < before[k]]
    assert set(lower) >= {k for k in record if not k.startswith("layer4")}, layouts
    if spec == "resnet18":
        assert a.total.norm() < 0.5 * local_norms(spec)[0].total.norm()  # and the end-to-end defect


# --- APS: exact invariance to circular integer shifts -------------------------------------------

@pytest.mark.parametrize("blurpool", [False, True])
def test_aps_makes_a_circular_cnn_exactly_shift_invariant(blurpool):
    net = circular_cnn()
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    new = antialias(net, aps=True, blurpool=blurpool, x=x)
    stages = ("_0", "_0_blur", "_0_aps") if blurpool else ("_0", "_0_aps")
    assert new.meta["layerlie.surgery"]["_0"].nodes == stages
    with torch.no_grad():
        y, y0 = new(x), net(x)
        for shift in [(1, 0), (0, 1), (3, 5), (-2, 7)]:
            moved = torch.roll(x, shift, dims=(2, 3))
            assert torch.equal(new(moved).argmax(-1), y.argmax(-1))  # consistency 1.0
            assert torch.allclose(new(moved), y, rtol=0, atol=ATOL["ops"])
            assert (net(moved) - y0).abs().max() > 1e-4  # the original is not invariant
    assert ll.attribute(new, x[:2], "translate_x").residual <= TOL[torch.float64]


def test_aps_under_vmap_and_forward_mode_ad():
    aps = PolyphaseSample(2)
    x = torch.randn(3, 4, 7, 8, dtype=torch.float64)
    t = torch.randn(5, *x.shape, dtype=torch.float64)
    loop = torch.stack([torch.func.jvp(aps, (x,), (ti,))[1] for ti in t])
    assert torch.equal(torch.func.vmap(lambda ti: torch.func.jvp(aps, (x,), (ti,))[1])(t), loop)
    assert torch.equal(loop[0], aps.sample(t[0], aps.phase(x))) and aps(x).shape == (3, 4, 4, 4)


# --- the substitutes against references -------------------------------------------------------

def test_binomial_taps_and_blurpool_against_kornia_and_timm():
    import kornia
    from timm.layers import BlurPool2d as TimmBlurPool2d

    assert binomial(5).tolist() == [1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16]
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    for size in range(1, 8):
        for stride in (1, 2, 3):
            ours = BlurPool2d(size, stride).double()(x)
            assert torch.allclose(ours, kornia.filters.blur_pool2d(x, size, stride=stride), atol=ATOL["op"])
    for size in (3, 5):
        assert torch.allclose(BlurPool2d(size, 2, "reflect").double()(x),
                              TimmBlurPool2d(3, size, 2, pad_mode="reflect").double()(x), atol=ATOL["op"])


def test_filtered_activation_keeps_constants_and_its_linearization_is_the_jvp():
    x = torch.randn(2, 1 + 12, 5, dtype=torch.float64)
    f = FilteredActivation.from_activation(F.gelu, Layout("tokens", token_dim=1, prefix=1, hw=(3, 4)), 5)
    const = torch.full_like(x, 0.7)
    assert torch.allclose(f(const), F.gelu(const), atol=ATOL["op"])
    assert torch.equal(f(x)[:, 0], F.gelu(x[:, 0]))  # the class token goes through the plain GELU
    t = torch.randn(3, *x.shape, dtype=torch.float64)
    jvp = torch.stack([torch.func.jvp(f, (x,), (ti,))[1] for ti in t])
    assert torch.allclose(f.linear(x, t), jvp, atol=ATOL["ops"])
    fd = (f(x + 1e-6 * t[0]) - f(x - 1e-6 * t[0])) / 2e-6
    assert torch.allclose(fd, jvp[0], atol=ATOL["central_difference"])


def test_resampled_substitutes_eagerly_with_the_original_weights():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, padding_mode="reflect")
    new = Resampled.from_conv(conv, 5)
    assert new.layer.weight is conv.weight and new.layer.stride == (1, 1) and conv.stride == (2, 2)
    assert new.blur.padding_mode == "reflect" and new(torch.randn(1, 3, 16, 16)).shape == (1, 8, 8, 8)
    patch = Resampled.from_conv(nn.Conv2d(3, 8, 4, stride=4))
    assert list(dict(patch.named_children())) == ["blur", "layer"] and patch.blur.stride == (1, 1)
    pool = Resampled.from_pool(nn.AvgPool2d(2, 2, ceil_mode=True))
    assert pool(torch.randn(1, 2, 7, 7)).shape == nn.AvgPool2d(2, 2, ceil_mode=True)(torch.randn(1, 2, 7, 7)).shape


# --- where, reapplying, retracing ---------------------------------------------------------------

def test_where_selects_by_name_type_depth_and_function():
    m, gm = model("resnet18"), ll.trace(model("resnet18"))
    depth = {n.name: i for i, n in enumerate(gm.graph.nodes)}

    def replaced(**kwargs):
        return sorted(antialias(m, **kwargs).meta["layerlie.surgery"])

    assert replaced(where="layer2_*") == ["layer2_0_conv1", "layer2_0_downsample_0"]
    assert replaced(where=["maxpool", "layer4_0_conv1"]) == ["layer4_0_conv1", "maxpool"]
    assert len(replaced(where="strided/downsampling")) == 8
    assert replaced(where=range(depth["maxpool"] + 1)) == ["conv1", "maxpool"]
    assert replaced(where=slice(depth["layer4_0_conv1"], None)) == ["layer4_0_conv1", "layer4_0_downsample_0"]
    assert replaced(where=lambda n: "downsample" in n.name)[0] == "layer2_0_downsample_0"


def test_reapplying_replaces_nothing_new_and_records_accumulate():
    x = images("resnet18")
    once = surgery("resnet18", blurpool=True)
    with pytest.raises(ll.LayerlieError, match=r"nothing to replace in ResNet: looked for strided convolutions"):
        antialias(once)
    with pytest.raises(ll.LayerlieError, match=r"nothing to replace in VisionTransformer"):
        antialias(surgery(VIT_SHALLOW, blurpool=True))  # the patch embedding is blurred already
    both = antialias(once, blurpool=False, activations="filtered", x=x)
    first, second = once.meta["layerlie.surgery"], both.meta["layerlie.surgery"]
    added = set(second) - set(first)
    assert set(first) < set(second) and len(added) == 17
    assert all(second[k].substitute.startswith("FilteredActivation") for k in added)
    again = ll.trace(both, x, softmax=False)  # layerlie's tracer keeps the substitutes as leaves
    assert [n.name for n in again.graph.nodes if n.op == "call_module"] == \
           [n.name for n in both.graph.nodes if n.op == "call_module"]


# --- errors -------------------------------------------------------------------------------------

def test_bad_options_are_one_line_errors():
    m, x = model("resnet18"), images("resnet18")
    with pytest.raises(ll.LayerlieError, match=r"unknown activations='smooth'; valid: None, 'filtered'"):
        antialias(m, activations="smooth")
    for bad in (0, 8, 2.5, True):
        with pytest.raises(ll.LayerlieError, match="filter_size must be an integer from 1 to 7"):
            antialias(m, filter_size=bad)
    with pytest.raises(ll.LayerlieError, match="needs filter_size >= 2"):
        antialias(m, activations="filtered", filter_size=1, x=x)
    with pytest.raises(ll.LayerlieError, match=r"activations='filtered' needs x="):
        antialias(nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU()), activations="filtered")  # no input size
    with pytest.raises(ll.LayerlieError, match="nothing to do"):
        antialias(m, blurpool=False)
    with pytest.raises(ll.LayerlieError, match="where pattern 'layer9_.' matches no node name and no layer type"):
        antialias(m, where="layer9_*")
    with pytest.raises(ll.LayerlieError, match=r"nothing to replace .* among the nodes that where='nonlinearity'"):
        antialias(m, where="nonlinearity")


def test_a_model_with_nothing_to_replace_says_so():
    flat = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ll.LayerlieError, match=r"nothing to replace in Sequential: looked for strided convolutions "
                                               r"and pools \(blurpool\) and pointwise nonlinearities"):
        antialias(flat.eval(), activations="filtered", x=torch.randn(1, 3, 8, 8))


def test_a_filter_larger_than_a_tensor_can_take_names_the_node_and_the_fix():
    with pytest.raises(ll.LayerlieError, match=r"node layer4_0_act1: FilteredActivation\(filter_size=7\) needs "
                                               r"feature maps of at least 3 x 3, got a side of 2; use a smaller "
                                               r"filter_size"):
        antialias(model("resnet18"), blurpool=False, activations="filtered", filter_size=7,
                  x=images("resnet18"))
    reflect = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, padding_mode="reflect"),
                            nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="reflect"), nn.Flatten())
    with pytest.raises(ll.LayerlieError, match=r"node _1_blur: BlurPool2d\(filter_size=7, reflect\) needs .* 4 x 4"):
        antialias(reflect.eval(), filter_size=7, x=torch.randn(1, 3, 6, 6))
