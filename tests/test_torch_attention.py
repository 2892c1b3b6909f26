"""torch's own attention: ``F.scaled_dot_product_attention``, ``nn.MultiheadAttention`` (batched
and unbatched) and the ``nn.Transformer`` family, in the models a researcher writes and in
torchvision's ViT (docs/method.md §2, 4, 5).

- references: the explicit ops that tracing writes equal torch's kernels for every mask form,
  and the twins of torch's modules equal the modules on the same parameters;
  ``lee`` in forward mode equals finite differences and the double-backward baseline, and
  ``lee`` of the traced graph equals ``lee`` of the model;
- completeness: the exact residual at float32 precision, the shares summing to one, Hutchinson
  running, after ``antialias`` and in ``ablate`` too;
- layouts: the attention map is a node with a pair layout, no tensor is left unknown, and the
  attention row of the table carries a share;
- the caller's settings (SDPA backends, the fast path) and model are the same afterwards, the
  graph holds the model's tensors under their names (the monitor follows training), and what is
  not supported is a one-line error.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import layerlie as ll
from layerlie.core import attention
from layerlie.core.layout import unknown_layouts
from layerlie.model.trace import TraceError
from layerlie.testing import TOL, rel, smooth_image

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


class EncoderViT(MhaViT):
    """The ViT on ``nn.TransformerEncoder`` (``layers`` blocks, a final norm), as vision code builds
    it: ``norm_first`` both ways, the activation by name or a callable, ``batch_first`` both ways;
    ``mask``: None, ``"padding"`` (the last token padded out, ``src_key_padding_mask``: with
    ``enable_nested_tensor``, torch's eval-mode fast path zeros it) or ``"causal"`` (torch's float
    causal mask, with the ``is_causal`` hint)."""

    def __init__(self, norm_first: bool = False, activation: str | object = "relu", batch_first: bool = True,
                 mask: str | None = None, layers: int = 2, dim: int = 16, heads: int = 2) -> None:
        super().__init__(batch_first=batch_first, mask=mask, dim=dim, heads=heads)
        del self.attn, self.mlp, self.norm1, self.norm2
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, activation=activation, batch_first=batch_first,
                                           norm_first=norm_first)
        nested = not norm_first and batch_first  # torch warns that it cannot nest otherwise
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(dim), enable_nested_tensor=nested)
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(self.far.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        masks = {"padding": dict(src_key_padding_mask=self.pad.expand(t.shape[:1] + self.pad.shape[1:])),
                 "causal": dict(mask=self.causal, is_causal=True)}.get(self.mask, {})
        t = t if self.batch_first else t.transpose(0, 1)
        t = self.encoder(t, **masks)
        t = t if self.batch_first else t.transpose(0, 1)
        return self.head(t.mean(1))


class DetrLike(MhaViT):
    """An encoder-decoder on ``nn.Transformer``: the patch tokens are the source, learned queries
    the target (under torch's causal mask), the head reads the mean of the decoded queries."""

    def __init__(self, queries: int = 3, dim: int = 16, heads: int = 2) -> None:
        super().__init__(dim=dim, heads=heads)
        del self.attn, self.mlp, self.norm1, self.norm2
        self.queries = nn.Parameter(torch.randn(1, queries, dim))
        self.transformer = nn.Transformer(dim, heads, 1, 1, 2 * dim, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        q = self.queries.expand(t.shape[0], -1, -1)
        causal = nn.Transformer.generate_square_subsequent_mask(q.shape[1], device=x.device)
        return self.head(self.transformer(t, q, tgt_mask=causal).mean(1))


class UnbatchedViT(MhaViT):
    """Attention on the unbatched tokens ``(L, E)`` of one image: ``nn.MultiheadAttention``, then
    encoder layers held in a ``nn.ModuleList``; a batch of one."""

    def __init__(self, batch_first: bool = True, dim: int = 16, heads: int = 2) -> None:
        super().__init__(batch_first=batch_first, dim=dim, heads=heads)
        del self.mlp, self.norm1, self.norm2
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, 2 * dim, batch_first=batch_first)
                                    for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)[0]
        t = t + self.attn(t, t, t, attn_mask=self.far)[0]
        for block in self.blocks:
            t = block(t)
        return self.head(t.mean(0))[None]


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
    "encoder": lambda: EncoderViT(),
    "encoder_padding": lambda: EncoderViT(mask="padding"),
    "encoder_pre_gelu_causal": lambda: EncoderViT(norm_first=True, activation="gelu", mask="causal"),
    "encoder_seq_first_callable": lambda: EncoderViT(norm_first=True, activation=lambda z: z * torch.sigmoid(z),
                                                     batch_first=False),
    "unbatched": lambda: UnbatchedViT(),
    "unbatched_seq_first": lambda: UnbatchedViT(batch_first=False),
    "detr": lambda: DetrLike(),
}
# forward mode and the baseline: both MultiheadAttention paths, both layouts, SDPA, torchvision,
# the encoder
EAGER = ["mha", "mha_weights", "mha_seq_first", "sdpa", "sdpa_bool_mask", "torchvision_vit", "encoder",
         "encoder_pre_gelu_causal"]


def build(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().to(dtype).eval()


def images(dtype: torch.dtype = torch.float32, name: str = "") -> torch.Tensor:
    return smooth_image(b=1 if name.startswith("unbatched") else 2, h=32, w=32, dtype=dtype)


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
    "unbatched": dict(unbatched=True, forward=dict(key_padding_mask="bool")),
    "unbatched_seq_first": dict(unbatched=True, module=dict(batch_first=False),
                                forward=dict(attn_mask="bool3", key_padding_mask="bool")),
    "unbatched_cross": dict(unbatched=True, module=dict(kdim=6, vdim=5), cross=True,
                            forward=dict(attn_mask="float", average_attn_weights=False)),
}


@pytest.mark.parametrize("case", list(MHA_CASES))
@pytest.mark.parametrize("need_weights", [False, True])
def test_explicit_multihead_attention_equals_torch(case, need_weights):
    spec = MHA_CASES[case]
    torch.manual_seed(0)
    options = dict(batch_first=True) | spec.get("module", {})
    mha = nn.MultiheadAttention(8, 2, **options).double().eval()
    b, n_q, n_k = 3, 5, 6
    seq = (lambda n, c: (n, c)) if spec.get("unbatched") else (lambda n, c: (b, n, c)) if mha.batch_first \
        else (lambda n, c: (n, b, c))
    query = torch.randn(seq(n_q, 8), dtype=torch.float64)
    key, value = (torch.randn(seq(n_k, options.get("kdim", 8)), dtype=torch.float64),
                  torch.randn(seq(n_k, options.get("vdim", 8)), dtype=torch.float64)) if spec.get("cross") \
        else (query, query)
    n_k = key.shape[-2 if mha.batch_first or spec.get("unbatched") else 0]
    b = 1 if spec.get("unbatched") else b
    far = torch.rand(n_q, n_k) > 0.7
    masks = {"bool": far, "float": torch.randn(n_q, n_k, dtype=torch.float64).masked_fill(far, float("-inf")),
             "bool3": torch.rand(b * 2, n_q, n_k) > 0.7}
    padding = {"bool": torch.arange(n_k).expand(b, -1) == n_k - 1,
               "float": torch.randn(b, n_k, dtype=torch.float64)}
    if spec.get("unbatched"):  # one sequence: a key padding mask (S,)
        padding = {kind: m[0] for kind, m in padding.items()}
    kwargs = dict(spec.get("forward", {}), need_weights=need_weights)
    if "attn_mask" in kwargs:
        kwargs["attn_mask"] = masks[kwargs["attn_mask"]]
    if "key_padding_mask" in kwargs:
        kwargs["key_padding_mask"] = padding[kwargs["key_padding_mask"]]
    with torch.no_grad():
        want = mha(query, key, value, **kwargs)
        got = attention.ExplicitMultiheadAttention(mha)(query, key, value, **kwargs)
    assert got[0].shape == want[0].shape and rel(got[0], want[0]) < TOL[torch.float64]
    if need_weights:
        assert got[1].shape == want[1].shape and rel(got[1], want[1]) < TOL[torch.float64]
    else:
        assert got[1] is None and want[1] is None


# torch's modules that compute an attention map inside
OPAQUE = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder, nn.TransformerDecoderLayer,
          nn.TransformerDecoder, nn.Transformer)


def _seq(n: int, layout: str = "batch_first") -> torch.Tensor:
    """A sequence of ``n`` width-8 tokens: ``(3, n, 8)``, ``(n, 3, 8)`` (``seq_first``) or ``(n, 8)``."""
    shape = {"batch_first": (3, n, 8), "seq_first": (n, 3, 8), "unbatched": (n, 8)}[layout]
    return torch.randn(shape, dtype=torch.float64)


def _padding(n: int, batch: int | None = 3) -> torch.Tensor:
    """The last two of ``n`` keys padded out (True), per sequence of a batch, or for one."""
    pad = torch.arange(n) >= n - 2
    return pad if batch is None else pad.expand(batch, -1)


def _causal(n: int) -> torch.Tensor:
    return nn.Transformer.generate_square_subsequent_mask(n, dtype=torch.float64)


def _silu(z: torch.Tensor) -> torch.Tensor:
    return z * torch.sigmoid(z)


def _stack(layer: nn.Module, kind: type[nn.Module]) -> nn.Module:
    return kind(layer, 2, norm=nn.LayerNorm(8, dtype=torch.float64))


FF = dict(dim_feedforward=16, dtype=torch.float64)
# name: () -> (torch's module, the keyword arguments of a call); 5 targets, 6 sources
TRANSFORMER_CASES = {
    "layer_post_relu": lambda: (nn.TransformerEncoderLayer(8, 2, batch_first=True, **FF), dict(src=_seq(5))),
    "layer_pre_gelu_masks": lambda: (
        nn.TransformerEncoderLayer(8, 2, batch_first=True, norm_first=True, activation="gelu", **FF),
        dict(src=_seq(5), src_mask=torch.rand(5, 5) > 0.7, src_key_padding_mask=_padding(5))),
    "layer_callable_seq_first": lambda: (
        nn.TransformerEncoderLayer(8, 2, activation=_silu, **FF),
        dict(src=_seq(5, "seq_first"), src_mask=torch.randn(5, 5, dtype=torch.float64))),
    "layer_unbatched": lambda: (nn.TransformerEncoderLayer(8, 2, norm_first=True, **FF),
                                dict(src=_seq(5, "unbatched"), src_key_padding_mask=_padding(5, None))),
    "encoder_causal": lambda: (_stack(nn.TransformerEncoderLayer(8, 2, batch_first=True, **FF), nn.TransformerEncoder),
                               dict(src=_seq(5), mask=_causal(5), is_causal=True)),
    "encoder_padding_nested": lambda: (
        _stack(nn.TransformerEncoderLayer(8, 2, batch_first=True, **FF), nn.TransformerEncoder),
        dict(src=_seq(5), src_key_padding_mask=_padding(5))),
    "decoder_layer": lambda: (nn.TransformerDecoderLayer(8, 2, batch_first=True, norm_first=True, **FF),
                              dict(tgt=_seq(5), memory=_seq(6), tgt_mask=_causal(5),
                                   memory_key_padding_mask=_padding(6))),
    "decoder_seq_first": lambda: (_stack(nn.TransformerDecoderLayer(8, 2, **FF), nn.TransformerDecoder),
                                  dict(tgt=_seq(5, "seq_first"), memory=_seq(6, "seq_first"), tgt_mask=_causal(5),
                                       tgt_is_causal=True)),
    "transformer": lambda: (nn.Transformer(8, 2, 1, 2, batch_first=True, **FF),
                            dict(src=_seq(6), tgt=_seq(5), src_key_padding_mask=_padding(6), tgt_mask=_causal(5))),
}


@pytest.mark.parametrize("case", list(TRANSFORMER_CASES))
def test_explicit_transformer_modules_equal_torch(case):
    """On a copy, each module of the ``nn.Transformer`` family, and every one inside it, becomes
    its twin: the same state dict, and torch's output on its dense path (float64)."""
    module, kwargs = TRANSFORMER_CASES[case]()
    module.eval()
    with torch.no_grad(), attention.differentiable_attention():
        want = module(**kwargs)
    root = nn.ModuleDict(dict(m=copy.deepcopy(module)))
    attention.explicit_attention_modules(root, torch.fx.Tracer().is_leaf_module)
    assert not [m for m in root.modules() if type(m) in OPAQUE]
    assert root.m.state_dict().keys() == module.state_dict().keys()
    with torch.no_grad():
        got = root.m(**kwargs)
    assert got.shape == want.shape and rel(got, want) < TOL[torch.float64]


def test_traced_models_write_the_attention_as_ops():
    """No SDPA call and no torch attention module (``nn.MultiheadAttention``, the
    ``nn.Transformer`` family) is left in the graph; the trace equals the model (the trace checks
    it, against torch's dense path: the nested-tensor fast path of ``encoder_padding`` differs)."""
    for name in MODELS:
        gm = ll.trace(build(name), images(name=name))
        calls = [n for n in gm.graph.nodes if n.target is F.scaled_dot_product_attention
                 or n.op == "call_module" and isinstance(gm.get_submodule(n.target), OPAQUE)]
        assert not calls, (name, calls)


# --- references: forward mode, finite differences, the double-backward baseline -------------

@pytest.mark.parametrize("name", EAGER)
def test_lee_equals_finite_differences_and_double_backward(name):
    """float64. The central difference of the finite transform converges to the Lie derivative
    at first order in eps (bilinear resampling has a kink at t = 0, docs/method.md §1): each decade of eps
    divides the error by about ten, down to the jvp and not to another value."""
    model, x = build(name, torch.float64), images(torch.float64, name)
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


@pytest.mark.parametrize("name", ["mha_weights", "mha_seq_first", "sdpa_float_mask", "torchvision_vit",
                                  "encoder_padding", "encoder_seq_first_callable", "unbatched_seq_first", "detr"])
def test_lee_of_the_traced_graph_equals_lee_of_the_model(name):
    """The explicit ops carry the same derivative as torch's kernels (float64)."""
    model, x = build(name, torch.float64), images(torch.float64, name)
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


# The decoder's maps: its self-attention over learned queries has no position (none), its
# cross-attention map keeps the sources' tokens on the key axis.
KINDS = {"detr": ["pair", "none", "tokens"]}


@pytest.mark.parametrize("name", list(MODELS))
def test_attention_map_is_a_pair_and_carries_a_share(name):
    model, x = build(name), images(name=name)
    gm = ll.trace(model, x)
    layouts = ll.infer_layouts(gm, x)
    maps = _attention_maps(gm)
    kinds = [layouts[m].kind for m in maps]
    assert maps and kinds == KINDS.get(name, ["pair"] * len(maps)), {m: layouts[m].describe() for m in maps}
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
    h = ll.attribute(model, x, "rotate", estimator="hutchinson", samples=8, seed=0)
    assert h.residual != h.residual  # not checkable: NaN, never 0
    assert torch.isfinite(torch.tensor(h.nodes["contribution_norm"].values)).all()
    assert h.by_type().loc["attention", "contribution_norm"] > 0


@pytest.mark.slow
def test_antialias_then_lee_and_ablate_on_torchvision_vit():
    model, x = build("torchvision_vit"), images()
    smooth = ll.antialias(model, blurpool=True, x=x)
    assert rel(torch.tensor(ll.lee(smooth, x, GROUPS, method="double_backward")["lee"].values),
               torch.tensor(ll.lee(smooth, x, GROUPS)["lee"].values)) < TOL[torch.float32]
    ab = ll.ablate(model, x, variants=["blurpool", "filtered"])
    assert list(ab.table["variant"]) == ["original", "blurpool", "filtered"]
    assert (ab.table["residual"] <= TOL[torch.float32]).all()
    assert (ab.by_type.loc["attention"] > 0).all()


@pytest.mark.parametrize("name", ["mha_weights", "detr"])
def test_the_caller_model_is_unchanged(name):
    model, x = build(name), images()
    types = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ll.attribute(model, x, "rotate")
    ll.antialias(model, blurpool=True, x=x)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["encoder_seq_first_callable", "detr", "unbatched"])
def test_the_graph_holds_the_model_tensors_under_their_names(name):
    """The twins keep torch's names: every tensor of the traced graph is the model's under the
    same name, and every parameter is there (what the monitor's weight copy relies on)."""
    model, x = build(name), images(name=name)
    gm = ll.trace(model, x)
    params, held = dict(model.named_parameters()), dict(gm.named_parameters()) | dict(gm.named_buffers())
    live = params | dict(model.named_buffers())
    assert held.keys() <= live.keys() and params.keys() <= held.keys(), (held.keys() ^ live.keys())
    assert all(torch.equal(t, live[k]) for k, t in held.items())


def test_the_monitor_follows_training_of_an_encoder():
    """The monitor copies the live weights into its graph by name: after a training step, its
    shares are those of the trained model, and they changed."""
    model, x = build("encoder_pre_gelu_causal"), images()
    monitor = ll.Monitor(model, x, ["rotate"], every=1, layers=True)
    monitor.step(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(x).logsumexp(-1).mean().backward()
    optimizer.step()
    model.eval()
    monitor.step(1)
    shares = monitor.table().set_index("step")["share_attention"]
    want = ll.attribute(model, x, "rotate", estimator="shares").by_type().loc["attention", "share"]
    assert abs(shares[1] - want) <= TOL[torch.float32] * abs(want) and shares[1] != shares[0]


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
