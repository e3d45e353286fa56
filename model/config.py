"""Gemma 3 text-model hyper-parameters: one dataclass, named presets, and readers for
Hugging Face `config.json` files and GGUF metadata."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy

from model.errors import UserError


@dataclass(frozen=True)
class Gemma3Config:
    vocab_size: int = 262_144
    context_length: int = 32_768
    hidden_size: int = 640
    num_heads: int = 4
    num_kv_heads: int = 1
    head_dim: int = 256
    intermediate_size: int = 2048
    num_layers: int = 18
    sliding_window: int = 512
    # Gemma 3 repeats (sliding_window_pattern - 1) sliding layers followed by one full layer.
    sliding_window_pattern: int = 6
    rope_local_base: float = 10_000.0
    rope_global_base: float = 1_000_000.0
    # Linear RoPE scaling of the global layers (4B+ use 8.0); 270m and 1b use none.
    rope_global_scaling: float = 1.0
    query_pre_attn_scalar: float = 256.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    bos_token_id: int = 2
    eos_token_ids: tuple[int, ...] = (1, 106)  # <eos>, <end_of_turn>
    pad_token_id: int = 0
    layer_types: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        self.validate_sizes()  # before default_layer_types, which divides by the pattern and loops over the layers
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.num_layers, self.sliding_window_pattern))
        self.validate()

    def validate_sizes(self) -> None:
        for name, largest in SIZE_LIMITS.items():
            value = getattr(self, name)
            if type(value) is not int or not 0 < value <= largest:
                raise UserError(f"config field {name} must be an integer from 1 to {largest}, got {value!r}",
                                "fix the model's config.json")

    def validate(self) -> None:
        """Everything but the sizes, which `validate_sizes` checked first."""
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})",
                            "fix the model's config.json")
        if (not isinstance(self.layer_types, tuple) or len(self.layer_types) != self.num_layers
                or not all(kind in ("sliding_attention", "full_attention") for kind in self.layer_types)):
            raise UserError("config layer_types must list 'sliding_attention'/'full_attention' once per layer",
                            "fix the model's config.json")
        token_ids = (self.bos_token_id, self.pad_token_id, *self.eos_token_ids)
        if not all(type(token_id) is int and token_id >= 0 for token_id in token_ids):
            raise UserError(f"config token ids must be non-negative integers, got bos {self.bos_token_id!r}, "
                            f"eos {self.eos_token_ids!r}, pad {self.pad_token_id!r}", "fix the model's config.json")
        floats = (self.rope_local_base, self.rope_global_base, self.rope_global_scaling, self.query_pre_attn_scalar,
                  self.rms_norm_eps)
        if not all(type(value) in (int, float) and 0 < value < float("inf") for value in floats):
            raise UserError("config rms_norm_eps, query_pre_attn_scalar and the RoPE bases and scaling must be "
                            "positive finite numbers", "fix the model's config.json")

    def is_sliding(self, layer_index: int) -> bool:
        return self.layer_types[layer_index] == "sliding_attention"

    def kv_cache_bytes(self, context_length: int, bytes_per_value: int = 4, batch_size: int = 1) -> int:
        """Bytes of the pre-allocated cache: full layers hold the context, sliding layers one window."""
        per_token = 2 * self.num_kv_heads * self.head_dim * bytes_per_value * batch_size
        return sum(per_token * (min(self.sliding_window, context_length) if self.is_sliding(i) else context_length)
                   for i in range(self.num_layers))

    def replace(self, **changes: Any) -> "Gemma3Config":
        if "num_layers" in changes and "layer_types" not in changes:
            changes["layer_types"] = ()
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        data["layer_types"] = list(self.layer_types)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Gemma3Config":
        if not isinstance(data, dict):
            raise UserError("config is not a JSON object", "fix the model's config.json")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        try:
            for key in ("eos_token_ids", "layer_types"):
                if key in values:
                    values[key] = tuple(values[key]) if isinstance(values[key], list) else values[key]
            return cls(**values)
        except TypeError as error:
            raise UserError(f"config is not a Gemma 3 config: {error}", "fix the model's config.json") from None

    def to_hf_config(self) -> dict[str, Any]:
        """The equivalent transformers `Gemma3TextConfig` dictionary (for config.json in bundles and tests)."""
        return {
            "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
            "vocab_size": self.vocab_size, "max_position_embeddings": self.context_length,
            "hidden_size": self.hidden_size, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "sliding_window": self.sliding_window, "sliding_window_pattern": self.sliding_window_pattern,
            "layer_types": list(self.layer_types), "rope_local_base_freq": self.rope_local_base,
            "rope_theta": self.rope_global_base,
            "rope_scaling": None if self.rope_global_scaling == 1.0 else
            {"rope_type": "linear", "factor": self.rope_global_scaling},
            "query_pre_attn_scalar": self.query_pre_attn_scalar, "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings, "hidden_activation": "gelu_pytorch_tanh",
            "attn_logit_softcapping": None, "final_logit_softcapping": None, "attention_bias": False,
            "bos_token_id": self.bos_token_id, "eos_token_id": list(self.eos_token_ids),
            "pad_token_id": self.pad_token_id, "torch_dtype": "float32",
        }


# Upper bounds far above any Gemma 3 (27B: 62 layers, 262k vocabulary, 128k context) that keep a hostile
# config from making us loop over billions of layers or size tensors past int32 before any file is read.
MAX_DIMENSION = 2**31 - 1
SIZE_LIMITS = {"vocab_size": MAX_DIMENSION, "context_length": MAX_DIMENSION, "hidden_size": MAX_DIMENSION,
               "num_heads": MAX_DIMENSION, "num_kv_heads": MAX_DIMENSION, "head_dim": MAX_DIMENSION,
               "intermediate_size": MAX_DIMENSION, "num_layers": 1024, "sliding_window": MAX_DIMENSION,
               "sliding_window_pattern": 1024}


def default_layer_types(num_layers: int, pattern: int) -> tuple[str, ...]:
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers))


PRESETS: dict[str, Gemma3Config] = {
    "270m": Gemma3Config(),
    "1b": Gemma3Config(hidden_size=1152, intermediate_size=6912, num_layers=26),
    # Same structure as the real models (GQA, both layer kinds, q/k norms) at toy size; the window of 8
    # makes every test prompt cross it.
    "tiny": Gemma3Config(vocab_size=512, context_length=1024, hidden_size=64, num_heads=4, num_kv_heads=2,
                         head_dim=16, intermediate_size=128, num_layers=6, sliding_window=8,
                         sliding_window_pattern=3, query_pre_attn_scalar=16.0, eos_token_ids=(1, 106)),
}


def preset(name: str) -> Gemma3Config:
    if name not in PRESETS:
        raise UserError(f"unknown config preset {name!r}", f"use one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def _first(mapping: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if mapping.get(key) is not None:
            return mapping[key]
    return default


def from_hf_config(data: dict[str, Any]) -> Gemma3Config:
    """Read a transformers config (Gemma3TextConfig, or a Gemma3Config with a text_config inside)."""
    if not isinstance(data, dict):
        raise UserError("config.json is not a JSON object", "use a Hugging Face Gemma 3 config.json")
    if isinstance(data.get("text_config"), dict):
        data = data["text_config"]
    model_type = data.get("model_type", "gemma3_text")
    if model_type not in ("gemma3_text", "gemma3"):
        raise UserError(f"config.json describes a {model_type!r} model, not Gemma 3", "point at a Gemma 3 model")
    eos = _first(data, "eos_token_id", default=[1, 106])
    eos = tuple(eos) if isinstance(eos, list) else (eos,)
    if 106 not in eos:
        eos = eos + (106,)
    scaling = data.get("rope_scaling") or {}
    if not isinstance(scaling, dict):
        raise UserError(f"config.json rope_scaling must be an object, got {scaling!r}", "fix the model's config.json")
    layer_types = data.get("layer_types") or ()
    try:
        return Gemma3Config(
            vocab_size=data.get("vocab_size", 262_144),
            context_length=data.get("max_position_embeddings", 32_768),
            hidden_size=data.get("hidden_size", 640),
            num_heads=data.get("num_attention_heads", 4),
            num_kv_heads=data.get("num_key_value_heads", 1),
            head_dim=data.get("head_dim", 256),
            intermediate_size=data.get("intermediate_size", 2048),
            num_layers=data.get("num_hidden_layers", 18),
            sliding_window=data.get("sliding_window", 512),
            sliding_window_pattern=data.get("sliding_window_pattern", 6),
            rope_local_base=float(data.get("rope_local_base_freq", 10_000.0)),
            rope_global_base=float(data.get("rope_theta", 1_000_000.0)),
            rope_global_scaling=float(scaling.get("factor", 1.0)) if scaling.get("rope_type", "linear") == "linear" else 1.0,
            query_pre_attn_scalar=float(data.get("query_pre_attn_scalar", 256)),
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", True)),
            bos_token_id=_first(data, "bos_token_id", default=2),
            eos_token_ids=eos,
            pad_token_id=_first(data, "pad_token_id", default=0),
            layer_types=tuple(layer_types) if isinstance(layer_types, list) else layer_types,
        )
    except (TypeError, ValueError, OverflowError) as error:
        raise UserError(f"config.json has an invalid value: {error}", "fix the model's config.json") from None


def load_hf_config(path: Path) -> Gemma3Config:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} does not exist", "point at a folder with a Hugging Face config.json") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise UserError(f"{path} is not valid JSON ({error})", "re-download the model's config.json") from None
    except OSError as error:
        raise UserError(f"cannot read {path} ({error.strerror})", "check the file and its permissions") from None
    return from_hf_config(data)


def _from_float32(value: Any) -> float:
    """The shortest decimal that a GGUF float32 stores: 1e-6, not 9.999999974752427e-07 (so configs compare equal)."""
    return float(str(numpy.float32(value)))


def from_gguf_metadata(metadata: dict[str, Any]) -> Gemma3Config:
    """Build a config from GGUF key/values (`general.architecture` must be gemma3).

    GGUF leaves some Gemma 3 constants implicit (llama.cpp hard-codes them): the local RoPE base (10 000),
    the 5:1 layer pattern and query_pre_attn_scalar = head_dim for every size but 27B.
    """
    arch = metadata.get("general.architecture")
    if arch != "gemma3":
        raise UserError(f"GGUF file is a {arch!r} model, not gemma3", "use a Gemma 3 GGUF file")
    def key(name: str, default: Any = None) -> Any:
        return metadata.get(f"gemma3.{name}", default)
    vocab = metadata.get("tokenizer.ggml.tokens")
    try:
        head_dim = int(key("attention.key_length", 256))
        num_layers = int(key("block_count", 18))
        pattern = int(key("attention.sliding_window_pattern", 6))
        return Gemma3Config(
            vocab_size=len(vocab) if vocab else 262_144,
            context_length=int(key("context_length", 32_768)),
            hidden_size=int(key("embedding_length", 640)),
            num_heads=int(key("attention.head_count", 4)),
            num_kv_heads=int(key("attention.head_count_kv", 1)),
            head_dim=head_dim,
            intermediate_size=int(key("feed_forward_length", 2048)),
            num_layers=num_layers,
            sliding_window=int(key("attention.sliding_window", 512)),
            sliding_window_pattern=pattern,
            rope_global_base=_from_float32(key("rope.freq_base", 1_000_000.0)),
            rope_global_scaling=_from_float32(key("rope.scaling.factor", 1.0) or 1.0),
            query_pre_attn_scalar=float(head_dim),
            rms_norm_eps=_from_float32(key("attention.layer_norm_rms_epsilon", 1e-6)),
            bos_token_id=int(metadata.get("tokenizer.ggml.bos_token_id", 2)),
            pad_token_id=int(metadata.get("tokenizer.ggml.padding_token_id", 0)),
        )
    except (TypeError, ValueError, OverflowError) as error:
        raise UserError(f"GGUF metadata has an invalid value: {error}", "use an unmodified Gemma 3 GGUF file") from None
