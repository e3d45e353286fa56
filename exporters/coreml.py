"""Core ML export: a stateful ML Program (`.mlpackage`, iOS 18 / macOS 15) with the KV cache inside the model.

The traced module (`StatefulDecoder`) reuses the reference model's weights but is written for Core ML:

- KV cache: one key and one value buffer per layer, registered on the top module and declared as
  `ct.StateType`s. A chunk is written by slice assignment at `cache_position` (Apple's "On Device Llama 3.1
  with Core ML" recipe), which converts to `slice_update` on the state. Per-layer buffers rather than one
  stacked tensor: each write touches one layer's [1, kv_heads, max_context, head_dim] slab instead of
  reading and rewriting all layers, and each state's shape reads as what it is.
- Sliding layers keep a full `max_context` cache, not a window-length ring: a prefill chunk longer than the
  window would wrap around a ring and need a scatter (which does not convert) or two writes per chunk; with
  full-length buffers every layer has one write pattern and the window lives in the mask. The price is
  memory (270M, fp16: 38 MB of cache at 2048 tokens instead of 14 MB; at 32k, 604 MB instead of 109 MB).
  Core ML states hold fp16 only. The fp32 package therefore stores each key/value as two fp16 states, the
  rounded value and its rounding error (`*_cache_residual_{i}`), whose sum carries ~22 bits: a plain fp16
  cache moved the real model's logits far more than the pair does (BENCHMARKS.md, "Core ML").
- Inputs: `input_ids` int32 [1, query_length] (query_length ∈ `query_lengths`, `ct.EnumeratedShapes`, which
  keeps the Neural Engine usable) and `cache_position` int32 [1], the cache index of the first token. The
  causal and sliding-window masks are built inside from the position (no mask input to get wrong, no
  float mask crossing the API): key index k is visible to query p when k ≤ p (and k > p − window).
- Output: `logits` float32 [1, 1, vocab] of the chunk's last token only. All-position logits would be
  512 × 262,144 values per prefill chunk and a 512-row LM head product that nobody reads.
- fp16: Gemma's residual stream grows past fp16's 65,504 on the real weights (BENCHMARKS.md, "Core ML"),
  and x² in an RMSNorm overflows from |x| ≈ 256. So the residual stream is carried divided by
  `RESIDUAL_SCALE` (RMSNorm is scale-invariant: the embedding scale and the two post-norms that feed the
  residual divide by it, the norms that read it divide sqrt(eps) by it) and every RMSNorm divides by max |x|
  before squaring.
- LM head: the tied 262,144 × 640 embedding is held as `lm_head_chunks` constants of ≤ 16,384 rows (the
  Neural Engine's dimension limit); the head is their products concatenated, and the embedding lookup
  gathers from the same constants, so the package stores the matrix once.
"""

from __future__ import annotations

import copy
import gc
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from exporters.coreml_grids import with_source_grids
from exporters.progress import Progress, report
from exporters.registry import FORMATS, check_precisions
from exporters.signature import ExportedVariant, tensor_spec
from exporters.weight_grids import FLOAT_QUANTIZER, QUANTIZED_BITS, model_grids
from model.block_grids import BlockGrid
from model.config import Gemma3Config
from model.errors import UserError
from model.gemma3 import Gemma3Model, RMSNorm, apply_rope
from model.weights import EMBEDDING

PRECISIONS = FORMATS["coreml"].precisions
PACKAGE_NAMES = {"fp16": "model.mlpackage", "fp32": "model_fp32.mlpackage", "int8": "model_int8.mlpackage",
                 "int4": "model_int4.mlpackage"}
# States (`ct.StateType`) exist from iOS 18 / macOS 15 on: those two names of one spec version are accepted.
DEPLOYMENT_TARGETS = ("iOS18", "macOS15")
ANE_MAX_DIMENSION = 16_384
# The real model's residual stream grows past fp16's maximum (65504) in its middle layers; divided by 16 it
# stays an order of magnitude below, so longer or odder prompts keep headroom (the measured maximum:
# BENCHMARKS.md, "Core ML"). Precision is unchanged (fp16 is relative).
RESIDUAL_SCALE = 16.0
# The smallest normal fp16: the floor of max |x| in RMSNorm, so an all-zero row divides by a number, not 0.
FP16_SMALLEST_NORMAL = 2.0 ** -14
# Core ML computes in fp16 whatever the weights' grid, so the block only sets how closely the weights follow the
# float ones: 32, the size of most GGUF blocks (a source's own 16-weight blocks stay as they are).
GRID_BLOCK_SIZE = 32
GEMMA_LICENSE = "Gemma Terms of Use: https://ai.google.dev/gemma/terms"

class PeakScaledRMSNorm(nn.Module):
    """Gemma's RMSNorm, fp16-safe: x is divided by its max |x| first, so squares stay ≤ 1.

    x / sqrt(mean(x²) + eps) = s / sqrt(mean(s²) + (sqrt(eps) / peak)²) with s = x / peak; `gain` is
    (1 + weight), divided by `output_divisor` for norms whose output joins the scaled residual stream. A norm
    that reads the residual stream (divided by `input_divisor`) divides sqrt(eps) too, which keeps it exact.
    """

    def __init__(self, norm: RMSNorm, input_divisor: float = 1.0, output_divisor: float = 1.0) -> None:
        super().__init__()
        # A tensor, not a float: `float / tensor` traces as reciprocal, which Core ML computes as
        # 1 / (x + 1e-4), an error that matters when max |x| is small.
        self.register_buffer("sqrt_eps", torch.tensor([math.sqrt(norm.eps) / input_divisor]), persistent=False)
        self.register_buffer("gain", ((1.0 + norm.weight.detach().float()) / output_divisor), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        peak = x.abs().amax(-1, keepdim=True).clamp(min=FP16_SMALLEST_NORMAL)
        scaled = x / peak
        eps_term = (self.sqrt_eps / peak).square()
        return scaled * torch.rsqrt(scaled.square().mean(-1, keepdim=True) + eps_term) * self.gain


class StatefulAttention(nn.Module):
    """Attention of one layer over its state buffers (owned by `StatefulDecoder`, passed in)."""

    def __init__(self, model: Gemma3Model, layer_index: int) -> None:
        super().__init__()
        config = model.config
        attention = model.layers[layer_index].attention
        self.qkv, self.sizes, self.o_proj = attention.qkv, attention.sizes, attention.o_proj
        self.q_norm, self.k_norm = PeakScaledRMSNorm(attention.q_norm), PeakScaledRMSNorm(attention.k_norm)
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.groups = config.num_heads // config.num_kv_heads
        # Core ML's fused SDPA (iOS 18) only has the default 1/sqrt(head_dim) scale: fold any other into q.
        self.query_rescale = config.query_pre_attn_scalar ** -0.5 * math.sqrt(config.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                key_cache: tuple[torch.Tensor, ...], value_cache: tuple[torch.Tensor, ...], start: torch.Tensor
                ) -> torch.Tensor:
        q, k, v = self.qkv(x).split(self.sizes, dim=-1)
        q = q.view(1, -1, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(1, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(1, -1, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        if self.query_rescale != 1.0:
            q = q * self.query_rescale
        end = start + x.shape[1]
        keys, values = store(key_cache, k, start, end), store(value_cache, v, start, end)
        # Grouped-query attention without repeating the cache: the `groups` query heads that share a kv head
        # become extra query rows of that head ([1, kv_heads, groups * seq, head_dim]).
        grouped_q = q.reshape(1, self.num_kv_heads, -1, self.head_dim)
        grouped_mask = mask.repeat(1, 1, self.groups, 1) if self.groups > 1 else mask
        out = F.scaled_dot_product_attention(grouped_q, keys, values, attn_mask=grouped_mask)
        out = out.reshape(1, self.num_heads, -1, self.head_dim).transpose(1, 2)
        return self.o_proj(out.reshape(1, -1, self.num_heads * self.head_dim))


def store(cache: tuple[torch.Tensor, ...], x: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Write x into cache positions [start, end) and return the whole cache in x's dtype. `cache` is one fp16
    buffer (x rounded) or two (x rounded, then the rounding error: together ~22 significant bits)."""
    rounded = x.to(torch.float16)
    cache[0][:, :, start:end] = rounded
    if len(cache) == 1:
        return cache[0].to(x.dtype)
    cache[1][:, :, start:end] = (x - rounded.to(x.dtype)).to(torch.float16)
    return cache[0].to(x.dtype) + cache[1].to(x.dtype)


class StatefulBlock(nn.Module):
    def __init__(self, model: Gemma3Model, layer_index: int) -> None:
        super().__init__()
        block = model.layers[layer_index]
        self.is_sliding = block.is_sliding
        self.input_norm = PeakScaledRMSNorm(block.input_norm, input_divisor=RESIDUAL_SCALE)
        self.attention = StatefulAttention(model, layer_index)
        self.post_attention_norm = PeakScaledRMSNorm(block.post_attention_norm, output_divisor=RESIDUAL_SCALE)
        self.pre_feedforward_norm = PeakScaledRMSNorm(block.pre_feedforward_norm, input_divisor=RESIDUAL_SCALE)
        self.feed_forward = block.feed_forward
        self.post_feedforward_norm = PeakScaledRMSNorm(block.post_feedforward_norm, output_divisor=RESIDUAL_SCALE)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                key_cache: tuple[torch.Tensor, ...], value_cache: tuple[torch.Tensor, ...], start: torch.Tensor
                ) -> torch.Tensor:
        attended = self.attention(self.input_norm(x), cos, sin, mask, key_cache, value_cache, start)
        x = x + self.post_attention_norm(attended)
        return x + self.post_feedforward_norm(self.feed_forward(self.pre_feedforward_norm(x)))


class ChunkedTiedEmbedding(nn.Module):
    """The tied embedding as `chunks` row blocks: the LM head (concatenated products) and the input lookup
    (a gather per block, kept where the token falls in it) read the same constants."""

    def __init__(self, weight: torch.Tensor, chunks: int, input_scale: float) -> None:
        super().__init__()
        self.rows_per_chunk = weight.shape[0] // chunks
        self.blocks = nn.ParameterList(nn.Parameter(block.detach().clone(), requires_grad=False)
                                       for block in weight.split(self.rows_per_chunk))
        self.input_scale = input_scale

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embedded = None
        for index, block in enumerate(self.blocks):
            row = input_ids - index * self.rows_per_chunk
            inside = ((row >= 0) & (row < self.rows_per_chunk))[..., None]
            rows = F.embedding(row.clamp(0, self.rows_per_chunk - 1), block)
            part = torch.where(inside, rows, torch.zeros_like(rows))
            embedded = part if embedded is None else embedded + part
        return embedded * self.input_scale

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.linear(hidden, block) for block in self.blocks], dim=-1)


def layer_cache_names(num_layers: int, residual_cache: bool) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Per layer, the names of its (key, value) cache buffers: the cache, then its residual if kept."""
    suffixes = ("", "_residual") if residual_cache else ("",)
    return [tuple(tuple(f"{kind}_cache{suffix}_{i}" for suffix in suffixes) for kind in ("key", "value"))
            for i in range(num_layers)]


def cache_shape(config: Gemma3Config, max_context: int) -> tuple[int, ...]:
    return (1, config.num_kv_heads, max_context, config.head_dim)


def rope_tables(rope: nn.Module, max_context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_context, head_dim] for every position, computed exactly as the reference does. A lookup
    rather than cos(position × frequency) in the graph: fp16 cannot hold position × frequency (at 2048 its
    step is 2 radians)."""
    cos, sin = rope(torch.arange(max_context)[None])
    return cos[0, 0], sin[0, 0]


class StatefulDecoder(nn.Module):
    """(input_ids int32 [1, seq], cache_position int32 [1]) → logits [1, 1, vocab] of the last token; writes
    the chunk's keys/values into the `key_cache_{i}` / `value_cache_{i}` state buffers (and, with
    `residual_cache`, their rounding errors into `key_cache_residual_{i}` / `value_cache_residual_{i}`)."""

    def __init__(self, model: Gemma3Model, max_context: int, lm_head_chunks: int, residual_cache: bool = False
                 ) -> None:
        super().__init__()
        config = model.config
        self.sliding_window, self.max_context = config.sliding_window, max_context
        self.embedding = ChunkedTiedEmbedding(model.embed_tokens.weight, lm_head_chunks,
                                              model.embed_scale / RESIDUAL_SCALE)
        self.layers = nn.ModuleList(StatefulBlock(model, i) for i in range(config.num_layers))
        self.final_norm = PeakScaledRMSNorm(model.final_norm, input_divisor=RESIDUAL_SCALE)
        for name, rope in (("local", model.rope_local), ("global", model.rope_global)):
            cos, sin = rope_tables(rope, max_context)
            self.register_buffer(f"rope_cos_{name}", cos, persistent=False)
            self.register_buffer(f"rope_sin_{name}", sin, persistent=False)
        self.layer_cache_names = layer_cache_names(config.num_layers, residual_cache)
        self.cache_names = [name for layer in self.layer_cache_names for kind in layer for name in kind]
        for name in self.cache_names:
            self.register_buffer(name, torch.zeros(cache_shape(config, max_context), dtype=torch.float16))

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        # int32 throughout: fp16 compute would round positions above 2048.
        positions = cache_position + torch.arange(input_ids.shape[1], dtype=torch.int32)[None]  # [1, seq]
        key_positions = torch.arange(self.max_context, dtype=torch.int32)
        causal = key_positions[None, None, :] <= positions[..., None]  # [1, seq, max_context]
        masks = {False: causal[:, None],
                 True: (causal & (key_positions[None, None, :] > positions[..., None] - self.sliding_window))[:, None]}
        index = positions[0]
        ropes = {True: (self.rope_cos_local[index], self.rope_sin_local[index]),
                 False: (self.rope_cos_global[index], self.rope_sin_global[index])}
        x = self.embedding.embed(input_ids)
        start = cache_position[0]
        for layer, (key_names, value_names) in zip(self.layers, self.layer_cache_names):
            cos, sin = ropes[layer.is_sliding]
            key_cache = tuple(getattr(self, name) for name in key_names)
            value_cache = tuple(getattr(self, name) for name in value_names)
            x = layer(x, cos, sin, masks[layer.is_sliding], key_cache, value_cache, start)
        return self.embedding.logits(self.final_norm(x[:, -1:]))


DEFAULT_MAX_CONTEXT = 2048
DEFAULT_LM_HEAD_CHUNKS = 16  # 16 × 16,384 rows: the ANE limits a dimension to 16,384


def export(model: Gemma3Model, out_dir: Path, precision: str = "fp16", max_context: int | None = None,
           query_lengths: Sequence[int] = (1, 64, 512), lm_head_chunks: int = DEFAULT_LM_HEAD_CHUNKS,
           progress: Progress = None, deployment_target: str = "iOS18") -> ExportedVariant:
    """Convert `model` into out_dir/<PACKAGE_NAMES[precision]> and describe it."""
    return export_many(model, out_dir, [precision], max_context, query_lengths, lm_head_chunks, progress,
                       deployment_target)[0]


def export_many(model: Gemma3Model, out_dir: Path, precisions: Sequence[str], max_context: int | None = None,
                query_lengths: Sequence[int] = (1, 64, 512), lm_head_chunks: int = DEFAULT_LM_HEAD_CHUNKS,
                progress: Progress = None, deployment_target: str = "iOS18",
                source_grids: Mapping[str, BlockGrid] | None = None,
                float_quantizer: str = FLOAT_QUANTIZER) -> list[ExportedVariant]:
    """Each precision's package in `out_dir`, in the order asked. Trace + convert is most of an export (times in
    BENCHMARKS.md): fp16, int8 and int4 share one conversion (fp16 compute; the 8- and 4-bit packages compress
    its weights, which leaves it as it was), fp32 has its own (fp32 compute, the rounding-error cache).
    `source_grids`: a quantized source's own grids, which int8 and int4 both carry (`coreml_grids`); only the
    weights without one are rounded, by `float_quantizer` (exporters/weight_grids.py)."""
    config = model.config
    if max_context is None:  # 2048, or the whole context of a model that has less (tiny: 1024)
        max_context = min(DEFAULT_MAX_CONTEXT, config.context_length)
    for precision in precisions:
        query_lengths = check_options(config, precision, max_context, tuple(query_lengths), lm_head_chunks,
                                      deployment_target)
    if next(model.parameters()).dtype != torch.float32:
        model = copy.deepcopy(model).float()  # the caller's model stays as it was; precision is Core ML's job
    by_conversion: dict[bool, list[str]] = {}
    for precision in precisions:
        by_conversion.setdefault(precision == "fp32", []).append(precision)
    variants: dict[str, ExportedVariant] = {}
    for float32_compute, made_from_it in by_conversion.items():
        decoder = StatefulDecoder(model.eval(), max_context, lm_head_chunks, residual_cache=float32_compute).eval()
        converted = convert(decoder, config, max_context, query_lengths, float32_compute, progress)
        io = package_io(config, decoder.cache_names, cache_shape(config, max_context), query_lengths)
        state_names = list(decoder.cache_names)
        del decoder
        for precision in made_from_it:
            mlmodel = converted
            if precision in ("int8", "int4"):
                report(progress, "compress")
                mlmodel = compressed(converted, model, precision, source_grids or {}, lm_head_chunks, float_quantizer)
            report(progress, "save")
            describe(mlmodel, config, precision, max_context, query_lengths, lm_head_chunks, state_names)
            path = Path(out_dir) / PACKAGE_NAMES[precision]
            mlmodel.save(str(path))
            variants[precision] = ExportedVariant(
                precision=precision, files=[path.name], io=io,
                options=export_options(max_context, query_lengths, lm_head_chunks),
                deployment_target=deployment_target, logits_dtype="float32")
            del mlmodel
        del converted
        gc.collect()  # before the next conversion: a converted program holds a copy of the weights
    return [variants[precision] for precision in precisions]


def convert(decoder: StatefulDecoder, config: Gemma3Config, max_context: int, query_lengths: tuple[int, ...],
            float32_compute: bool, progress: Progress) -> Any:
    """`decoder` traced, then converted to an ML Program (not loaded: prediction needs macOS)."""
    import coremltools as ct

    report(progress, "trace")
    example = (torch.zeros(1, query_lengths[-1], dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    with torch.no_grad():
        traced = torch.jit.trace(decoder, example, check_trace=False)
    report(progress, "convert")
    return ct.convert(
        traced,
        inputs=[ct.TensorType("input_ids", shape=input_ids_shape(query_lengths), dtype=np.int32),
                ct.TensorType("cache_position", shape=(1,), dtype=np.int32)],
        outputs=[ct.TensorType("logits", dtype=np.float32)],
        states=state_types(decoder.cache_names, cache_shape(config, max_context)),
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT32 if float32_compute else ct.precision.FLOAT16,
        convert_to="mlprogram",
        skip_model_load=True,
    )


def check_options(config: Gemma3Config, precision: str, max_context: int, query_lengths: tuple[int, ...],
                  lm_head_chunks: int, deployment_target: str) -> tuple[int, ...]:
    """Every option a user can get wrong, refused before minutes of conversion; returns the sorted lengths."""
    check_precisions("coreml", [precision])
    if deployment_target not in DEPLOYMENT_TARGETS:
        raise UserError(f"deployment target {deployment_target!r} is not supported: the stateful KV cache needs "
                        "iOS 18 / macOS 15 or later", f"use one of: {', '.join(DEPLOYMENT_TARGETS)}")
    if not 1 <= max_context <= config.context_length:
        raise UserError(f"max_context {max_context} is outside 1..{config.context_length} (the model's context)",
                        "pass e.g. 2048")
    if not query_lengths or any(not 1 <= n <= max_context for n in query_lengths) or 1 not in query_lengths:
        raise UserError(f"query lengths {list(query_lengths)} must include 1 (decode) and stay within "
                        f"max_context ({max_context})", "pass e.g. (1, 64, 512)")
    rows = config.vocab_size // lm_head_chunks if lm_head_chunks > 0 else 0
    if lm_head_chunks < 1 or config.vocab_size % lm_head_chunks or rows > ANE_MAX_DIMENSION:
        raise UserError(f"lm_head_chunks {lm_head_chunks} must divide the vocabulary ({config.vocab_size}) into "
                        f"chunks of at most {ANE_MAX_DIMENSION} rows (the Neural Engine's limit)",
                        f"use {max(1, -(-config.vocab_size // ANE_MAX_DIMENSION))} or a multiple of it that "
                        "divides the vocabulary")
    return tuple(sorted(set(query_lengths)))


def input_ids_shape(query_lengths: tuple[int, ...]) -> Any:
    """Enumerated shapes (the Neural Engine accepts these, not ranges); one length is a fixed shape."""
    import coremltools as ct

    if len(query_lengths) == 1:
        return (1, query_lengths[0])
    return ct.EnumeratedShapes([(1, n) for n in query_lengths], default=(1, 1))


def state_types(names: list[str], shape: tuple[int, ...]) -> list[Any]:
    """Core ML states hold fp16 only (coremltools refuses others)."""
    import coremltools as ct

    return [ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=name) for name in names]


def compressed(converted: Any, model: Gemma3Model, precision: str, source_grids: Mapping[str, BlockGrid],
               lm_head_chunks: int, float_quantizer: str = FLOAT_QUANTIZER) -> Any:
    """Every weight matrix as its grid (exporters/weight_grids.py: the source's own, else the float weights
    rounded, the embedding at 8 bits), in blocks of at most GRID_BLOCK_SIZE."""
    bits = QUANTIZED_BITS[precision]
    grids = model_grids(model, source_grids, bits, GRID_BLOCK_SIZE, float_quantizer)
    originals = {name: parameter.detach().float().numpy() for name, parameter in model.state_dict().items()
                 if name in grids}
    return with_source_grids(converted, grids, originals, EMBEDDING, lm_head_chunks)


def describe(mlmodel: Any, config: Gemma3Config, precision: str, max_context: int,
             query_lengths: tuple[int, ...], lm_head_chunks: int, state_names: Sequence[str]) -> None:
    """What a Swift app reads from the package (`MLModel.modelDescription`): descriptions of the inputs and
    output, and in the user-defined metadata the state names, the tokenizer's special ids and the context."""
    mlmodel.author = "Google DeepMind (Gemma 3 weights); exported by gemma-export"
    mlmodel.license = GEMMA_LICENSE
    mlmodel.short_description = (f"Gemma 3 text decoder ({precision}) with a stateful KV cache of {max_context} "
                                 "tokens: feed a chunk of token ids at its cache position, get the next-token logits.")
    mlmodel.version = package_version()
    mlmodel.input_description["input_ids"] = (f"int32 [1, n] token ids, n in {list(query_lengths)}: a prompt chunk "
                                              "or the one token to decode")
    mlmodel.input_description["cache_position"] = ("int32 [1]: cache index (= position) of the chunk's first token; "
                                                   f"the chunk must end at or before {max_context}")
    mlmodel.output_description["logits"] = f"float32 [1, 1, {config.vocab_size}]: next-token logits of the chunk's last token"
    options = export_options(max_context, query_lengths, lm_head_chunks)
    mlmodel.user_defined_metadata.update({key: str(value) for key, value in options.items()} | {
        "precision": precision, "vocab_size": str(config.vocab_size), "max_context": str(max_context),
        "state_names": ",".join(state_names),
        "states": "fp16 KV cache per layer, [1, kv_heads, max_context, head_dim]: one model.makeState() per "
                  "sequence, passed to every prediction(from:using:)",
        "bos_token_id": str(config.bos_token_id), "eos_token_ids": ",".join(map(str, config.eos_token_ids)),
        "pad_token_id": str(config.pad_token_id), "tokenizer": "tokenizer.json beside the package (bundle folder)",
        "chat_template": "<start_of_turn>user\n{message}<end_of_turn>\n<start_of_turn>model\n"})


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gemma-export")
    except PackageNotFoundError:
        return "0.0.0"


def export_options(max_context: int, query_lengths: tuple[int, ...], lm_head_chunks: int) -> dict[str, Any]:
    import coremltools as ct

    return {"max_context": max_context, "query_lengths": list(query_lengths), "lm_head_chunks": lm_head_chunks,
            "residual_scale": RESIDUAL_SCALE,
            "kv_cache": "per-layer fp16 states of max_context slots (fp32: value + rounding-error pairs)",
            "coremltools_version": ct.__version__, "torch_version": torch.__version__}


def package_io(config: Gemma3Config, state_names: list[str], state_shape: tuple[int, ...],
               query_lengths: tuple[int, ...]) -> dict[str, list[dict[str, Any]]]:
    seq = "seq" if len(query_lengths) > 1 else query_lengths[0]
    return {"inputs": [tensor_spec("input_ids", "int32", [1, seq]), tensor_spec("cache_position", "int32", [1])],
            "outputs": [tensor_spec("logits", "float32", [1, 1, config.vocab_size])],
            "states": [tensor_spec(name, "float16", list(state_shape)) for name in state_names]}
