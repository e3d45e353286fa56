"""The from-scratch model against HF transformers' Gemma3ForCausalLM, and the KV cache against the full forward."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model import generate
from model.generate import Generator, Sampling
from model.generate import generate as generate_with_result
from model.errors import UserError
from model.gemma3 import source_state_dict
from model.loading import build_model
from model.weights import load_weights, save_hf_directory

transformers = pytest.importorskip("transformers")


def hf_twin(loaded, tmp_path_factory):
    """transformers' Gemma3ForCausalLM holding the same weights (written and read in HF layout)."""
    folder = tmp_path_factory.mktemp("hf")
    save_hf_directory(loaded.weights.config, source_state_dict(loaded.model), folder)
    return transformers.Gemma3ForCausalLM.from_pretrained(folder, torch_dtype=torch.float32,
                                                          attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def tiny_hf(tiny, tmp_path_factory):
    return hf_twin(tiny, tmp_path_factory)


def long_prompt(config, length=40, seed=0):
    """Token ids of a prompt several sliding windows long (tiny's window is 8)."""
    ids = torch.randint(10, config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    ids[0, 0] = config.bos_token_id
    return ids


def test_the_checkpoint_tensors_are_views_of_the_models_stacked_projections(tiny):
    """q|k|v and gate|up are stacked at load time; the checkpoint's own tensors are read back, bit for bit, as
    views of the stacked ones (one copy in memory); a checkpoint missing one part is named, not loaded."""
    source = source_state_dict(tiny.model)
    checkpoint = load_weights("random:tiny").state_dict  # as read, before a model took it
    assert source.keys() == checkpoint.keys()
    for name, tensor in source.items():
        assert torch.equal(tensor, checkpoint[name]), name
    qkv = tiny.model.layers[1].attention.qkv.weight
    assert qkv.shape[0] == sum(source[f"layers.1.attention.{part}_proj.weight"].shape[0] for part in "qkv")
    value = tiny.weights.state_dict["layers.1.attention.v_proj.weight"]
    assert value.untyped_storage().data_ptr() == qkv.untyped_storage().data_ptr()
    partial = {name: tensor for name, tensor in tiny.weights.state_dict.items()
               if name != "layers.2.feed_forward.up_proj.weight"}
    with pytest.raises(UserError) as error:
        build_model(replace(tiny.weights, state_dict=partial), torch.device("cpu"), torch.float32)
    assert "layers.2.feed_forward.gate_up.weight" in error.value.cause


def test_tiny_crosses_the_window(tiny):
    config = tiny.model.config
    assert {"sliding_attention", "full_attention"} == set(config.layer_types)
    assert long_prompt(config).shape[1] > 4 * config.sliding_window


def test_full_forward_equals_transformers(tiny, tiny_hf):
    ids = long_prompt(tiny.model.config)
    with torch.no_grad():
        ours, theirs = tiny.model(ids), tiny_hf(ids).logits
    assert ours.dtype == torch.float32 and ours.shape == (1, 40, tiny.model.config.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_greedy_tokens_equal_transformers(tiny, tiny_hf):
    ids = long_prompt(tiny.model.config)
    theirs = tiny_hf.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    ours = generate(tiny.model, ids, 32, stop_token_ids=[])
    assert ours.tolist() == theirs[:, ids.shape[1]:].tolist()


def test_cached_decode_equals_full_forward_at_every_step(tiny):
    ids = long_prompt(tiny.model.config, 48)
    with torch.no_grad():
        full = tiny.model(ids)
    generator = Generator(tiny.model, 1, 48)
    differences = [(generator.prefill(ids[:, :12]) - full[:, 11]).abs().max().item()]
    for step in range(12, 48):
        differences.append((generator.decode(ids[:, step]) - full[:, step]).abs().max().item())
    assert max(differences) <= 1e-5


def test_sliding_window_matters(tiny):
    """Guard against a sliding layer silently attending to everything: with the window widened the logits
    past the window change, and before it they don't."""
    ids = long_prompt(tiny.model.config)
    window = tiny.model.config.sliding_window
    with torch.no_grad():
        windowed = tiny.model(ids)
        for layer in tiny.model.layers:
            if layer.is_sliding:
                layer.attention.sliding_window = 10_000
        unwindowed = tiny.model(ids)
        for layer in tiny.model.layers:
            if layer.is_sliding:
                layer.attention.sliding_window = window
    assert (windowed[:, :window] - unwindowed[:, :window]).abs().max().item() == 0.0
    assert (windowed[:, window + 1:] - unwindowed[:, window + 1:]).abs().max().item() > 1e-3


def test_left_padded_batch_gives_each_row_its_own_result(tiny):
    prompt = long_prompt(tiny.model.config)
    lengths = [40, 25, 13, 31]
    batch = torch.zeros(4, 40, dtype=torch.long)
    mask = torch.zeros(4, 40, dtype=torch.long)
    for row, length in enumerate(lengths):
        batch[row, 40 - length:] = prompt[0, :length]
        mask[row, 40 - length:] = 1
    together = generate_with_result(tiny.model, batch, 24, attention_mask=mask, stop_token_ids=[], return_logits=True)
    for row, length in enumerate(lengths):
        alone = generate_with_result(tiny.model, prompt[:, :length], 24, stop_token_ids=[], return_logits=True)
        assert together.tokens[row].tolist() == alone.tokens[0].tolist()
        difference = max((a[row] - b[0]).abs().max().item() for a, b in zip(together.step_logits, alone.step_logits))
        assert difference <= 1e-4


def test_padded_full_forward_equals_transformers(tiny, tiny_hf):
    prompt = long_prompt(tiny.model.config)
    batch = torch.zeros(2, 40, dtype=torch.long)
    mask = torch.zeros(2, 40, dtype=torch.long)
    batch[0], mask[0] = prompt[0], 1
    batch[1, 15:], mask[1, 15:] = prompt[0, :25], 1
    with torch.no_grad():
        ours, theirs = tiny.model(batch, attention_mask=mask), tiny_hf(batch, attention_mask=mask).logits
    assert (ours[mask.bool()] - theirs[mask.bool()]).abs().max().item() <= 1e-4


def test_compiled_decode_gives_the_same_tokens(tiny):
    ids = long_prompt(tiny.model.config)
    eager = generate(tiny.model, ids, 20, stop_token_ids=[])
    compiled = generate(tiny.model, ids, 20, stop_token_ids=[], compile=True)
    assert compiled.tolist() == eager.tolist()


def test_stop_token_ends_generation(tiny):
    ids = long_prompt(tiny.model.config)
    free = generate(tiny.model, ids, 20, stop_token_ids=[])
    stop_at = int(free[0, 5])
    stopped = generate(tiny.model, ids, 20, stop_token_ids=[stop_at])
    first = free[0].tolist().index(stop_at)
    assert stopped[0].tolist() == free[0, :first + 1].tolist()


def test_sampling_is_seeded_and_filters(tiny):
    ids = long_prompt(tiny.model.config)
    sampling = Sampling(temperature=1.0, top_k=5, seed=7)
    first = generate(tiny.model, ids, 16, sampling=sampling, stop_token_ids=[])
    again = generate(tiny.model, ids, 16, sampling=sampling, stop_token_ids=[])
    assert first.tolist() == again.tolist()
    other = generate(tiny.model, ids, 16, sampling=Sampling(temperature=1.0, top_k=5, seed=8), stop_token_ids=[])
    assert first.tolist() != other.tolist()
    # top_p tiny enough keeps only the argmax: sampling becomes greedy.
    nucleus = generate(tiny.model, ids, 16, sampling=Sampling(temperature=1.0, top_p=1e-6, seed=1), stop_token_ids=[])
    assert nucleus.tolist() == generate(tiny.model, ids, 16, stop_token_ids=[]).tolist()


def test_sliding_cache_is_bounded_by_the_window(tiny):
    config = tiny.model.config
    generator = Generator(tiny.model, 1, 1000)
    for layer, cache in zip(tiny.model.layers, generator.cache.layers):
        assert cache.keys.shape[2] == (config.sliding_window if layer.is_sliding else 1000)
    assert generator.cache.nbytes >= config.kv_cache_bytes(1000)


def test_cache_size_at_32k_for_270m_is_what_the_readme_says():
    from model.config import PRESETS
    assert PRESETS["270m"].kv_cache_bytes(32_768) == 217_055_232  # 207 MiB in fp32 (README)



def test_a_config_checks_its_sizes_once(monkeypatch):
    """Before the layer types are derived (they divide by the pattern), and not again in validate()."""
    from model.config import PRESETS, Gemma3Config
    checked = []
    validate_sizes = Gemma3Config.validate_sizes
    monkeypatch.setattr(Gemma3Config, "validate_sizes", lambda config: checked.append(validate_sizes(config)))
    PRESETS["tiny"].replace(num_layers=3)
    assert len(checked) == 1

@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("keys", [300, 1100, 2065])
def test_decode_attention_equals_sdpa(kv_heads, keys):
    """The CPU decode form (keys @ queries, softmax down the keys, values summed in 512-key blocks plus a tail)
    against SDPA with enable_gqa: two rows, one left-padded, causal and windowed masks."""
    from model.gemma3 import attention_mask_for, decode_attention
    generator = torch.Generator().manual_seed(kv_heads * keys)
    q = torch.randn(2, 4, 1, 32, generator=generator)
    k, v = (torch.randn(2, kv_heads, keys, 32, generator=generator) for _ in range(2))
    key_positions = torch.arange(keys)
    key_valid = torch.ones(2, keys, dtype=torch.bool)
    key_valid[1, :37] = False
    for window in (None, 700):
        mask = attention_mask_for(torch.tensor([keys - 1]), key_positions, key_valid, window)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.17,
                                                                    enable_gqa=kv_heads != 4)
        assert (decode_attention(q, k, v, mask, 0.17) - expected).abs().max().item() <= 2e-6


def test_long_cache_decode_uses_the_matmul_form_and_equals_the_full_forward(tiny, monkeypatch):
    """A Generator sized past DECODE_MATMUL_MIN_KEYS: its full layers decode through `decode_attention` (counted),
    every step's logits equal the full forward's, and the torch.compile'd decode step gives the same logits."""
    import model.gemma3 as gemma3
    original, calls = gemma3.decode_attention, []

    def counted(q, k, *rest):
        calls.append(k.shape[2])
        return original(q, k, *rest)

    monkeypatch.setattr(gemma3, "decode_attention", counted)
    max_length = gemma3.DECODE_MATMUL_MIN_KEYS + 17
    # tiny's weights with a context long enough for that cache.
    model = gemma3.Gemma3Model(tiny.model.config.replace(context_length=max_length)).eval()
    model.load_state_dict(tiny.model.state_dict())
    ids = long_prompt(model.config, 48)
    with torch.no_grad():
        full = model(ids)
    eager, compiled = Generator(model, 1, max_length), Generator(model, 1, max_length, compile=True)
    differences = [(eager.prefill(ids[:, :12]) - full[:, 11]).abs().max().item()]
    compiled.prefill(ids[:, :12])
    for step in range(12, 48):
        logits = eager.decode(ids[:, step])
        differences.append((logits - full[:, step]).abs().max().item())
        if step < 16:
            assert (compiled.decode(ids[:, step]) - logits).abs().max().item() <= 1e-5
    assert max(differences) <= 1e-5
    full_layers = sum(not layer.is_sliding for layer in model.layers)
    # Each eager step calls it once per full layer (the compiled step adds its trace-time calls).
    assert len(calls) >= 36 * full_layers and set(calls) == {max_length}
