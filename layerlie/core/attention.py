"""torch's own attention, made measurable (docs/method.md §2, docs/method.md §5: pair layouts).

``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention`` compute the attention map
inside one kernel. Two things follow, and this module answers both:

- Derivatives. The fused kernels (flash and memory-efficient SDPA, the CPU flash kernel,
  ``torch._native_multi_head_attention``, the fast path of ``nn.MultiheadAttention`` and
  ``nn.TransformerEncoderLayer`` in eval mode) have no forward-mode derivative, and some no
  second derivative. :func:`differentiable_attention` runs them, for its duration, through
  SDPA's math backend with the fast path off: the same function, differentiable in both
  modes. Global settings are restored afterwards.
- The map as a node. Tracing writes each SDPA call as explicit ops (:func:`scaled_dot_product_attention`:
  ``q k^T * scale``, the masks and the softmax over keys, ``A V``), and replaces, on the trace's
  private copy, every ``nn.MultiheadAttention`` and every module of the ``nn.Transformer``
  family by its twin (:func:`explicit_attention_modules`): the same parameters under the same
  names, with a forward that fx traces into those ops. The attention map is then a node with a
  pair layout (docs/method.md §5), and its defect is charged where it arises rather than to one opaque
  call.

Example:
    >>> import torch, torch.nn.functional as F
    >>> q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
    >>> torch.allclose(scaled_dot_product_attention(q, k, v, is_causal=True),
    ...                F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6)
    True
"""

from __future__ import annotations

import contextlib
import copy
import functools
import operator
from collections.abc import Callable, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from layerlie.errors import TraceError
from layerlie.core.ops import register_op


@contextlib.contextmanager
def differentiable_attention() -> Iterator[None]:
    """SDPA in its math backend and ``nn.MultiheadAttention``'s fused fast path off, for the
    duration: forward-mode and double-backward derivatives then exist on every device; both
    settings are restored afterwards."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """The softmax over keys of attention ``scores`` ``(..., L, S)`` under SDPA's masks: a boolean
    ``mask`` keeps the keys where it is True, a float one is added; ``is_causal`` keeps key
    ``j <= i`` for query ``i``. A query that keeps no key attends to nothing (zeros), as in torch's
    math backend. One op, so that no node of the graph holds the ``-inf`` of a masked score,
    where ``G`` of the map (docs/method.md §5) would be undefined."""
    if is_causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    attn = scores.softmax(-1)
    return torch.where(torch.isneginf(scores).all(-1, keepdim=True), 0.0, attn)


def _mha_mask(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
              lead: torch.Size) -> torch.Tensor:
    """``nn.MultiheadAttention``'s ``attn_mask`` ``(L, S)`` or ``(batch * heads, L, S)`` and
    ``key_padding_mask`` ``(batch, S)`` (boolean: True masks a key out; float: added) as one
    mask for :func:`masked_softmax` that broadcasts to ``(*lead, L, S)``, ``lead`` being
    ``(batch, heads)``, or ``(heads,)`` for unbatched inputs (masks ``(heads, L, S)``, ``(S,)``)."""
    masks = []
    if attn_mask is not None:
        masks.append(attn_mask.view(*lead, *attn_mask.shape[-2:]) if attn_mask.ndim == 3 else attn_mask)
    if key_padding_mask is not None:
        masks.append(key_padding_mask.view(*lead[:-1], 1, 1, key_padding_mask.shape[-1]))
    if all(m.dtype == torch.bool for m in masks):
        return ~functools.reduce(operator.or_, masks)
    dtype = next(m.dtype for m in masks if m.dtype != torch.bool)
    return sum(m if m.dtype != torch.bool else torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf"))
               for m in masks)


# Calls to these two with traced arguments become single nodes; what they branch on (a mask's
# dtype and shape) is known only when the graph runs.
fx.wrap("masked_softmax")
fx.wrap("_mha_mask")


def _constant(value: object, name: str) -> None:
    if isinstance(value, fx.Proxy):
        raise TraceError(f"{name} is computed in the forward, so the traced graph cannot choose its branch; "
                            "pass it as a Python constant")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              is_causal: bool = False, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T * scale, masked) v`` as explicit ops, and the map: ``q (..., L, E)``,
    ``k (..., S, E)``, ``v (..., S, Ev)`` give ``(..., L, Ev)`` and ``A (..., L, S)``
    (docs/method.md §5: ``q @ k^T`` is a pair map, ``A @ V`` tokens again)."""
    _constant(is_causal, "is_causal")
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
    attn = scores.softmax(-1) if mask is None and not is_causal else masked_softmax(scores, mask, is_causal)
    return attn @ v, attn


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` as explicit ops (:func:`attention`); the tracer calls it
    in place of each SDPA call.

    Raises:
        TraceError: for a ``dropout_p`` other than 0 (SDPA drops at random in eval mode too),
            or a flag computed in the forward.
    """
    _constant(dropout_p, "dropout_p of F.scaled_dot_product_attention")
    _constant(enable_gqa, "enable_gqa of F.scaled_dot_product_attention")
    if dropout_p != 0:
        raise TraceError(f"F.scaled_dot_product_attention is called with dropout_p={dropout_p}, which drops "
                            "at random in eval mode too; pass dropout_p=0.0 outside training")
    if enable_gqa:  # grouped queries: each key and value head serves query.shape[-3] // key.shape[-3] heads
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
        value = value.repeat_interleave(query.shape[-3] // value.shape[-3], -3)
    return attention(query, key, value, attn_mask, is_causal, scale)[0]


class _Twin(nn.Module):
    """``Twin(module)``: the torch module ``module`` with a forward that fx traces into explicit
    ops. The twin holds ``module``'s attributes, parameter and buffer tensors and children under
    the same names, so ``state_dict()`` keys and tensors are the same (docs/method.md §3). A twin class
    names its torch class second: ``class Twin(_Twin, nn.SomeModule)``."""

    def __init__(self, module: nn.Module) -> None:
        self.__dict__.update(module.__dict__)
        for key in ("_parameters", "_buffers", "_modules"):  # own dicts, the same tensors and modules
            self.__dict__[key] = copy.copy(module.__dict__[key])


class ExplicitMultiheadAttention(_Twin, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` in eval mode, as traceable ops on the same parameters: the
    projections, :func:`attention` per head, the output projection. Batched and unbatched inputs,
    ``batch_first`` both ways, ``need_weights`` and ``average_attn_weights`` both ways, boolean or
    float ``attn_mask`` and ``key_padding_mask``.

    Example:
        >>> mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
        >>> x = torch.randn(2, 5, 8)
        >>> torch.allclose(ExplicitMultiheadAttention(mha)(x, x, x)[0], mha(x, x, x)[0], atol=1e-6)
        True
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        unsupported = [name for name, on in (("add_bias_kv=True", mha.bias_k is not None),
                                             ("add_zero_attn=True", mha.add_zero_attn)) if on]
        if unsupported:
            raise TraceError(f"nn.MultiheadAttention with {unsupported[0]} cannot be traced by layerlie (its extra "
                                "key has no position); use granularity='module'")
        super().__init__(mha)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As ``nn.MultiheadAttention.forward`` (``is_causal`` is its hint that ``attn_mask`` is
        causal: the mask decides). Every axis is counted from the end, so that one graph serves
        batched ``(N, L, E)`` (``(L, N, E)``) and unbatched ``(L, E)`` inputs."""
        for flag, name in ((need_weights, "need_weights"), (average_attn_weights, "average_attn_weights"),
                           (is_causal, "is_causal")):
            _constant(flag, f"{name} of nn.MultiheadAttention")
        if is_causal and attn_mask is None:
            raise TraceError("nn.MultiheadAttention is called with is_causal=True and no attn_mask, which torch "
                                "refuses too; pass the causal mask as attn_mask")
        q, k, v = self._project(*self._batch_first(query, key, value))
        heads = [t.view(t.shape[:-1] + (self.num_heads, self.head_dim)).transpose(-3, -2) for t in (q, k, v)]
        mask = None if attn_mask is None and key_padding_mask is None else \
            _mha_mask(attn_mask, key_padding_mask, heads[0].shape[:-2])
        out, attn = attention(*heads, mask, scale=self.head_dim ** -0.5)
        out = self.out_proj(out.transpose(-3, -2).flatten(-2))
        out = out if self.batch_first else out.transpose(0, -2)
        if not need_weights:
            return out, None
        return out, attn.mean(-3) if average_attn_weights else attn

    def _batch_first(self, *qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(N, L, E)`` (or ``(L, E)``) inputs, the same object where the caller passed the same one."""
        if self.batch_first:
            return qkv
        moved: dict[int, torch.Tensor] = {}
        for t in qkv:
            if id(t) not in moved:
                moved[id(t)] = t.transpose(0, -2)  # the identity on an unbatched (L, E)
        return tuple(moved[id(t)] for t in qkv)

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The input projections: one linear layer for self-attention, three otherwise."""
        linear = nn.functional.linear
        if self.in_proj_weight is not None and query is key is value:
            q, k, v = linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, -1)
            return q, k, v
        if self.in_proj_weight is not None:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        return linear(query, w_q, b_q), linear(key, w_k, b_k), linear(value, w_v, b_v)


class ExplicitTransformerEncoderLayer(_Twin, nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` on its dense path: its fused eval-mode kernel has no
    forward-mode derivative, and its mask checks branch on the masks' dtypes, which fx cannot
    read. ``norm_first`` both ways, any activation; the masks go to the attention as given."""

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """As ``nn.TransformerEncoderLayer.forward`` in eval mode."""
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))


class ExplicitTransformerEncoder(_Twin, nn.TransformerEncoder):
    """``nn.TransformerEncoder`` on its dense path, the one layerlie's derivatives take
    (:func:`differentiable_attention`): ``enable_nested_tensor`` selects an eval-mode fast path
    only. ``is_causal`` is a hint that ``mask`` is causal: the mask decides."""

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
        """As ``nn.TransformerEncoder.forward``: the layers in turn, then ``norm`` when set."""
        for layer in self.layers:
            src = layer(src, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=bool(is_causal))
        return src if self.norm is None else self.norm(src)


class ExplicitTransformerDecoderLayer(_Twin, nn.TransformerDecoderLayer):
    """``nn.TransformerDecoderLayer``: torch's forward, which does not branch on data, traced
    into its attention blocks instead of kept whole."""


class ExplicitTransformerDecoder(_Twin, nn.TransformerDecoder):
    """``nn.TransformerDecoder``, without the causal-mask detection that compares the mask's
    values (``tgt_is_causal`` is a hint: the mask decides)."""

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None, tgt_is_causal: bool | None = None,
                memory_is_causal: bool = False) -> torch.Tensor:
        """As ``nn.TransformerDecoder.forward``: the layers in turn, then ``norm`` when set."""
        for layer in self.layers:
            tgt = layer(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                        tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                        tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
        return tgt if self.norm is None else self.norm(tgt)


class ExplicitTransformer(_Twin, nn.Transformer):
    """``nn.Transformer`` without its input checks, which compare sizes fx cannot read: the
    encoder, then the decoder on its output."""

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, tgt_key_padding_mask: torch.Tensor | None = None,
                memory_key_padding_mask: torch.Tensor | None = None, src_is_causal: bool | None = None,
                tgt_is_causal: bool | None = None, memory_is_causal: bool = False) -> torch.Tensor:
        """As ``nn.Transformer.forward``."""
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                            memory_is_causal=memory_is_causal)


# The torch modules that the trace's copy holds as their traceable twins, by exact type: a
# subclass is the model's own code, which fx traces as written.
_TWINS: dict[type[nn.Module], type[_Twin]] = {
    nn.MultiheadAttention: ExplicitMultiheadAttention,
    nn.TransformerEncoderLayer: ExplicitTransformerEncoderLayer,
    nn.TransformerEncoder: ExplicitTransformerEncoder,
    nn.TransformerDecoderLayer: ExplicitTransformerDecoderLayer,
    nn.TransformerDecoder: ExplicitTransformerDecoder,
    nn.Transformer: ExplicitTransformer,
}


def explicit_attention_modules(root: nn.Module, is_leaf: Callable[[nn.Module, str], bool]) -> dict[str, nn.Module]:
    """Replace, in place, every torch attention module (``nn.MultiheadAttention``, the
    ``nn.Transformer`` family) that a tracer with leaf test ``is_leaf`` reaches by its twin on
    the same parameters, inside the twins too; call it on a copy. Containers (``nn.ModuleList``,
    ``nn.ModuleDict``) are searched, although fx calls them leaves: they are never called.
    Returns ``{path: replacement}``."""
    made: dict[int, nn.Module] = {}
    record: dict[str, nn.Module] = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            twin = _TWINS.get(type(child))
            if twin is not None:
                child = made.setdefault(id(child), twin(child))
                setattr(module, name, child)
                record[path] = child
            if twin is not None or isinstance(child, (nn.ModuleList, nn.ModuleDict)) or not is_leaf(child, path):
                visit(child, f"{path}.")

    visit(root, "")
    return record


register_op(masked_softmax, layer_type="attention",
            example=lambda fn: (fn, (torch.randn(2, 3, 5, 7, dtype=torch.float64),
                                     torch.rand(5, 7, dtype=torch.float64) > 0.3, True)))
