"""`gemma-export bench --baseline llama.cpp|transformers`: the baselines run the same model as our runners (their
first logits equal ours), bench measures them in the same run and saves every runner's ratio to each of them, and
a baseline that can't run here is one clear line and exit 2."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from validation.pipeline import run_bench, run_validation, write_report
from model.loading import load
from model.tokenizer import tiny_vocabulary
from model.weights import GGUF_NAMES, is_norm, save_hf_directory, source_names
from validation.baselines import RATIO_METRICS, open_baseline, open_baseline_runner
from validation.bench import BenchSettings, prompt_ids
from validation.compare import matching_prefix
from validation.runners import REFERENCE_SPEC, Runner, RunnerSpec, Selection, make_runner

REPO = Path(__file__).resolve().parents[1]
CLI = "import sys; from gemma_export.cli import cli; from gemma_export.errors import run_cli; sys.exit(run_cli(cli))"
SETTINGS = BenchSettings(threads=1, ttft_prompt_tokens=4, prefill_tokens=16, decode_tokens=4, repeats=1)
TRANSFORMERS_SPEC = {"backend": "transformers", "precision": "fp32", "device": "cpu"}
LLAMA_CPP_SPEC = {"backend": "llama.cpp", "precision": "F32", "device": "cpu"}
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason='llama-cpp-python is not installed (pip install -e ".[baseline]")')


# Numbers, not speed: one torch thread avoids oversubscribing a shared machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args: str, shim: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter; `shim` goes first on PYTHONPATH (to replace an installed package)."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(str(path) for path in (shim, REPO) if path))
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, cwd=REPO,
                          env=environment, timeout=600)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def write_tiny_gguf(loaded, path: Path) -> Path:
    """random:tiny as an F32 Gemma 3 GGUF in llama.cpp's names and keys (norms stored with +1, as its converter
    does), with the tiny SentencePiece vocabulary."""
    import gguf

    config = loaded.weights.config
    writer = gguf.GGUFWriter(path, "gemma3")
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_global_base)
    writer.add_sliding_window(config.sliding_window)
    writer.add_uint32("gemma3.attention.sliding_window_pattern", config.sliding_window_pattern)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocabulary = tiny_vocabulary()
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocabulary.pieces)
    writer.add_token_scores(vocabulary.scores)
    writer.add_token_types(vocabulary.types)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_ids[0])
    writer.add_pad_token_id(config.pad_token_id)
    names = source_names(GGUF_NAMES, config.num_layers)
    for ours, tensor in loaded.weights.state_dict.items():
        stored = tensor + 1.0 if is_norm(ours) else tensor
        writer.add_tensor(names[ours], stored.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory) -> Path:
    return write_tiny_gguf(tiny, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf")


def greedy(runner, prompt: list[int], steps: int) -> tuple[list[np.ndarray], list[int]]:
    """The logits of the prompt and of each greedy step, and the tokens chosen."""
    logits = [runner.prefill(prompt)]
    tokens = [int(logits[-1].argmax())]
    for _ in range(steps - 1):
        logits.append(runner.decode(tokens[-1]))
        tokens.append(int(logits[-1].argmax()))
    return logits, tokens


# ------------------------------------------------------------------------------------------------ the option

def test_unknown_baseline_is_a_usage_error():
    result = run_cli("bench", "--model", "random:tiny", "--baseline", "vllm")
    assert result.returncode == 2
    assert len(error_lines(result)) == 1 and "'--baseline'" in error_lines(result)[0], result.stderr
    assert "'llama.cpp'" in error_lines(result)[0] and "'transformers'" in error_lines(result)[0]


def test_llama_cpp_not_installed_is_one_clear_line(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "llama_cpp.py").write_text("raise ModuleNotFoundError(\"No module named 'llama_cpp'\", name='llama_cpp')\n")
    result = run_cli("bench", "--model", "random:tiny", "--formats", "pytorch", "--baseline", "llama.cpp",
                     "--out", str(tmp_path / "artifacts"), shim=shim)
    assert result.returncode == 2, result.stderr
    assert error_lines(result) == ['error: llama-cpp-python is not installed; pip install -e ".[baseline]"']
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "artifacts").exists()  # refused before anything was measured


def test_llama_cpp_needs_a_gguf_model(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "llama_cpp.py").write_text("")  # installed, as far as the check can tell
    result = run_cli("bench", "--model", "random:tiny", "--formats", "pytorch", "--baseline", "llama.cpp",
                     "--out", str(tmp_path / "artifacts"), shim=shim)
    assert result.returncode == 2, result.stderr
    assert error_lines(result) == ["error: the llama.cpp baseline needs a GGUF model, and random:tiny is not one; "
                                   "use --model gemma-3-270m or a .gguf file, or leave out --baseline llama.cpp"]


# ------------------------------------------------------------------------------------ peak RSS is its own

def test_bench_process_of_a_baseline_does_not_import_torch():
    """llama.cpp is measured by `python -m validation.bench`: torch (~250 MB) must not count in its RSS."""
    code = "import sys, validation.bench; print(sorted(m for m in ('torch', 'model') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr


def test_peak_rss_of_a_child_is_not_its_parents():
    """getrusage's ru_maxrss survives exec on Linux: a child of a big parent would report the parent's size."""
    ballast = np.ones(256 * 2**20 // 8)  # this process: at least 256 MiB resident
    code = "from validation.memory import peak_rss_bytes; print(peak_rss_bytes())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert int(result.stdout) < 128 * 2**20 < ballast.nbytes, result.stderr


# ------------------------------------------------------------------------------- the same model, measured

def test_transformers_baseline_runs_our_model(tiny, tmp_path):
    """Prompt past the sliding window, then greedy steps: transformers' logits equal the reference's."""
    folder = save_hf_directory(tiny.weights.config, tiny.weights.state_dict, tmp_path / "hf")
    baseline = open_baseline(TRANSFORMERS_SPEC, folder, context_tokens=64, threads=1)
    reference = make_runner(REFERENCE_SPEC, {}, tiny.model, max_length=64)
    prompt = prompt_ids(12, tiny.model.config.vocab_size)
    assert len(prompt) > tiny.model.config.sliding_window
    theirs, their_tokens = greedy(baseline, prompt, 6)
    ours, our_tokens = greedy(reference, prompt, 6)
    assert their_tokens == our_tokens
    for step, (their_logits, our_logits) in enumerate(zip(theirs, ours)):
        assert np.abs(their_logits - our_logits).max() < 1e-3, step
    assert baseline.weight_bytes_per_token == tiny.model.weight_bytes_per_token


@needs_llama_cpp
def test_tiny_gguf_is_the_tiny_model(tiny, tiny_gguf):
    """The test GGUF holds random:tiny exactly (read back by our own loader), so llama.cpp runs our model."""
    from model.weights import load_weights

    read_back = load_weights(str(tiny_gguf))
    assert read_back.config == tiny.weights.config
    for name, tensor in tiny.weights.state_dict.items():
        assert torch.allclose(read_back.state_dict[name], tensor, atol=1e-6), name


@needs_llama_cpp
def test_llama_cpp_baseline_runs_our_model(tiny, tiny_gguf):
    baseline = open_baseline(LLAMA_CPP_SPEC, tiny_gguf, context_tokens=64, threads=1)
    reference = make_runner(REFERENCE_SPEC, {}, tiny.model, max_length=64)
    prompt = prompt_ids(12, tiny.model.config.vocab_size)
    theirs, their_tokens = greedy(baseline, prompt, 6)
    ours, our_tokens = greedy(reference, prompt, 6)
    assert baseline.vocab_size == tiny.model.config.vocab_size
    assert their_tokens == our_tokens
    scale = np.abs(ours[0]).max()
    for step, (their_logits, our_logits) in enumerate(zip(theirs, ours)):
        # llama.cpp keeps K and V in fp16: equal to a small fraction of the logits' range, not to fp32 rounding.
        assert np.abs(their_logits - our_logits).max() < 2e-2 * scale, step


@needs_llama_cpp
def test_llama_cpp_teacher_forces_a_text_in_one_prefill(tiny, tiny_gguf):
    """Validation's llama.cpp keeps every position's logits: one prefill gives what a prefill and a decode step
    per token give (llama.cpp's batched and one-token kernels round alike up to its fp16 KV cache)."""
    spec = RunnerSpec.from_dict(LLAMA_CPP_SPEC)
    batched = open_baseline_runner(spec, tiny_gguf, context_tokens=64, threads=1)
    stepwise = Runner(spec, *runner_parts(open_baseline(LLAMA_CPP_SPEC, tiny_gguf, context_tokens=64, threads=1)))
    text = prompt_ids(40, tiny.model.config.vocab_size)
    one_prefill, step_by_step = batched.teacher_forced(text), stepwise.teacher_forced(text)
    assert hasattr(batched.decoder, "prefill_every_position") and not hasattr(stepwise.decoder,
                                                                              "prefill_every_position")
    assert len(one_prefill) == len(step_by_step) == len(text) - 1
    scale = np.abs(step_by_step[0]).max()
    for step, (mine, theirs) in enumerate(zip(one_prefill, step_by_step)):
        assert np.abs(mine - theirs).max() < 2e-2 * scale, step
        assert mine.argmax() == theirs.argmax(), step


def runner_parts(opened) -> tuple:
    return opened, opened.vocab_size, opened.size_bytes, opened.weight_bytes_per_token, opened.context_tokens


def check_ratios(row: dict, baseline: dict) -> None:
    ratios = row["vs_baselines"][baseline["runner"]]
    assert set(ratios) == set(RATIO_METRICS)
    for metric in RATIO_METRICS:
        assert ratios[metric] == pytest.approx(row[metric] / baseline[metric], rel=1e-12), metric


@pytest.mark.slow
def test_bench_measures_the_transformers_baseline_and_saves_ratios(tiny, tmp_path):
    root = tmp_path / "artifacts"
    outcome = run_bench(tiny, root, Selection(formats=("pytorch",)), SETTINGS, bandwidth_megabytes=32,
                        baselines=("transformers",))
    assert outcome.failed_runners == []
    saved = json.loads((root / "random-tiny" / "report" / "bench.json").read_text())
    [baseline] = saved["baselines"]
    assert baseline["runner"] == "transformers fp32 cpu"
    for metric in ("load_seconds", *RATIO_METRICS, "percent_of_ceiling"):
        assert baseline[metric] > 0, metric
    assert baseline["prefill_tokens"] == 16 and baseline["decode_tokens"] == 4
    row = next(row for row in saved["runners"] if row["runner"] == "pytorch fp32 cpu")
    check_ratios(row, baseline)
    paths = write_report(root, "random-tiny")
    markdown = paths["md"].read_text()
    ratios = row["vs_baselines"]["transformers fp32 cpu"]
    assert "## Against the baselines" in markdown
    assert (f"| pytorch fp32 cpu | transformers fp32 cpu | {ratios['decode_tokens_per_second']:.2f} | "
            f"{ratios['prefill_tokens_per_second']:.2f} | {ratios['time_to_first_token_seconds']:.2f} |") in markdown
    html = paths["html"].read_text()
    assert "Against the baselines" in html and html.count("data:image/png;base64,") == 2  # speed + ratio bars
    assert json.loads(paths["json"].read_text())["bench"]["baselines"] == saved["baselines"]


@needs_llama_cpp
@pytest.mark.slow
def test_bench_measures_the_llama_cpp_baseline_on_a_gguf_model(tiny_gguf, tmp_path):
    loaded = load(str(tiny_gguf))
    root = tmp_path / "artifacts"
    outcome = run_bench(loaded, root, Selection(formats=("pytorch",)), SETTINGS, bandwidth_megabytes=32,
                        baselines=("llama.cpp", "transformers"))
    assert outcome.failed_runners == []
    baselines = {row["runner"]: row for row in outcome.piece["baselines"]}
    assert set(baselines) == {"llama.cpp F32 cpu", "transformers fp32 cpu"}
    llama = baselines["llama.cpp F32 cpu"]
    assert llama["size_bytes"] == tiny_gguf.stat().st_size
    for metric in ("load_seconds", *RATIO_METRICS):
        assert llama[metric] > 0, metric
    row = next(row for row in outcome.piece["runners"] if row["runner"] == "pytorch fp32 cpu")
    for baseline in baselines.values():
        check_ratios(row, baseline)


def check_gate_baselines(outcome, root: Path, slug: str, expected: dict[str, float]) -> None:
    """Each baseline went through the same gate as the runners (same teacher-forced steps, same reference), is
    judged by no floor, and has its row in the report; `expected`: baseline → the mean KL it must stay under."""
    runners = {row["runner"]: row for row in outcome.piece["runners"]}
    baselines = {row["runner"]: row for row in outcome.piece["baselines"]}
    assert set(baselines) == set(expected) and outcome.failed_runners == []
    compared = runners["pytorch-compile fp32 cpu"] if "pytorch-compile fp32 cpu" in runners else None
    for name, row in baselines.items():
        assert row["baseline"] is True and row["verdict"] == "baseline" and row["failures"] == []
        assert row["thresholds"] == {"max_abs_logit_diff": None, "min_top1_agreement": None,
                                     "greedy_identical": False, "max_mean_kl_divergence": None}
        assert row["prompts"] and all(len(prompt["steps"]) == 4 for prompt in row["prompts"])
        assert row["teacher_forced_steps"] == 4 * len(row["prompts"]) + 63  # and 64 held-out tokens
        assert 0 <= row["mean_kl_divergence"] < expected[name], name
        assert row["seconds"] > 0 and row["nonfinite_logits"] == 0
        if compared is not None:
            assert row["teacher_forced_steps"] == compared["teacher_forced_steps"]
    markdown = write_report(root, slug)["md"].read_text()
    assert "## Baselines on the same tokens" in markdown
    for row in baselines.values():
        assert (f"| {row['backend']} | {row['precision']} | {row['teacher_forced_steps']} | "
                f"{row['mean_kl_divergence']:.2e} | {100 * row['top1_agreement']:.1f} |") in markdown


def test_validate_runs_the_transformers_baseline_through_the_gate(tiny, tmp_path):
    root = tmp_path / "artifacts"
    outcome = run_validation(tiny, root, Selection(formats=("pytorch",)), max_new_tokens=4, threads=1,
                             perplexity_tokens=64, baselines=("transformers",))
    # transformers runs the same fp32 weights: the same distribution up to float32 rounding.
    check_gate_baselines(outcome, root, "random-tiny", {"transformers fp32 cpu": 1e-9})


@needs_llama_cpp
def test_validate_runs_the_llama_cpp_baseline_through_the_gate(tiny_gguf, tmp_path):
    loaded = load(str(tiny_gguf))
    root = tmp_path / "artifacts"
    outcome = run_validation(loaded, root, Selection(formats=("pytorch",)), max_new_tokens=4, threads=1,
                             perplexity_tokens=64, baselines=("llama.cpp",))
    # llama.cpp keeps K and V in fp16 (see test_llama_cpp_baseline_runs_our_model): close, not equal.
    check_gate_baselines(outcome, root, loaded.weights.slug, {"llama.cpp F32 cpu": 1e-3})


# ------------------------------------------------------------------------------------------- the real model

@pytest.mark.real
@needs_llama_cpp
def test_llama_cpp_greedy_tokens_match_ours_on_the_real_model(real):
    """Same Q4_K_M file: llama.cpp and our dequantized fp32 model predict the same tokens. Not bit-equal:
    llama.cpp multiplies the 4-bit weights by activations rounded to 8 bits (Q8_K), so a near-tie may flip
    (seen: step 16, " and" vs "." after "...the largest city in France"). Teacher-forced on our tokens, at
    most one of 16 steps may differ, and free-running greedy text agrees for at least the first 12 tokens."""
    baseline = open_baseline({**LLAMA_CPP_SPEC, "precision": "Q4_K_M"}, real.weights.gguf_file, context_tokens=64,
                             threads=0)
    reference = make_runner(REFERENCE_SPEC, {}, real.model, max_length=64)
    prompt = real.tokenizer.encode("The capital of France is")
    _, our_tokens = greedy(reference, prompt, 16)
    forced = [baseline.prefill(prompt), *(baseline.decode(token) for token in our_tokens[:-1])]
    agreeing = sum(int(logits.argmax()) == token for logits, token in zip(forced, our_tokens))
    assert agreeing >= 15, (agreeing, real.tokenizer.decode(our_tokens))
    _, their_tokens = greedy(baseline, prompt, 16)
    assert matching_prefix(their_tokens, our_tokens) >= 12, (real.tokenizer.decode(their_tokens),
                                                             real.tokenizer.decode(our_tokens))
