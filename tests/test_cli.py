"""The CLI as a user runs it: a subprocess, its output, its exit code."""

from __future__ import annotations

import pytest

from conftest import gemma_export


def test_generate_streams_text_and_speed():
    result = gemma_export("generate", "--model", "random:tiny", "--prompt", "Hello there", "--max-new-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello there")
    assert "prefill" in result.stderr and "decode" in result.stderr and "bandwidth achieved" in result.stderr


@pytest.mark.real
def test_generate_real_model_says_paris():
    result = gemma_export("generate", "--prompt", "Q: What is the capital of France?\nA:", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


BAD_INPUTS = [
    (["generate", "--model", "no-such-model", "--prompt", "x"], "unknown model id"),
    (["generate", "--model", "random:nope", "--prompt", "x"], "preset"),
    (["generate", "--model", "/nonexistent/dir/model.gguf", "--prompt", "x"], "does not exist"),
    (["generate", "--model", "random:tiny", "--prompt", "x", "--max-new-tokens", "5000"], "context"),
    (["generate", "--model", "random:tiny", "--prompt", "x", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["generate", "--model", "random:tiny", "--prompt", "x", "--device", "tpu"], "--device"),
    (["generate", "--model", "random:tiny", "--prompt", "x", "--dtype", "int3"], "--dtype"),
    (["generate", "--model", "random:tiny", "--prompt", "x", "--bogus"], "--bogus"),
    (["export", "--model", "random:tiny", "--format", "onnx", "--max-context", "64"], "does not apply to onnx"),
]


@pytest.mark.parametrize("args, cause", BAD_INPUTS, ids=[" ".join(a[2:4]) + " " + c for a, c in BAD_INPUTS])
def test_bad_input_gives_one_clear_line(args, cause):
    result = gemma_export(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert cause.lower() in lines[0].lower()
    assert "Traceback" not in result.stderr


def test_unavailable_device_names_the_fix():
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA, so --device cuda is not an error here")
    result = gemma_export("generate", "--model", "random:tiny", "--prompt", "x", "--device", "cuda")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: device 'cuda' is not available on this machine; use --device cpu"


def test_debug_shows_the_traceback():
    result = gemma_export("--debug", "generate", "--model", "no-such-model", "--prompt", "x")
    assert result.returncode == 2
    assert "Traceback" in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_debug_is_the_group_option_not_any_word_of_the_command_line():
    """`--debug` as an option's value (here the prompt) is text to that option, not a request for tracebacks."""
    result = gemma_export("generate", "--model", "no-such-model", "--prompt", "--debug")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown model id 'no-such-model'; use gemma-3-270m, random:tiny|270m|1b, a hub id like "
        "google/gemma-3-270m, a .gguf file or a model folder"]


def test_formats_and_precisions_come_from_the_one_registry():
    """exporters/registry.py's FORMATS: each exporter's per-precision table, the bundle reader, the validation
    runners and the CLI's choices and help all follow it."""
    from exporters import artifact, coreml, executorch, onnx, torchscript
    from exporters.registry import FORMATS
    from validation.runners import BACKENDS, FORMAT_CHOICES, IN_MEMORY_FORMAT

    assert set(onnx.MODEL_FILES) == set(FORMATS["onnx"].precisions)
    assert set(torchscript.PRECISION_DTYPES) == set(FORMATS["torchscript"].precisions)
    assert set(coreml.PACKAGE_NAMES) == set(coreml.PRECISIONS) == set(FORMATS["coreml"].precisions)
    assert set(executorch.PROGRAM_NAMES) == set(executorch.PRECISIONS) == set(FORMATS["executorch"].precisions)
    assert artifact.FORMATS is FORMATS and FORMAT_CHOICES == (IN_MEMORY_FORMAT, *FORMATS)
    assert {backend.bundle_format for backend in BACKENDS.values()} == {None, *FORMATS}
    help_text = " ".join(gemma_export("export", "--help").stdout.split())
    assert "--format [" + "|".join(FORMATS) + "]" in help_text
    for fmt, info in FORMATS.items():
        assert f"{fmt}: {'|'.join(info.precisions)} (default {info.default_precision})" in help_text


@pytest.mark.parametrize("verbose", [False, True])
def test_all_ends_with_each_stages_time_and_with_verbose_each_runners(verbose):
    """The summary `all` prints comes from the report's timing rows: each export, the validate and bench totals
    and the whole command; each runner only with --verbose (a runner's name may hold parentheses)."""
    from gemma_export.validation_commands import stage_summary
    from validation.pipeline import Outcome

    validation = Outcome({"seconds": 300.0, "runners": [{"runner": "pytorch fp32 cpu", "seconds": 20.0},
                                                        {"runner": "llama.cpp (q4_k_m) cpu", "seconds": 30.0}]}, [], [])
    bench = Outcome({"seconds": 200.0, "runners": [{"runner": "onnxruntime int4 cpu", "seconds": 18.0}]}, [], [])
    timings = {"exports": {"torchscript": 60.0, "onnx": 90.0}, "total_seconds": 700.0}
    lines = stage_summary(timings, validation, bench, verbose).splitlines()
    stages = ["time per stage:", "  export torchscript       60 s", "  export onnx              90 s",
              "  validate                300 s"]
    runners = ["    pytorch fp32 cpu                          20 s",
               "    llama.cpp (q4_k_m) cpu                    30 s"]
    benched = "    onnxruntime int4 cpu                      18 s"
    assert lines[:4] == stages and lines[-1] == "  all                     700 s"
    assert (lines[4:6] == runners) == verbose and (benched in lines) == verbose
    assert "  bench                   200 s" in lines and len(lines) == (9 if verbose else 6)
