"""Weights + tokenizer → a ready model on the requested device and dtype."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.errors import UserError
from model.gemma3 import Gemma3Model, source_state_dict, stacked_state_dict
from model.tokenizer import GemmaTokenizer
from model.weights import DEFAULT_MODEL, LoadedWeights, default_gguf_path, load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: Gemma3Model
    tokenizer: GemmaTokenizer
    weights: LoadedWeights


def resolve_device(name: str) -> torch.device:
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if name not in available:
        raise UserError(f"unknown device {name!r}", "use cpu, cuda or mps")
    if not available[name]:
        raise UserError(f"device {name!r} is not available on this machine", "use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}", f"use one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def build_model(weights: LoadedWeights, device: torch.device, dtype: torch.dtype) -> Gemma3Model:
    # Build on the meta device and adopt the loaded tensors: no second copy of 1 GB of random init.
    with torch.device("meta"):
        model = Gemma3Model(weights.config)
    missing, unexpected = model.load_state_dict(stacked_state_dict(weights.state_dict), strict=False, assign=True)
    if missing or unexpected:
        raise UserError(f"weights don't match the model (missing {missing[:3]}, unexpected {unexpected[:3]})",
                        "use a Gemma 3 checkpoint")
    # The checkpoint's q, k, v, gate and up become views of the model's stacked copies: one copy in memory.
    weights.state_dict.update(source_state_dict(model))
    model.init_buffers(device)  # the meta-device buffers → real ones (the cast below makes them again in float32)
    return model.to(device=device, dtype=dtype).eval()


def load_tokenizer(weights: LoadedWeights) -> GemmaTokenizer:
    if weights.tokenizer_file is not None:
        return GemmaTokenizer.from_file(weights.tokenizer_file)
    if weights.gguf_file is not None:
        return GemmaTokenizer.from_gguf(weights.gguf_file)
    if weights.config.vocab_size == GemmaTokenizer.tiny().vocab_size:
        return GemmaTokenizer.tiny()
    # random:270m / random:1b share the real Gemma 3 vocabulary: use the embedded default model's tokenizer.
    return GemmaTokenizer.from_gguf(default_gguf_path())


def load(source: str = DEFAULT_MODEL, device: str = "cpu", dtype: str | torch.dtype = "float32",
         revision: str | None = None) -> LoadedModel:
    target_device, target_dtype = resolve_device(device), resolve_dtype(dtype)
    weights = load_weights(source, revision=revision)
    return LoadedModel(build_model(weights, target_device, target_dtype), load_tokenizer(weights), weights)


def load_model(source: str = DEFAULT_MODEL, device: str = "cpu", dtype: str | torch.dtype = "float32",
               revision: str | None = None) -> tuple[Gemma3Model, GemmaTokenizer]:
    loaded = load(source, device, dtype, revision)
    return loaded.model, loaded.tokenizer
