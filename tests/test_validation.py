"""The validation stage on random:tiny bundles made by the exporters themselves: every runner agrees with the
reference through one interface, validate writes the three report files, a tampered or wrongly-exported
bundle makes validation fail naming it, and bad input ends in one clear line and a non-zero exit."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from exporters import coreml as coreml_exporter
from exporters import onnx as onnx_exporter
from exporters import torchscript as torchscript_exporter
from exporters.artifact import BundleWriter
from exporters.registry import variant_key
from model.config import PRESETS
from model.errors import UserError
from validation import report as report_module
from validation.bench import BenchSettings
from validation.compare import (THRESHOLDS, TWIN_PROBE_STEPS, Prompt, Thresholds, compare_all, crashed_result,
                                failures, greedy_and_forced, greedy_run, load_prompts, matching_prefix, step_metrics,
                                thresholds_for)
from validation.report import save_piece
from validation.coreml_runtime import covering_chunks
from validation.runners import (BACKENDS, REFERENCE_SPEC, Host, Runner, RunnerSpec, Selection, available_specs,
                                load_bundles, make_runner, teacher_forced_logits, unavailable_reason)
from validation.pipeline import run_bench, run_validation, write_report

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 4
# The CLI with the validation commands registered (idempotent once cli.py registers them itself).
CLI = ("import sys; from gemma_export.cli import cli; from gemma_export.errors import run_cli; "
       "from gemma_export.validation_commands import register; register(cli); sys.exit(run_cli(cli))")
# The ExecuTorch runner goes through the same checks in tests/test_executorch_export.py, on the session's tiny
# `all` bundle: lowering a program for this module's bundles too would add minutes to `make test-fast`.
ALL_TARGETS = [(name, target) for name, backend in BACKENDS.items() for target in backend.targets
               if name != "executorch"]


# Numbers, not speed: one torch thread avoids oversubscribing a shared machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def write_bundle(loaded, model, root: Path, fmt: str, exporter, **options) -> None:
    """Export `model` (fp32) with the format's own exporter, under the identity (sha256) of `loaded`'s weights."""
    weights = loaded.weights
    with BundleWriter(root, weights.slug, fmt) as bundle:
        exported = exporter.export(model, bundle.path, "fp32", **options)
        for variant in exported if isinstance(exported, list) else [exported]:
            bundle.add_variant(**{**dataclasses.asdict(variant), "precision": variant_key(variant)})
        source = {"model_id": weights.source_id, "weight_sha256": weights.weight_sha256}
        # The format's own files, as export_bundle writes them (ONNX: the Hugging Face repository files).
        bundle_files = getattr(exporter, "write_bundle_files", None)
        bundle.finish(config=weights.config, tokenizer=loaded.tokenizer, source=source,
                      extra_files=bundle_files and (lambda folder, variants: bundle_files(
                          folder, weights.config, variants, {**source, "slug": weights.slug})))


@pytest.fixture(scope="module")
def artifacts(tiny, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("artifacts")
    write_bundle(tiny, tiny.model, root, "torchscript", torchscript_exporter)
    write_bundle(tiny, tiny.model, root, "onnx", onnx_exporter)
    write_bundle(tiny, tiny.model, root, "coreml", coreml_exporter, max_context=tiny.model.config.context_length)
    return root


@pytest.fixture(scope="module")
def perturbed_artifacts(tiny, tmp_path_factory) -> Path:
    """An ONNX bundle whose hashes are all valid but whose model had one weight changed before export."""
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        model.layers[0].feed_forward.down_proj.weight[0, 0] += 5.0
    root = tmp_path_factory.mktemp("perturbed")
    write_bundle(tiny, model, root, "onnx", onnx_exporter)
    return root


def copy_artifacts(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("report", "*.lock"))
    return destination


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=REPO)


def validate_cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cli("validate", "--model", "random:tiny", "--out", str(root), "--max-new-tokens", str(NEW_TOKENS),
                   "--threads", "1", *args)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------------------- thresholds, metrics

def test_threshold_table_and_overrides():
    tiny, real = PRESETS["tiny"], PRESETS["270m"]
    assert thresholds_for("fp32", tiny) == Thresholds(max_abs_logit_diff=1e-3, greedy_identical=True)
    assert thresholds_for("fp32", real).max_abs_logit_diff == 5e-3
    assert THRESHOLDS["fp32"].max_abs_logit_diff is None  # the limit is the model scale's, not a table default
    precisions = ("fp16", "bf16", "int8", "int4")
    assert [THRESHOLDS[p].min_top1_agreement for p in precisions] == [0.99, 0.99, 0.97, 0.92]
    assert [THRESHOLDS[p].max_mean_kl_divergence for p in precisions] == [0.001, 0.001, 0.01, 0.02]
    assert thresholds_for("int8", real, min_top1_agreement=0.5).min_top1_agreement == 0.5
    # random-weight toy model: top-1 only catches a broken export; KL keeps the real floors
    assert [thresholds_for(p, tiny).min_top1_agreement for p in precisions] == [0.5, 0.5, 0.5, 0.25]
    assert thresholds_for("int4", tiny).max_mean_kl_divergence == 0.02
    assert thresholds_for("int4", real).min_top1_agreement == 0.92
    assert thresholds_for("fp32", tiny, max_abs_logit_diff=0.1).max_abs_logit_diff == 0.1


def test_step_metrics_and_failures_name_the_criterion():
    reference = np.array([0.0, 1.0, 5.0, 2.0, -1.0, 0.5], dtype=np.float32)
    assert step_metrics(reference, reference)["max_abs_logit_diff"] == 0.0
    assert step_metrics(reference, reference)["kl_divergence"] == pytest.approx(0.0, abs=1e-12)
    flipped = reference.copy()
    flipped[1] = 9.0
    metrics = step_metrics(reference, flipped)
    assert metrics["max_abs_logit_diff"] == 8.0 and not metrics["top1_agrees"] and metrics["kl_divergence"] > 0
    with_nan = reference.copy()
    with_nan[0] = np.nan
    assert step_metrics(reference, with_nan)["nonfinite_logits"] == 1
    assert matching_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    summary = {"nonfinite_logits": 1, "max_abs_logit_diff": 0.5, "top1_agreement": 0.9, "mean_kl_divergence": 0.03}
    prompts = [{"prompt": "long", "greedy_match_steps": 2, "reference_tokens": [1, 2, 3]}]
    found = failures(summary, prompts, Thresholds(1e-3, 0.99, greedy_identical=True, max_mean_kl_divergence=0.02))
    assert found == ["1 NaN/Inf logits", "max |Δlogit| 0.5 > 0.001", "mean KL 0.03 > 0.02",
                     "top-1 agreement 90.0% < 99%", "greedy run leaves the reference at step 2 of 3 (prompt 'long')"]
    nan_summary = {**summary, "mean_kl_divergence": math.nan, "top1_agreement": math.nan}
    assert failures(nan_summary, prompts, Thresholds(min_top1_agreement=0.5, max_mean_kl_divergence=1.0)) == [
        "1 NaN/Inf logits", "mean KL nan > 1", "top-1 agreement nan% < 50%"]



def test_a_runner_that_raised_fails_with_the_error_line_the_cli_prints():
    spec = RunnerSpec("onnxruntime", "fp32", "cpu")
    with_fix = crashed_result(spec.name, spec.to_dict(), UserError("file is truncated", "re-export it"))
    without_fix = crashed_result(spec.name, spec.to_dict(), UserError("file is truncated"))
    crashed = crashed_result(spec.name, spec.to_dict(), ValueError("bad shape"))
    assert [row["failures"] for row in (with_fix, without_fix, crashed)] == [
        ["file is truncated; re-export it"], ["file is truncated"], ["crashed: ValueError: bad shape"]]
    assert with_fix["verdict"] == "FAIL" and with_fix["runner"] == spec.name

class ContextRunner:
    """A toy runner whose logits are a function of its whole context; counts the steps it was asked for."""
    vocab = 7

    def __init__(self) -> None:
        self.context: list[int] = []
        self.calls = 0

    def logits(self) -> np.ndarray:
        self.calls += 1
        seed = sum((i + 1) * token for i, token in enumerate(self.context)) % 1009
        return np.random.default_rng(seed).normal(size=self.vocab).astype(np.float32)

    def prefill(self, ids) -> np.ndarray:
        self.context = [int(token) for token in ids]
        return self.logits()

    def decode(self, token: int) -> np.ndarray:
        self.context.append(int(token))
        return self.logits()


class ContextDecoder:
    """`ContextRunner` behind the decoder interface `Runner` wraps ([1, seq] ids in, [1, vocab] logits out)."""

    def __init__(self) -> None:
        self.runner = ContextRunner()

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self.runner.prefill(ids[0])[None]

    def decode(self, token: np.ndarray) -> np.ndarray:
        return self.runner.decode(int(token))[None]

    def reset(self) -> None:
        self.runner.context = []


class NaNDecoder(ContextDecoder):
    """A backend that overflows: every logit NaN (as the PyTorch model in plain fp16 did on a code prompt)."""

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return np.full_like(super().prefill(ids), np.nan)

    def decode(self, token: np.ndarray) -> np.ndarray:
        return np.full_like(super().decode(token), np.nan)


def toy_runner(spec: RunnerSpec, decoder) -> Runner:
    return Runner(spec, decoder, ContextRunner.vocab, size_bytes=1000, weight_bytes_per_token=1000,
                  context_tokens=100)


def test_a_runner_with_nan_logits_fails_by_name_in_every_report_format_and_gets_no_speed(tmp_path):
    """The gate judges the held-out steps too; a NaN runner is a FAIL row named as such (json, md, html), its
    speed is not shown, and the report (with its plots) is still written."""
    reference = toy_runner(REFERENCE_SPEC, ContextDecoder())
    healthy, broken = RunnerSpec("onnxruntime", "fp16", "cpu"), RunnerSpec("torchscript", "fp16", "cpu")
    openers = [(spec.name, spec.to_dict(), lambda spec=spec, decoder=decoder: toy_runner(spec, decoder))
               for spec, decoder in ((healthy, ContextDecoder()), (broken, NaNDecoder()))]
    prompts = [Prompt("short", [3, 1, 4], False)]
    heldout = [5, 2, 6, 1, 0, 3, 4, 2, 1]
    rows = compare_all(reference, openers, prompts, heldout, 4, lambda precision: THRESHOLDS[precision])
    by_name = {row["runner"]: row for row in rows}
    good, bad = by_name[healthy.name], by_name[broken.name]
    assert good["verdict"] == "PASS" and good["teacher_forced_steps"] == 4 + len(heldout) - 1
    assert good["mean_kl_divergence"] == 0.0 and good["perplexity_ratio"] == 1.0
    assert bad["verdict"] == "FAIL" and bad["failures"][0] == f"{(4 + len(heldout) - 1) * ContextRunner.vocab} NaN/Inf logits"
    assert math.isnan(bad["max_abs_logit_diff"]) and math.isnan(bad["mean_kl_divergence"])
    bench_row = {"decode_tokens_per_second": 50.0, "ceiling_tokens_per_second": 500.0, "percent_of_ceiling": 10.0}
    save_piece(tmp_path, "validation", {"model": {"slug": "toy", "model_id": "toy"}, "max_new_tokens": 4,
                                        "heldout_tokens": len(heldout), "runners": rows, "skipped": []})
    save_piece(tmp_path, "bench", {"runners": [{"runner": name, **spec, **bench_row} for name, spec, _ in openers],
                                   "skipped": [], "baselines": []})
    paths = report_module.write_report(tmp_path)
    saved = {row["runner"]: row for row in json.loads(paths["json"].read_text())["validation"]["runners"]}
    assert saved[broken.name]["max_abs_logit_diff"] is None and saved[broken.name]["nonfinite_logits"] > 0
    markdown = paths["md"].read_text()
    bad_line = next(line for line in markdown.splitlines() if line.startswith("| torchscript | fp16 |"))
    good_line = next(line for line in markdown.splitlines() if line.startswith("| onnxruntime | fp16 |"))
    assert "FAIL (NaN/Inf logits)" in bad_line and "50.0" not in bad_line and "50.0" in good_line
    html_text = paths["html"].read_text()
    assert "FAIL (NaN/Inf logits)" in html_text and html_text.count("data:image/png;base64,") == 3
    report = json.loads(paths["json"].read_text())
    speed_rows = [row for row in report_module.rows_by_runner(report) if report_module.speed(row)]
    assert [row["runner"] for row in speed_rows] == [healthy.name]


class OneBitOffDecoder(ContextDecoder):
    """Equal to `ContextDecoder` but for the last bit of one logit after 9 tokens (only the long prompt gets there)."""

    def decode(self, token: np.ndarray) -> np.ndarray:
        logits = super().decode(token)
        if len(self.runner.context) == 9:
            logits[0, 2] = np.nextafter(logits[0, 2], np.float32(np.inf))
        return logits


class CountingDecoder(ContextDecoder):
    """Counts every prefill and decode asked of it, across runs."""
    asked = 0

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        type(self).asked += 1
        return super().prefill(ids)

    def decode(self, token: np.ndarray) -> np.ndarray:
        type(self).asked += 1
        return super().decode(token)


@pytest.mark.parametrize("twin_decoder, takes_the_numbers", [(CountingDecoder, True), (OneBitOffDecoder, False)])
def test_a_twin_equal_bit_for_bit_on_the_probe_takes_the_first_files_numbers(twin_decoder, takes_the_numbers):
    """A torch.export program equal to its TorchScript twin on every bit of the probe prompt (past the window)
    takes the twin's numbers and says so; one bit off anywhere, and it is judged on every step itself."""
    CountingDecoder.asked = 0
    reference = toy_runner(REFERENCE_SPEC, ContextDecoder())
    first, twin = RunnerSpec("torchscript", "bf16", "cpu"), RunnerSpec("torch-export", "bf16", "cpu")
    openers = [(spec.name, spec.to_dict(), lambda spec=spec, decoder=decoder: toy_runner(spec, decoder()))
               for spec, decoder in ((first, ContextDecoder), (twin, twin_decoder))]
    prompts = [Prompt("short", [3, 1, 4], False), Prompt("long", [2, 6, 5, 3, 5, 1], True)]
    heldout = [5, 2, 6, 1, 0, 3, 4, 2, 1]
    assert TWIN_PROBE_STEPS >= 6
    rows = {row["runner"]: row for row in compare_all(reference, openers, prompts, heldout, 6,
                                                      lambda precision: THRESHOLDS[precision])}
    judged, checked = rows[first.name], rows[twin.name]
    assert checked["backend"] == "torch-export" and checked["verdict"] == "PASS"
    if takes_the_numbers:
        assert checked["equal_to"] == first.name and CountingDecoder.asked == 6  # the probe: a prefill, 5 decodes
        assert checked["shortened"] == [f"equals {first.name} bit for bit on prompt 'long' (its first 6 greedy "
                                        f"tokens and teacher-forced logits); its other steps are {first.name}'s"]
        assert {key: checked[key] for key in ("prompts", "heldout_steps", "mean_kl_divergence")} == \
            {key: judged[key] for key in ("prompts", "heldout_steps", "mean_kl_divergence")}
    else:
        assert "equal_to" not in checked and "shortened" not in checked
        assert checked["teacher_forced_steps"] == 2 * 6 + len(heldout) - 1
        assert checked["max_abs_logit_diff"] > 0 == judged["max_abs_logit_diff"]


def test_report_lists_shortened_measurements_interpreter_speed_and_where_the_time_went(tmp_path):
    """A runner the bench budget cut is named with what was cut; an interpreter's speed is marked as such; the
    time table has each stage with its runners' shares."""
    mil = {"runner": "coreml-mil fp32 numpy", "backend": "coreml-mil", "precision": "fp32", "device": "numpy",
           "decode_tokens_per_second": 2.0, "ceiling_tokens_per_second": 40.0, "seconds": 60.0,
           "shortened": ["decode: 1 of 3 timed runs", "decode: 48 of 256 tokens per run"]}
    onnx = {"runner": "onnxruntime int4 cpu", "backend": "onnxruntime", "precision": "int4", "device": "cpu",
            "decode_tokens_per_second": 60.0, "ceiling_tokens_per_second": 90.0, "seconds": 20.0}
    save_piece(tmp_path, "bench", {"runners": [mil, onnx], "skipped": [], "baselines": [], "seconds": 100.0,
                                   "settings": {"budget_s": 30.0, "rounds": 1}})
    first = {"runner": "torchscript bf16 cpu", "backend": "torchscript", "precision": "bf16", "device": "cpu",
             "verdict": "PASS", "failures": [], "prompts": [], "seconds": 30.0}
    twin = {**first, "runner": "torch-export bf16 cpu", "backend": "torch-export", "seconds": 5.0,
            "equal_to": first["runner"], "shortened": ["equals torchscript bf16 cpu bit for bit on prompt 'long'"]}
    save_piece(tmp_path, "validation", {"model": {"slug": "toy", "model_id": "toy"}, "max_new_tokens": 4,
                                        "heldout_tokens": 8, "runners": [first, twin], "skipped": [], "seconds": 40.0})
    save_piece(tmp_path, "timings", {"exports": {"onnx": 120.0, "coreml": 280.0}, "total_seconds": 900.0})
    paths = report_module.write_report(tmp_path)
    markdown = paths["md"].read_text()
    section = markdown.split("## Shortened measurements")[1].split("## ")[0]
    assert "30 s per measurement" in section and "interpreter's" in section and "TorchScript twin's" in section
    assert "- bench: coreml-mil fp32 numpy: decode: 1 of 3 timed runs; decode: 48 of 256 tokens per run" in section
    assert "- validate: torch-export bf16 cpu: equals torchscript bf16 cpu bit for bit on prompt 'long'" in section
    assert "onnxruntime int4 cpu" not in section and "validate: torchscript bf16" not in section
    for line in ("| export | (whole stage) | 400 |  |", "| export | coreml | 280 | 70 |",
                 "| bench | (whole stage) | 100 |  |", "| bench | coreml-mil fp32 numpy | 60 | 60 |",
                 "| bench | onnxruntime int4 cpu | 20 | 20 |", "| all | (the whole command) | 900 |  |"):
        assert line in markdown, line
    html_text = paths["html"].read_text()
    assert "Shortened measurements" in html_text and "Where the time went" in html_text


@pytest.mark.parametrize("diverge_at", [None, 0, 3, 7])
def test_greedy_and_forced_equals_two_separate_passes(diverge_at):
    """One greedy pass gives the teacher-forced logits up to the first divergence; after it the rest is
    teacher-forced again. Same tokens and logits as the two-pass way, fewer steps when they agree."""
    prompt, steps = [3, 1, 4], 8
    reference_tokens, _ = greedy_run(ContextRunner(), prompt, steps)
    if diverge_at is not None:  # a reference that differs from this runner's greedy choice at that step
        reference_tokens = reference_tokens[:diverge_at] + [(reference_tokens[diverge_at] + 1) % ContextRunner.vocab]
        reference_tokens += [0] * (steps - len(reference_tokens))
    runner = ContextRunner()
    tokens, logits = greedy_and_forced(runner, prompt, reference_tokens)
    expected_tokens, _ = greedy_run(ContextRunner(), prompt, steps)
    expected_logits = teacher_forced_logits(ContextRunner(), prompt, reference_tokens)
    assert tokens == expected_tokens
    assert len(logits) == steps and all(np.array_equal(a, b) for a, b in zip(logits, expected_logits))
    agreeing = matching_prefix(tokens, reference_tokens)
    assert agreeing == (steps if diverge_at is None else diverge_at)
    assert runner.calls == steps + max(steps - agreeing - 1, 0)  # the two-pass way: 2 × steps


def test_tiny_prompts_cross_the_sliding_window(tiny):
    prompts = load_prompts(tiny.tokenizer, tiny.model.config, NEW_TOKENS)
    assert [p.name for p in prompts] == ["short", "long", "chat"]
    assert all(p.crosses_window for p in prompts)
    assert max(len(p.ids) for p in prompts) + NEW_TOKENS <= tiny.model.config.context_length


@pytest.mark.real
def test_long_prompt_crosses_the_270m_window(real):
    prompts = {p.name: p for p in load_prompts(real.tokenizer, real.model.config, NEW_TOKENS)}
    assert len(prompts["long"].ids) > real.model.config.sliding_window
    assert prompts["chat"].ids[:3] == real.tokenizer.encode("<start_of_turn>user")[:3]


# -------------------------------------------------------------------------------------------------- runners

def assert_follows_the_reference(tiny, runner: Runner, reference: Runner) -> None:
    """The runner's logits and greedy tokens are the reference's over a prompt longer than the tiny window and 6
    decode steps, twice: a reset (or a new prefill) starts over."""
    prompt = tiny.tokenizer.encode("The history of computing is a story")  # longer than the window of 8
    assert len(prompt) > tiny.model.config.sliding_window
    for _ in range(2):
        expected, actual = reference.prefill(prompt), runner.prefill(prompt)
        assert actual.dtype == np.float32 and actual.shape == (tiny.model.config.vocab_size,)
        for _step in range(6):
            assert np.abs(expected - actual).max() <= 1e-3
            assert int(actual.argmax()) == int(expected.argmax())
            token = int(expected.argmax())
            expected, actual = reference.decode(token), runner.decode(token)
        runner.reset()


@pytest.mark.parametrize(("backend", "target"), ALL_TARGETS, ids=[f"{b}-{t}" for b, t in ALL_TARGETS])
def test_runners_agree_with_the_reference(tiny, artifacts, backend, target):
    """Every runner this host can run, through the one interface: same logits, same greedy tokens, and a
    reset (or a new prefill) starts over."""
    bundles, problems = load_bundles(artifacts, tiny.weights.slug, ["torchscript", "onnx", "coreml"],
                                     tiny.weights.weight_sha256)
    specs, skipped = available_specs(bundles, Host.detect(), problems=problems)
    spec = next((s for s in specs if (s.backend, s.device, s.precision) == (backend, target, "fp32")), None)
    if spec is None:
        reasons = [s.reason for s in skipped if s.runner in (backend, f"{backend} fp32 {target}")]
        pytest.skip(reasons[0] if reasons else f"no fp32 {backend} variant")
    runner = make_runner(spec, bundles, tiny.model, max_length=64, threads=1)
    assert_follows_the_reference(tiny, runner, make_runner(REFERENCE_SPEC, bundles, tiny.model, max_length=64))
    assert runner.size_bytes > 0 and runner.weight_bytes_per_token > 0


def test_teacher_forcing_in_one_prefill_equals_step_by_step(tiny, artifacts):
    """The held-out text goes through one prefill where the runtime answers every position's logits: the same
    numbers as a prefill and a decode step per token, up to summation order."""
    bundles, _ = load_bundles(artifacts, tiny.weights.slug, ["torchscript", "onnx"], tiny.weights.weight_sha256)
    ids = tiny.tokenizer.encode("The history of computing is a story of people and machines")[:40]
    for backend in ("pytorch", "torchscript", "torch-export", "onnxruntime"):
        runner = make_runner(RunnerSpec(backend, "fp32", "cpu"), bundles, tiny.model, max_length=64, threads=1)
        assert hasattr(runner.decoder, "prefill_every_position"), backend
        at_once = runner.teacher_forced(ids)
        stepped = [runner.prefill(ids[:1]), *(runner.decode(token) for token in ids[1:-1])]
        assert len(at_once) == len(stepped) == len(ids) - 1
        assert max(float(np.abs(a - b).max()) for a, b in zip(at_once, stepped)) <= 1e-4, backend


def test_mil_teacher_forcing_in_chunks_equals_step_by_step(tiny, artifacts):
    """The MIL interpreter teacher-forces a text in the package's prompt chunks (its last-position slice passing
    every position on, the last chunk padded): the logits a prefill and a decode step per token give, up to
    summation order."""
    bundles, _ = load_bundles(artifacts, tiny.weights.slug, ["coreml"], tiny.weights.weight_sha256)
    runner = make_runner(RunnerSpec("coreml-mil", "fp32", "numpy"), bundles, tiny.model, max_length=256)
    ids = tiny.tokenizer.encode("The history of computing is a story of people and machines " * 8)[:150]
    assert covering_chunks(len(ids) - 1, runner.decoder.query_lengths)[-1] > 1  # a padded chunk, not 1-token steps
    at_once = runner.teacher_forced(ids)
    stepped = [runner.prefill(ids[:1]), *(runner.decode(token) for token in ids[1:-1])]
    assert len(at_once) == len(stepped) == len(ids) - 1
    assert max(float(np.abs(a - b).max()) for a, b in zip(at_once, stepped)) <= 1e-4
    assert [int(a.argmax()) for a in at_once] == [int(b.argmax()) for b in stepped]


def test_unavailable_targets_are_skipped_with_a_reason():
    host = Host(system="Linux", cuda=False, mps=False, onnx_providers=("CPUExecutionProvider",),
                cpp_compiler=True, mil_runner=False)
    assert unavailable_reason(BACKENDS["coreml"], "ALL", host) == "Core ML runtime needs macOS"
    assert unavailable_reason(BACKENDS["pytorch"], "cuda", host) == "CUDA not available"
    assert "CUDAExecutionProvider" in unavailable_reason(BACKENDS["onnxruntime"], "cuda", host)
    specs, skipped = available_specs({}, host, Selection(formats=("pytorch", "onnx")))
    assert RunnerSpec("pytorch", "fp32", "cpu") in specs
    assert {"runner": "onnxruntime", "reason": "no onnx bundle"} in [dataclasses.asdict(s) for s in skipped]
    with pytest.raises(UserError, match="requested but is not available: CUDA not available"):
        available_specs({}, host, Selection(devices=("cuda",)))
    with pytest.raises(UserError, match="unknown ONNX Runtime provider"):
        available_specs({}, host, Selection(providers=("tpu",)))


# ------------------------------------------------------------------------------------------------- validate

@pytest.mark.slow
def test_validate_writes_the_three_report_files(tiny, artifacts):
    outcome = run_validation(tiny, artifacts, max_new_tokens=NEW_TOKENS, threads=1)
    paths = write_report(artifacts, tiny.weights.slug)
    assert {path.name for path in paths.values()} == {"report.json", "report.md", "report.html"}
    assert outcome.failed_runners == [] and outcome.bundle_errors == []
    report = json.loads(paths["json"].read_text())
    assert {"cpu", "logical_cores", "ram_bytes", "os"} <= set(report["machine"])
    assert {"torch", "onnxruntime", "python"} <= set(report["versions"])
    rows = {row["runner"]: row for row in report["validation"]["runners"]}
    bundles, _ = load_bundles(artifacts, tiny.weights.slug, ["torchscript", "onnx"], tiny.weights.weight_sha256)
    runnable, _ = available_specs(bundles, Host.detect())
    assert {spec.name for spec in runnable} <= set(rows)
    assert {"torchscript fp32 cpu", "torch-export fp32 cpu", "onnxruntime fp32 cpu", "coreml-mil fp32 numpy"} <= set(rows)
    assert rows["pytorch fp32 cpu"]["verdict"] == "reference"
    for name, row in rows.items():
        assert finite_number(row["perplexity"]) and row["size_bytes"] > 0
        if row["verdict"] == "reference":
            continue
        assert row["verdict"] == "PASS", (name, row["failures"])
        for metric in ("max_abs_logit_diff", "mean_abs_logit_diff", "min_cosine", "max_kl_divergence",
                       "top1_agreement", "top5_overlap"):
            assert finite_number(row[metric]), (name, metric)
        assert row["max_abs_logit_diff"] <= 1e-3 and row["top1_agreement"] == 1.0 and row["min_cosine"] > 0.999
        assert row["greedy_match_steps"] == row["greedy_steps"] == NEW_TOKENS
        assert [p["prompt"] for p in row["prompts"]] == ["short", "long", "chat"]
        assert all(len(p["steps"]) == NEW_TOKENS for p in row["prompts"])
    skipped = {entry["runner"]: entry["reason"] for entry in report["validation"]["skipped"]}
    if Host.detect().system != "Darwin":  # on macOS the Core ML runners run, so they are not among the skipped
        assert skipped["coreml fp32 ALL"] == "Core ML runtime needs macOS"
    markdown = paths["md"].read_text()
    assert "| onnxruntime | fp32 | cpu | PASS |" in markdown and "## Skipped" in markdown
    html = paths["html"].read_text()
    assert html.count("data:image/png;base64,") == 2 and "<style>" in html and "http" not in html.split("<body>")[1]


def test_bench_measures_each_runner_in_its_own_process(tiny, artifacts, tmp_path):
    # Its own copy with its own validation piece: the report then combines both, whatever ran before.
    root = copy_artifacts(artifacts, tmp_path / "artifacts")
    # ONNX Runtime's own loop only: the app runtimes' bench rows are checked on tiny_all (test_end_to_end.py).
    onnx_only = Selection(formats=("onnx",), backends=("onnxruntime",))
    assert run_validation(tiny, root, onnx_only, max_new_tokens=NEW_TOKENS, threads=1,
                          perplexity_tokens=64).failed_runners == []
    settings = BenchSettings(threads=1, ttft_prompt_tokens=4, prefill_tokens=16, decode_tokens=4, repeats=1)
    outcome = run_bench(tiny, root, onnx_only, settings, bandwidth_megabytes=32)
    assert outcome.failed_runners == []
    row = next(row for row in outcome.piece["runners"] if row["runner"] == "onnxruntime fp32 cpu")
    for metric in ("load_seconds", "time_to_first_token_seconds", "prefill_tokens_per_second",
                   "decode_tokens_per_second", "percent_of_ceiling", "peak_rss_bytes", "size_bytes"):
        assert finite_number(row[metric]) and row[metric] > 0, metric
    assert row["prefill_tokens"] == 16 and row["decode_tokens"] == 4 and row["threads"] == 1
    report = json.loads(write_report(root, tiny.weights.slug)["json"].read_text())
    by_kernel = report["bench"]["read_bandwidth_by_kernel"]  # three read kernels at two sizes; the best counts
    assert len(by_kernel) == 6 and all(finite_number(value) and value > 0 for value in by_kernel.values())
    assert report["bench"]["read_bandwidth_bytes_per_second"] == max(by_kernel.values())
    html = (root / "random-tiny" / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # validation's logit-difference and top-1 plots, bench's speed


@pytest.mark.slow
def test_reexported_perturbed_model_fails_naming_the_backend(perturbed_artifacts):
    result = validate_cli(perturbed_artifacts, "--formats", "onnx")
    assert result.returncode == 1, result.stderr
    assert "FAIL onnxruntime fp32 cpu: max |Δlogit|" in result.stderr
    assert "validation failed for: onnxruntime fp32 cpu" in result.stderr
    report = json.loads((perturbed_artifacts / "random-tiny" / "report" / "report.json").read_text())
    row = next(row for row in report["validation"]["runners"] if row["runner"] == "onnxruntime fp32 cpu")
    assert row["verdict"] == "FAIL" and row["max_abs_logit_diff"] > 1e-3


@pytest.mark.slow
def test_a_loosened_threshold_is_applied(perturbed_artifacts):
    result = validate_cli(perturbed_artifacts, "--formats", "onnx", "--max-logit-diff", "1000")
    report = json.loads((perturbed_artifacts / "random-tiny" / "report" / "report.json").read_text())
    row = next(row for row in report["validation"]["runners"] if row["runner"] == "onnxruntime fp32 cpu")
    assert row["thresholds"]["max_abs_logit_diff"] == 1000
    assert not any("max |Δlogit|" in failure for failure in row["failures"])
    assert result.returncode == (1 if row["failures"] else 0)


# ------------------------------------------------------------------------------------------------ bad input

def overwrite_first_float(path: Path) -> None:
    """Rewrite one float of an initializer in place (an onnx/model.onnx_data byte range), nothing else."""
    with open(path, "r+b") as handle:
        value = np.frombuffer(handle.read(4), dtype=np.float32)[0]
        handle.seek(0)
        handle.write(np.float32(value + 1.0).tobytes())


def tamper_hash(bundle: Path) -> str:
    overwrite_first_float(bundle / "onnx" / "model.onnx_data")
    return "sha256 mismatch"


def delete_file(bundle: Path) -> str:
    (bundle / "onnx" / "model.onnx_data").unlink()
    return "missing"


def other_weights(bundle: Path) -> str:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["source"]["weight_sha256"] = "f" * 64
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return "exported from other weights"


@pytest.mark.parametrize("damage", [tamper_hash, delete_file, other_weights])
def test_broken_bundle_is_one_clear_line_and_listed_as_skipped(artifacts, tmp_path, damage):
    root = copy_artifacts(artifacts, tmp_path / "artifacts")
    expected = damage(root / "random-tiny" / "onnx")
    result = validate_cli(root, "--formats", "onnx")
    assert result.returncode == 2, result.stderr
    assert len(error_lines(result)) == 1 and expected in error_lines(result)[0], result.stderr
    assert "Traceback" not in result.stderr
    report = json.loads((root / "random-tiny" / "report" / "report.json").read_text())
    skipped = {entry["runner"]: entry["reason"] for entry in report["validation"]["skipped"]}
    assert expected in skipped["onnxruntime"]


@pytest.mark.parametrize(("option", "value", "expected"), [
    ("--device", "cuda", "device 'cuda' was requested but is not available"),
    ("--provider", "cuda", "provider 'cuda' was requested but is not available"),
    ("--provider", "tpu", "unknown ONNX Runtime provider 'tpu'"),
])
def test_unavailable_device_or_provider_is_one_clear_line(artifacts, option, value, expected):
    host = Host.detect()
    if (option, value) == ("--device", "cuda") and host.cuda or \
            (option, value) == ("--provider", "cuda") and "CUDAExecutionProvider" in host.onnx_providers:
        pytest.skip("this host has CUDA")
    result = validate_cli(artifacts, "--formats", "onnx", option, value)
    assert result.returncode == 2, result.stderr
    assert len(error_lines(result)) == 1 and expected in error_lines(result)[0], result.stderr


def test_bench_skipping_a_runner_validate_judged_says_why_in_the_report():
    """The MIL interpreter is judged by validate and left out by bench: the report says why beside its empty
    speed cells; a skip of a runner the same command did run (another run's) is not listed."""
    mil = {"runner": "coreml-mil fp32 numpy", "backend": "coreml-mil", "precision": "fp32", "device": "numpy"}
    onnx = {"runner": "onnxruntime fp32 cpu", "backend": "onnxruntime", "precision": "fp32", "device": "cpu"}
    reason = BACKENDS["coreml-mil"].untimed_reason
    another_runs_skip = {"runner": "onnxruntime", "reason": "no onnx bundle"}
    report = {"validation": {"runners": [mil, onnx], "skipped": [another_runs_skip]},
              "bench": {"runners": [onnx], "skipped": [{"runner": mil["runner"], "reason": reason}]}}
    assert report_module.skipped_by_reason(report) == {reason: [mil["runner"]]}
