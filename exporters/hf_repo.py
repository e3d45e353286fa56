"""The ONNX bundle as a Hugging Face model repository that Optimum, onnxruntime-genai and transformers.js load
as it is, and `push` to the hub.

    <bundle>/                    config.json, generation_config.json, tokenizer.json, tokenizer_config.json
                                 (with the chat template), special_tokens_map.json, genai_config.json,
                                 README.md (the model card), manifest.json
    <bundle>/onnx/               model.onnx, model_fp16.onnx, model_int8.onnx, model_q4.onnx + `<file>_data`

onnxruntime-genai reads one decoder file per folder: the root `genai_config.json` names the default precision
(fp32 when the bundle has it, else the first of fp16, int8, int4). `genai_overlay(model_file)` is the JSON that
points a loaded config at another file (`og.Config(folder).overlay(...)`); the model card shows it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from model.config import Gemma3Config
from model.errors import UserError

GENAI_CONFIG = "genai_config.json"
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
MODEL_CARD = "README.md"
# The order a runtime's default precision is picked in; transformers.js names each file's `dtype`.
PRECISION_ORDER = ("fp32", "fp16", "int8", "int4")
TRANSFORMERS_JS_DTYPES = {"fp32": "fp32", "fp16": "fp16", "int8": "int8", "int4": "q4"}
# Gemma's chat template (what model/tokenizer.py's `gemma_chat_text` writes, with the leading <bos>): a system
# message opens the first user turn, "assistant" is written "model".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def default_precision(precisions: Sequence[str]) -> str:
    return next(precision for precision in PRECISION_ORDER if precision in precisions)


def genai_config(config: Gemma3Config, model_file: str) -> dict[str, Any]:
    """onnxruntime-genai's config for one decoder file: the Optimum I/O names, and pasts that grow
    (`past_present_share_buffer: false`: a present is past + new, never a fixed buffer)."""
    return {
        "model": {
            "bos_token_id": config.bos_token_id, "context_length": config.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": model_file, "head_size": config.head_dim, "hidden_size": config.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": config.num_heads, "num_hidden_layers": config.num_layers,
                "num_key_value_heads": config.num_kv_heads,
            },
            "eos_token_id": list(config.eos_token_ids), "pad_token_id": config.pad_token_id,
            "type": "gemma3_text", "vocab_size": config.vocab_size,
        },
        "search": {"do_sample": False, "max_length": config.context_length, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def genai_overlay(model_file: str) -> str:
    """What `og.Config(folder).overlay(...)` takes to run another file of the same folder."""
    return json.dumps({"model": {"decoder": {"filename": model_file}}})


def generation_config(config: Gemma3Config) -> dict[str, Any]:
    return {"bos_token_id": config.bos_token_id, "eos_token_id": list(config.eos_token_ids),
            "pad_token_id": config.pad_token_id, "do_sample": False}


def tokenizer_config() -> dict[str, Any]:
    """For transformers / transformers.js: the special tokens by text, the chat template, and no second <bos>
    (the tokenizer.json post-processor adds one)."""
    return {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
            "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000, "padding_side": "left", "chat_template": CHAT_TEMPLATE}


def special_tokens_map() -> dict[str, str]:
    return {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_repo_files(folder: Path, config: Gemma3Config, variants: Mapping[str, Mapping[str, Any]],
                     source: Mapping[str, Any], validation: Mapping[str, Any] | None = None) -> None:
    """The root files of the repository layout into a staged bundle folder (before its manifest is written).
    `variants`: the manifest's, precision → {files, ...}; `validation`: the report's validation piece, if any."""
    from exporters.model_card import model_card  # here: model_card reads this module's names

    precisions = [precision for precision in PRECISION_ORDER if precision in variants]
    default = default_precision(precisions)
    write_json(folder / GENERATION_CONFIG, generation_config(config))
    write_json(folder / TOKENIZER_CONFIG, tokenizer_config())
    write_json(folder / SPECIAL_TOKENS_MAP, special_tokens_map())
    write_json(folder / GENAI_CONFIG, genai_config(config, variants[default]["files"][0]))
    sizes = {precision: sum((folder / name).stat().st_size for name in variants[precision]["files"])
             for precision in precisions}
    (folder / MODEL_CARD).write_text(model_card(config, variants, sizes, source, validation), encoding="utf-8")


# ------------------------------------------------------------------------------------------------- push

def push(bundle_dir: Path, repo_id: str, token: str | None, private: bool = False,
         revision: str | None = None) -> str:
    """Upload the verified bundle folder as it is (`huggingface_hub.upload_folder`) → the commit URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from exporters.artifact import load_bundle

    bundle = load_bundle(bundle_dir)  # only a complete bundle, every file as the manifest says
    if bundle.format != "onnx":
        raise UserError(f"{bundle_dir} is a {bundle.format} bundle", "push the onnx bundle (artifacts/<model>/onnx)")
    if not token:
        raise UserError("pushing to the hub needs a token", "set HF_TOKEN to a token with write access")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(bundle.path), repo_id=repo_id, repo_type="model",
                                   revision=revision, commit_message=f"Upload {bundle.manifest['source']['slug']} "
                                   f"ONNX bundle ({', '.join(bundle.precisions)})")
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        hint = {401: "check HF_TOKEN", 403: "use a token with write access to " + repo_id}.get(
            status, "check --repo-id and HF_ENDPOINT")
        raise UserError(f"the hub refused the upload to {repo_id} (HTTP {status})", hint) from None
    except OSError as error:  # connection refused, DNS, timeouts (requests' errors are OSErrors)
        raise UserError(f"can't reach the Hugging Face hub at {os.environ.get('HF_ENDPOINT', 'huggingface.co')} "
                        f"({type(error).__name__})", "check the network or HF_ENDPOINT") from None
    return str(commit)


# ------------------------------------------------------------------------------------- model card numbers

def refresh_model_card(artifacts_root: Path, slug: str, validation: Mapping[str, Any]) -> bool:
    """Rewrite the ONNX bundle's model card with `validation`'s numbers (the report's validation piece):
    the bundle is published again like an export (its files hard-linked, the root files rewritten, a new
    manifest), so it is never half updated. Returns whether it was; a bundle that does not verify, was made
    from other weights or is being exported right now is left as it is."""
    from exporters.artifact import BundleWriter, load_bundle

    folder = Path(artifacts_root) / slug / "onnx"
    try:
        bundle = load_bundle(folder, verify=False)  # the writer verifies every file it carries over
    except UserError:
        return False
    source = bundle.manifest["source"]
    if source.get("weight_sha256") != validation.get("model", {}).get("weight_sha256"):
        return False
    try:
        with BundleWriter(artifacts_root, slug, "onnx", keep_existing_variants=True) as writer:
            writer.finish(config=bundle.config, tokenizer=folder / "tokenizer.json",
                          source={key: value for key, value in source.items() if key != "slug"},
                          options=bundle.manifest["options"],
                          extra_files=lambda staged, variants: write_repo_files(staged, bundle.config, variants,
                                                                                source, validation))
    except UserError:  # another export holds the bundle: its own card is written when it finishes
        return False
    except ValueError:  # no variant verified (a file was edited): validate names it; nothing is published
        return False
    return True
