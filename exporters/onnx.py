"""ONNX export of the explicit-cache decoder at four precisions (its onnxruntime loop, `OnnxDecoder`, is in
`validation/onnx_runtime.py`).

One graph serves prefill (past = 0) and decode (seq = 1), with the Optimum / transformers.js I/O names from
`exporters.signature.decoder_io`, and the axis names Optimum writes (`batch_size`, `sequence_length`,
`past_sequence_length`, ...: transformers.js builds its empty past from them). File names and folder follow a
Hugging Face model repository as transformers.js and Optimum read it: `onnx/model.onnx`, `onnx/model_fp16.onnx`,
`onnx/model_int8.onnx`, `onnx/model_q4.onnx`, each with its weights in one `<name>_data` file beside it
(`exporters.hf_repo` writes the repository's root files).
- every precision: positions come from `attention_mask` (HF's rule, cumsum − 1), not from the `position_ids`
  input, which is accepted and ignored: transformers.js feeds 1-based positions for Gemma 3.

- fp32: the LM head reads the embedding's initializer (the 671 MB matrix is stored once).
- fp16: every linear layer, the embedding and the LM head hold fp16 weights and compute in fp16, but take and
  return float32: Gemma's residual stream grows past fp16's maximum (65 504) on the real 270M weights and
  RMSNorm squares it, so the residual stream, norms, attention and the KV cache stay float32. Made from the
  traced fp32 graph (`with_float16_weights`).
- every precision: the projections that read the same input run as one MatMul (q|k|v, gate|up), as in the model:
  one kernel where there were three and two, and each int8 / int4 `MatMulNBits` rounds its input once (BENCHMARKS.md).
- every precision: attention is `GroupedQueryAttention` (KV heads shared without copies, sliding layers
  bounded to their window), which keeps decode speed nearly flat with the past length (issue 6).
- int8 / int4: every weight matrix as a block grid (`exporters.onnx_quantize`): `MatMulNBits` for the linear
  layers and the LM head, `GatherBlockQuantized` for the embedding, which shares the head's 8-bit table. From a
  quantized GGUF the grids are the file's own, carried exactly; from float weights, round-to-nearest per block
  of 32 (layers at the precision's bits, embedding at 8). Made from the traced fp32 graph (`export_many`
  traces once for every precision).
- every precision: a sliding layer's past has its own axis, `sliding_past`, and may hold only its newest keys
  (≥ window − 1; positions and validity come from the end of `attention_mask`): `OnnxDecoder` cuts it back,
  so a step at 8k context does not copy 15 whole sliding pasts into their presents. The window is in the
  file's metadata. Whole pasts (Optimum, transformers.js) work as before.
- every precision: an optional input `num_logits_to_keep` (default 0: every position) runs the LM head on the
  last N positions only; `OnnxDecoder` asks for 1 in prefill (`with_logits_to_keep`).
"""

from __future__ import annotations

import copy
import gc
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.optimizer
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from model.config import Gemma3Config
from model.errors import UserError
from model.gemma3 import (Attention, Gemma3Model, RMSNorm, apply_rope, attention_mask_for,
                          positions_from_mask)
from model.interrupts import raise_if_interrupted
from model.kv_cache import ConcatKVCache, ConcatLayerKVCache
from exporters.onnx_quantize import ACCURACY_LEVEL, BLOCK_SIZE, quantized_model_graph
from exporters.progress import Progress, report
from exporters.registry import check_precisions
from exporters.signature import ExportedVariant, decoder_io, past_names, tensor_spec
from exporters.weight_grids import FLOAT_QUANTIZER, QUANTIZED_BITS, stacked_grids, tensor_grids
from model.block_grids import BlockGrid

ONNX_FOLDER = "onnx"
MODEL_FILES = {"fp32": "onnx/model.onnx", "fp16": "onnx/model_fp16.onnx", "int8": "onnx/model_int8.onnx",
               "int4": "onnx/model_q4.onnx"}
OPSET = 18
LOGITS = "logits"
# Optional input: logits of the last N positions only (0, the default: all). The name ORT GenAI models use.
LOGITS_TO_KEEP = "num_logits_to_keep"
KEPT_AXIS = "kept_sequence_length"  # logits' axis 1: `sequence_length`, or N when num_logits_to_keep = N > 0
# Optional input: full layers' presents hold only the new keys, for a loop that keeps their cache
# (`with_new_only_full_presents`).
NEW_ONLY_PRESENTS = "full_presents_new_only"
# torch.export specializes dimensions of size 0 and 1, so the sample inputs use ≥ 2 on every dynamic axis;
# `check_edge_shapes` then runs the saved graph with past = 0 and seq = 1. A sliding layer's past has its own
# axis, `sliding_past` (≤ past: it may hold only the newest keys), sampled shorter so that nothing ties the two.
SAMPLE_BATCH, SAMPLE_SEQ, SAMPLE_PAST, SAMPLE_SLIDING_PAST = 2, 3, 4, 2
SLIDING_PAST_AXIS = "sliding_past_sequence_length"
OLD_SLIDING_PAST_AXIS = "sliding_past"  # files exported before the Optimum axis names
# Our axis names → Optimum's (transformers.js resolves `batch_size` when it builds an empty past; every other
# symbolic axis of a past becomes 0 there).
OPTIMUM_AXES = {"batch": "batch_size", "seq": "sequence_length", "past": "past_sequence_length",
                "past + seq": "past_sequence_length + sequence_length", "sliding_past": SLIDING_PAST_AXIS,
                "sliding_past + seq": f"{SLIDING_PAST_AXIS} + sequence_length"}
# Model metadata (`custom_metadata_map` in onnxruntime): the window, for a loop that cuts sliding pasts.
SLIDING_WINDOW_KEY = "gemma3.sliding_window"


def export(model: Gemma3Model, out_dir: Path, precision: str = "fp32", progress: Progress = None) -> ExportedVariant:
    """Write `MODEL_FILES[precision]` and its external data into `out_dir`; return what was written."""
    return export_many(model, out_dir, [precision], progress)[0]


def export_many(model: Gemma3Model, out_dir: Path, precisions: Sequence[str], progress: Progress = None,
                source_grids: Mapping[str, BlockGrid] | None = None,
                float_quantizer: str = FLOAT_QUANTIZER) -> list[ExportedVariant]:
    """Write each precision's file into `out_dir`; return their variants in the order asked. The trace
    (`torch.onnx.export`) is most of an export (times in BENCHMARKS.md): every precision is made from one traced
    float32 graph (quantized, or its weights stored in fp16). `source_grids`: the quantized source's own grids
    (parameter name → grid), which int8 / int4 carry instead of rounding those weights again; `float_quantizer`
    rounds the others (exporters/weight_grids.py)."""
    for precision in precisions:
        check_precision(precision)
    if model.embed_tokens.weight.dtype != torch.float32:
        raise UserError(f"ONNX export needs the float32 model, got {model.embed_tokens.weight.dtype}",
                        "load the model with dtype float32; precision variants are made by the exporter")

    report(progress, "export")
    traced = export_graph(decoder_for(model.eval()), model.config)
    report(progress, "optimize")
    onnxscript.optimizer.optimize(traced)
    traced = with_new_only_full_presents(with_logits_to_keep(traced), model.config)
    variants = {}
    for precision in sorted(precisions, key=lambda precision: precision == "fp16"):  # fp16 changes `traced`: last
        graph, grids = traced, None
        if precision in QUANTIZED_BITS:
            report(progress, "quantize")
            bits = QUANTIZED_BITS[precision]
            grids = tensor_grids(model, source_grids or {}, bits, BLOCK_SIZE[bits], float_quantizer)
            graph = quantized_model_graph(traced, model, stacked_grids(model, grids))  # `traced` stays as it was
        elif precision == "fp16":
            report(progress, "float16")
            graph = with_float16_weights(traced)
        variants[precision] = save_variant(graph, Path(out_dir) / MODEL_FILES[precision], precision, model.config,
                                           progress, grids)
        del graph
        gc.collect()  # an IR graph is a web of cycles (nodes ↔ graph): freed by the collector, not by `del`
    return [variants[precision] for precision in precisions]


def save_variant(graph: ir.Model, model_path: Path, precision: str, config: Gemma3Config,
                 progress: Progress, grids: Mapping[str, BlockGrid] | None = None) -> ExportedVariant:
    data_name = external_data_name(model_path.name)
    report(progress, "save")
    model_path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(graph, model_path, external_data=data_name)
    report(progress, "check")
    onnx.checker.check_model(str(model_path))
    check_edge_shapes(model_path)
    kv_dtype = "float32"
    folder = f"{model_path.parent.name}/" if model_path.parent.name == ONNX_FOLDER else ""
    return ExportedVariant(precision=precision, files=[folder + model_path.name, folder + data_name],
                           io=onnx_io(config, kv_dtype),
                           options=variant_options(precision, kv_dtype, grids), opset=graph.opset_imports[""],
                           logits_dtype="float32")


def write_bundle_files(folder: Path, config: Gemma3Config, variants: Mapping[str, Mapping[str, Any]],
                       source: Mapping[str, Any]) -> None:
    """The bundle's Hugging Face repository files (genai_config.json, tokenizer_config.json, the model card...)."""
    from exporters.hf_repo import write_repo_files
    write_repo_files(folder, config, variants, source)


def onnx_io(config: Gemma3Config, kv_dtype: str) -> dict[str, list[dict[str, Any]]]:
    """The shared decoder signature with Optimum's axis names and these changes: a sliding layer's past and
    present have their own axis (`sliding_past_sequence_length`: that past may hold only the newest keys), the
    optional
    `num_logits_to_keep` (default 0: every position) makes the logits' axis 1 `seq` or N, and the optional
    `full_presents_new_only` (default False) makes full layers' presents hold only the `seq` new keys/values."""
    io = decoder_io(config, kv_dtype)
    for spec in [*io["inputs"], *io["outputs"]]:
        sliding = spec["name"].startswith(("past_key_values.", "present.")) and is_sliding_cache(spec["name"], config)
        spec["shape"] = [OPTIMUM_AXES[axis.replace("past", "sliding_past") if sliding else axis]
                         if isinstance(axis, str) else axis for axis in spec["shape"]]
    io["inputs"].append({**tensor_spec(LOGITS_TO_KEEP, "int64", []), "default": 0})
    io["inputs"].append({**tensor_spec(NEW_ONLY_PRESENTS, "bool", []), "default": False})
    logits = next(spec for spec in io["outputs"] if spec["name"] == LOGITS)
    logits["shape"] = [logits["shape"][0], KEPT_AXIS, *logits["shape"][2:]]
    return io


def is_sliding_cache(name: str, config: Gemma3Config) -> bool:
    """`past_key_values.3.key` / `present.3.value` → whether layer 3 is a sliding-window layer."""
    return config.is_sliding(int(name.split(".")[1]))


def check_precision(precision: str) -> None:
    check_precisions("onnx", [precision])


def external_data_name(model_file: str) -> str:
    """transformers.js and Optimum look for `<model file>_data` next to the model."""
    return f"{model_file}_data"


def variant_options(precision: str, kv_dtype: str, grids: Mapping[str, BlockGrid] | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {"external_data": True, "kv_dtype": kv_dtype}
    if precision in QUANTIZED_BITS:
        options["quantization"] = {
            "method": "MatMulNBits", "bits": QUANTIZED_BITS[precision], "accuracy_level": ACCURACY_LEVEL,
            "lm_head": "MatMulNBits", "embedding": "GatherBlockQuantized (the LM head's table)",
            "weight_grids": dict(Counter(grid.source_type for grid in (grids or {}).values()))}
    else:
        options["weights_dtype"] = "float16" if precision == "fp16" else "float32"
    return options


# ---- the module that is exported -------------------------------------------------------------------------

class DecoderWithPast(nn.Module):
    """`model.forward_with_past` with flat tensors in and out (ONNX has no nested inputs) and a chosen LM head."""

    def __init__(self, model: Gemma3Model, lm_head: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.lm_head = lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *flat_past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # Positions from the mask (HF's rule), whatever `position_ids` says: transformers.js feeds Gemma 3
        # 1-based ones, other runtimes 0-based. The input stays in the signature (`keep_position_ids_input`).
        position_ids = positions_from_mask(attention_mask, input_ids.shape[1])
        past = list(zip(flat_past[0::2], flat_past[1::2]))
        cache = ConcatKVCache(past, attention_mask)
        # From the mask: a sliding layer's past may hold only its newest keys (`OnnxDecoder` cuts them).
        cache_position = torch.arange(input_ids.shape[1]) + (attention_mask.shape[1] - input_ids.shape[1])
        hidden = self.model.hidden_states(input_ids, attention_mask, position_ids, cache, cache_position)
        presents = cache.presents()
        return (self.lm_head(hidden), *[tensor for key_value in presents for tensor in key_value])


class TiedLMHead(nn.Module):
    """Logits from the embedding matrix itself, so the file stores it once."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self.embedding = embedding

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embedding.weight)


class GroupedQueryAttention(nn.Module):
    """`Attention` with the same weights, written for a decode step in ONNX Runtime rather than for PyTorch.

    What torch's SDPA decomposes into costs more than the weights at long context: `repeat_interleave` copies
    every key and value `num_heads / num_kv_heads` times, both queries and keys are scaled (a pass over all
    keys), and a NaN guard follows the softmax. Here the query heads of one KV head are stacked into the rows
    of one MatMul against the shared keys, only the queries are scaled, and no row is ever empty (a query
    always sees itself), so no NaN guard. Full layers read past and chunk apart, so their long past is not
    copied to be read. Sliding layers attend to the last `window - 1 + seq` keys only: the past may be longer
    (the I/O contract keeps it whole) but older keys are masked out anyway. (Sliding layers read apart too, with
    presents of new keys only and pasts kept in buffers, measured slower: 36 `If` nodes and 30 slices of the
    window cost more than the cut pasts' concats; BENCHMARKS.md.)
    """

    def __init__(self, attention: Attention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                valid: torch.Tensor, cache: ConcatLayerKVCache) -> torch.Tensor:
        attention = self.attention
        batch, seq, _ = x.shape
        # q/k norms before the head transpose: after it, onnxruntime moves the Transpose into the norm's
        # pattern and no longer fuses it.
        q, k, v = attention.qkv(x).split(attention.sizes, dim=-1)
        q = attention.q_norm(q.view(batch, seq, attention.num_heads, attention.head_dim))
        k = attention.k_norm(k.view(batch, seq, attention.num_kv_heads, attention.head_dim))
        v = v.view(batch, seq, attention.num_kv_heads, attention.head_dim).transpose(1, 2)
        q = apply_rope(q.transpose(1, 2), cos, sin) * attention.scale
        k = apply_rope(k.transpose(1, 2), cos, sin)
        groups = attention.num_heads // attention.num_kv_heads
        grouped_q = q.reshape(batch, attention.num_kv_heads, groups * seq, attention.head_dim)
        if attention.sliding_window is None:
            # Past and chunk read apart (their scores side by side, one softmax): nothing in the attention copies
            # the long past, so a loop that keeps the cache itself can drop the present's copy too
            # (`with_new_only_full_presents`).
            past_k, past_v, key_positions, key_valid = cache.update_apart(k, v)
            scores = torch.cat([torch.matmul(grouped_q, past_k.transpose(2, 3)),
                                torch.matmul(grouped_q, k.transpose(2, 3))], dim=-1)
        else:
            k, v, key_positions, key_valid = cache.update(k, v, positions, valid)
            first = torch.sym_max(k.shape[2] - (attention.sliding_window - 1 + seq), 0)
            k, v, key_positions, key_valid = k[:, :, first:], v[:, :, first:], key_positions[first:], \
                key_valid[:, first:]
            scores = torch.matmul(grouped_q, k.transpose(2, 3))
        allowed = attention_mask_for(positions, key_positions, key_valid, attention.sliding_window)[:, :, None]
        probs = scores.view(batch, attention.num_kv_heads, groups, seq, -1).masked_fill(~allowed, float("-inf"))
        probs = probs.softmax(-1).view(batch, attention.num_kv_heads, groups * seq, -1)
        if attention.sliding_window is None:
            past_length = past_k.shape[2]
            out = torch.matmul(probs[..., :past_length], past_v) + torch.matmul(probs[..., past_length:], v)
        else:
            out = torch.matmul(probs, v)
        return attention.o_proj(out.view(batch, attention.num_heads, seq, attention.head_dim).transpose(1, 2)
                        .reshape(batch, seq, attention.num_heads * attention.head_dim))


class FusableRMSNorm(nn.Module):
    """`RMSNorm` with the same numbers in the form onnxruntime fuses into one `SimplifiedLayerNormalization`:
    x / sqrt(mean(x²) + ε) · w, with w = 1 + weight computed once here. torch exports `rsqrt` as Sqrt →
    Reciprocal → Mul, which the fusion does not match: unfused, the real 270M's 109 norms were hundreds of small
    ops a step and a large share of the int4 time to first token (profile in BENCHMARKS.md). It stays here, not
    in model/: `x / sqrt(·)` rounds differently from Hugging Face's `x * rsqrt(·)`, which model/ matches bit for bit."""

    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.eps = norm.eps
        self.scale = nn.Parameter(1.0 + norm.weight.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.scale).to(x.dtype)


def with_grouped_attention(model: Gemma3Model) -> Gemma3Model:
    """A copy of `model`'s modules (sharing its weights) whose attention is `GroupedQueryAttention` and norms
    `FusableRMSNorm`."""
    shared = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}
    converted = copy.deepcopy(model, memo=shared)
    for layer in converted.layers:
        layer.attention = GroupedQueryAttention(layer.attention)
    norms = [(name, module) for name, module in converted.named_modules() if isinstance(module, RMSNorm)]
    for name, norm in norms:
        parent_name, _, child_name = name.rpartition(".")
        setattr(converted.get_submodule(parent_name), child_name, FusableRMSNorm(norm))
    return converted


def decoder_for(model: Gemma3Model) -> DecoderWithPast:
    """The module that is traced: grouped attention, fusable norms, tied head."""
    model = with_grouped_attention(model)
    return DecoderWithPast(model, TiedLMHead(model.embed_tokens)).eval()


# ---- export, quantize, check -----------------------------------------------------------------------------

def sample_inputs(config: Gemma3Config) -> tuple[torch.Tensor, ...]:
    total = SAMPLE_PAST + SAMPLE_SEQ
    input_ids = torch.randint(0, config.vocab_size, (SAMPLE_BATCH, SAMPLE_SEQ))
    attention_mask = torch.ones(SAMPLE_BATCH, total, dtype=torch.long)
    position_ids = torch.arange(SAMPLE_PAST, total).expand(SAMPLE_BATCH, SAMPLE_SEQ).contiguous()
    past = []
    for layer in range(config.num_layers):
        length = SAMPLE_SLIDING_PAST if config.is_sliding(layer) else SAMPLE_PAST
        past += [torch.zeros(SAMPLE_BATCH, config.num_kv_heads, length, config.head_dim) for _ in range(2)]
    return (input_ids, attention_mask, position_ids, *past)


def dynamic_shapes(config: Gemma3Config) -> tuple[Any, ...]:
    batch, seq, past = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length")
    sliding_past = Dim(SLIDING_PAST_AXIS)
    # The mask spans past + seq; torch.export cannot name a sum of two dims, so it infers that one (AUTO).
    kv_axes = tuple({0: batch, 2: sliding_past if config.is_sliding(layer) else past}
                    for layer in range(config.num_layers) for _ in range(2))
    return ({0: batch, 1: seq}, {0: batch, 1: Dim.AUTO}, {0: batch, 1: seq}, kv_axes)


def export_graph(decoder: DecoderWithPast, config: Gemma3Config) -> ir.Model:
    io = onnx_io(config, "float32")
    with torch.no_grad():
        program = torch.onnx.export(
            decoder, sample_inputs(config), dynamo=True, opset_version=OPSET, optimize=False, verbose=False,
            dynamic_shapes=dynamic_shapes(config), input_names=[spec["name"] for spec in decoder_io(config)["inputs"]],
            output_names=[spec["name"] for spec in io["outputs"]])
    graph = program.model
    name_axes(graph, io)
    graph.metadata_props[SLIDING_WINDOW_KEY] = str(config.sliding_window)
    return graph


def with_logits_to_keep(graph: ir.Model) -> ir.Model:
    """Add the optional input `num_logits_to_keep` (int64 scalar, default 0 = every position, as the standard
    contract has it): the LM head then runs on the last N positions only. A prompt needs the last token's
    logits, and the 262,144-wide head on every prompt position was most of the prefill and of the time to first
    token (BENCHMARKS.md, "The prompt's logits only"). The input has a default (an initializer of
    the same name), so onnxruntime does not list it among the required inputs: Optimum and transformers.js,
    which do not know it, run the file as before."""
    main = graph.graph
    logits = next(value for value in main.outputs if value.name == LOGITS)
    head = logits.producer()
    if head.op_type != "MatMul":
        raise RuntimeError(f"the logits come from a {head.op_type}, not the LM head's MatMul")

    def constant(suffix: str, values: list[int]) -> ir.Value:
        value = ir.Value(name=f"{LOGITS_TO_KEEP}/{suffix}", shape=ir.Shape([len(values)]),
                         type=ir.TensorType(ir.DataType.INT64), const_value=ir.tensor(np.array(values, np.int64)))
        main.register_initializer(value)
        return value

    count = ir.Value(name=LOGITS_TO_KEEP, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.INT64),
                     const_value=ir.tensor(np.array(0, np.int64)))
    main.inputs.append(count)
    main.register_initializer(count)  # the default; a feed of the same name overrides it
    zero, end, axis = constant("zero", [0]), constant("end", [np.iinfo(np.int64).max]), constant("axis", [1])
    # start = -N when N > 0, else 0; Slice(hidden, start, end, axis 1) keeps the last N positions (or all).
    unsqueeze = ir.Node("", "Unsqueeze", [count, zero], name=f"{LOGITS_TO_KEEP}/Unsqueeze")
    positive = ir.Node("", "Greater", [unsqueeze.outputs[0], zero], name=f"{LOGITS_TO_KEEP}/Greater")
    negated = ir.Node("", "Neg", [unsqueeze.outputs[0]], name=f"{LOGITS_TO_KEEP}/Neg")
    start = ir.Node("", "Where", [positive.outputs[0], negated.outputs[0], zero], name=f"{LOGITS_TO_KEEP}/Where")
    sliced = ir.Node("", "Slice", [head.inputs[0], start.outputs[0], end, axis], name=f"{LOGITS_TO_KEEP}/Slice")
    main.insert_before(head, [unsqueeze, positive, negated, start, sliced])
    head.replace_input_with(0, sliced.outputs[0])
    logits.shape = ir.Shape([logits.shape[0], KEPT_AXIS, logits.shape[2]])
    return graph


def with_new_only_full_presents(graph: ir.Model, config: Gemma3Config) -> ir.Model:
    """Add the optional input `full_presents_new_only` (bool scalar, default False: the standard contract).
    When True, a full-attention layer's `present` holds only the chunk's new keys/values instead of past + new:
    a loop that keeps those layers' cache in buffers of its own appends them there and feeds a view of the
    buffer as the next past. At 8k context the 3 full layers' present = past + new copies ~50 MB a step, which
    cutting the sliding pasts (`OnnxDecoder.cut_sliding_pasts`) does not touch. Each such present becomes an
    `If` on the flag: `Identity(new)` or the original `Concat(past, new)`, which nothing else reads
    (`GroupedQueryAttention` reads a full layer's past and new keys apart). Optimum and transformers.js never
    feed the flag."""
    main = graph.graph
    flag = ir.Value(name=NEW_ONLY_PRESENTS, shape=ir.Shape([]), type=ir.TensorType(ir.DataType.BOOL),
                    const_value=ir.tensor(np.array(False)))
    main.inputs.append(flag)
    main.register_initializer(flag)  # the default; a feed of the same name overrides it
    for index, present in enumerate(list(main.outputs)):
        if not present.name.startswith("present.") or is_sliding_cache(present.name, config):
            continue
        concat = present.producer()
        if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2 or len(present.uses()) != 0:
            raise RuntimeError(f"{present.name} is not a Concat(past, new) that only the output reads")
        name = present.name
        main.remove(concat)
        main.outputs.pop(index)
        present.name = f"{name}/past_and_new"
        identity = ir.Node("", "Identity", [concat.inputs[1]], name=f"{name}/new_only")
        identity.outputs[0].name = f"{name}/new_only"
        choose = ir.Node("", "If", [flag], num_outputs=1, name=f"{name}/If", attributes=[
            ir.AttrGraph("then_branch", ir.Graph([], identity.outputs, nodes=[identity], name=f"{name}/new")),
            ir.AttrGraph("else_branch", ir.Graph([], [present], nodes=[concat], name=f"{name}/whole"))])
        main.append(choose)  # after everything it reads (the past input and the new keys)
        chosen = choose.outputs[0]
        chosen.name, chosen.shape, chosen.type = name, present.shape, present.type
        main.outputs.insert(index, chosen)
    return graph


def with_float16_weights(graph: ir.Model) -> ir.Model:
    """The fp16 file from the traced fp32 graph, in place: every weight matrix (an initializer that a MatMul
    reads as its weight, directly or through the tied head's Transpose; the embedding's Gather reads the same
    one) is stored in fp16, each such MatMul casts its input to fp16 and its product back to float32, and the
    Gather its rows. Norms, attention, the residual stream and the cache stay float32 (see the module note).
    That is the graph a trace of fp16 modules gives (Cast → MatMul → Cast), without a second trace, the longest
    step of an export (BENCHMARKS.md, "One trace for all four ONNX precisions")."""
    main = graph.graph

    def weight_of(value: ir.Value) -> ir.Value | None:
        producer = value.producer()
        if producer is not None and producer.op_type == "Transpose":
            value = producer.inputs[0]
        return value if value.is_initializer() and value.dtype == ir.DataType.FLOAT else None

    def cast(value: ir.Value, dtype: ir.DataType, name: str) -> ir.Node:
        return ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", dtype)], name=name)

    def float32_after(node: ir.Node) -> None:
        """Its output becomes fp16; a Cast back to float32 takes its place for every reader."""
        half = node.outputs[0]
        back = cast(half, ir.DataType.FLOAT, f"{node.name}/to_float32")
        main.insert_after(node, back)
        back.outputs[0].shape, back.outputs[0].type = half.shape, ir.TensorType(ir.DataType.FLOAT)
        was_output = half.is_graph_output()
        name = half.name
        half.replace_all_uses_with(back.outputs[0], replace_graph_outputs=True)
        back.replace_input_with(0, half)  # replace_all_uses_with rewired the Cast's own input too
        half.dtype = ir.DataType.FLOAT16
        if was_output:
            half.name, back.outputs[0].name = f"{name}/float16", name

    matmuls = [node for node in main if node.op_type == "MatMul" and weight_of(node.inputs[1]) is not None]
    weights = {id(weight): weight for weight in (weight_of(node.inputs[1]) for node in matmuls)}.values()
    for weight in weights:
        weight.const_value = ir.tensor(weight.const_value.numpy().astype(np.float16), name=weight.name)
        weight.dtype = ir.DataType.FLOAT16
        for reader, _ in list(weight.uses()):
            if reader.op_type not in ("MatMul", "Transpose", "Gather"):
                raise RuntimeError(f"weight {weight.name} is read by a {reader.op_type}: not a linear layer's")
            if reader.op_type == "Transpose":
                reader.outputs[0].dtype = ir.DataType.FLOAT16
            elif reader.op_type == "Gather":
                float32_after(reader)
    for matmul in matmuls:
        to_half = cast(matmul.inputs[0], ir.DataType.FLOAT16, f"{matmul.name}/to_float16")
        main.insert_before(matmul, to_half)
        to_half.outputs[0].shape = matmul.inputs[0].shape
        to_half.outputs[0].dtype = ir.DataType.FLOAT16
        matmul.replace_input_with(0, to_half.outputs[0])
        float32_after(matmul)
    return graph


def name_axes(graph: ir.Model, io: Mapping[str, list[dict[str, Any]]]) -> None:
    """Give every graph input and output the axis names of `io` (Optimum's): torch.export names the sum of two
    dims by itself (e.g. `s53` for the mask), and transformers.js reads these names to build an empty past."""
    specs = {spec["name"]: spec["shape"] for spec in [*io["inputs"], *io["outputs"]]}
    for value in [*graph.graph.inputs, *graph.graph.outputs]:
        if value.name in specs and value.shape is not None:
            value.shape = ir.Shape([axis if isinstance(axis, int) else ir.SymbolicDim(axis)
                                    for axis in specs[value.name]])


def check_edge_shapes(model_path: Path) -> None:
    """The shapes torch.export never saw: a 1-token prefill (past = 0), then a decode step over it, run by
    validation's own loop. Imported here, not at the top: validation imports exporters, not the reverse."""
    from validation.onnx_runtime import OnnxDecoder

    decoder = OnnxDecoder(model_path)
    first = decoder.prefill(np.array([[1]]))
    second = decoder.decode(first.argmax(-1))
    if not (np.isfinite(first).all() and np.isfinite(second).all()):
        raise RuntimeError(f"{model_path.name} returns non-finite logits for a 1-token prompt")
