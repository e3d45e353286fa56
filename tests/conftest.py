"""Shared fixtures. Markers are registered in pyproject.toml: `real` = uses the real Gemma 3 270M weights, `slow` =
tiny-model work that `make test-fast` leaves to `make test` (every test using `tiny_all` is marked here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
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
# tiny: every backend (fp32 of each format), the 4-bit variants and the ExecuTorch fp16 program, whose toy-model
# floors the run must pass.
TINY_ALL_PRECISIONS = ("fp32", "onnx:int4", "coreml:int4", "executorch:fp16")
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


class BackgroundAll:
    """One session-wide `gemma-export all` (the `tiny_all` and `real_bundles` fixtures), started as a subprocess as
    soon as collection shows that a selected test needs it. The tests that need neither are ordered first
    (`pytest_collection_modifyitems`) and run while it works: the run is mostly one core's Python (tracing,
    lowering), and the machine has two."""

    def __init__(self, name: str, args: tuple[str, ...]) -> None:
        self.out = Path(tempfile.mkdtemp(prefix=f"gemma-export-{name}-"))
        self.log = tuple(tempfile.TemporaryFile(mode="w+", encoding="utf-8") for _ in ("stdout", "stderr"))
        self.command = [sys.executable, "-m", "gemma_export", "all", "--out", str(self.out), *E2E_SETTINGS, *args]
        self.process = subprocess.Popen(self.command, stdout=self.log[0], stderr=self.log[1], text=True, cwd=REPO,
                                        env={**os.environ, "HF_HUB_OFFLINE": "1"})
        self.started = time.monotonic()
        self.completed: subprocess.CompletedProcess | None = None

    def result(self) -> tuple[Path, subprocess.CompletedProcess]:
        """(artifacts root, the finished run), waiting for it the first time."""
        if self.completed is None:
            try:
                returncode = self.process.wait(timeout=max(1.0, ALL_TIMEOUT_S - (time.monotonic() - self.started)))
            except subprocess.TimeoutExpired:
                self.process.kill()
                raise
            stdout, stderr = (self.read(log) for log in self.log)
            self.completed = subprocess.CompletedProcess(self.command, returncode, stdout, stderr)
        return self.out, self.completed

    @staticmethod
    def read(log) -> str:
        log.seek(0)
        return log.read()

    def close(self) -> None:
        if self.process.poll() is None:  # the session ended (or was interrupted) before a test waited for it
            self.process.kill()
            self.process.wait()
        for log in self.log:
            log.close()
        shutil.rmtree(self.out, ignore_errors=True)


def tiny_all_args() -> tuple[str, ...]:
    """Every format at every precision of random:tiny, validated, benched and reported."""
    precisions = [flag for item in TINY_ALL_PRECISIONS for flag in ("--precisions", item)]
    return "--model", "random:tiny", "--threads", "1", *precisions


def real_all_args() -> tuple[str, ...]:
    """The real model's fp32 and the compressed variants apps ship. --no-bench: CI judges the real numbers, not the
    real speed (bench is covered on tiny; BENCHMARKS.md has the real speeds); it saves a fresh process per runner
    loading the 270M weights. The app runtimes (onnxruntime-genai, transformers.js: step by step through the
    held-out text) are judged on these files by test_app_runtimes.py's own shorter loops."""
    from validation.runners import BACKENDS
    precisions = [flag for item in REAL_ALL_PRECISIONS for flag in ("--precisions", item)]
    backends = [flag for name in BACKENDS if name not in REAL_SKIPPED_BACKENDS for flag in ("--backends", name)]
    return ("--model", "gemma-3-270m", "--no-bench", *precisions, *backends, "--perplexity-tokens",
            REAL_HELDOUT_TOKENS)


ALL_TIMEOUT_S = 3600
# The session-wide runs by fixture name, in the order their tests run (last: the longest).
BACKGROUND_RUN_ARGS = {"tiny_all": tiny_all_args, "real_bundles": real_all_args}
BACKGROUND_RUNS: dict[str, BackgroundAll] = {}


def background_run(name: str) -> BackgroundAll:
    if name not in BACKGROUND_RUNS:
        BACKGROUND_RUNS[name] = BackgroundAll(name, BACKGROUND_RUN_ARGS[name]())
    return BACKGROUND_RUNS[name]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test on the session's tiny `gemma-export all` run waits for it (every format, precision and runner,
    validated and benched: minutes), so it is `slow` wherever it lives. The tests on a session-wide run go last,
    in BACKGROUND_RUN_ARGS's order (stable: each module's own order is kept), so the runs have time to work."""
    def waits_for(item: pytest.Item) -> int:
        names = getattr(item, "fixturenames", ())
        return max((index + 1 for index, name in enumerate(BACKGROUND_RUN_ARGS) if name in names), default=0)

    for item in items:
        if "tiny_all" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    items.sort(key=waits_for)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the session-wide runs the selected tests need (after `-m`/`-k` deselection)."""
    if session.config.option.collectonly:
        return
    for name in BACKGROUND_RUN_ARGS:
        if any(name in getattr(item, "fixturenames", ()) for item in session.items):
            background_run(name)


def pytest_sessionfinish() -> None:
    for run in BACKGROUND_RUNS.values():
        run.close()
    BACKGROUND_RUNS.clear()


@pytest.fixture(scope="session")
def tiny_all():
    """Every format at every precision of random:tiny, validated, benched and reported: (artifacts, result)."""
    return background_run("tiny_all").result()


@pytest.fixture(scope="session")
def real_bundles():
    """The real model through `gemma-export all` once per session: (artifacts root, result). The per-format
    real tests run their own generate loops on these bundles' files."""
    return background_run("real_bundles").result()


def real_bundle_path(real_bundles, fmt: str):
    """The folder of one format's bundle made by `real_bundles`, after checking that it verifies (hashes): the
    per-format tests judge their own files, whatever verdict `all` gave other variants."""
    from exporters.artifact import load_bundle

    out, result = real_bundles
    return load_bundle(out, "gemma-3-270m", fmt).path
