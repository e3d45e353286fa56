"""The ONNX bundle's README.md: a Hugging Face model card (metadata, files, validation numbers, usage)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from exporters.hf_repo import PRECISION_ORDER, TRANSFORMERS_JS_DTYPES, default_precision, genai_overlay
from model.config import Gemma3Config

# The hub id of the weights' origin, for `base_model` (the offline default is Gemma 3 270M's GGUF).
BASE_MODELS = {"gemma-3-270m": "google/gemma-3-270m"}
# Validation runners over this bundle, in the card's column order.
CARD_RUNNERS = (("onnxruntime", "cpu"), ("onnxruntime-genai", "cpu"), ("transformers-js", "node"))
PRECISION_NOTES = {
    "fp32": "float32 weights and compute",
    "fp16": "fp16 weights, float32 residual stream, norms, attention and KV cache",
    "int8": "8-bit block weights (MatMulNBits / GatherBlockQuantized)",
    "int4": "4-bit block weights (MatMulNBits), 8-bit embedding / LM head",
}


def base_model(source: Mapping[str, Any]) -> str | None:
    model_id = str(source.get("model_id", ""))
    if model_id in BASE_MODELS:
        return BASE_MODELS[model_id]
    return model_id if model_id.count("/") == 1 and not model_id.startswith(("/", ".")) else None


def front_matter(source: Mapping[str, Any]) -> str:
    lines = ["---", "license: gemma", "library_name: transformers.js", "pipeline_tag: text-generation"]
    if origin := base_model(source):
        lines.append(f"base_model: {origin}")
    lines += ["tags:", "- onnx", "- transformers.js", "- onnxruntime-genai", "- gemma3", "- text-generation", "---"]
    return "\n".join(lines)


def runner_cell(row: Mapping[str, Any] | None) -> str:
    if row is None:
        return "not run"
    if "top1_agreement" not in row:  # the runtime could not open the file: the report says why
        return f"{row['verdict']}: did not run"
    return (f"{row['verdict']}: top-1 {row['top1_agreement']:.3f}, mean KL {row['mean_kl_divergence']:.2g}, "
            f"max Δlogit {row['max_abs_logit_diff']:.2g}, greedy {row['greedy_match_steps']}/{row['greedy_steps']}")


def files_table(variants: Mapping[str, Mapping[str, Any]], sizes: Mapping[str, int],
                validation: Mapping[str, Any] | None) -> str:
    rows = {row["runner"]: row for row in (validation or {}).get("runners", [])}
    header = ["precision", "file (+ `_data`)", "size", "transformers.js dtype", "what it holds",
              *[f"{backend} ({device})" for backend, device in CARD_RUNNERS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for precision in (precision for precision in PRECISION_ORDER if precision in variants):
        cells = [precision, f"`{variants[precision]['files'][0]}`", f"{sizes[precision] / 2**20:.1f} MiB",
                 f"`{TRANSFORMERS_JS_DTYPES[precision]}`", PRECISION_NOTES[precision],
                 *[runner_cell(rows.get(f"{backend} {precision} {device}")) for backend, device in CARD_RUNNERS]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def validation_note(validation: Mapping[str, Any] | None) -> str:
    if not validation:
        return ("Validation: not run yet for this bundle (`gemma-export validate` writes the numbers here: each "
                "runtime's own loop against the PyTorch reference).")
    return (f"Validation against the PyTorch reference (`gemma-export validate`): "
            f"{validation.get('max_new_tokens')} greedy steps per prompt and {validation.get('heldout_tokens')} "
            "held-out tokens teacher-forced, each runtime through its own loop. Top-1: how often the runtime's "
            "next token is the reference's, over every teacher-forced step; mean KL: its divergence from the "
            "reference's distribution (the gate of reduced precisions); greedy: how many steps the runtime's own "
            "greedy run follows the reference's before it first differs (fewest over the prompts; fp32 must follow "
            "every step, a 4-bit file may leave early at a near-tie and continue just as well).")


def usage(default_file: str, default_precision: str) -> str:
    dtype = TRANSFORMERS_JS_DTYPES[default_precision]
    return f"""## Usage

transformers.js (browser or Node; `dtype` picks the file: `fp32` → `onnx/model.onnx`, `q4` → `onnx/model_q4.onnx`):

```js
import {{ pipeline }} from "@huggingface/transformers";
const generator = await pipeline("text-generation", "<this repo or folder>", {{ dtype: "{dtype}" }});
const output = await generator("The capital of France is", {{ max_new_tokens: 32, do_sample: false }});
console.log(output[0].generated_text);
```

onnxruntime-genai (Python; the same API in C#, C++, Java, Swift/Objective-C). `genai_config.json` runs
`{default_file}`; an overlay points it at another file of the folder:

```python
import onnxruntime_genai as og
config = og.Config("path/to/this/folder")
config.overlay('{genai_overlay("onnx/model_q4.onnx")}')  # optional: another precision
model = og.Model(config)
tokenizer = og.Tokenizer(model)
tokenizer.update_options(add_special_tokens="true")  # Gemma needs <bos>; genai's encode leaves it out by default
params = og.GeneratorParams(model)
params.set_search_options(max_length=64)
generator = og.Generator(model, params)
generator.append_tokens(tokenizer.encode("The capital of France is"))
while not generator.is_done():
    generator.generate_next_token()
print(tokenizer.decode(generator.get_sequence(0)))
```

Optimum (Python):

```python
from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer
model = ORTModelForCausalLM.from_pretrained("path/to/this/folder", subfolder="onnx", file_name="model.onnx")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
ids = tokenizer("The capital of France is", return_tensors="pt")
print(tokenizer.decode(model.generate(**ids, max_new_tokens=32, do_sample=False)[0]))
```

The graphs take the Optimum inputs (`input_ids`, `attention_mask`, `position_ids`, `past_key_values.N.key|value`)
and return `logits` and `present.N.key|value`; positions are taken from `attention_mask`, so a runtime's
`position_ids` convention (0- or 1-based) does not change the output. `manifest.json` lists every file with its
sha256."""


def model_card(config: Gemma3Config, variants: Mapping[str, Mapping[str, Any]], sizes: Mapping[str, int],
               source: Mapping[str, Any], validation: Mapping[str, Any] | None) -> str:
    default = default_precision(list(variants))
    name = source.get("slug", "gemma-3")
    return f"""{front_matter(source)}

# {name} (ONNX)

Gemma 3 text model ({config.num_layers} layers, hidden size {config.hidden_size}, vocabulary {config.vocab_size},
context {config.context_length} tokens, sliding window {config.sliding_window}) exported to ONNX by `gemma-export`
from `{source.get('model_id')}` (weights sha256 `{str(source.get('weight_sha256'))[:16]}…`). The folder is a Hugging
Face model repository: Optimum, onnxruntime-genai and transformers.js load it as it is.

## Files

{files_table(variants, sizes, validation)}

{validation_note(validation)}

Root files: `config.json` (transformers `Gemma3TextConfig`), `generation_config.json`, `tokenizer.json`,
`tokenizer_config.json` (with the Gemma chat template), `special_tokens_map.json`, `genai_config.json`
(onnxruntime-genai, runs `{variants[default]['files'][0]}`), `manifest.json` (every file's size and sha256).

{usage(variants[default]['files'][0], default)}

## License

The weights are Gemma's, under the [Gemma Terms of Use](https://ai.google.dev/gemma/terms).
"""
