"""Gemma 3 from scratch: `model, tokenizer = load_model("gemma-3-270m")`, then `generate(model, ids, max_new_tokens=N)`.

Other names are imported lazily so `import model.config` stays light (no tokenizer or weight-loader imports).
"""

from __future__ import annotations

import importlib

# Load the `model.generate` submodule now, so the function `generate` defined below keeps the name: Python
# sets a package attribute to a submodule only when that submodule is first imported.
import model.generate as _generate_module

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
    return _generate_module.generate(model, input_ids, max_new_tokens, **options).tokens


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
