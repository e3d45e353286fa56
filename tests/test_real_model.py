"""The real Gemma 3 270M (embedded GGUF) against transformers reading the same GGUF independently."""

from __future__ import annotations

import pytest
import torch

from model.generate import Generator
from model.generate import generate as generate_with_result

pytestmark = pytest.mark.real
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def real_hf(real):
    gguf_file = real.weights.gguf_file
    return transformers.Gemma3ForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, torch_dtype=torch.float32, attn_implementation="eager").eval()


def test_config_is_the_270m_preset(real):
    from model.config import PRESETS
    assert real.model.config == PRESETS["270m"]


def test_logits_equal_transformers_past_the_window(real, real_hf, real_long_prompt_ids):
    ids = torch.tensor([real_long_prompt_ids])
    with torch.no_grad():
        ours, theirs = real.model(ids), real_hf(ids).logits
    difference = (ours - theirs).abs().max().item()
    print(f"real 270m, {ids.shape[1]} tokens: max |Δlogit| vs transformers = {difference:.2e}")
    assert difference <= 1e-3


def test_greedy_tokens_equal_transformers(real, real_hf, real_long_prompt_ids):
    ids = torch.tensor([real_long_prompt_ids])
    theirs = real_hf.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = generate_with_result(real.model, ids, 32, stop_token_ids=[]).tokens
    assert ours.tolist() == theirs[:, ids.shape[1]:].tolist()


def test_cached_decode_equals_full_forward(real, real_long_prompt_ids):
    ids = torch.tensor([real_long_prompt_ids[:540]])
    with torch.no_grad():
        full = real.model(ids)
    generator = Generator(real.model, 1, 540)
    differences = [(generator.prefill(ids[:, :500]) - full[:, 499]).abs().max().item()]
    for step in range(500, 540):  # crosses position 512: the ring buffer wraps
        differences.append((generator.decode(ids[:, step]) - full[:, step]).abs().max().item())
    assert max(differences) <= 1e-3


def test_known_continuation(real):
    ids = torch.tensor([real.tokenizer.encode("Q: What is the capital of France?\nA:")])
    text = real.tokenizer.decode(generate_with_result(real.model, ids, 8).tokens[0].tolist())
    assert "Paris" in text
