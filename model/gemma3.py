"""Gemma 3 (text) from scratch, top to bottom: RMSNorm, RoPE, attention, feed-forward, block, model.

Reads like the paper: RMSNorm scales by (1 + weight) in float32; queries and keys get their own RMSNorm before
RoPE; sliding-window layers use RoPE base 10 000, full layers 1 000 000; the embedding is multiplied by
sqrt(hidden_size); every block has four norms (before and after attention, before and after the feed-forward);
the LM head is the embedding matrix. The projections that read one input are stacked, q|k|v and gate|up (one
product each); a checkpoint's tensors keep their own names (`STACKED_PROJECTIONS`, at the bottom).

Precision: a model cast to bfloat16 or float16 keeps 16-bit weights, matrix products and KV cache, and does
everything else in float32: the residual stream, every norm, RoPE, the feed-forward's GELU, the logits.
Gemma's residual stream grows past float16's largest value (65 504), so a model run wholly in float16 turns
into NaN, and one run wholly in bfloat16 drifts from the reference. For a float32 model every cast is a no-op.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from model.config import Gemma3Config
from model.kv_cache import ConcatKVCache, KVCache, LayerKVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float32 in and out whatever the weights' dtype (the module docstring says why)."""
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed * (1.0 + self.weight.float())


class Linear(nn.Linear):
    """A bias-free linear layer that multiplies in its weights' dtype and hands float32 on."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).float()


class RotaryEmbedding(nn.Module):
    """cos/sin tables computed from each token's position (so left-padded rows get their own positions)."""

    def __init__(self, head_dim: int, base: float, scaling: float = 1.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq / scaling, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = position_ids[..., None].float() * self.inv_freq  # [batch, seq, head_dim / 2]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos()[:, None], angles.sin()[:, None]  # [batch, 1, seq, head_dim]


def rotary_embeddings(config: Gemma3Config) -> tuple[RotaryEmbedding, RotaryEmbedding]:
    """(local, global): sliding layers and full layers rotate with different bases."""
    return (RotaryEmbedding(config.head_dim, config.rope_local_base),
            RotaryEmbedding(config.head_dim, config.rope_global_base, config.rope_global_scaling))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos.to(x.dtype)) + (rotate_half(x) * sin.to(x.dtype))


def attention_mask_for(query_positions: torch.Tensor, key_positions: torch.Tensor, key_valid: torch.Tensor,
                       sliding_window: int | None) -> torch.Tensor:
    """Boolean [batch, 1, q, k]: causal, inside the window (a query sees itself and the previous window − 1
    tokens), not padding. A query always sees its own key, so a padding row never has an empty softmax."""
    q = query_positions[:, None]
    k = key_positions[None, :]
    allowed = (k >= 0) & (k <= q)
    if sliding_window is not None:
        allowed = allowed & (k > q - sliding_window)
    allowed = allowed[None] & key_valid[:, None, :]
    return (allowed | (k == q)[None])[:, None]


# Below this many keys SDPA's one fused call is quicker; above it the matmul form below is (the measured
# crossover: BENCHMARKS.md, "PyTorch decode attention as `keys @ queries`").
DECODE_MATMUL_MIN_KEYS = 2048
# Keys per block of the weighted sum of values: one bmm over the blocks keeps both cores busy.
VALUE_BLOCK = 512


def uses_decode_matmul(q: torch.Tensor, k: torch.Tensor) -> bool:
    """One query per row, eager or torch.compile'd on the CPU, against a long cache. Traced and exported graphs
    keep SDPA: most serve prefill and decode with one graph (a symbolic or traced `seq`), and a runtime that lowers
    a decode-only graph further (ExecuTorch's XNNPACK) is proven on SDPA, not on this form."""
    seq, keys = q.shape[2], k.shape[2]
    exported = torch.jit.is_tracing() or torch.compiler.is_exporting()
    return (q.device.type == "cpu" and type(seq) is int and seq == 1 and type(keys) is int
            and keys >= DECODE_MATMUL_MIN_KEYS and not exported)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
                     ) -> torch.Tensor:
    """Attention of one query per head ([batch, heads, 1, head_dim]) over the cache ([batch, kv_heads, keys,
    head_dim]); mask [batch, 1, 1, keys]. Equal to SDPA with enable_gqa, laid out for the CPU's GEMMs: each kv
    head's query group is the columns of one `keys @ queries` (MKL runs this tall product faster than
    queries @ keysᵀ, and SDPA's CPU kernel for a single query reads the cache slowly), the softmax runs down
    the keys, and the weighted sum of values is a bmm over blocks of keys (split-K: MKL's few-row product over a
    long cache keeps one core busy, and is slower on two). Timings: BENCHMARKS.md."""
    batch, heads, _, head_dim = q.shape
    kv_heads = k.shape[1]
    queries = (q * scale).reshape(batch, kv_heads, heads // kv_heads, head_dim).transpose(-1, -2)
    scores = torch.matmul(k, queries).masked_fill(~mask[:, :, 0, :, None], float("-inf"))  # [b, kv, keys, group]
    weights = scores.float().softmax(dim=2).to(v.dtype)
    return weighted_values(weights, v).reshape(batch, heads, 1, head_dim)


def weighted_values(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """weights [b, kv, keys, group] · values [b, kv, keys, head_dim] → [b, kv, group, head_dim]."""
    batch, kv_heads, keys, group = weights.shape
    blocked = keys - keys % VALUE_BLOCK
    out = torch.matmul(weights[:, :, blocked:].transpose(-1, -2), values[:, :, blocked:])
    if blocked:
        blocks = blocked // VALUE_BLOCK
        block_weights = weights[:, :, :blocked].reshape(batch, kv_heads, blocks, VALUE_BLOCK, group)
        block_values = values[:, :, :blocked].reshape(batch, kv_heads, blocks, VALUE_BLOCK, values.shape[-1])
        out = out + torch.matmul(block_weights.transpose(-1, -2), block_values).sum(2)
    return out


class Attention(nn.Module):
    def __init__(self, config: Gemma3Config, is_sliding: bool) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window if is_sliding else None
        self.scale = config.query_pre_attn_scalar ** -0.5
        # q, k and v read the same input: one product over their stacked weights (each output column reads the same
        # weights as in a projection of its own: the same numbers; BENCHMARKS.md, "the model's own stacked
        # projections").
        self.sizes = [config.num_heads * config.head_dim, *2 * [config.num_kv_heads * config.head_dim]]
        self.qkv = Linear(config.hidden_size, sum(self.sizes))
        self.o_proj = Linear(config.num_heads * config.head_dim, config.hidden_size)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                valid: torch.Tensor, cache: LayerKVCache | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).split(self.sizes, dim=-1)
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # Attention's products read a 16-bit cache in a 16-bit model (SDPA's CPU kernels accumulate and take the
        # softmax in float32).
        dtype = self.qkv.weight.dtype
        q = apply_rope(self.q_norm(q), cos, sin).to(dtype)
        k = apply_rope(self.k_norm(k), cos, sin).to(dtype)
        v = v.to(dtype)
        if cache is None:
            key_positions, key_valid = positions, valid
        else:
            k, v, key_positions, key_valid = cache.update(k, v, positions, valid)
        mask = attention_mask_for(positions, key_positions, key_valid, self.sliding_window)
        # Grouped-query attention reads each kv head for its `num_heads // num_kv_heads` query heads in place;
        # repeat_interleave would copy the whole cache that many times per step (BENCHMARKS.md, "`enable_gqa`
        # instead of `repeat_interleave`").
        if uses_decode_matmul(q, k):
            out = decode_attention(q, k, v, mask, self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                                 enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, config: Gemma3Config) -> None:
        super().__init__()
        self.sizes = [config.intermediate_size] * 2
        self.gate_up = Linear(config.hidden_size, sum(self.sizes))  # gate and up stacked, as q|k|v
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.sizes, dim=-1)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class TransformerBlock(nn.Module):
    def __init__(self, config: Gemma3Config, layer_index: int) -> None:
        super().__init__()
        self.is_sliding = config.is_sliding(layer_index)
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = Attention(config, self.is_sliding)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_feedforward_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)
        self.post_feedforward_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor,
                valid: torch.Tensor, cache: LayerKVCache | None) -> torch.Tensor:
        x = x + self.post_attention_norm(self.attention(self.input_norm(x), *rope, positions, valid, cache))
        return x + self.post_feedforward_norm(self.feed_forward(self.pre_feedforward_norm(x)))


# Rows of a 16-bit LM head widened to float32 at once: a bounded temporary instead of a float32 copy of the head.
# 10 MiB rather than 42: fresh pages for a temporary that large at every step cost many times the product itself
# (BENCHMARKS.md, "The 16-bit LM head"; how much still varies with the allocator's state).
HEAD_ROWS_PER_CHUNK = 4096


class Gemma3Model(nn.Module):
    """`model(input_ids)` → float32 logits [batch, seq, vocab]: a full forward with no cache.

    With a `KVCache`, pass `cache_position` (the cache indices of these tokens, [seq]) to prefill or decode.
    `attention_mask` ([batch, past + seq], 1 = token, 0 = left padding) and `position_ids` ([batch, seq]) follow
    the Hugging Face conventions; positions default to each row's count of real tokens so far.
    """

    def __init__(self, config: Gemma3Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.num_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)create the computed, non-persistent float32 buffers (RoPE frequencies, embedding scale), on the
        weights' device: after a build on the meta device, and after every cast (`_apply`)."""
        with torch.device(device or self.embed_tokens.weight.device):
            self.rope_local, self.rope_global = rotary_embeddings(self.config)
            self.register_buffer("embed_scale", torch.tensor(math.sqrt(self.config.hidden_size)), persistent=False)

    def _apply(self, fn, recurse=True):  # noqa: ANN001 — nn.Module's own signature
        """`.to(dtype)`, `.half()`, `.bfloat16()` cast every floating buffer: in bfloat16 the RoPE frequencies
        keep 8 significant bits, which turns the angle of position 500 by up to a radian. The computed
        buffers are made again in float32 after any cast."""
        super()._apply(fn, recurse)
        self.init_buffers()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                cache_position: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, attention_mask, position_ids, cache, cache_position))

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                      cache_position: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq = input_ids.shape
        if cache_position is None:
            cache_position = torch.arange(seq, device=input_ids.device)
        if attention_mask is None:
            valid = torch.ones(batch, seq, dtype=torch.bool, device=input_ids.device)
        else:
            valid = attention_mask[:, -seq:].bool()
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, seq) if attention_mask is not None \
                else cache_position[None].expand(batch, seq)
        x = self.embed_tokens(input_ids)
        # HF multiplies by sqrt(hidden) rounded to the model dtype; so do we, then the residual stream is float32.
        x = (x * self.embed_scale.to(x.dtype)).float()
        rope_local, rope_global = self.rope_local(position_ids), self.rope_global(position_ids)
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            x = layer(x, rope_local if layer.is_sliding else rope_global, cache_position, valid, layer_cache)
        return self.final_norm(x)

    def forward_with_past(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                          past: list[tuple[torch.Tensor, torch.Tensor]]
                          ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The Hugging Face decoder contract that exported graphs follow: explicit past keys/values per layer
        ([batch, kv_heads, past, head_dim], past may be 0) in, logits and `present` (past + new) out."""
        cache = ConcatKVCache(past, attention_mask)
        # From the mask, not from a past: a sliding layer's past may hold only its newest keys.
        past_length = attention_mask.shape[1] - input_ids.shape[1]
        cache_position = torch.arange(input_ids.shape[1], device=input_ids.device) + past_length
        logits = self.forward(input_ids, attention_mask, position_ids, cache, cache_position)
        return logits, cache.presents()

    def empty_past(self, batch_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        parameter = self.embed_tokens.weight
        shape = (batch_size, self.config.num_kv_heads, 0, self.config.head_dim)
        empty = torch.zeros(shape, dtype=parameter.dtype, device=parameter.device)
        return [(empty, empty) for _ in range(self.config.num_layers)]

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits from float32 hidden states. 16-bit rows are widened a chunk at a time: a 16-bit
        product would round each logit to 16 bits, which in bfloat16 (8 significant bits) moves a logit of 30
        by up to 0.06, enough to swap near-tied tokens."""
        weight = self.embed_tokens.weight
        if weight.dtype == torch.float32:
            return F.linear(hidden, weight)
        return torch.cat([F.linear(hidden, rows.float()) for rows in weight.split(HEAD_ROWS_PER_CHUNK)], dim=-1)

    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights read to produce one token: every parameter once (the embedding as the LM head;
        its row lookup is negligible)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())


def positions_from_mask(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """HF's rule: position = number of real tokens before this one (padding gets 0, it is masked anyway)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -seq:]


# ------------------------------------------------------------------------------------------ stacked projections
# The model's projections that read one input, stacked (per layer), and the source tensors they are made of (the
# names of model/weights.py, one per tensor of a checkpoint), in row order.
STACKED_PROJECTIONS = {"attention.qkv": ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
                       "feed_forward.gate_up": ("feed_forward.gate_proj", "feed_forward.up_proj")}
LAYER_PARAMETER = re.compile(r"(layers\.\d+\.)(.+)\.weight")


def stacked_parts(name: str) -> tuple[str, ...]:
    """The source tensors one parameter of the model is made of, in row order: itself, or a stacked
    projection's parts."""
    match = LAYER_PARAMETER.fullmatch(name)
    if match is None or match[2] not in STACKED_PROJECTIONS:
        return (name,)
    return tuple(f"{match[1]}{part}.weight" for part in STACKED_PROJECTIONS[match[2]])


def stacked_state_dict(source: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (model/weights.py's names) → the model's parameters, the projections stacked. A
    layer missing a part keeps its parts apart (`load_state_dict` then names what is missing)."""
    state = dict(source)
    for layer in sorted({match[1] for name in source if (match := LAYER_PARAMETER.fullmatch(name))}):
        for stacked, parts in STACKED_PROJECTIONS.items():
            names = [f"{layer}{part}.weight" for part in parts]
            if all(name in state for name in names):
                state[f"{layer}{stacked}.weight"] = torch.cat([state.pop(name) for name in names])
    return state


def source_state_dict(model: Gemma3Model) -> dict[str, torch.Tensor]:
    """The model's parameters under the checkpoint's names: each stacked projection split into views of its
    parts."""
    state = {}
    for name, tensor in model.state_dict().items():
        parts = stacked_parts(name)
        if len(parts) == 1:
            state[name] = tensor
        else:
            state.update(zip(parts, tensor.split(model.get_submodule(name.rsplit(".", 2)[0]).sizes)))
    return state
