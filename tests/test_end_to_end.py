"""`gemma-export all` as a user runs it (a subprocess, the CLI entry point): export, validate, bench, report.

- tiny: every backend (fp32 of every format) plus the 4-bit variants; the report lists every backend this host
  can run with real numbers, and every one it cannot with the reason.
- the real default model (CI runs it too): fp32 of every format plus one reduced precision each
  (TorchScript fp16, ONNX fp16 and int4, Core ML fp16), through the same command. The
  per-format real tests (test_*_export.py) drive these same bundles' files with their own generate loops
  (fixture `real_bundles` in conftest.py), so each real export is made once per test session.
"""

from __future__ import annotations

import json
import math
import platform

import pytest

from exporters.artifact import load_bundle
from exporters.registry import FORMATS
from gemma_export.validation_commands import ALL_BUDGET_S
from validation.bench import BenchSettings
from conftest import E2E_SETTINGS, REAL_ALL_PRECISIONS, REAL_HELDOUT_TOKENS, TINY_ALL_PRECISIONS

# Runner names per bundle format: (backend, target) for each variant the bundle holds. The Core ML runtime
# runs on macOS only; elsewhere the report must list it as skipped with that reason.
LINUX_TARGETS = {"torchscript": [("torchscript", "cpu"), ("torch-export", "cpu")],
                 "onnx": [("onnxruntime", "cpu"), ("onnxruntime-genai", "cpu"), ("transformers-js", "node")],
                 "coreml": [("coreml-mil", "numpy")], "executorch": [("executorch", "xnnpack")]}
# The runtimes apps embed: judged by the tiny run; the real run leaves them to test_app_runtimes.py (its own
# loops on the same real files), where CI's time goes further.
APP_RUNTIMES = {"onnxruntime-genai", "transformers-js"}
METRICS = ("max_abs_logit_diff", "mean_abs_logit_diff", "min_cosine", "max_kl_divergence", "mean_kl_divergence",
           "top1_agreement", "top5_overlap", "perplexity", "perplexity_ratio")
BENCH_METRICS = ("load_seconds", "time_to_first_token_seconds", "prefill_tokens_per_second",
                 "decode_tokens_per_second", "percent_of_ceiling", "peak_rss_bytes", "size_bytes")


def planned_precisions(filters: tuple[str, ...]) -> dict[str, list[str]]:
    """Format → precisions that `gemma-export all --precisions ...` exports for these filters."""
    return {fmt: [item.split(":")[-1] for item in filters if item.split(":")[-1] in info.precisions
                  and (":" not in item or item.startswith(f"{fmt}:"))] for fmt, info in FORMATS.items()}


def expected_runners(precisions: dict[str, list[str]], app_runtimes: bool = True) -> set[str]:
    names = {"pytorch fp32 cpu", "pytorch-compile fp32 cpu"}
    for fmt, chosen in precisions.items():
        for backend, target in LINUX_TARGETS[fmt]:
            if app_runtimes or backend not in APP_RUNTIMES:
                names |= {f"{backend} {precision} {target}" for precision in chosen}
    return names


def check_report(out, slug: str, precisions: dict[str, list[str]], benched: bool = True,
                 heldout_tokens: int = int(E2E_SETTINGS[E2E_SETTINGS.index("--perplexity-tokens") + 1]),
                 app_runtimes: bool = True) -> dict:
    """The three report files exist; validation (and bench, when `all` ran it) hold every runner with finite
    numbers; what the host cannot run is listed with its reason. Returns report.json."""
    folder = out / slug / "report"
    assert {path.name for path in folder.iterdir()} >= {"report.json", "report.md", "report.html"}
    report = json.loads((folder / "report.json").read_text())
    assert report["validation"]["heldout_tokens"] == heldout_tokens
    validation = {row["runner"]: row for row in report["validation"]["runners"]}
    bench = {row["runner"]: row for row in report["bench"]["runners"]} if benched else {}
    assert ("bench" in report) == benched
    expected = expected_runners(precisions, app_runtimes)
    interpreters = {name for name in expected if name.startswith("coreml-mil ")}
    if platform.system() != "Darwin":
        assert expected == set(validation) and (not benched or expected - interpreters == set(bench)), (
            sorted(validation), sorted(bench))
        if benched:  # the MIL interpreter's numerics are judged; its speed is not measured, and the report says why
            bench_skipped = {entry["runner"]: entry["reason"] for entry in report["bench"]["skipped"]}
            assert {name for name, reason in bench_skipped.items() if "--backends coreml-mil" in reason} == interpreters
        skipped = {entry["runner"]: entry["reason"] for entry in report["validation"]["skipped"]}
        assert {name for name, reason in skipped.items() if reason == "Core ML runtime needs macOS"} == {
            f"coreml {precision} {units}" for precision in precisions.get("coreml", [])
            for units in ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")}
    assert validation["pytorch fp32 cpu"]["verdict"] == "reference"
    for name in expected - {"pytorch fp32 cpu"}:
        row = validation[name]
        assert row["verdict"] == "PASS", (name, row.get("failures"))
        assert row["teacher_forced_steps"] == 3 * row["greedy_steps"] + heldout_tokens - 1, name
        assert all(math.isfinite(row[metric]) for metric in METRICS), (name, row)
        assert row["nonfinite_logits"] == 0, name
        assert not benched or name in interpreters or all(
            math.isfinite(bench[name][metric]) and bench[name][metric] > 0 for metric in BENCH_METRICS), name
    markdown = (folder / "report.md").read_text()
    assert all(f"| {name.split()[0]} | {name.split()[1]} |" in markdown for name in expected)
    check_timings(report, markdown, precisions, benched)
    html = (folder / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= (3 if benched else 2)
    return report


def check_timings(report: dict, markdown: str, precisions: dict[str, list[str]], benched: bool) -> None:
    """`all` records where its time went: each export, each stage, each runner within a stage; the parts add up
    to no more than their stage, and the stages to no more than the whole command."""
    timings = report["timings"]
    assert list(timings["exports"]) == list(precisions) and all(value > 0 for value in timings["exports"].values())
    stages = [report["validation"], *([report["bench"]] if benched else [])]
    for stage in stages:
        parts = [row["seconds"] for row in stage["runners"]]
        assert all(value > 0 for value in parts) and sum(parts) <= stage["seconds"]
    assert sum(timings["exports"].values()) + sum(stage["seconds"] for stage in stages) <= timings["total_seconds"]
    assert "## Where the time went" in markdown
    assert f"| all | (the whole command) | {timings['total_seconds']:.0f} |" in markdown


def check_bundles(out, slug: str, precisions: dict[str, list[str]], weight_sha256: str) -> None:
    """Every bundle verifies (hashes) and was made from the model the report names."""
    for fmt, chosen in precisions.items():
        bundle = load_bundle(out, slug, fmt)
        assert bundle.manifest["source"]["weight_sha256"] == weight_sha256
        assert {key.removesuffix("-pt2") for key in bundle.precisions} == set(chosen)


def test_tiny_all_every_backend(tiny, tiny_all):
    out, result = tiny_all
    assert result.returncode == 0, result.stderr[-3000:]
    assert "time per stage:" in result.stderr and "\n  export coreml " in result.stderr
    assert result.stdout.count("report: ") == 1, result.stdout  # validate and bench both finish; one report line
    precisions = planned_precisions(TINY_ALL_PRECISIONS)
    assert precisions == {"torchscript": ["fp32"], "onnx": ["fp32", "int4"], "coreml": ["fp32", "int4"],
                          "executorch": ["fp32", "fp16"]}
    check_bundles(out, tiny.weights.slug, precisions, tiny.weights.weight_sha256)
    report = check_report(out, tiny.weights.slug, precisions)
    fp32 = {row["runner"]: row for row in report["validation"]["runners"] if " fp32 " in f" {row['runner']} "}
    for name, row in fp32.items():
        if row["verdict"] != "reference":
            assert row["max_abs_logit_diff"] <= 1e-3 and row["greedy_match_steps"] == row["greedy_steps"], name
    # The .pt2 program equals its .pt twin bit for bit: it takes the twin's numbers (the report says so).
    assert fp32["torch-export fp32 cpu"]["equal_to"] == "torchscript fp32 cpu"
    assert "validate: torch-export fp32 cpu: equals torchscript fp32 cpu bit for bit" in \
        (out / tiny.weights.slug / "report" / "report.md").read_text()
    # `all` benches with a third of `bench`'s budget per measurement (a first look beside the verdicts).
    assert report["bench"]["settings"]["budget_s"] == ALL_BUDGET_S == BenchSettings().budget_s / 3


@pytest.mark.real
def test_real_all_fp32_and_one_compressed_precision_per_format(real, real_bundles):
    out, result = real_bundles
    assert result.returncode == 0, result.stderr[-3000:]
    precisions = planned_precisions(REAL_ALL_PRECISIONS)
    check_bundles(out, real.weights.slug, precisions, real.weights.weight_sha256)
    report = check_report(out, real.weights.slug, precisions, benched=False, heldout_tokens=int(REAL_HELDOUT_TOKENS),
                          app_runtimes=False)
    rows = {row["runner"]: row for row in report["validation"]["runners"]}
    for name, row in rows.items():
        if " fp32 " in f" {name} " and row["verdict"] != "reference":
            assert row["max_abs_logit_diff"] <= 5e-3 and row["greedy_match_steps"] == row["greedy_steps"], name
    print("real all:", {name: (row["verdict"], round(row["max_abs_logit_diff"], 5), row["top1_agreement"],
                               row["mean_kl_divergence"]) for name, row in rows.items() if row["verdict"] != "reference"})
