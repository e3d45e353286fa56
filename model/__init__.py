"""Gemma 3 from scratch: `model, tokenizer = load_model("gemma-3-270m")`, then `generate(model, ids, max_new_tokens=N)`.

Names are imported lazily so `import model.config` stays light (no tokenizer or weight-loader imports).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Gemma3Config": "model.config", "PRESETS": "model.config", "UserError": "model.errors",
    "Gemma3Model": "model.gemma3", "Generator": "model.generate", "GenerationResult": "model.generate",
    "Sampling": "model.generate", "DEFAULT_MODEL": "model.loading", "LoadedModel": "model.loading",
    "load": "model.loading", "load_model": "model.loading",
}
__all__ = [*_EXPORTS, "generate"]


def generate(model, input_ids, max_new_tokens: int = 32, **options):
    """The new token ids, [batch, new] (greedy by default, with the KV cache). `model.generate.generate`
    returns the full `GenerationResult` (timings, per-step logits)."""
    from model.generate import generate as generate_with_result
    return generate_with_result(model, input_ids, max_new_tokens, **options).tokens


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
