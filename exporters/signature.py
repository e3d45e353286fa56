"""What an exporter hands back, and the decoder I/O signature every explicit-cache export shares.

Names follow Optimum / transformers.js / ORT-genai: `input_ids`, `attention_mask`, `position_ids`,
`past_key_values.{i}.key|value` in; `logits`, `present.{i}.key|value` out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from model.config import Gemma3Config


@dataclass
class ExportedVariant:
    precision: str
    files: list[str]  # relative to the bundle folder, the file a runtime opens first
    io: dict[str, list[dict[str, Any]]]  # {"inputs": [{name, dtype, shape}], "outputs": [...]}
    options: dict[str, Any] = field(default_factory=dict)
    opset: int | None = None
    deployment_target: str | None = None
    logits_dtype: str = "float32"


def tensor_spec(name: str, dtype: str, shape: list[int | str]) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "shape": shape}


def past_names(config: Gemma3Config, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(config.num_layers) for kind in ("key", "value")]


def decoder_io(config: Gemma3Config, kv_dtype: str = "float32") -> dict[str, list[dict[str, Any]]]:
    """The explicit-cache decoder: one graph for prefill (past = 0) and decode (seq = 1)."""
    kv_shape: list[int | str] = ["batch", config.num_kv_heads, "past", config.head_dim]
    present_shape: list[int | str] = ["batch", config.num_kv_heads, "past + seq", config.head_dim]
    inputs = [tensor_spec("input_ids", "int64", ["batch", "seq"]),
              tensor_spec("attention_mask", "int64", ["batch", "past + seq"]),
              tensor_spec("position_ids", "int64", ["batch", "seq"])]
    inputs += [tensor_spec(name, kv_dtype, kv_shape) for name in past_names(config, "past_key_values")]
    outputs = [tensor_spec("logits", "float32", ["batch", "seq", config.vocab_size])]
    outputs += [tensor_spec(name, kv_dtype, present_shape) for name in past_names(config, "present")]
    return {"inputs": inputs, "outputs": outputs}
