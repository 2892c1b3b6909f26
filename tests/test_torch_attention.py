"""torch's own attention: ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``, in
the models a researcher writes and in torchvision's ViT (METHOD 2, 4, 5).

- references: the explicit ops that tracing writes equal torch's kernels for every mask form;
  ``lee`` in forward mode equals finite differences and the double-backward baseline, and
  ``lee`` of the traced graph equals ``lee`` of the model;
- completeness: the exact residual at float32 precision, the shares summing to one, Hutchinson
  running, after ``antialias`` and in ``ablate`` too;
- layouts: the attention map is a node with a pair layout, no tensor is left unknown, and the
  attention row of the table carries a share;
- the caller's settings (SDPA backends, the fast path) are the same afterwards, and what is not
  supported is a one-line error.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import TOL, rel, smooth_image
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import layerlie as ll
from layerlie import attention
from layerlie.layout import unknown_layouts
from layerlie.trace import TraceError

GROUPS = ["translate_x", "rotate"]


class MhaViT(nn.Module):
    """A one-block ViT on ``nn.MultiheadAttention``: patch embedding, class token, position
    embedding, pre-norm attention and MLP, a head on the mean of the tokens. ``mask``: None, ``"bool"``
    (a local window as ``attn_mask`` and the last key padded out), or ``"float"`` (an additive
    mask with ``-inf`` entries)."""

    def __init__(self, need_weights: bool = False, batch_first: bool = True, mask: str | None = None,
                 dim: int = 16, heads: int = 2, patch: int = 8, size: int = 32) -> None:
        super().__init__()
        n = (size // patch) ** 2 + 1
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, 5)
        self.need_weights, self.batch_first, self.mask = need_weights, batch_first, mask
        far = torch.cdist(torch.arange(n)[:, None].float(), torch.arange(n)[:, None].float()) > 6
        self.register_buffer("far", far)  # True: masked out (nn.MultiheadAttention's convention)
        self.register_buffer("pad", torch.arange(n)[None] == n - 1)
        self.register_buffer("additive", torch.zeros(n, n).masked_fill(far, float("-inf")) + 0.1 * torch.randn(n, n))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        pad = self.pad.expand(h.shape[:1] + self.far.shape[1:])  # (batch, keys)
        masks = {"bool": dict(attn_mask=self.far, key_padding_mask=pad),
                 "float": dict(attn_mask=self.additive)}.get(self.mask, {})
        h = h if self.batch_first else h.transpose(0, 1)
        out, _ = self.attn(h, h, h, need_weights=self.need_weights, **masks)
        return out if self.batch_first else out.transpose(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        t = t + self.mix(self.norm1(t))
        t = t + self.mlp(self.norm2(t))
        return self.head(t.mean(1))


class SdpaViT(MhaViT):
    """The same ViT with its attention written on ``F.scaled_dot_product_attention``; ``mask``:
    None, ``"bool"`` (True: takes part, SDPA's convention), ``"float"`` (a learned additive bias per
    head, as relative-position biases are passed) or ``"causal"``."""

    def __init__(self, mask: str | None = None, dim: int = 16, heads: int = 2, **kwargs) -> None:
        super().__init__(mask=mask, dim=dim, heads=heads, **kwargs)
        del self.attn
        self.qkv, self.proj, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads
        self.bias = nn.Parameter(0.5 * torch.randn(heads, *self.far.shape))

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        b, n, c = h.shape
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        masks = {"bool": dict(attn_mask=~self.far), "float": dict(attn_mask=self.bias),
                 "causal": dict(is_causal=True)}.get(self.mask, {})
        out = F.scaled_dot_product_attention(q, k, v, **masks)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def torchvision_vit() -> nn.Module:
    """torchvision's ViT at test size. torchvision initializes the head to zero, so a fresh
    model's output, and its Lie derivative, is a constant: the head gets random weights."""
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64)
    nn.init.normal_(model.heads.head.weight)
    return model


MODELS = {
    "mha": lambda: MhaViT(),
    "mha_weights": lambda: MhaViT(need_weights=True),
    "mha_seq_first": lambda: MhaViT(batch_first=False),
    "mha_seq_first_weights": lambda: MhaViT(need_weights=True, batch_first=False),
    "mha_bool_masks": lambda: MhaViT(mask="bool"),
    "mha_float_mask_weights": lambda: MhaViT(need_weights=True, mask="float"),
    "sdpa": lambda: SdpaViT(),
    "sdpa_bool_mask": lambda: SdpaViT(mask="bool"),
    "sdpa_float_mask": lambda: SdpaViT(mask="float"),
    "sdpa_causal": lambda: SdpaViT(mask="causal"),
    "torchvision_vit": torchvision_vit,
}
# forward mode and the baseline: both MultiheadAttention paths, both layouts, SDPA, torchvision
EAGER = ["mha", "mha_weights", "mha_seq_first", "sdpa", "sdpa_bool_mask", "torchvision_vit"]


def build(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().to(dtype).eval()


def images(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return smooth_image(b=2, h=32, w=32, dtype=dtype)


# --- references: explicit ops against torch's kernels ------------------------------------------

def _sdpa_cases() -> dict[str, tuple[tuple[int, int], dict]]:
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(5, 7, generator=g) > 0.4
    keep[2] = False  # a query that keeps no key attends to nothing
    bias = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    return {
        "none": ((5, 7), {}),
        "bool": ((5, 7), dict(attn_mask=keep)),
        "float": ((5, 7), dict(attn_mask=bias)),
        "float_inf": ((5, 7), dict(attn_mask=bias.masked_fill(~keep, float("-inf")))),
        "causal": ((5, 5), dict(is_causal=True)),
        "causal_wide": ((4, 7), dict(is_causal=True)),
        "causal_tall": ((7, 4), dict(is_causal=True)),
        "scale": ((5, 7), dict(scale=0.3)),
    }


@pytest.mark.parametrize("case", list(_sdpa_cases()))
def test_explicit_sdpa_equals_torch(case):
    (n_q, n_k), kwargs = _sdpa_cases()[case]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, n_q, 4, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 3, n_k, 4, generator=g, dtype=torch.float64) for _ in range(2))
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert rel(attention.scaled_dot_product_attention(q, k, v, **kwargs), want) < TOL[torch.float64]


def test_explicit_sdpa_groups_query_heads():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 3, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 6, 3, generator=g, dtype=torch.float64) for _ in range(2))
    want = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert rel(attention.scaled_dot_product_attention(q, k, v, enable_gqa=True), want) < TOL[torch.float64]


MHA_CASES = {
    "self": dict(),
    "self_weights_per_head": dict(forward=dict(average_attn_weights=False)),
    "seq_first": dict(module=dict(batch_first=False)),
    "bool_masks": dict(forward=dict(attn_mask="bool", key_padding_mask="bool")),
    "float_masks": dict(forward=dict(attn_mask="float", key_padding_mask="float")),
    "per_head_mask": dict(forward=dict(attn_mask="bool3")),
    "cross_kdim_vdim": dict(module=dict(kdim=6, vdim=5), cross=True),
    "no_bias": dict(module=dict(bias=False), cross=True),
}


@pytest.mark.parametrize("case", list(MHA_CASES))
@pytest.mark.parametrize("need_weights", [False, True])
def test_explicit_multihead_attention_equals_torch(case, need_weights):
    spec = MHA_CASES[case]
    torch.manual_seed(0)
    options = dict(batch_first=True) | spec.get("module", {})
    mha = nn.MultiheadAttention(8, 2, **options).double().eval()
    b, n_q, n_k = 3, 5, 6
    seq = (lambda n, c: (b, n, c)) if mha.batch_first else (lambda n, c: (n, b, c))
    query = torch.randn(seq(n_q, 8), dtype=torch.float64)
    key, value = (torch.randn(seq(n_k, options.get("kdim", 8)), dtype=torch.float64),
                  torch.randn(seq(n_k, options.get("vdim", 8)), dtype=torch.float64)) if spec.get("cross") \
        else (query, query)
    n_k = key.shape[1 if mha.batch_first else 0]
    far = torch.rand(n_q, n_k) > 0.7
    masks = {"bool": far, "float": torch.randn(n_q, n_k, dtype=torch.float64).masked_fill(far, float("-inf")),
             "bool3": torch.rand(b * 2, n_q, n_k) > 0.7}
    padding = {"bool": torch.arange(n_k).expand(b, -1) == n_k - 1,
               "float": torch.randn(b, n_k, dtype=torch.float64)}
    kwargs = dict(spec.get("forward", {}), need_weights=need_weights)
    if "attn_mask" in kwargs:
        kwargs["attn_mask"] = masks[kwargs["attn_mask"]]
    if "key_padding_mask" in kwargs:
        kwargs["key_padding_mask"] = padding[kwargs["key_padding_mask"]]
    with torch.no_grad():
        want = mha(query, key, value, **kwargs)
        got = attention.ExplicitMultiheadAttention(mha)(query, key, value, **kwargs)
    assert rel(got[0], want[0]) < TOL[torch.float64]
    if need_weights:
        assert rel(got[1], want[1]) < TOL[torch.float64]
    else:
        assert got[1] is None and want[1] is None


def test_traced_models_write_the_attention_as_ops():
    """No SDPA call and no MultiheadAttention is left in the graph; the trace equals the model
    (the trace checks it)."""
    x = images()
    for name in MODELS:
        gm = ll.trace(build(name), x)
        calls = [n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention
                 or n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.MultiheadAttention)]
        assert not calls, (name, calls)


# --- references: forward mode, finite differences, the double-backward baseline -------------

@pytest.mark.parametrize("name", EAGER)
def test_lee_equals_finite_differences_and_double_backward(name):
    """float64. The central difference of the finite transform converges to the Lie derivative
    at first order in eps (bilinear resampling has a kink at t = 0, METHOD 1): each decade of eps
    divides the error by about ten, down to the jvp and not to another value."""
    model, x = build(name, torch.float64), images(torch.float64)
    table = ll.lee(model, x, GROUPS)
    baseline = ll.lee(model, x, GROUPS, method="double_backward")
    assert rel(torch.tensor(baseline["lee"].values), torch.tensor(table["lee"].values)) < TOL[torch.float64]

    def f(z: torch.Tensor) -> torch.Tensor:
        return model(z).softmax(-1)

    for name_g in GROUPS:
        g = ll.group(name_g)
        d = ll.lie_derivative(f, x, g)
        lee = torch.tensor(table[table.group == name_g]["lee"].values, dtype=torch.float64)
        assert rel(d.abs().mean(-1), lee) < TOL[torch.float64]
        with torch.no_grad():
            errors = [rel((f(g.transform(x, e)) - f(g.transform(x, -e))) / (2 * e), d) for e in (1e-4, 1e-5, 1e-6)]
        assert all(b < 0.2 * a for a, b in zip(errors, errors[1:])) and errors[-1] < 1e-4, (name_g, errors)


@pytest.mark.parametrize("name", ["mha_weights", "mha_seq_first", "sdpa_float_mask", "torchvision_vit"])
def test_lee_of_the_traced_graph_equals_lee_of_the_model(name):
    """The explicit ops carry the same derivative as torch's kernels (float64)."""
    model, x = build(name, torch.float64), images(torch.float64)
    traced = ll.lee(ll.trace(model), x, GROUPS)
    assert rel(torch.tensor(traced["lee"].values), torch.tensor(ll.lee(model, x, GROUPS)["lee"].values)) \
        < TOL[torch.float64]


def _attention_settings() -> tuple:
    return (torch.backends.mha.get_fastpath_enabled(), torch.backends.cuda.flash_sdp_enabled(),
            torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled(),
            torch.backends.cuda.cudnn_sdp_enabled())


def test_any_backend_the_caller_chose_works_and_is_restored():
    """With the caller's choice of the flash kernel alone (no forward-mode derivative), ``lee``
    and ``attribute`` run, and the caller's choice and the fast path are in place afterwards."""
    model, x = build("mha"), images()
    before = _attention_settings()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        chosen = _attention_settings()
        table = ll.lee(model, x, GROUPS)
        a = ll.attribute(model, x, "rotate", granularity="module")
        assert _attention_settings() == chosen
    assert _attention_settings() == before and before[0]
    assert torch.isfinite(torch.tensor(table["lee"].values)).all() and a.residual <= TOL[torch.float32]


# --- graph paths: layouts, completeness, shares ----------------------------------------------

def _attention_maps(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.target in ("softmax", attention.masked_softmax)]


@pytest.mark.parametrize("name", list(MODELS))
def test_attention_map_is_a_pair_and_carries_a_share(name):
    model, x = build(name), images()
    gm = ll.trace(model, x)
    layouts = ll.infer_layouts(gm, x)
    maps = _attention_maps(gm)
    assert maps and all(layouts[m].kind == "pair" for m in maps), {m: layouts[m].describe() for m in maps}
    unknown, _ = unknown_layouts(gm, x)
    assert not unknown, [n.format_node() for n in unknown]
    a = ll.attribute(model, x, "rotate")
    assert not a.degenerate and a.residual <= TOL[torch.float32]
    attention_row = a.by_type().loc["attention"]
    assert attention_row["contribution_norm"] > 1e-3 * float(a.total.norm())
    assert set(maps) <= set(a.nodes[a.nodes.layer_type == "attention"]["node"])


@pytest.mark.parametrize("name", ["mha_seq_first_weights", "sdpa_causal", "torchvision_vit"])
def test_shares_and_hutchinson(name):
    model, x = build(name), images()
    shares = ll.attribute(model, x, "rotate", estimator="shares")
    assert shares.residual <= TOL[torch.float32]
    assert shares.by_type().loc["attention", "share"] != 0
    h = ll.attribute(model, x, "rotate", estimator="hutchinson", probes=8, seed=0)
    assert h.residual != h.residual  # not checkable: NaN, never 0
    assert torch.isfinite(torch.tensor(h.nodes["contribution_norm"].values)).all()
    assert h.by_type().loc["attention", "contribution_norm"] > 0


@pytest.mark.slow
def test_antialias_then_lee_and_ablate_on_torchvision_vit():
    model, x = build("torchvision_vit"), images()
    smooth = ll.antialias(model, blurpool=True, example=x)
    assert rel(torch.tensor(ll.lee(smooth, x, GROUPS, method="double_backward")["lee"].values),
               torch.tensor(ll.lee(smooth, x, GROUPS)["lee"].values)) < TOL[torch.float32]
    ab = ll.ablate(model, x, variants=["blurpool", "filtered"])
    assert list(ab.table["variant"]) == ["original", "blurpool", "filtered"]
    assert (ab.table["residual"] <= TOL[torch.float32]).all()
    assert (ab.by_type.loc["attention"] > 0).all()


def test_the_caller_model_is_unchanged():
    model, x = build("mha_weights"), images()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ll.attribute(model, x, "rotate")
    ll.antialias(model, blurpool=True, example=x)
    assert isinstance(model.attn, nn.MultiheadAttention)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# --- what is not supported -------------------------------------------------------------------

class _Unsupported(MhaViT):
    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what
        if what == "add_bias_kv":
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True, add_bias_kv=True)

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        if self.what == "dropout":
            return F.scaled_dot_product_attention(h, h, h, dropout_p=0.1)
        return super().mix(h)


@pytest.mark.parametrize("what, message", [("add_bias_kv", "add_bias_kv=True"), ("dropout", "dropout_p=0.1")])
def test_unsupported_forms_are_one_line_errors(what, message):
    torch.manual_seed(0)
    model = _Unsupported(what).eval()
    with pytest.raises(TraceError, match=message) as err:
        ll.trace(model)
    assert "\n" not in str(err.value)
