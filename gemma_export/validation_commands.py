"""`gemma-export validate | bench | report`: thin click layers over validation/, plus the three functions that
`gemma-export all` calls (`run_validation`, `run_bench`, `write_report`)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from exporters.hf_repo import refresh_model_card
from model.errors import UserError
from model.loading import DEFAULT_MODEL, LoadedModel, load
from validation import report as report_files
from validation.baselines import BASELINE_CHOICES, baseline_model_files, baseline_spec, check_baselines
from validation.bench import BenchJob, BenchSettings, bench_all
from validation.compare import HELDOUT_MAX_TOKENS, compare_all, load_heldout, load_prompts, thresholds_for
from validation.runners import (BACKENDS, COREML_COMPUTE_UNITS, FORMAT_CHOICES, IN_MEMORY_FORMAT, ONNX_PROVIDERS,
                                REFERENCE_SPEC, TORCH_DEVICES, BundleProblem, Host, RunnerSpec, Selection,
                                available_specs, load_bundles, make_runner, set_thread_count)

EXIT_VALIDATION_FAILED = 1


@dataclass
class Outcome:
    """What validate or bench found: the piece saved for the report, and the problems to exit non-zero on."""

    piece: dict[str, Any]
    failed_runners: list[str]
    bundle_errors: list[str]


def bundle_formats(formats: Sequence[str] | None) -> list[str]:
    return [fmt for fmt in (formats or FORMAT_CHOICES) if fmt != IN_MEMORY_FORMAT]


def hash_progress(description: str) -> Any:
    bar = tqdm(desc=description, unit="B", unit_scale=True, leave=False)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
    return bar, update


def prepare(loaded: LoadedModel, artifacts_root: Path, selection: Selection
            ) -> tuple[list[RunnerSpec], dict[str, Any], list[dict[str, str]], list[str]]:
    """Verify the bundles and pick the runners: (specs, bundles, skipped entries, bundle errors). Explicitly
    requested formats without a bundle are errors; others are only skipped."""
    weights = loaded.weights
    bar, update = hash_progress("verify bundles")
    with bar:
        bundles, problems = load_bundles(artifacts_root, weights.slug, bundle_formats(selection.formats),
                                         weights.weight_sha256, progress=update)
    specs, skipped = available_specs(bundles, Host.detect(), selection, problems)
    errors = [problem.reason for problem in problems if is_error(problem, selection)]
    return specs, bundles, [asdict(entry) for entry in skipped], errors


def is_error(problem: BundleProblem, selection: Selection) -> bool:
    return problem.is_error or (selection.formats is not None and problem.format in selection.formats)


def model_entry(loaded: LoadedModel) -> dict[str, str]:
    weights = loaded.weights
    return {"model_id": weights.source_id, "slug": weights.slug, "weight_sha256": weights.weight_sha256}


def run_validation(loaded: LoadedModel, artifacts_root: Path, selection: Selection = Selection(),
                   max_new_tokens: int = 32, max_abs_logit_diff: float | None = None,
                   min_top1_agreement: float | None = None, threads: int = 0,
                   perplexity_tokens: int = HELDOUT_MAX_TOKENS) -> Outcome:
    """Compare every available runner with the reference; save validation.json into the report folder."""
    specs, bundles, skipped, errors = prepare(loaded, artifacts_root, selection)
    set_thread_count(threads)
    model, config = loaded.model, loaded.model.config
    prompts = load_prompts(loaded.tokenizer, config, max_new_tokens)
    heldout = load_heldout(loaded.tokenizer, perplexity_tokens)
    longest = max(len(prompt.ids) for prompt in prompts) + max_new_tokens
    max_length = max(longest, len(heldout))
    reference = make_runner(REFERENCE_SPEC, bundles, model, max_length=max_length)
    compared = [spec for spec in specs if spec != REFERENCE_SPEC]
    with tqdm(total=len(compared) + 1, desc="validate", unit="runner") as bar:
        def advance(name: str) -> None:
            bar.set_postfix_str(name)
            bar.update(1)
        openers = [(spec.name, spec.to_dict(),
                    lambda spec=spec: make_runner(spec, bundles, model, max_length=max_length, threads=threads))
                   for spec in compared]
        bar.set_postfix_str("reference")
        rows = compare_all(reference, openers, prompts, heldout, max_new_tokens,
                           lambda precision: thresholds_for(precision, config, max_abs_logit_diff, min_top1_agreement),
                           on_runner=advance)
        bar.update(1)
    piece = {"model": model_entry(loaded), "max_new_tokens": max_new_tokens, "heldout_tokens": len(heldout),
             "runners": rows, "skipped": skipped, "bundle_errors": errors}
    report_files.save_piece(report_files.report_dir(artifacts_root, loaded.weights.slug), "validation", piece)
    failed = [row["runner"] for row in rows if row["verdict"] == "FAIL"]
    return Outcome(piece, failed, errors)


def run_bench(loaded: LoadedModel, artifacts_root: Path, selection: Selection = Selection(),
              settings: BenchSettings = BenchSettings(), bandwidth_megabytes: int = 1024,
              baselines: Sequence[str] = ()) -> Outcome:
    """Benchmark every available runner and each requested baseline (llama.cpp, transformers), each in a fresh
    process; save bench.json, with every runner's ratios to the baselines, into the report folder."""
    weights = loaded.weights
    baselines = list(dict.fromkeys(baselines))
    check_baselines(baselines, weights)
    specs, _, skipped, errors = prepare(loaded, artifacts_root, selection)
    jobs = [BenchJob(spec, str(artifacts_root), weights.slug, weights.source_id, weights.weight_sha256, settings)
            for spec in specs]
    with baseline_model_files(weights) if baselines else contextlib.nullcontext() as files:
        baseline_jobs = [BenchJob(baseline_spec(name, files), str(artifacts_root), weights.slug, weights.source_id,
                                  weights.weight_sha256, settings, model_path=str(files.path_for(name)))
                         for name in baselines]
        with tqdm(total=(len(jobs) + len(baseline_jobs)) * settings.rounds, desc="bench", unit="runner") as bar:
            def advance(name: str) -> None:
                bar.set_postfix_str(name)
                bar.update(1)
            measured = bench_all(jobs, bandwidth_megabytes, on_runner=advance, baseline_jobs=baseline_jobs)
    piece = {"model": model_entry(loaded), **measured, "skipped": skipped, "bundle_errors": errors}
    report_files.save_piece(report_files.report_dir(artifacts_root, weights.slug), "bench", piece)
    failed = [row["runner"] for row in [*measured["runners"], *measured["baselines"]] if "error" in row]
    return Outcome(piece, failed, errors)


def write_report(artifacts_root: Path, slug: str) -> dict[str, Path]:
    """The report files, and the ONNX bundle's model card with the validation numbers."""
    folder = report_files.report_dir(artifacts_root, slug)
    if not any((folder / f"{piece}.json").is_file() for piece in report_files.PIECES):
        raise UserError(f"{folder} holds no validation or benchmark results yet",
                        "run gemma-export validate (and bench) first")
    paths = report_files.write_report(folder)
    validation = report_files.load_pieces(folder).get("validation")
    if validation is not None:
        refresh_model_card(artifacts_root, slug, validation)
    return paths


def finish(outcome: Outcome, paths: dict[str, Path], what: str) -> None:
    """Print where the report is; exit non-zero naming each failing runner, then each broken bundle."""
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
        click.option("--model", "model_id", default=DEFAULT_MODEL, show_default=True,
                     help="The model the bundles were exported from (the reference)."),
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


@click.command("validate")
@selection_options
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Greedy steps compared per prompt.")
@perplexity_tokens_option
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Threads of the PyTorch and ONNX Runtime runners; 0 = every core.")
@click.option("--max-logit-diff", type=click.FloatRange(min=0), default=None,
              help="Override the max |Δlogit| limit (default: fp32 1e-3 tiny / 5e-3 real; none for others).")
@click.option("--min-top1", type=click.FloatRange(0, 1), default=None,
              help="Override the top-1 agreement floor, as a fraction (default: fp16/bf16 0.99, int8 0.98, int4 0.97).")
def validate_command(model_id: str, out_dir: Path, formats: tuple[str, ...], precisions: tuple[str, ...],
                     devices: tuple[str, ...], providers: tuple[str, ...], compute_units: tuple[str, ...],
                     backends: tuple[str, ...], max_new_tokens: int, perplexity_tokens: int, threads: int,
                     max_logit_diff: float | None, min_top1: float | None) -> None:
    """Compare every exported runner with the PyTorch reference; write artifacts/<model>/report/."""
    selection = selection_from(formats, precisions, devices, providers, compute_units, backends)
    loaded = load(model_id)
    outcome = run_validation(loaded, out_dir, selection, max_new_tokens, max_logit_diff, min_top1, threads,
                             perplexity_tokens)
    finish(outcome, write_report(out_dir, loaded.weights.slug), "validation")


@click.command("bench")
@selection_options
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True, help="0 = every core.")
@click.option("--decode-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--prefill-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed runs per measurement (median), after one warm-up run.")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Measure every runner and baseline this many times, each time in a fresh process and in "
                   "alternating order; report the medians (and the median of each round's ratio to a baseline). "
                   "For shared, noisy machines.")
@click.option("--bandwidth-mb", type=click.IntRange(min=16), default=1024, show_default=True,
              help="Buffer size of the read-bandwidth measurement.")
@click.option("--baseline", "baselines", multiple=True, type=click.Choice(BASELINE_CHOICES),
              help="Repeatable: also measure what a user would run instead, in the same run, and report every "
                   "runner's ratio to it. llama.cpp needs a GGUF model and pip install -e \".[baseline]\"; "
                   "transformers runs the same weights in fp32.")
def bench_command(model_id: str, out_dir: Path, formats: tuple[str, ...], precisions: tuple[str, ...],
                  devices: tuple[str, ...], providers: tuple[str, ...], compute_units: tuple[str, ...],
                  backends: tuple[str, ...], threads: int, decode_tokens: int, prefill_tokens: int, repeats: int,
                  rounds: int, bandwidth_mb: int, baselines: tuple[str, ...]) -> None:
    """Measure load time, TTFT, prefill/decode tok/s, peak RSS and % of the bandwidth ceiling per runner, and
    with --baseline each runner's ratio to llama.cpp and/or transformers."""
    selection = selection_from(formats, precisions, devices, providers, compute_units, backends)
    loaded = load(model_id)
    settings = BenchSettings(threads=threads, prefill_tokens=prefill_tokens, decode_tokens=decode_tokens,
                             repeats=repeats, rounds=rounds)
    outcome = run_bench(loaded, out_dir, selection, settings, bandwidth_mb, baselines)
    finish(outcome, write_report(out_dir, loaded.weights.slug), "benchmark")


@click.command("report")
@click.option("--model", "model_id", default=DEFAULT_MODEL, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True)
def report_command(model_id: str, out_dir: Path) -> None:
    """Render report.json / report.md / report.html from the saved validate and bench results."""
    from model.weights import load_weights

    paths = write_report(out_dir, load_weights(model_id).slug)
    click.echo(f"report: {paths['md']}  {paths['html']}")


def register(cli: click.Group) -> None:
    for command in (validate_command, bench_command, report_command):
        cli.add_command(command)
