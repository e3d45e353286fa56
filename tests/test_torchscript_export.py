"""TorchScript (`model.pt`) and torch.export (`model.pt2`) exports: each file, driven by its own loop, must
generate what PyTorch generates, for any batch/seq/past, and load with nothing but torch."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import real_bundle_path
from exporters.signature import decoder_io
from exporters.torchscript import export
from model.errors import UserError
from model.generate import generate
from validation.torchscript_runtime import open_decoder

LOGIT_TOLERANCE = 1e-3
# Against the eager model in the same dtype, whose ring cache sums attention in another order: measured 0.0098
# (bf16, one ulp of a logit near 2) and 0.00095 (fp16).
HALF_LOGIT_TOLERANCE = {"bf16": 5e-2, "fp16": 5e-3}
FILES = ["model.pt", "model.pt2"]

# Imports only torch (this repo's packages are blocked): reads decoder.json from the archive, starts from an
# empty past and prints the greedy tokens as JSON.
STANDALONE_GREEDY = """
import json, sys
for name in ("model", "exporters", "validation", "gemma_export"):
    sys.modules[name] = None
import torch

path, prompt, new_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
extra_files = {"decoder.json": ""}
if path.endswith(".pt2"):
    forward = torch.export.load(path, extra_files=extra_files).module()
else:
    forward = torch.jit.load(path, _extra_files=extra_files)
meta = json.loads(extra_files["decoder.json"])
kv_shape = (1, meta["num_kv_heads"], 0, meta["head_dim"])
past = [torch.zeros(kv_shape, dtype=getattr(torch, meta["kv_dtype"])) for _ in range(2 * meta["num_layers"])]
input_ids = torch.tensor([prompt])
attention_mask = torch.ones_like(input_ids)
position_ids = torch.arange(len(prompt))[None]
tokens = []
with torch.no_grad():
    while len(tokens) < new_tokens:
        logits, *past = forward(input_ids, attention_mask, position_ids, *past)
        tokens.append(int(logits[0, -1].argmax()))
        input_ids = torch.tensor([[tokens[-1]]])
        attention_mask = torch.cat([attention_mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
        position_ids = position_ids[:, -1:] + 1
print(json.dumps(tokens))
"""


def tiny_prompt(length: int, seed: int, vocab_size: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (length,), generator=generator).tolist()


def reference(model, prompt: list[int], new_tokens: int):
    return generate(model, prompt, new_tokens, stop_token_ids=[], return_logits=True)


def max_step_difference(step_logits: list[torch.Tensor], reference_logits: list[torch.Tensor]) -> float:
    assert len(step_logits) == len(reference_logits)
    return max((mine - theirs).abs().max().item() for mine, theirs in zip(step_logits, reference_logits))


@pytest.fixture(scope="module")
def tiny_export(tiny, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("torchscript-tiny")
    steps: list[str] = []
    variants = export(tiny.model, out_dir, progress=steps.append)
    return out_dir, variants, steps


def test_export_writes_both_files_with_the_decoder_signature(tiny, tiny_export):
    out_dir, variants, steps = tiny_export
    assert [v.files for v in variants] == [["model.pt"], ["model.pt2"]]
    assert all((out_dir / v.files[0]).stat().st_size > 0 for v in variants)
    assert all(v.io == decoder_io(tiny.model.config) and v.logits_dtype == "float32" for v in variants)
    assert variants[0].options["method"] == "torch.jit.trace"
    assert variants[1].options["method"] == "torch.export.export"
    assert steps == ["trace model.pt", "save model.pt", "verify model.pt",
                     "export model.pt2", "save model.pt2", "verify model.pt2"]


@pytest.mark.parametrize("file_name", FILES)
def test_tiny_greedy_and_logits_match_pytorch_past_the_window(tiny, tiny_export, file_name):
    config = tiny.model.config
    prompt = tiny_prompt(40, seed=0, vocab_size=config.vocab_size)
    assert len(prompt) > 4 * config.sliding_window
    expected = reference(tiny.model, prompt, 64)
    tokens, step_logits = open_decoder(tiny_export[0] / file_name).greedy(prompt, 64)
    # Equal tokens mean the file was fed the reference tokens, so the logit differences are teacher-forced.
    assert tokens.tolist() == expected.tokens.tolist()
    assert max_step_difference(step_logits, expected.step_logits) <= LOGIT_TOLERANCE
    assert step_logits[0].dtype == torch.float32 and step_logits[0].shape == (1, config.vocab_size)


@pytest.mark.parametrize("file_name", FILES)
def test_file_loads_and_generates_with_only_torch(tiny, tiny_export, file_name, tmp_path):
    prompt = tiny_prompt(20, seed=1, vocab_size=tiny.model.config.vocab_size)
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    script = tmp_path / "standalone_greedy.py"
    script.write_text(STANDALONE_GREEDY)
    completed = subprocess.run([sys.executable, str(script), str(tiny_export[0] / file_name), json.dumps(prompt),
                                "16"], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == reference(tiny.model, prompt, 16).tokens[0].tolist()


@pytest.mark.parametrize("file_name", FILES)
def test_left_padded_batch_equals_each_prompt_alone(tiny, tiny_export, file_name):
    vocab_size, pad = tiny.model.config.vocab_size, tiny.model.config.pad_token_id
    prompts = [tiny_prompt(length, seed=10 + length, vocab_size=vocab_size) for length in (12, 20, 9, 17)]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    runner = open_decoder(tiny_export[0] / file_name)
    batch_tokens, batch_logits = runner.greedy(input_ids, 12, attention_mask)
    assert batch_tokens.shape == (4, 12)
    for row, prompt in enumerate(prompts):
        tokens, step_logits = runner.greedy(prompt, 12)
        assert batch_tokens[row].tolist() == tokens[0].tolist()
        assert max_step_difference([logits[row:row + 1] for logits in batch_logits], step_logits) <= LOGIT_TOLERANCE


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.slow
def test_half_precision_exports_keep_float32_logits_and_agree_with_eager(tiny, tmp_path, precision):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    variants = export(tiny.model, tmp_path, precision)
    assert [v.files for v in variants] == [[f"model-{precision}.pt"], [f"model-{precision}.pt2"]]
    assert next(tiny.model.parameters()).dtype == torch.float32  # the caller's model is not cast
    prompt = tiny_prompt(24, seed=2, vocab_size=tiny.model.config.vocab_size)
    expected = reference(copy.deepcopy(tiny.model).to(dtype), prompt, 8)
    for variant in variants:
        runner = open_decoder(tmp_path / variant.files[0])
        tokens, step_logits = runner.greedy(prompt, 8)
        assert variant.logits_dtype == "float32" and step_logits[0].dtype == torch.float32
        assert runner.past[0].dtype == dtype
        assert tokens.tolist() == expected.tokens.tolist()
        assert max_step_difference(step_logits, expected.step_logits) <= HALF_LOGIT_TOLERANCE[precision]


def test_unknown_precision_is_a_user_error_naming_the_supported_ones(tiny, tmp_path):
    with pytest.raises(UserError) as error:
        export(tiny.model, tmp_path, "int3")
    assert "fp32" in str(error.value) and "bf16" in str(error.value) and "fp16" in str(error.value)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def real_export(real_bundles):
    """The fp32 model.pt / model.pt2 of the real model's bundle from `gemma-export all` (conftest)."""
    return real_bundle_path(real_bundles, "torchscript")


@pytest.fixture(scope="module")
def real_reference(real, real_long_prompt_ids):
    return reference(real.model, real_long_prompt_ids, 64)


@pytest.mark.real
@pytest.mark.parametrize("file_name", FILES)
def test_real_model_greedy_and_logits_match_pytorch_past_the_window(real, real_export, real_reference,
                                                                     real_long_prompt_ids, file_name):
    assert len(real_long_prompt_ids) > real.model.config.sliding_window
    expected = real_reference
    tokens, step_logits = open_decoder(real_export / file_name).greedy(real_long_prompt_ids, 64)
    difference = max_step_difference(step_logits, expected.step_logits)
    print(f"{file_name}: max |Δlogit| over 64 steps = {difference:.3g}")
    assert tokens.tolist() == expected.tokens.tolist()
    assert difference <= LOGIT_TOLERANCE
