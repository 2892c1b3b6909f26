"""The model contract, in-place ops, each estimator's own check, and the global random state.

- references: a raw ``timm.create_model`` model (in-place activations) and ``ll.load_model``
  give the same attribution table; ``trace`` and ``antialias`` return the model's logits, and
  ``ll.lee`` of an anti-aliased model is the figure ``ablate`` reports for it;
- invariants: after ``trace``, no node writes into a value that the engine stores, so a
  pointwise linear op in front of an in-place activation keeps ``e_v = 0`` (docs/method.md §3);
- completeness: a deliberately wrong linearization rule makes the exact and the shares checks
  fail (docs/method.md §4), because ``L F`` comes from ``torch.func.jvp`` of the whole graph.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import layerlie as ll
from layerlie.testing import ATOL, RTOL, TOL, smooth_image, timm_model

SEED = 0


def small_photo(model: nn.Module, size: int) -> torch.Tensor:
    return F.interpolate(ll.photos(model, n=1), size=(size, size), mode="bilinear", align_corners=False)


# --- in-place ops ----------------------------------------------------------------------------

def test_raw_timm_model_gives_the_table_of_load_model():
    torch.manual_seed(SEED)
    raw = timm.create_model("resnet18", pretrained=False).eval()
    torch.manual_seed(SEED)
    loaded = ll.load_model("resnet18")
    assert raw.act1.inplace and not loaded.act1.inplace  # the raw model keeps timm's in-place ReLUs
    x = small_photo(loaded, 64)
    a, b = (ll.attribute(m, x, "translate_x").nodes.set_index("node") for m in (raw, loaded))
    assert list(a.index) == list(b.index)
    for col in ("local_norm", "contribution_norm"):
        assert torch.allclose(torch.tensor(a[col].values), torch.tensor(b[col].values), rtol=RTOL["regrouped"], atol=ATOL["norms"]), col
    # an eval BatchNorm is pointwise affine: no defect of its own; the ReLU after it carries one
    total = float(a["contribution_norm"].max())
    assert a.loc["bn1", "local_norm"] < 1e-6 * a.loc["act1", "local_norm"]
    assert a.loc["bn1", "contribution_norm"] < 1e-6 * total < a.loc["act1", "contribution_norm"]


class InPlace(nn.Module):
    """``h = 2 x`` (pointwise linear: ``e_v = 0``), then one in-place op on ``h``."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2
        other = x.flip(-1)
        if self.form == "module":
            y = self.act(h)
        elif self.form == "functional":
            y = F.relu(h, inplace=True)
        elif self.form == "functional_positional":
            y = F.relu(h, True)
        elif self.form == "method":
            y = h.relu_()
        elif self.form == "torch_function":
            y = torch.relu_(h)
        elif self.form == "add_":
            y = h.add_(other)
        elif self.form == "mul_":
            y = h.mul_(other)
        else:
            h += other
            y = h
        return (y * other).mean((2, 3))


@pytest.mark.parametrize("form", ["module", "functional", "functional_positional", "method", "torch_function",
                                  "add_", "mul_", "iadd"])
def test_every_inplace_form_is_made_out_of_place(form):
    x = smooth_image(b=1, h=12, w=12)
    model = InPlace(form).double().eval()
    gm = ll.trace(model, x)
    assert not any(n.kwargs.get("inplace") for n in gm.graph.nodes)
    assert not any(n.op == "call_method" and n.target.endswith("_") for n in gm.graph.nodes)
    if form == "module":
        assert not gm.get_submodule("act").inplace and model.act.inplace  # the copy, not the model
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    a = ll.attribute(gm, x, "translate_x", output="logits", scheme="spectral")
    assert a.nodes.set_index("node").loc["mul", "local_norm"] < 1e-12  # its stored value is 2 x
    assert a.residual < TOL[torch.float64]


def test_inplace_ops_that_cannot_be_rewritten_are_errors():
    class NoTwin(nn.Module):
        def forward(self, x):
            h = x * 2
            h.zero_()
            return h.mean((2, 3))

    with pytest.raises(ll.TraceError, match=r"node %zero_ .* modifies a tensor in place and has no out-of-place "
                                            r"twin; write it out of place"):
        ll.trace(NoTwin())

    class IntoAView(nn.Module):
        def forward(self, x):
            v = x.view(x.shape[0], -1)
            v.relu_()
            return x.mean((2, 3)) + v.mean(-1, keepdim=True)

    with pytest.raises(ll.TraceError, match=r"writes in place into view, which shares memory with x, read afterwards"):
        ll.trace(IntoAView())

    class ViewedBefore(nn.Module):
        def forward(self, x):
            h = x * 2
            v = h[:, :1]
            h.relu_()
            return (h + v).mean((2, 3))

    with pytest.raises(ll.TraceError, match=r"writes in place into mul, which shares memory with getitem, read"):
        ll.trace(ViewedBefore())

    class Aliased(nn.Module):  # fx records x += y as x + y: the alias keeps the old value
        def forward(self, x):
            h = x * 2
            alias = h
            h += 1
            return (h + alias).mean((2, 3))

    with pytest.raises(ll.TraceError, match=r"does not reproduce the model's output .*x \+= y on a tensor"):
        ll.trace(Aliased().eval(), torch.randn(1, 3, 8, 8))


# --- the model contract ----------------------------------------------------------------------

VIT = ("vit_tiny_patch16_224", (("img_size", 32), ("depth", 2)))


@pytest.mark.parametrize("spec", ["resnet18", VIT], ids=["resnet18", "vit_tiny"])
def test_trace_and_antialias_return_logits_and_lee_of_the_variant_is_what_ablate_reports(spec):
    name, kwargs = (spec, ()) if isinstance(spec, str) else spec
    model = timm_model(name, **dict(kwargs))
    x = small_photo(model, 32)
    with torch.no_grad():
        logits = model(x)
        gm = ll.trace(model, x)
        assert torch.allclose(gm(x), logits, rtol=RTOL["regrouped"], atol=ATOL["traced"])
        m2 = ll.antialias(model)
        new = m2(x)
    assert new.shape == logits.shape and not torch.allclose(new.sum(-1), torch.ones(1))  # logits, not probabilities
    with torch.no_grad():
        same = ll.antialias(model, filter_size=1)(x)  # one tap: the blur is the identity
    assert torch.allclose(same, logits, rtol=RTOL["regrouped"], atol=ATOL["logits"])
    ab = ll.ablate(model, x, variants=["blurpool"], groups=["translate_x"], estimator="shares").table
    lees = ab.set_index("variant")["lee_translate_x"]
    assert float(ll.lee(m2, x, "translate_x")["lee"].mean()) == pytest.approx(lees["blurpool"], rel=1e-5)
    assert float(ll.lee(model, x, "translate_x")["lee"].mean()) == pytest.approx(lees["original"], rel=1e-5)


def test_the_softmax_stays_a_named_output():
    model = timm_model("resnet18")
    x = small_photo(model, 32)
    gm = ll.trace(model)
    assert gm.meta["layerlie.outputs"] == {"logits": "fc"}
    probs, name = ll.with_output(gm, "softmax")
    assert probs.meta["layerlie.outputs"] == {"logits": "fc", "softmax": name}
    assert gm.meta["layerlie.outputs"] == {"logits": "fc"}  # gm itself is left alone
    with torch.no_grad():
        assert torch.allclose(probs(x), model(x).softmax(-1), atol=ATOL["traced"])
        assert torch.allclose(gm(x), model(x), atol=ATOL["traced"])
    assert all(probs.get_parameter(k) is p for k, p in gm.named_parameters())  # shared, not copied
    a = ll.attribute(gm, x, "translate_x", output="softmax", estimator="shares")
    b = ll.attribute(probs, x, "translate_x", output="softmax", estimator="shares")
    assert torch.allclose(a.total, b.total)
    with pytest.raises(ll.LayerlieError, match="does not name its logits node; trace the model with layerlie.trace"):
        ll.with_output(torch.fx.symbolic_trace(nn.Flatten()), "softmax")


def test_filtered_activations_without_example_use_the_models_input_size():
    name, kwargs = VIT
    model = timm_model(name, **dict(kwargs))
    x = small_photo(model, 32)
    implicit = ll.antialias(model, blurpool=False, activations="filtered")
    explicit = ll.antialias(model, blurpool=False, activations="filtered", x=x)
    assert implicit.meta["layerlie.surgery"].keys() == explicit.meta["layerlie.surgery"].keys()
    assert len(implicit.meta["layerlie.surgery"]) == 2  # the GELU of each block
    with torch.no_grad():
        assert torch.allclose(implicit(x), explicit(x))
    resnet = ll.antialias(ll.trace(timm_model("resnet18")), blurpool=False, activations="filtered")
    assert len(resnet.meta["layerlie.surgery"]) == 17  # a GraphModule from trace knows the size too
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with pytest.raises(ll.LayerlieError, match=r"^activations='filtered' needs x= .*Sequential does not state "
                                               r"its input size$"):
        ll.antialias(plain, activations="filtered")


# --- each estimator's check can fail ----------------------------------------------------------

def conv_relu_net() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, padding=1, stride=2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten()).double().eval()


@pytest.fixture
def wrong_relu_rule():
    """The ReLU's linearization rule scaled by 0.9, restored afterwards."""
    targets = [nn.ReLU, F.relu, torch.relu, "relu"]
    saved = {t: ll.get_rule(t) for t in targets}
    right = saved[nn.ReLU]
    ll.register_rule(*targets)(lambda call, tangents: 0.9 * right(call, tangents))
    yield
    for t, rule in saved.items():
        ll.register_rule(t)(rule)


def checks(x: torch.Tensor) -> dict[str, ll.Attribution]:
    return {e: ll.attribute(conv_relu_net(), x, "rotate", estimator=e, samples=20) for e in ll.list_estimators()}


def test_each_estimator_reports_its_own_check():
    a = checks(smooth_image(b=1, h=12, w=12))
    assert a["exact"].check == "completeness residual" and a["exact"].residual < TOL[torch.float64]
    assert a["shares"].check == "share-sum residual" and a["shares"].residual < TOL[torch.float64]
    assert a["hutchinson"].check == "not checkable" and math.isnan(a["hutchinson"].residual)
    assert "not checkable" in a["hutchinson"].summary() and "share-sum residual (relative)" in a["shares"].summary()
    assert a["exact"].defects.keys() == a["shares"].defects.keys() and "_1" in a["exact"].defects


def test_a_wrong_linearization_rule_fails_the_exact_and_the_shares_checks(wrong_relu_rule):
    a = checks(smooth_image(b=1, h=12, w=12))
    assert a["exact"].residual > 1e-3 and a["shares"].residual > 1e-3
    assert math.isnan(a["hutchinson"].residual)


# --- the global random state ------------------------------------------------------------------

def test_no_public_function_changes_the_global_random_state():
    model = timm_model("resnet18")
    x = small_photo(model, 32)
    gm = ll.trace(model, x)
    state = torch.get_rng_state()
    ll.lee(model, x, "translate_x")
    for estimator in ll.list_estimators():
        ll.attribute(gm, x, "translate_x", estimator=estimator, samples=3)
    ll.attribute(model, x, "translate_x", estimator="hutchinson", samples=3, granularity="module")
    ll.aliasing(gm, x)
    ll.antialias(model, activations="filtered", aps=True, x=x)
    ll.ablate(gm, x, variants=["blurpool"], groups=["translate_x"], estimator="shares")
    assert torch.equal(torch.get_rng_state(), state)


def test_the_probes_are_seeded():
    x = smooth_image(b=1, h=12, w=12)
    a, b, c = (ll.attribute(conv_relu_net(), x, "rotate", estimator="hutchinson", samples=5, seed=s).nodes
               for s in (0, 0, 1))
    assert a["contribution_norm"].equals(b["contribution_norm"])
    assert not a["contribution_norm"].equals(c["contribution_norm"])
