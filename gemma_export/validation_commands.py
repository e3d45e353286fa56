"""`gemma-export validate | bench | report`: thin click layers over validation/pipeline.py (which `gemma-export all`
calls too), and how a validation or bench ends: the report's paths, each failing runner, the exit code."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from gemma_export.options import model_options
from model.errors import UserError
from model.loading import load
from model.weights import DEFAULT_MODEL, source_slug
from validation.baselines import BASELINE_CHOICES
from validation.bench import BenchSettings
from validation.compare import FP32_MAX_LOGIT_DIFF, HELDOUT_MAX_TOKENS, THRESHOLDS
from validation.pipeline import Outcome, run_bench, run_validation, write_report
from validation.report import WHOLE_COMMAND, WHOLE_STAGE, timing_rows
from validation.runners import (BACKENDS, COREML_COMPUTE_UNITS, FORMAT_CHOICES, ONNX_PROVIDERS, TORCH_DEVICES,
                                Selection)

EXIT_VALIDATION_FAILED = 1


def finish(outcome: Outcome, paths: dict[str, Path] | None, what: str) -> None:
    """Print where the report is (unless `paths` is None: already printed); exit non-zero naming each failing
    runner, then each broken bundle."""
    if paths is not None:
        click.echo(f"report: {paths['md']}  {paths['html']}")
    for row in [*outcome.piece["runners"], *outcome.piece.get("baselines", [])]:
        if row["runner"] in outcome.failed_runners:
            reasons = row.get("failures") or [row.get("error", "")]
            click.echo(f"FAIL {row['runner']}: {'; '.join(reasons)}", err=True)
    if outcome.bundle_errors:
        raise UserError("; ".join(outcome.bundle_errors))
    if outcome.failed_runners:
        click.echo(f"{what} failed for: {', '.join(outcome.failed_runners)}", err=True)
        # SystemExit, not click's Exit: with standalone_mode=False click *returns* an Exit's code, and
        # gemma_export.errors.run_cli does not pass that return value on.
        sys.exit(EXIT_VALIDATION_FAILED)


# ---------------------------------------------------------------------------------------------- commands

def selection_options(function: Any) -> Any:
    options = [
        model_options("The model the bundles were exported from (the reference)."),
        click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("artifacts"),
                     show_default=True, help="Artifacts root holding <model>/<format>/ bundles."),
        click.option("--formats", multiple=True, type=click.Choice(FORMAT_CHOICES),
                     help="Repeatable; default: every bundle there is, plus the in-memory pytorch runners."),
        click.option("--precisions", multiple=True, help="Repeatable, e.g. fp32, int8; default: all exported."),
        click.option("--device", "devices", multiple=True, type=click.Choice(TORCH_DEVICES),
                     help="Repeatable torch device for the PyTorch-based runners; default: every one available."),
        click.option("--provider", "providers", multiple=True,
                     help=f"Repeatable ONNX Runtime execution provider: {', '.join(ONNX_PROVIDERS)} or full name."),
        click.option("--compute-units", multiple=True, type=click.Choice(COREML_COMPUTE_UNITS),
                     help="Repeatable Core ML compute units (macOS)."),
        backends_option,
    ]
    for option in reversed(options):
        function = option(function)
    return function


def selection_from(formats: tuple[str, ...], precisions: tuple[str, ...], devices: tuple[str, ...],
                   providers: tuple[str, ...], compute_units: tuple[str, ...], backends: tuple[str, ...] = ()
                   ) -> Selection:
    return Selection(formats or None, precisions or None, devices or None, providers or None, compute_units or None,
                     backends or None)


# Repeatable --backends: which runners to judge (the reference always runs).
backends_option = click.option(
    "--backends", multiple=True, type=click.Choice(list(BACKENDS)),
    help="Repeatable; default: every backend. E.g. --backends onnxruntime-genai --backends transformers-js.")


# Perplexity decodes the held-out text one token at a time through every runner: the longest part of a
# validation for slow runners (the numpy MIL runner: ~1 s per step on the real model).
perplexity_tokens_option = click.option(
    "--perplexity-tokens", type=click.IntRange(2, 4096), default=HELDOUT_MAX_TOKENS, show_default=True,
    help="Tokens of the held-out text each runner's perplexity is measured on.")


# The defaults the validate help names, from validation.compare's tables.
FP32_LIMITS = " / ".join(f"{limit:g} {scale}" for scale, limit in FP32_MAX_LOGIT_DIFF.items())
TOP1_FLOORS = ", ".join(f"{precision} {thresholds.min_top1_agreement:g}" for precision, thresholds in THRESHOLDS.items()
                        if thresholds.min_top1_agreement is not None)


BUDGET_HELP = ("Most seconds the timed runs of one measurement (TTFT, prefill, decode) may take: a runner too slow "
               "for --repeats runs of --decode-tokens gets fewer, and the report says so.")
budget_option = click.option("--budget-s", type=click.FloatRange(min=0, min_open=True), default=BenchSettings.budget_s,
                             show_default=True, help=BUDGET_HELP)
# `all` is the first look at every file (its bench a quick pass beside the verdicts); `bench` is for the numbers
# one quotes, with three times the time per measurement.
ALL_BUDGET_S = BenchSettings.budget_s / 3
all_budget_option = click.option("--budget-s", type=click.FloatRange(min=0, min_open=True), default=ALL_BUDGET_S,
                                 show_default=True, help=BUDGET_HELP + " `gemma-export bench` gives each 3× this.")
baseline_option = click.option(
    "--baseline", "baselines", multiple=True, type=click.Choice(BASELINE_CHOICES),
    help="Repeatable: also run what a user would run instead, in the same run: validate measures it on the same "
         "tokens as every runner (mean KL, top-1, perplexity; judged by no floor), bench measures its speed and "
         "every runner's ratio to it. llama.cpp needs a GGUF model and pip install -e \".[baseline]\"; "
         "transformers runs the same weights in fp32.")


@click.command("validate")
@selection_options
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Greedy steps compared per prompt.")
@perplexity_tokens_option
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Threads of the PyTorch and ONNX Runtime runners; 0 = every core.")
@click.option("--max-logit-diff", type=click.FloatRange(min=0), default=None,
              help=f"Override the max |Δlogit| limit (default: fp32 {FP32_LIMITS}; none for others).")
@click.option("--min-top1", type=click.FloatRange(0, 1), default=None,
              help=f"Override the top-1 agreement floor, as a fraction (default: {TOP1_FLOORS}; lower on toy models).")
@baseline_option
def validate_command(model_id: str, revision: str | None, out_dir: Path, formats: tuple[str, ...],
                     precisions: tuple[str, ...], devices: tuple[str, ...], providers: tuple[str, ...],
                     compute_units: tuple[str, ...], max_new_tokens: int, perplexity_tokens: int, threads: int,
                     backends: tuple[str, ...], max_logit_diff: float | None, min_top1: float | None,
                     baselines: tuple[str, ...]) -> None:
    """Compare every exported runner with the PyTorch reference; write artifacts/<model>/report/."""
    selection = selection_from(formats, precisions, devices, providers, compute_units, backends)
    loaded = load(model_id, revision=revision)
    outcome = run_validation(loaded, out_dir, selection, max_new_tokens, max_logit_diff, min_top1, threads,
                             perplexity_tokens, baselines)
    finish(outcome, write_report(out_dir, loaded.weights.slug), "validation")


@click.command("bench")
@selection_options
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True, help="0 = every core.")
@click.option("--decode-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--prefill-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed runs per measurement (median), after one warm-up run.")
@budget_option
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Measure every runner and baseline this many times, each time in a fresh process and in "
                   "alternating order; report the medians (and the median of each round's ratio to a baseline). "
                   "For shared, noisy machines.")
@click.option("--bandwidth-mb", type=click.IntRange(min=16), default=1024, show_default=True,
              help="Buffer size of the read-bandwidth measurement.")
@baseline_option
def bench_command(model_id: str, revision: str | None, out_dir: Path, formats: tuple[str, ...],
                  precisions: tuple[str, ...], devices: tuple[str, ...], providers: tuple[str, ...],
                  compute_units: tuple[str, ...], backends: tuple[str, ...], threads: int, decode_tokens: int,
                  prefill_tokens: int,
                  repeats: int, budget_s: float, rounds: int, bandwidth_mb: int, baselines: tuple[str, ...]) -> None:
    """Measure load time, TTFT, prefill/decode tok/s, peak RSS and % of the bandwidth ceiling per runner, and
    with --baseline each runner's ratio to llama.cpp and/or transformers."""
    selection = selection_from(formats, precisions, devices, providers, compute_units, backends)
    loaded = load(model_id, revision=revision)
    settings = BenchSettings(threads=threads, prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
                             repeats=repeats, budget_s=budget_s, rounds=rounds)
    outcome = run_bench(loaded, out_dir, selection, settings, bandwidth_mb, baselines)
    finish(outcome, write_report(out_dir, loaded.weights.slug), "benchmark")


@click.command("report")
@click.option("--model", "model_id", default=DEFAULT_MODEL, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True)
def report_command(model_id: str, out_dir: Path) -> None:
    """Render report.json / report.md / report.html from the saved validate and bench results."""
    paths = write_report(out_dir, source_slug(model_id))
    click.echo(f"report: {paths['md']}  {paths['html']}")


def stage_summary(timings: dict[str, Any], validation: Outcome, bench: Outcome | None, verbose: bool) -> str:
    """Where the time went, from the report's timing table: each export, the validate and bench totals and the
    whole command; with `verbose` also each runner under validate and bench."""
    report = {"timings": timings, "validation": validation.piece, "bench": bench.piece if bench else {}}
    lines = ["time per stage:"]
    for stage, part, seconds, _share in timing_rows(report):
        whole_stage = part in (WHOLE_STAGE, WHOLE_COMMAND)
        if stage == "export" and not whole_stage:
            lines.append(f"  export {part:<12} {seconds:>7} s")
        elif whole_stage and stage != "export":
            lines.append(f"  {stage:<19} {seconds:>7} s")
        elif verbose and not whole_stage:
            lines.append(f"    {part:<36} {seconds:>7} s")
    return "\n".join(lines)


def register(cli: click.Group) -> None:
    for command in (validate_command, bench_command, report_command):
        cli.add_command(command)
