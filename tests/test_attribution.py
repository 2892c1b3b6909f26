"""Attribution: completeness, estimators against each other and a brute force, the facts
of docs/method.md §3, and receptive-field coordinates (docs/method.md §5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layerlie as ll
from layerlie.testing import ESTIMATOR_TOL, TOL, rel, smooth_image, timm_model

GROUPS = ["translate_x", "rotate", "scale", "shear_y", "hyperbolic_rotate", "saturate"]


def small_input(model, size: int = 64, n: int = 2) -> torch.Tensor:
    return F.interpolate(ll.photos(model, n=n), size=(size, size), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("group", GROUPS + ["custom"])
def test_completeness_on_resnet18(group):
    model = timm_model("resnet18")
    g = ll.Group.affine("tilt", [[0.2, 1, 0.1], [0, -0.3, 0]]) if group == "custom" else group
    a = ll.attribute(model, small_input(model), g)
    assert not a.degenerate and a.residual <= TOL[torch.float32]
    assert a.nodes["share"].sum() == pytest.approx(1.0, abs=1e-3)
    layouts = a.nodes.set_index("node")["layout"]
    assert "unknown" not in set(layouts) and layouts["global_pool_pool"] == "none"


@pytest.mark.parametrize("group", ["translate_x", "rotate"])
def test_completeness_on_a_vit_with_a_class_token(group):
    model = timm_model("vit_tiny_patch16_224", img_size=64)
    a = ll.attribute(model, small_input(model), group)
    assert a.residual <= TOL[torch.float32]
    layouts = set(a.nodes["layout"])
    assert "tokens(dim=1,P=1,4x4)" in layouts and "unknown" not in layouts
    assert "pair(q=dim2,P=1,4x4; k=dim3,P=1,4x4)" in layouts  # q @ k^T: G acts on both token axes


def test_completeness_in_float64_and_with_the_published_coordinates():
    model = ll.load_model("resnet18", dtype=torch.float64)
    x = small_input(model, 48, 1)
    a = ll.attribute(model, x, "rotate", scheme="spectral")
    assert a.residual <= TOL[torch.float64]
    b = ll.attribute(model, x, "rotate", coords="published")
    assert b.residual <= TOL[torch.float64]


def tiny_cnn(act: bool, padding_mode: str = "circular") -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 6, 3, padding=1, padding_mode=padding_mode), nn.BatchNorm2d(6)]
    if act:
        layers.append(nn.ReLU())
    layers += [nn.Conv2d(6, 4, 3, padding=1, padding_mode=padding_mode), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(4, 5)]
    net = nn.Sequential(*layers).double().eval()
    with torch.no_grad():  # a non-trivial eval BatchNorm
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    return net


def test_equivariant_toy_network_has_zero_contributions_and_one_relu_carries_all():
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    a = ll.attribute(tiny_cnn(act=False), x, "translate_x", scheme="spectral", output="logits")
    assert float(a.total.abs().max()) < 1e-12
    assert a.nodes["local_norm"].max() < 1e-10
    b = ll.attribute(tiny_cnn(act=True), x, "translate_x", scheme="spectral", output="logits")
    nonzero = b.nodes[b.nodes["local_norm"] > 1e-10]
    assert list(nonzero["node"]) == ["_2"]  # the ReLU, module index 2 of the Sequential
    assert nonzero["share"].item() == pytest.approx(1.0, abs=1e-9) and b.residual < TOL[torch.float64]


def test_facts_of_method_3():
    x = smooth_image(h=12, w=12)
    zero_pad = ll.attribute(tiny_cnn(act=False, padding_mode="zeros"), x, "translate_x", scheme="spectral",
                            output="logits")
    d = ll.attribute(tiny_cnn(act=False, padding_mode="zeros"), x, "translate_x", estimator="shares",
                     output="logits")
    e_conv = d.defects["_0"]
    interior = e_conv[..., 2:-2, 2:-2].abs().max()
    assert interior < 1e-12 < e_conv.abs().max()  # border-only for a zero-padded conv
    assert zero_pad.nodes.set_index("node").loc["_1", "local_norm"] < 1e-12  # eval BatchNorm

    torch.manual_seed(1)
    conv1, conv2 = nn.Conv2d(3, 4, 3, padding=1).double(), nn.Conv2d(3, 4, 3, padding=1, stride=2).double()
    conv2.load_state_dict(conv1.state_dict())
    img = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    norms = []
    for conv in (conv1, conv2):
        a = ll.attribute(nn.Sequential(conv, nn.Flatten()).eval(), img, "rotate", output="logits")
        norms.append(a.nodes.set_index("node").loc["_0", "local_norm"])
    assert norms[1] > norms[0]


def test_an_affine_offset_has_a_border_only_defect_under_the_zero_padded_scheme():
    """docs/method.md §3 says a pointwise affine op has ``e_v = 0`` exactly. That holds for a linear op, and
    for an offset under a periodic scheme (above); with ``central``'s zeros beyond the border, the
    offset ``c`` of an eval BatchNorm is content that the motion brings in from outside, so its
    defect is ``-v c / 2`` on the first and last columns (translate_x) and zero inside."""
    x = smooth_image(b=1, h=10, w=12)
    net = tiny_cnn(act=False)
    e = ll.attribute(net, x, "translate_x", estimator="shares", output="logits").defects["_1"]
    bn = net[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    offset = (bn.bias - bn.running_mean * scale).detach()
    v = 2 / (x.shape[-1] - 1)  # translate_x moves u_x at unit speed; one pixel is 2 / (W - 1)
    border = torch.zeros_like(e)
    border[..., 0] = -offset.view(-1, 1) / (2 * v)
    border[..., -1] = offset.view(-1, 1) / (2 * v)
    assert offset.abs().min() > 0.01 and float((e - border).abs().max()) < 1e-9
    with torch.no_grad():
        bn.bias.copy_(bn.running_mean * scale)  # no offset: a linear map, exactly no defect
    e = ll.attribute(net, x, "translate_x", estimator="shares", output="logits").defects.get("_1")
    assert e is None or float(e.abs().max()) < 1e-12


def test_exact_equals_brute_force_and_shares_and_hutchinson_agree():
    model = tiny_cnn(act=True, padding_mode="zeros")
    x = smooth_image(h=10, w=10)
    gm, _ = ll.with_output(ll.trace(model), "softmax")  # what attribute differentiates by default
    exact = ll.attribute(gm, x, "rotate")
    e_relu = exact.defects["_2"]
    eps = 1e-6

    class Perturb(torch.fx.Interpreter):
        def __init__(self, sign):
            super().__init__(gm)
            self.sign = sign

        def run_node(self, n):
            out = super().run_node(n)
            return out + self.sign * eps * e_relu if n.name == "_2" else out

    with torch.no_grad():
        brute = (Perturb(1).run(x) - Perturb(-1).run(x)) / (2 * eps)
    row = exact.nodes.set_index("node").loc["_2"]
    assert row["contribution_norm"] == pytest.approx(float(brute.norm()), rel=1e-6)

    shares = ll.attribute(gm, x, "rotate", estimator="shares")
    both = exact.nodes.set_index("node")["share"].fillna(0)
    assert (both - shares.nodes.set_index("node")["share"].fillna(0)).abs().max() < 1e-9

    hutch = ll.attribute(gm, x, "rotate", estimator="hutchinson", samples=400)
    h = hutch.nodes.set_index("node")
    for node, value in exact.nodes.set_index("node")["contribution_norm"].items():
        if value > 0:
            assert abs(h.loc[node, "contribution_norm"] - value) <= 3 * h.loc[node, "stderr"] + 1e-12


def test_receptive_field_positions_make_a_pooled_ramp_defect_free():
    """A 2x2 stride-2 average pool of a ramp a x + b y is the same ramp sampled at the
    receptive-field centres: zero local defect in the interior for every affine group."""
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    ramp = (0.3 * xx - 0.7 * yy).double().expand(1, 1, 16, 16).contiguous()
    net = nn.Sequential(nn.AvgPool2d(2, 2), nn.Flatten()).eval()
    gm = ll.trace(net)
    for name in [g for g in ll.list_groups() if ll.group(g).spatial]:
        rf, pub = (ll.attribute(gm, ramp, name, estimator="shares", output="logits", coords=coords).defects
                   for coords in ("receptive_field", "published"))
        zero = torch.zeros(1, 1, 3, 3, dtype=ramp.dtype)
        e_rf = rf.get("_0", zero)[..., 1:-1, 1:-1]
        e_pub = pub.get("_0", zero)[..., 1:-1, 1:-1]
        assert e_rf.abs().max() < 1e-5, name
        if name in ("translate_x", "translate_y"):
            # [-1, 1] per tensor moves the 8-sample grid 15/14 times as far as the input:
            # a spurious defect at the resolution change (for a ramp, the linear fields
            # of rotation, scale and shear happen to cancel it).
            assert e_pub.abs().max() > 1e-2, name


def test_bad_input():
    model = timm_model("resnet18")
    x = small_input(model, 32, 1)
    with pytest.raises(ll.LayerlieError, match="unknown estimator .lrp.; valid estimators: exact, hutchinson, shares"):
        ll.attribute(model, x, "rotate", estimator="lrp")
    with pytest.raises(ll.LayerlieError, match="not a node"):
        ll.attribute(model, x, "rotate", output="nowhere")
    with pytest.raises(ll.LayerlieError, match="no batch axis"):
        ll.attribute(nn.Sequential(nn.Flatten(0)).eval(), x, "rotate", output="logits")
    with pytest.raises(ll.LayerlieError, match="compatibility map"):
        ll.attribute(model, x, "stretch_x_published")
    with pytest.raises(ll.LayerlieError, match="too small for one source"):
        ll.attribute(model, x, "rotate", memory_budget=1000)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x.mean((2, 3))
        return x.amax((2, 3))


def test_untraceable_model_without_leaf_modules_says_why():
    with pytest.warns(UserWarning, match="cannot trace Branchy"), \
            pytest.raises(ll.LayerlieError, match="no leaf modules to hook"):
        ll.attribute(Branchy().eval(), torch.randn(1, 3, 8, 8), "rotate")


class BranchyNet(nn.Module):
    """Untraceable (data-dependent control flow) but made of leaf modules, with glue between
    them: a functional GELU, a strided slice and a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.c2, self.bn = nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = self.act(self.c1(x))
        if h.sum() > 0:
            h = 2 * h
        h = self.bn(self.c2(h)) + F.gelu(self.act(h)[..., ::2, ::2])
        return self.fc(self.act(h).mean((2, 3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fallback_hooks_are_complete_and_match_the_end_to_end_derivative(dtype):
    torch.manual_seed(0)
    model = BranchyNet().eval().to(dtype)
    x = torch.randn(2, 3, 16, 16, dtype=dtype)
    with pytest.warns(UserWarning, match="cannot trace BranchyNet.*forward hooks"):
        a = ll.attribute(model, x, "rotate")
    assert a.settings["granularity"] == "module"
    assert a.residual <= TOL[dtype]
    want = ll.lie_derivative(lambda z: model(z).softmax(-1), x, ll.group("rotate"))
    assert rel(a.total, want) <= TOL[dtype]
    n = a.nodes.set_index("node")
    assert n.loc["bn", "local_norm"] <= TOL[dtype] * n.loc["c2", "local_norm"]  # eval BN: e = 0
    assert n.loc["act#2:in0", "local_norm"] > 0  # the glue (GELU, slice, add) has a defect
    shares = ll.attribute(model, x, "rotate", estimator="shares", granularity="module").nodes["share"]
    assert torch.allclose(torch.tensor(shares.to_numpy()), torch.tensor(n["share"].to_numpy()),
                          atol=ESTIMATOR_TOL["shares"][dtype])
    assert abs(shares.sum() - 1) <= ESTIMATOR_TOL["shares"][dtype]


def test_fallback_on_a_traceable_model_gives_the_graph_total():
    model = timm_model("resnet18")
    x = ll.photos(model, n=1)[..., ::4, ::4]
    graph = ll.attribute(model, x, "translate_x", output="logits")
    hooks = ll.attribute(model, x, "translate_x", output="logits", granularity="module")
    assert rel(hooks.total, graph.total) <= TOL[torch.float32]
    assert hooks.residual <= TOL[torch.float32]
    calls = [(a.nodes["op"] == "call_module").sum() for a in (hooks, graph)]
    assert calls[0] == calls[1]  # one site per leaf-module call, as in the graph
    assert hooks.nodes["layer_type"].iloc[-1] == "output" and "attention" not in set(hooks.nodes["layer_type"])
    with pytest.raises(ll.LayerlieError, match="needs a graph"):
        ll.attribute(model, x, "translate_x", output="layer1", granularity="module")


def test_reused_module_is_one_node_per_call_and_plot_and_summary(tmp_path):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x))).mean((2, 3))

    torch.manual_seed(0)
    a = ll.attribute(Twice().double().eval(), smooth_image(), "rotate", output="logits")
    assert list(a.nodes["node"]).count("conv") == 1 and "conv_1" in set(a.nodes["node"])
    assert a.residual < TOL[torch.float64]
    assert "completeness residual" in a.summary()
    a.plot().savefig(tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 1000


def test_total_equals_the_end_to_end_lie_derivative():
    model = timm_model("resnet18")
    x = small_input(model)
    a = ll.attribute(model, x, "scale")
    assert rel(a.total, ll.lie_derivative(lambda z: model(z).softmax(-1), x, "scale")) < 1e-5


def test_resnet_d_shortcut_lists_the_position_mismatch_and_its_add_carries_it():
    model = timm_model("resnet26d")
    x = ll.photos(model, n=1)[..., ::4, ::4]
    a = ll.attribute(model, x, "rotate")
    assert a.residual <= TOL[torch.float32]
    mismatched = a.nodes[a.nodes["position_mismatch"] != ""]
    assert len(mismatched) == 3  # the first block of stages 2-4: avg-pool shortcut vs strided conv
    assert mismatched["position_mismatch"].str.contains("downsample").all()
    assert (mismatched["local_norm"] > 0).all()  # rotation's field differs across half a pixel
    shifted = ll.attribute(model, x, "translate_x").nodes.set_index("node")
    assert (shifted.loc[mismatched["node"], "local_norm"] == 0).all()  # a constant field does not


class Log(nn.Module):
    def forward(self, h):
        return torch.log(h)  # NaN wherever h < 0


class NaNInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.log = nn.Conv2d(3, 4, 3, padding=1), Log()

    def forward(self, x):
        h = self.conv(x)
        if self.training:  # control flow on a Python bool: traceable
            h = h + 1
        return self.log(h).mean((2, 3))


class NaNInsideUntraceable(NaNInside):
    def forward(self, x):
        h = self.conv(x)
        if h.sum() > -1e9:  # data-dependent: fx cannot trace it
            h = h - 1
        return self.log(h).mean((2, 3))


def test_nan_in_an_intermediate_tensor_names_the_first_node():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(ll.LayerlieError, match=r"NaN or inf first appears at node %log .*dtype=torch.float64") as err:
        ll.attribute(NaNInside().eval(), x, "rotate", output="logits")
    assert "\n" not in str(err.value)  # one line: fx's note on the failing node is left off
    with pytest.warns(UserWarning, match="forward hooks"), \
            pytest.raises(ll.LayerlieError, match=r"NaN or inf first appears at log \(module log\)"):
        ll.attribute(NaNInsideUntraceable().eval(), x, "rotate", output="logits")


@pytest.mark.parametrize("estimator", ["exact", "shares"])
def test_repr_is_one_short_line_with_the_settings_check_and_top_nodes(estimator):
    model = timm_model("resnet18")
    a = ll.attribute(model, small_input(model, 32, 1), "rotate", estimator=estimator)
    text = repr(a)
    assert str(a) == text and "\n" not in text and "tensor" not in text and len(text) < 400
    key = "share" if estimator == "shares" else "contribution_norm"
    top = a.nodes.loc[a.nodes[key].abs().idxmax()]
    assert text.startswith(f"Attribution(model='ResNet', group='rotate', scheme='central', estimator='{estimator}', "
                           f"nodes={len(a.nodes)}, {a.check_line()}, top by ")
    assert f"{top.node} ({top.layer_type}) {top[key]:.3g}" in text
