"""The end-to-end Lie derivative: references (finite differences, the published pipeline),
invariants (equivariant and invariant maps give zero), and estimators that must agree."""

from __future__ import annotations

import pytest
import torch
from test_groups_tangent import PUBLISHED_THETA, double_backward_derivative, published_transform
from torch import nn

import layerlie as ll
from layerlie.testing import TOL, rel, small_cnn, smooth_image, timm_model


@pytest.mark.parametrize("name", ll.list_groups())
def test_lie_derivative_equals_finite_difference_of_the_finite_transform(name):
    g = ll.group(name)
    f = small_cnn()
    x = smooth_image(h=20, w=26)
    with torch.no_grad():
        d = ll.lie_derivative(f, x, g)
        errors = [rel((f(g.transform(x, e)) - f(g.transform(x, -e))) / (2 * e), d) for e in (1e-3, 1e-4, 1e-5)]
    assert errors[-1] < 2e-3 and errors[-1] <= errors[0] + 1e-9, errors


def test_image_output_subtracts_the_output_tangent():
    """For an image-to-image map, L f = J[G x] - G f(x), checked against the finite
    difference of T_-eps f(T_eps x) (docs/method.md §2)."""
    torch.manual_seed(0)
    f = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh()).double().eval()
    x = smooth_image(h=24, w=24)
    g = ll.group("rotate")
    with torch.no_grad():
        d = ll.lie_derivative(f, x, g)
        eps = 1e-5
        fd = (g.transform(f(g.transform(x, eps)), -eps) - g.transform(f(g.transform(x, -eps)), eps)) / (2 * eps)
    assert rel(fd, d) < 1e-3


def test_several_groups_share_one_pass_and_match_single_calls():
    f = small_cnn()
    x = smooth_image()
    stacked = ll.lie_derivative(f, x, ["translate_x", "rotate", "saturate"])
    for k, name in enumerate(["translate_x", "rotate", "saturate"]):
        assert rel(stacked[k], ll.lie_derivative(f, x, name)) < TOL[torch.float64]


def test_double_backward_baseline_equals_jvp():
    f = small_cnn()
    x = smooth_image()
    a = ll.lie_derivative(f, x, ["scale", "shear_x"], method="double_backward")
    b = ll.lie_derivative(f, x, ["scale", "shear_x"])
    assert rel(a, b) < TOL[torch.float64]


# --- the published pipeline ---------------------------------------------------------------

def _published_lie_derivative(model, x, name):
    """The published end-to-end computation: softmax(model(published_transform(x, t))),
    differentiated at t = 0 with double backward."""
    return double_backward_derivative(
        lambda t: model(published_transform(x, PUBLISHED_THETA[name](t)[None])).softmax(-1))


@pytest.mark.parametrize("name", list(PUBLISHED_THETA))
def test_published_scheme_reproduces_the_published_pipeline(name):
    model = timm_model("resnet18")
    x = ll.photos(model, n=2)[..., ::2, ::2].contiguous()
    expected = _published_lie_derivative(model, x, name)
    got = ll.lie_derivative(lambda z: model(z).softmax(-1), x, name, scheme="published")
    assert rel(got, expected) < 0.01
    db = ll.lie_derivative(lambda z: model(z).softmax(-1), x, name, scheme="published", method="double_backward")
    assert rel(got, db) < 1e-5


def test_published_translation_differs_from_central_on_a_cnn():
    """docs/method.md §1: the one-sided published derivative disagrees with the central one."""
    model = timm_model("resnet18")
    x = ll.photos(model, n=2)[..., ::2, ::2].contiguous()
    def f(z):
        return model(z).softmax(-1)

    pub = ll.lie_derivative(f, x, "translate_x", scheme="published")
    cen = ll.lie_derivative(f, x, "translate_x")
    assert rel(pub, cen) > 0.2


# --- invariant maps give zero ---------------------------------------------------------------

def test_spatial_mean_is_translation_invariant_with_the_spectral_scheme():
    x = torch.randn(3, 3, 16, 20)
    def f(z):
        return torch.tanh(z.mean(dim=(2, 3)) @ torch.ones(3, 4))

    for name in ("translate_x", "translate_y"):
        d = ll.lie_derivative(f, x, name, scheme="spectral")
        assert d.abs().max() < 1e-6


def test_function_of_the_colour_moments_is_translation_invariant():
    """Any function of the channel second-moment matrix sum_p h_c h_d is translation
    invariant exactly: central and spectral differences are antisymmetric operators."""
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(9, 16), nn.GELU(), nn.Linear(16, 4)).double()

    def f(z):
        flat = z.flatten(2)
        return head((flat @ flat.transpose(1, 2)).flatten(1) / flat.shape[-1])

    x = torch.randn(2, 3, 14, 18, dtype=torch.float64)
    for scheme in ("central", "spectral"):
        d = ll.lie_derivative(f, x, ["translate_x", "translate_y"], scheme=scheme)
        assert d.abs().max() < 1e-12
    # v_x constant along x and v_y along y (rotation, shear) keeps G antisymmetric too;
    # scaling does not, and it changes the moments.
    assert ll.lie_derivative(f, x, "rotate").abs().max() < 1e-12
    assert ll.lie_derivative(f, x, "scale").abs().max() > 1e-3


def test_saturate_invariant_function_gives_zero():
    f = small_cnn()
    x = smooth_image()
    def normalized(z):
        return f(z / z.flatten(1).norm(dim=1)[:, None, None, None])

    assert ll.lie_derivative(normalized, x, "saturate").abs().max() < 1e-12
    assert ll.lie_derivative(f, x, "saturate").abs().max() > 1e-3


def test_custom_group_equal_to_a_builtin_gives_the_same_numbers():
    model = timm_model("resnet18")
    x = ll.photos(model, n=2)[..., ::2, ::2].contiguous()
    mine = [ll.Group.affine("my_shear", [[0, 1, 0], [0, 0, 0]]), ll.Group.channel("my_sat", torch.eye(3))]
    a = ll.lee(model, x, mine)
    b = ll.lee(model, x, ["shear_x", "saturate"])
    assert a["lee"].tolist() == b["lee"].tolist()


# --- the published metric on timm models -----------------------------------------------------

def test_lee_table_shape_and_values():
    model = timm_model("resnet18")
    x = ll.photos(model, n=2)
    table = ll.lee(model, x, names=["a", "b"])
    assert list(table.columns) == ["image", "group", "lee"]
    assert len(table) == 2 * 10 and set(table["image"]) == {"a", "b"}
    d = ll.lie_derivative(lambda z: model(z).softmax(-1), x, "rotate")
    assert table.query("group == 'rotate' and image == 'b'")["lee"].item() == pytest.approx(
        float(d[1].abs().mean()), rel=1e-6)
    stats = ll.summarize(table)
    assert list(stats.index) == [g.name for g in ll.resolve_groups("all")]


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "vit_tiny_patch16_224"])
def test_models_where_double_backward_fails_work_in_forward_mode(name):
    """hardsigmoid_backward and CPU flash attention's backward have no derivative, so the
    published trick fails; forward mode needs neither."""
    model = timm_model(name)
    x = ll.photos(model, n=1)
    table = ll.lee(model, x, "translate_x,rotate")
    assert torch.isfinite(torch.tensor(table["lee"].values)).all()
    fused = [m for m in model.modules() if getattr(m, "fused_attn", None) is not None]
    assert all(m.fused_attn for m in fused)  # restored after the computation
    if name.startswith("mobilenetv3"):
        with pytest.raises(ll.LayerlieError, match="method='jvp'"):
            ll.lee(model, x, "translate_x", method="double_backward")


def test_bad_inputs_are_rejected_with_a_clear_message():
    f = small_cnn()
    with pytest.raises(ll.LayerlieError, match="x\\[None\\]"):
        ll.lie_derivative(f, torch.randn(3, 8, 8), "rotate")
    with pytest.raises(ll.LayerlieError, match="floating-point"):
        ll.lie_derivative(f, torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "rotate")
    bad = torch.randn(1, 3, 8, 8)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ll.LayerlieError, match="NaN or inf"):
        ll.lie_derivative(f, bad, "rotate")
    with pytest.raises(ll.LayerlieError, match="model output contains NaN"):
        ll.lie_derivative(lambda z: z.mean((2, 3)) / 0 * 0, torch.randn(1, 3, 8, 8), "rotate")
    with pytest.raises(ll.LayerlieError, match="valid methods"):
        ll.lie_derivative(f, smooth_image(), "rotate", method="hessian")
    model = timm_model("resnet18")
    with pytest.raises(ll.LayerlieError, match="expects 3 input channels"):
        ll.lee(model, torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("memory_budget", [float("inf"), 1.0])
def test_replayed_passes_equal_lee(memory_budget):
    """The passes planned once (``lee_passes``, tangents included) and replayed (``replay_lee``)
    give ``lee``'s numbers, when the plan cuts the images and groups into one pass each (a
    budget of one byte) and with a group whose base point is not the images (a compatibility map,
    hence the published scheme)."""
    from layerlie.core.engine import coarsest
    from layerlie.measure.lie import lee_passes, replay_lee

    model = small_cnn()
    x = smooth_image(b=3, h=20, w=20)
    groups = ll.resolve_groups(["translate_x", "stretch_x_published", "rotate"])

    def probabilities(z):
        return model(z).softmax(-1)

    passes = lee_passes(probabilities, x, groups, scheme="published", memory_budget=memory_budget)
    assert len(passes) == (2 if memory_budget == float("inf") else 9)  # one per base point; one per image and group
    got = replay_lee(coarsest(probabilities), passes)
    want = ll.lee(model, x, groups, scheme="published", memory_budget=memory_budget)
    assert got.shape == (len(groups), len(x))
    want = torch.tensor(want["lee"].values, dtype=got.dtype)
    assert rel(got.flatten(), want) < TOL[torch.float64]
    # injected fault: tangents that are not the images' (mirrored) are caught by the same comparison
    wrong = replay_lee(coarsest(probabilities), [p._replace(tangents=p.tangents.flip(-1)) for p in passes])
    assert rel(wrong.flatten(), want) > 1e-2


def test_a_lambda_over_a_model_in_training_mode_is_one_line_naming_eval():
    """The README's ``lie_derivative(lambda z: model(z).softmax(-1), ...)`` on a raw
    ``timm.create_model`` model, which is in training mode: its batch norms update their
    statistics in place inside the jvp. One line that names the fix (a lambda is the user's
    code: layerlie cannot switch the model inside it to eval mode, as it does for a model)."""
    import timm

    model = timm.create_model("resnet10t", pretrained=False)
    x = ll.photos(model, n=2, size=64)
    with pytest.raises(ll.LayerlieError, match=r"in place .*call model\.eval\(\) first") as err:
        ll.lie_derivative(lambda z: model(z).softmax(-1), x, ll.group("rotate"))
    assert "\n" not in str(err.value)
    assert model.training
    model.eval()  # the fix the error names
    assert torch.isfinite(ll.lie_derivative(lambda z: model(z).softmax(-1), x, ll.group("rotate"))).all()
