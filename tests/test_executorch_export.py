"""ExecuTorch (`model.pte`): the program, run by the ExecuTorch runtime with its own loop (prompt in chunks, one
decode call per token), must generate what PyTorch generates, past the sliding window, and a second sequence must
not see the first one's cache. The files judged are those `gemma-export all` made (tiny: the session's `tiny_all`;
real: `real_bundles`), so no test lowers a program of its own but the refusal below."""

from __future__ import annotations

import copy
import importlib.util

import numpy as np
import pytest
import torch

from conftest import real_bundle_path
from test_validation import assert_follows_the_reference
from exporters.artifact import load_bundle
from exporters.executorch import (ExecuTorchProgram, check_max_context, quiet_native_output, runner_metadata,
                                  unavailable_reason, xnnpack_partitioner)
from model.errors import UserError
from model.generate import generate
from validation.executorch_runtime import ExecuTorchDecoder
from validation.runners import (BACKENDS, REFERENCE_SPEC, Host, RunnerSpec, Selection, available_specs, load_bundles,
                                make_runner)
from validation.runners import unavailable_reason as backend_unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

# fp32 against fp32: XNNPACK's GEMMs sum in another order than PyTorch's (measured: tiny 4e-5; real in
# BENCHMARKS.md, "ExecuTorch").
LOGIT_TOLERANCE = 1e-3
# fp16 against the eager fp16 model: XNNPACK rounds its 16-bit products elsewhere than PyTorch, and the program's LM
# head rounds each logit to fp16 (exporters/executorch.py, CachedDecoder.lm_head).
FP16_LOGIT_TOLERANCE = 5e-3


@pytest.fixture(scope="module")
def tiny_program(tiny_all, tiny):
    out, result = tiny_all
    assert result.returncode == 0, result.stderr[-3000:]
    bundle = load_bundle(out, tiny.weights.slug, "executorch")
    return bundle, bundle.variant("fp32").files[0]


def prompt_ids(length: int, seed: int, vocab_size: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


def greedy(decoder: ExecuTorchDecoder, prompt: list[int], new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """The runner's loop: prefill, then feed each argmax back; the tokens and every step's logits."""
    logits = [decoder.prefill(np.asarray([prompt]))[0]]
    tokens = [int(logits[-1].argmax())]
    while len(tokens) < new_tokens:
        logits.append(decoder.decode(np.asarray(tokens[-1]))[0])
        tokens.append(int(logits[-1].argmax()))
    return tokens, logits


def max_step_difference(step_logits: list[torch.Tensor], reference_logits: list[torch.Tensor]) -> float:
    assert len(step_logits) == len(reference_logits)
    return max((mine - theirs.float()).abs().max().item() for mine, theirs in zip(step_logits, reference_logits))


def test_tiny_program_generates_what_pytorch_generates_past_the_window(tiny, tiny_program):
    _, path = tiny_program
    config = tiny.model.config
    decoder = ExecuTorchDecoder(path, threads=1)
    assert decoder.program.max_prefill_chunk == config.sliding_window  # 4 chunks below, the last of 3 tokens
    prompt = prompt_ids(3 * config.sliding_window + 3, 0, config.vocab_size)
    expected = generate(tiny.model, prompt, 24, stop_token_ids=[], return_logits=True)
    tokens, logits = greedy(decoder, prompt, 24)
    assert tokens == expected.tokens[0].tolist()
    assert max_step_difference(logits, expected.step_logits) <= LOGIT_TOLERANCE


def test_the_runner_agrees_with_the_reference_through_the_one_interface(tiny, tiny_all):
    """validation/runners.py's `executorch fp32 xnnpack`, opened from the verified bundle like every runner (the
    checks tests/test_validation.py makes of the others): the reference's logits and greedy tokens, twice (a
    reset starts over), and the facts bench reads."""
    out, _ = tiny_all
    bundles, problems = load_bundles(out, tiny.weights.slug, ["executorch"], tiny.weights.weight_sha256)
    assert problems == []
    specs, skipped = available_specs(bundles, Host.detect(), Selection(formats=("executorch",)))
    assert set(specs) == {RunnerSpec("executorch", precision, "xnnpack") for precision in ("fp32", "fp16")}
    assert skipped == []
    runner = make_runner(RunnerSpec("executorch", "fp32", "xnnpack"), bundles, threads=1)
    assert_follows_the_reference(tiny, runner, make_runner(REFERENCE_SPEC, bundles, tiny.model, max_length=64))
    assert runner.context_tokens == tiny.model.config.context_length
    assert runner.weight_bytes_per_token == tiny.model.weight_bytes_per_token < runner.size_bytes


def test_tiny_fp16_program_generates_what_the_fp16_model_generates_past_the_window(tiny, tiny_all):
    """`--precision fp16`: the model's 16-bit weights, products and KV cache (the rest float32) in XNNPACK's fp16
    kernels follow the eager fp16 model, with half the fp32 program's weight bytes."""
    out, _ = tiny_all
    bundle = load_bundle(out, tiny.weights.slug, "executorch")
    fp16_path, fp32_path = (bundle.variant(precision).files[0] for precision in ("fp16", "fp32"))
    config = tiny.model.config
    model_fp16 = copy.deepcopy(tiny.model).half()
    prompt = prompt_ids(3 * config.sliding_window + 3, 3, config.vocab_size)
    expected = generate(model_fp16, prompt, 24, stop_token_ids=[], return_logits=True)
    tokens, logits = greedy(ExecuTorchDecoder(fp16_path, threads=1), prompt, 24)
    assert tokens == expected.tokens[0].tolist()
    assert max_step_difference(logits, expected.step_logits) <= FP16_LOGIT_TOLERANCE
    # at least half the float32 weights' bytes saved (the rest of a file is the graph, which a toy model's are mostly)
    assert fp32_path.stat().st_size - fp16_path.stat().st_size >= tiny.model.weight_bytes_per_token / 2
    assert bundle.variant("fp16").options["weight_bytes_per_token"] == model_fp16.weight_bytes_per_token


def test_a_new_sequence_does_not_see_the_previous_ones_cache(tiny, tiny_program):
    """A prefill at 0 after a long sequence, and a prompt of one token (the decode method): each equals a fresh
    PyTorch run, though the program's buffers still hold the previous sequence."""
    _, path = tiny_program
    config = tiny.model.config
    decoder = ExecuTorchDecoder(path, threads=1)
    greedy(decoder, prompt_ids(40, 1, config.vocab_size), 8)
    for length in (5, 1):
        prompt = prompt_ids(length, 2, config.vocab_size)
        expected = generate(tiny.model, prompt, 6, stop_token_ids=[], return_logits=True)
        tokens, logits = greedy(decoder, prompt, 6)
        assert tokens == expected.tokens[0].tolist(), length
        assert max_step_difference(logits, expected.step_logits) <= LOGIT_TOLERANCE, length


def test_the_program_carries_what_an_app_needs(tiny, tiny_program):
    """ExecuTorch's LLM runners read these constant methods; the bundle holds the tokenizer and the manifest
    the same numbers."""
    bundle, path = tiny_program
    config = tiny.model.config
    program = ExecuTorchProgram(path, threads=1)
    options = bundle.variant("fp32").options
    expected = runner_metadata(config, options["max_context"], options["max_prefill_chunk"])
    assert expected["get_bos_id"] == config.bos_token_id and expected["get_max_context_len"] == config.context_length
    for name, value in expected.items():
        answer = program.program.load_method(name).execute([])
        assert (list(map(int, answer)) if isinstance(value, list) else int(answer[0])) == value, name
    assert (bundle.path / "tokenizer.json").is_file() and (bundle.path / "config.json").is_file()
    assert options["delegate"] == "XNNPACK" and options["executorch_version"] == "1.5.1"


def test_a_chunk_that_does_not_fit_is_refused_with_the_limits(tiny, tiny_program):
    _, path = tiny_program
    program = ExecuTorchProgram(path, threads=1)
    too_long = torch.zeros(1, program.max_prefill_chunk + 1, dtype=torch.long)
    with pytest.raises(UserError, match=f"chunks of 1..{program.max_prefill_chunk} tokens"):
        program.run(too_long, 0)
    with pytest.raises(UserError, match=f"context {program.max_context}"):
        program.run(torch.zeros(1, 2, dtype=torch.long), program.max_context - 1)
    with pytest.raises(UserError, match="does not fit"):
        program.run(torch.zeros(1, 1, dtype=torch.long), -1)


def test_a_pte_with_the_identifier_and_garbage_after_it_is_refused_not_a_crash(tiny_program, tmp_path):
    """Past the identifier check, the runtime itself must refuse the file (an error, not an abort of the
    process): the bytes of a good program but every 997th one flipped, and its first half alone."""
    _, path = tiny_program
    data = bytearray(path.read_bytes())
    data[1000::997] = bytes(byte ^ 0x55 for byte in data[1000::997])
    for name, damaged in (("flipped.pte", bytes(data)), ("half.pte", path.read_bytes()[:len(data) // 2])):
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(RuntimeError):
            ExecuTorchProgram(tmp_path / name, threads=1)
    (tmp_path / "noise.pte").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(UserError, match="noise.pte is not an ExecuTorch program"):
        ExecuTorchProgram(tmp_path / "noise.pte", threads=1)


def lowered_gelu_difference(partitioner, tmp_path) -> float:
    """max |Δ| between eager `gelu(x, approximate="tanh")` and the same module lowered with `partitioner` and run
    by the ExecuTorch runtime, over x in [-6, 6]."""
    with quiet_native_output():
        from executorch.exir import to_edge_transform_and_lower
        from executorch.runtime import Runtime

    class TanhGelu(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.gelu(x, approximate="tanh")

    x = torch.linspace(-6, 6, 4096)[None]
    program = to_edge_transform_and_lower(torch.export.export(TanhGelu(), (x,)), partitioner=[partitioner])
    path = tmp_path / f"gelu-{len(list(tmp_path.iterdir()))}.pte"
    path.write_bytes(program.to_executorch().buffer)
    with quiet_native_output():
        output = Runtime.get().load_program(path).load_method("forward").execute([x])[0]
    return (output - TanhGelu()(x)).abs().max().item()


def test_the_feed_forwards_tanh_gelu_is_computed_as_tanh_gelu(tmp_path):
    """XNNPACK's GELU (what its default partitioner delegates) is the erf form whatever `approximate` says; ours
    leaves the op to the portable kernel, which keeps the tanh form."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    assert lowered_gelu_difference(xnnpack_partitioner(), tmp_path) <= 1e-6
    assert lowered_gelu_difference(XnnpackPartitioner(), tmp_path) > 1e-4  # the erf form: why it is left out


def test_the_decode_method_keeps_sdpa_past_the_decode_matmul_threshold(tiny, monkeypatch):
    """Eager decode over ≥ DECODE_MATMUL_MIN_KEYS keys takes `decode_attention` (split-K matmuls); exported
    programs keep SDPA (model/gemma3.py's rule). Lowered to XNNPACK, the matmul form's empty remainder block
    gave logits 13 off at the real model's first decode step past 1024 tokens (BENCHMARKS.md, "ExecuTorch")."""
    import model.gemma3 as gemma3
    from exporters.executorch import exported_method

    calls = []
    monkeypatch.setattr(gemma3, "decode_attention", lambda *args: calls.append(args[1].shape[2]))
    max_context = gemma3.DECODE_MATMUL_MIN_KEYS + 17
    model = gemma3.Gemma3Model(tiny.model.config.replace(context_length=max_context)).eval()
    model.load_state_dict(tiny.model.state_dict())
    program = exported_method(model, max_context, "decode", 8)
    assert calls == []
    assert any(node.target == torch.ops.aten.scaled_dot_product_attention.default
               for node in program.graph_module.graph.nodes)


def test_every_cache_buffer_starts_from_its_initial_value_in_the_program(tiny):
    """The buffers the program writes are those InitializedMutableBufferPass initializes from the file: each of
    the cache's (without it key_positions would start at 0, "written", instead of -1)."""
    from exporters.executorch import exported_method, mutated_buffer_names
    from model.kv_cache import KVCache

    program = exported_method(tiny.model.eval(), 64, "decode", 8).run_decompositions({})  # functional, as edge
    cache_buffers = {name.rsplit(".", 1)[-1] for name, _ in KVCache(tiny.model.config, 1, 64).named_buffers()}
    assert mutated_buffer_names([program]) == sorted(cache_buffers) == ["key_positions", "key_valid", "keys",
                                                                        "values"]


def test_a_max_context_outside_the_model_is_refused_before_lowering(tiny):
    context = tiny.model.config.context_length
    assert check_max_context(tiny.model.config, None) == min(2048, context)
    for bad in (1, context + 1):
        with pytest.raises(UserError, match=f"outside 2..{context}"):
            check_max_context(tiny.model.config, bad)


def test_without_executorch_the_runner_is_skipped_and_the_export_refused_with_how_to_get_it(tiny, monkeypatch,
                                                                                             tmp_path):
    from exporters.executorch import export

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "executorch" else real_find_spec(name, *args))
    host = Host.detect()
    reason = backend_unavailable_reason(BACKENDS["executorch"], "xnnpack", host)
    assert reason == "ExecuTorch is not installed (make setup installs executorch==1.5.1)"
    with pytest.raises(UserError, match="ExecuTorch is not installed") as refusal:
        export(tiny.model, tmp_path)
    assert "pip install -e '.[executorch]'" in refusal.value.fix and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ real model

@pytest.mark.real
def test_real_program_is_greedy_identical_to_pytorch_for_64_steps_past_the_window(real, real_bundles,
                                                                                   real_long_prompt_ids):
    path = real_bundle_path(real_bundles, "executorch") / "model.pte"
    assert len(real_long_prompt_ids) > real.model.config.sliding_window
    expected = generate(real.model, real_long_prompt_ids, 64, stop_token_ids=[], return_logits=True)
    tokens, logits = greedy(ExecuTorchDecoder(path), real_long_prompt_ids, 64)
    difference = max_step_difference(logits, expected.step_logits)
    print(f"model.pte: max |Δlogit| over 64 steps past the window = {difference:.3g}")
    assert tokens == expected.tokens[0].tolist()
    assert difference <= LOGIT_TOLERANCE
