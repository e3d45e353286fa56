"""Shared fixtures. Markers are registered in pyproject.toml: `real` = uses the real Gemma 3 270M weights, `slow` =
tiny-model work that `make test-fast` leaves to `make test` (every test using `tiny_all` is marked here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Tests never reach the network: the hub code paths are exercised against local caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(os.cpu_count() or 1)

# A prompt longer than every sliding window we test (tiny: 8, 270m: 512 tokens).
LONG_TEXT = (
    "The history of computing is a story of abstraction layered upon abstraction. Early machines were wired "
    "by hand; programs were sequences of switches. Assemblers turned mnemonics into numbers, compilers turned "
    "formulas into instructions, and operating systems turned a single expensive machine into something many "
    "people could share. Each layer hid the one below it, and each made new kinds of programs possible. "
)


@pytest.fixture(scope="module")
def one_thread():
    """For modules about numbers rather than speed (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    one torch thread while the module runs, so parallel work on a shared machine is not oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny():
    from model.loading import load
    return load("random:tiny")


@pytest.fixture(scope="session")
def real():
    from model.loading import load
    return load("gemma-3-270m")


@pytest.fixture(scope="session")
def real_long_prompt_ids(real):
    """A real-tokenizer prompt of more than 512 tokens: it crosses the sliding window."""
    ids = real.tokenizer.encode(LONG_TEXT * 12)
    assert len(ids) > real.model.config.sliding_window + 16
    return ids[:600]


# `gemma-export all` on the real model in CI: fp32 of every format, and the reduced precisions apps ship:
# TorchScript fp16 (the mixed-precision recipe of model/gemma3.py), ONNX fp16 and int4 (the GGUF's own grids),
# Core ML fp16 (its default). Core ML's int8/int4 packages still re-round the GGUF's grids and miss their floors
# (BENCHMARKS.md); `make all` exports and judges them too. Few steps per prompt (the numbers are checked, not
# the speed), but the held-out text gives the gate 255 more teacher-forced steps: on 24 steps one near-tie is
# 4 % of top-1.
REAL_ALL_PRECISIONS = ("fp32", "torchscript:fp16", "onnx:fp16", "onnx:int4", "coreml:fp16")
REAL_HELDOUT_TOKENS = "256"
REAL_SKIPPED_BACKENDS = ("onnxruntime-genai", "transformers-js")
# tiny: every backend (fp32 of each format) and the 4-bit variants, whose toy-model floor the run must pass.
TINY_ALL_PRECISIONS = ("fp32", "onnx:int4", "coreml:int4")
E2E_SETTINGS = ("--max-new-tokens", "8", "--perplexity-tokens", "64", "--decode-tokens", "8", "--repeats", "1")


def gguf_writer(path: Path, config, architecture: str = "gemma3"):
    """A `gguf.GGUFWriter` with the metadata llama.cpp writes for a Gemma 3 of `config` and a placeholder
    vocabulary; the caller adds tensors and writes the file."""
    import gguf

    writer = gguf.GGUFWriter(path, architecture)
    for key, value in {"context_length": config.context_length, "embedding_length": config.hidden_size,
                       "block_count": config.num_layers, "feed_forward_length": config.intermediate_size,
                       "attention.head_count": config.num_heads, "attention.head_count_kv": config.num_kv_heads,
                       "attention.key_length": config.head_dim, "attention.value_length": config.head_dim,
                       "attention.sliding_window": config.sliding_window,
                       "attention.sliding_window_pattern": config.sliding_window_pattern}.items():
        writer.add_uint32(f"{architecture}.{key}", value)
    writer.add_float32(f"{architecture}.rope.freq_base", config.rope_global_base)
    writer.add_float32(f"{architecture}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_token_list([f"<t{i}>" for i in range(config.vocab_size)])
    return writer


def gemma_export(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
                 **options) -> subprocess.CompletedProcess:
    """`python -m gemma_export ARGS` as a user runs it: a subprocess started in the repository, output captured,
    offline unless `env` says otherwise; `options` go to subprocess.run (e.g. preexec_fn)."""
    return subprocess.run([sys.executable, "-m", "gemma_export", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"} if env is None else env, timeout=timeout,
                          **options)


def run_all_command(out, *args: str) -> subprocess.CompletedProcess:
    """`gemma-export all` with the end-to-end settings."""
    return gemma_export("all", "--out", str(out), *E2E_SETTINGS, *args, timeout=3600)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test on the session's tiny `gemma-export all` run waits for it (every format, precision and runner,
    validated and benched: minutes), so it is `slow` wherever it lives."""
    for item in items:
        if "tiny_all" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_all(tmp_path_factory):
    """Every format at every precision of random:tiny, validated, benched and reported: (artifacts, result)."""
    out = tmp_path_factory.mktemp("all-tiny")
    precisions = [flag for item in TINY_ALL_PRECISIONS for flag in ("--precisions", item)]
    return out, run_all_command(out, "--model", "random:tiny", "--threads", "1", *precisions)


@pytest.fixture(scope="session")
def real_bundles(tmp_path_factory):
    """The real model through `gemma-export all` once per session: (artifacts root, result). The per-format
    real tests run their own generate loops on these bundles' files."""
    out = tmp_path_factory.mktemp("all-real")
    precisions = [flag for item in REAL_ALL_PRECISIONS for flag in ("--precisions", item)]
    # --no-bench: CI judges the real numbers, not the real speed (bench is covered on tiny; BENCHMARKS.md has
    # the real speeds); it saves a fresh process per runner loading the 270M weights. The app runtimes
    # (onnxruntime-genai, transformers.js: step by step through the held-out text) are judged on these files by
    # test_app_runtimes.py's own shorter loops.
    from validation.runners import BACKENDS
    backends = [flag for name in BACKENDS if name not in REAL_SKIPPED_BACKENDS for flag in ("--backends", name)]
    return out, run_all_command(out, "--model", "gemma-3-270m", "--no-bench", *precisions, *backends,
                                "--perplexity-tokens", REAL_HELDOUT_TOKENS)


def real_bundle_path(real_bundles, fmt: str):
    """The folder of one format's bundle made by `real_bundles`, after checking that it verifies (hashes): the
    per-format tests judge their own files, whatever verdict `all` gave other variants."""
    from exporters.artifact import load_bundle

    out, result = real_bundles
    return load_bundle(out, "gemma-3-270m", fmt).path
