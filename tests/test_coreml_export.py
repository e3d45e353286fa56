"""Core ML export: the saved .mlpackage is read back and executed by the MIL runner (numpy, op by op) with
its own generate loop, and compared with the PyTorch reference.

Bars (64 steps tiny, 32 real): fp32 → same greedy tokens and teacher-forced max |Δlogit| ≤ 1e-3 (tiny) / 5e-3
(real); fp16 → no NaN/Inf, top-1 agreement ≥ 99 %, first 16 greedy tokens equal (real); int8 / int4 → agreement
printed, above floors measured on these weights. Every prompt is longer than the sliding window.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from conftest import real_bundle_path
from test_block_grids import assert_package_holds_grids
from exporters import coreml
from model.errors import UserError
from model.generate import generate
from model.weights import source_block_grids
from validation.compare import greedy_and_forced, matching_prefix
from validation.coreml_runtime import CoreMLRuntimeDecoder, covering_chunks, prompt_chunks
from validation.mil import MILRunner

STEPS = 64
# The numpy MIL runner takes ~1 s per real step: 32 steps after the 600-token prompt (still past the window).
REAL_STEPS = 32
TINY_OPTIONS = {"max_context": 128, "query_lengths": (1, 4, 16)}
TINY_PROMPT_LENGTH = 23  # 16 + 4 + 3 × 1: every enumerated length runs; crosses the window of 8
# Agreement floors (each test prints its numbers). The real int8 / int4 packages hold the GGUF's own grids, so
# they keep the fp16 package's floor; the tiny model's int8 / int4 are rounded from random float weights, and
# its logits are nearly tied, so its floors are low.
REAL_AGREEMENT_FLOOR = {"fp16": 0.99, "int8": 0.99, "int4": 0.99}
TINY_AGREEMENT_FLOOR = {"fp16": 0.95, "int8": 0.85, "int4": 0.25}  # random weights: near-tied logits


class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __enter__(self) -> "PeakMemory":
        self.process, self.peak_bytes, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak_bytes = max(self.peak_bytes, self.process.memory_info().rss)
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()


def package_megabytes(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2 ** 20


def export_timed(model, out_dir: Path, precisions: list[str], **options) -> dict[str, tuple[Path, dict[str, float]]]:
    """`coreml.export_many` of `precisions` (one conversion for fp16/int8/int4): precision → (package, stats of
    the whole export: seconds, peak RSS, and the package's size)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with PeakMemory() as memory:
        variants = coreml.export_many(model, out_dir, precisions, **options)
    seconds, peak_gb = time.perf_counter() - started, memory.peak_bytes / 2 ** 30
    print(f"\n[coreml {'+'.join(precisions)}] convert {seconds:.1f} s, peak RSS {peak_gb:.2f} GB")
    return {variant.precision: (out_dir / variant.files[0],
                                {"seconds": seconds, "peak_rss_gb": peak_gb,
                                 "size_mb": package_megabytes(out_dir / variant.files[0])})
            for variant in variants}


def compare(runner: MILRunner, prompt: list[int], reference) -> dict[str, float]:
    """The package's own greedy loop against the reference, and its teacher-forced logits at every step."""
    started = time.perf_counter()
    reference_tokens = reference.tokens[0].tolist()
    tokens, actual = greedy_and_forced(runner, prompt, reference_tokens)
    seconds = time.perf_counter() - started
    expected = reference.step_logits
    differences = [float((a - e).abs().max()) for a, e in zip(actual, expected)]
    agreement = np.mean([int(a.argmax()) == int(e.argmax()) for a, e in zip(actual, expected)])
    return {"max_dlogit": max(differences), "agreement": float(agreement), "steps": len(reference_tokens),
            "matching_prefix": matching_prefix(tokens, reference_tokens),
            "finite": all(bool(torch.isfinite(a).all()) for a in actual), "seconds": seconds}


def report(name: str, result: dict[str, float]) -> None:
    print(f"\n[{name}] max |Δlogit| {result['max_dlogit']:.2e}, top-1 agreement {result['agreement']:.1%}, "
          f"greedy prefix {result['matching_prefix']}/{result['steps']}, finite {result['finite']}; MIL runner "
          f"{result['seconds']:.0f} s in all")


# --- tiny ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_packages(tiny, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("coreml_tiny")
    exported = export_timed(tiny.model, out_dir, list(coreml.PRECISIONS), **TINY_OPTIONS)
    return {precision: path for precision, (path, _) in exported.items()}


@pytest.fixture(scope="module")
def tiny_prompt():
    return torch.randint(3, 512, (TINY_PROMPT_LENGTH,), generator=torch.Generator().manual_seed(7)).tolist()


@pytest.fixture(scope="module")
def tiny_reference(tiny, tiny_prompt):
    return generate(tiny.model, tiny_prompt, STEPS, stop_token_ids=[], return_logits=True)


def test_tiny_package_spec(tiny, tiny_packages):
    import coremltools as ct

    config = tiny.model.config
    assert sorted(p.name for p in tiny_packages.values()) == sorted(coreml.PACKAGE_NAMES.values())
    spec = ct.models.MLModel(str(tiny_packages["fp16"]), skip_model_load=True).get_spec()
    assert spec.specificationVersion == ct.target.iOS18.value == 9
    description = spec.description
    assert [i.name for i in description.input] == ["input_ids", "cache_position"]
    assert [o.name for o in description.output] == ["logits"]
    shapes = sorted(list(s.shape) for s in description.input[0].type.multiArrayType.enumeratedShapes.shapes)
    assert shapes == [[1, 1], [1, 4], [1, 16]]
    states = {s.name: list(s.type.stateType.arrayType.shape) for s in description.state}
    assert len(states) == 2 * config.num_layers
    assert states["key_cache_0"] == [1, config.num_kv_heads, 128, config.head_dim]
    # fp32 keeps each cache as an fp16 pair (value, rounding error): Core ML states are fp16 only.
    fp32_spec = ct.models.MLModel(str(tiny_packages["fp32"]), skip_model_load=True).get_spec()
    assert len(fp32_spec.description.state) == 4 * config.num_layers
    assert {s.name for s in fp32_spec.description.state} >= {"key_cache_residual_0", "value_cache_residual_5"}
    assert description.metadata.license == coreml.GEMMA_LICENSE
    assert description.metadata.userDefined["max_context"] == "128"
    # What a Swift app needs besides the I/O: the state names, the special ids (Gemma: <bos> 2, <eos> 1 and
    # <end_of_turn> 106 on the real vocabulary; the tiny one's own here), the descriptions.
    metadata = description.metadata.userDefined
    assert metadata["state_names"].split(",") == [s.name for s in description.state]
    assert metadata["bos_token_id"] == str(config.bos_token_id)
    assert metadata["eos_token_ids"] == ",".join(map(str, config.eos_token_ids))
    assert {i.name: i.shortDescription != "" for i in description.input} == {"input_ids": True, "cache_position": True}
    assert description.output[0].shortDescription.startswith("float32 [1, 1, ")


def test_tiny_lm_head_is_chunked_and_stored_once(tiny, tiny_packages):
    from validation.mil import load_program

    _, program = load_program(tiny_packages["fp16"])
    operations = list(program.functions["main"].operations)
    head = [op for op in operations if op.op_type == "linear" and "embedding_blocks" in op.weight.name]
    assert len(head) == 16 and {tuple(op.weight.shape) for op in head} == {(32, 64)}
    gathered = {op.x.name for op in operations if op.op_type == "gather" and "embedding_blocks" in op.x.name}
    assert gathered == {op.weight.name for op in head}  # the lookup reads the head's own constants
    parameters = sum(p.numel() for p in tiny.model.parameters())
    weights = tiny_packages["fp16"] / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    assert weights.stat().st_size < 1.3 * 2 * parameters


def test_tiny_fp32_equals_pytorch(tiny_packages, tiny_prompt, tiny_reference):
    result = compare(MILRunner(tiny_packages["fp32"]), tiny_prompt, tiny_reference)
    report("tiny fp32", result)
    assert result["matching_prefix"] == STEPS
    assert result["max_dlogit"] <= 1e-3


@pytest.mark.parametrize("precision", ["fp16", "int8", "int4"])
def test_tiny_reduced_precision(precision, tiny_packages, tiny_prompt, tiny_reference):
    result = compare(MILRunner(tiny_packages[precision]), tiny_prompt, tiny_reference)
    report(f"tiny {precision}", result)
    assert result["finite"]
    assert result["agreement"] >= TINY_AGREEMENT_FLOOR[precision]


def test_runner_refuses_context_overflow(tiny_packages):
    runner = MILRunner(tiny_packages["fp32"])
    with pytest.raises(UserError, match="max_context of 128"):
        runner.prefill(list(range(3, 3 + 129)))
    runner.prefill([5] * 127)
    runner.decode(5)
    with pytest.raises(UserError, match="129 tokens exceed"):
        runner.decode(5)


@pytest.mark.parametrize("options, message", [
    ({"precision": "int2"}, "no precision 'int2'"),
    ({"deployment_target": "iOS17"}, "needs iOS 18"),
    ({"max_context": 4096}, "outside 1..1024"),
    ({"query_lengths": (8, 16)}, "must include 1"),
    ({"query_lengths": (1, 256)}, "within max_context"),
    ({"lm_head_chunks": 3}, "must divide the vocabulary"),
])
def test_bad_options_are_user_errors(tiny, tmp_path, options, message):
    options = {**TINY_OPTIONS, **options}
    with pytest.raises(UserError, match=message):
        coreml.export(tiny.model, tmp_path, **options)
    assert not any(tmp_path.iterdir())


def test_lm_head_chunks_must_fit_the_neural_engine(real_config_only):
    with pytest.raises(UserError, match="at most 16384 rows"):
        coreml.check_options(real_config_only, "fp16", 2048, (1, 64), 8, "iOS18")


@pytest.fixture
def real_config_only():
    from model.config import preset
    return preset("270m")


def test_one_conversion_serves_fp16_and_int4_and_default_context_fits_the_model(tiny, tmp_path):
    from validation.mil import load_program

    steps = []
    exported = coreml.export_many(tiny.model, tmp_path, ["int4", "fp16"], query_lengths=(1,), progress=steps.append)
    assert steps == ["trace", "convert", "compress", "save", "save"]
    assert [variant.precision for variant in exported] == ["int4", "fp16"]
    # The default 2048 is more than tiny's whole context (1024): the package takes the model's context.
    assert exported[0].options["max_context"] == tiny.model.config.context_length == 1024
    compressed_ops = {}
    for variant in exported:
        spec, program = load_program(tmp_path / variant.files[0])
        assert spec.description.metadata.userDefined["precision"] == variant.precision
        compressed_ops[variant.precision] = sum(op.op_type.startswith("constexpr_")
                                                for op in program.functions["main"].operations)
    # Compressing the int4 package first left the shared conversion as it was: the fp16 package saved after it
    # holds plain weights. The int4 one holds every weight matrix as its grid, the tied embedding as the LM
    # head's chunks (a float source: exporters/weight_grids.py rounds it, the embedding at 8 bits).
    matrices = sum(parameter.dim() == 2 for parameter in tiny.model.state_dict().values())
    assert compressed_ops == {"int4": matrices - 1 + coreml.DEFAULT_LM_HEAD_CHUNKS, "fp16": 0}


def test_runtime_decoder_needs_macos(tiny_packages):
    import platform

    if platform.system() == "Darwin":
        pytest.skip("on macOS the runtime decoder works (tests/test_coreml_macos.py)")
    with pytest.raises(UserError, match="Core ML prediction needs macOS; use the MIL runner"):
        CoreMLRuntimeDecoder(tiny_packages["fp16"])


def test_prompt_chunks_cover_the_prompt():
    assert prompt_chunks(600, (1, 64, 512)) == [512, 64] + [1] * 24
    assert prompt_chunks(3, (1, 64, 512)) == [1, 1, 1]


def test_covering_chunks_pad_the_rest_instead_of_one_token_steps():
    """Teacher forcing may pad past the text (causal): the rest goes in one chunk where that wastes fewer tokens
    than the longest chunk that fits it."""
    assert covering_chunks(511, (1, 64, 512)) == [512]
    assert covering_chunks(600, (1, 64, 512)) == [512, 64, 64]
    assert covering_chunks(130, (1, 64, 512)) == [64, 64, 64]
    assert covering_chunks(3, (1,)) == [1, 1, 1]
    assert covering_chunks(600, (1, 64, 512), room=620) == [512, 64] + [1] * 24  # padding must fit the cache


# --- real Gemma 3 270M -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_export(real, real_bundles, tmp_path_factory):
    """Each real variant's package: from the real model's bundle made by `gemma-export all` (conftest) where it
    has that precision, else converted here once (lazily, on first use) with its conversion time and peak RSS."""
    bundle = real_bundle_path(real_bundles, "coreml")
    out_dir = tmp_path_factory.mktemp("coreml_real")
    exported: dict[str, tuple[Path, dict[str, float]]] = {}

    def get(precision: str) -> tuple[Path, dict[str, float]]:
        if precision not in exported:
            shipped = bundle / coreml.PACKAGE_NAMES[precision]
            if shipped.exists():
                exported[precision] = (shipped, {"size_mb": package_megabytes(shipped)})
            else:  # int8 and int4 from one conversion with the GGUF's own grids, as `gemma-export export` does
                compressed = [p for p in ("int8", "int4") if not (bundle / coreml.PACKAGE_NAMES[p]).exists()]
                exported.update(export_timed(real.model, out_dir, compressed if precision in compressed
                                             else [precision], source_grids=source_block_grids(real.weights)))
        return exported[precision]
    return get


@pytest.fixture(scope="module")
def real_reference(real, real_long_prompt_ids):
    return generate(real.model, real_long_prompt_ids, REAL_STEPS, stop_token_ids=[], return_logits=True)


@pytest.mark.real
def test_real_fp16_package(real, real_export, real_long_prompt_ids, real_reference):
    import coremltools as ct

    path, stats = real_export("fp16")
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    assert spec.specificationVersion == 9 and len(spec.description.state) == 36
    result = compare(MILRunner(path), real_long_prompt_ids, real_reference)
    report("real fp16", result)
    assert result["finite"]
    assert result["agreement"] >= REAL_AGREEMENT_FLOOR["fp16"]
    assert result["matching_prefix"] >= 16
    assert stats["size_mb"] < 600  # the tied embedding is stored once (~536 MB of fp16 weights)


@pytest.mark.real
def test_real_fp32_equals_pytorch(real_export, real_long_prompt_ids, real_reference):
    path, _ = real_export("fp32")
    result = compare(MILRunner(path), real_long_prompt_ids, real_reference)
    report("real fp32", result)
    assert result["matching_prefix"] == REAL_STEPS
    assert result["max_dlogit"] <= 5e-3


@pytest.mark.real
def test_real_int4_package_holds_the_gguf_grids(real, real_export):
    path, _ = real_export("int4")
    assert_package_holds_grids(path, real.model, source_block_grids(real.weights), coreml.DEFAULT_LM_HEAD_CHUNKS)


@pytest.mark.real
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_real_compressed(precision, real_export, real_long_prompt_ids, real_reference):
    path, _ = real_export(precision)
    result = compare(MILRunner(path), real_long_prompt_ids, real_reference)
    report(f"real {precision}", result)
    assert result["finite"]
    assert result["agreement"] >= REAL_AGREEMENT_FLOOR[precision]
