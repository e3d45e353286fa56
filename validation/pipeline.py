"""The validation stage as `gemma-export validate`, `bench` and `all` run it: verify the bundles, pick the
runners this host can run (`prepare`), compare them with the reference (`run_validation`) or measure them
(`run_bench`), save each result as a piece of the report, and render the report (`write_report`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from exporters.hf_repo import refresh_model_card
from exporters.progress import byte_progress_bar
from model.errors import UserError
from model.loading import LoadedModel
from validation import report as report_files
from validation.baselines import (BaselineFiles, baseline_model_files, baseline_spec, check_baselines,
                                  open_baseline_runner)
from validation.bench import BenchJob, BenchSettings, bench_all
from validation.compare import (HELDOUT_MAX_TOKENS, compare_all, load_heldout, load_prompts, runner_max_length,
                                thresholds_for)
from validation.runners import (BACKENDS, FORMAT_CHOICES, IN_MEMORY_FORMAT, REFERENCE_SPEC, BundleProblem, Host,
                                Runner, RunnerSpec, Selection, Skipped, available_specs, load_bundles, make_runner,
                                set_thread_count)


@dataclass
class Outcome:
    """What validate or bench found: the piece saved for the report, and the problems to exit non-zero on."""

    piece: dict[str, Any]
    failed_runners: list[str]
    bundle_errors: list[str]


def bundle_formats(formats: Sequence[str] | None) -> list[str]:
    return [fmt for fmt in (formats or FORMAT_CHOICES) if fmt != IN_MEMORY_FORMAT]


def prepare(loaded: LoadedModel, artifacts_root: Path, selection: Selection
            ) -> tuple[list[RunnerSpec], dict[str, Any], list[dict[str, str]], list[str]]:
    """Verify the bundles and pick the runners: (specs, bundles, skipped entries, bundle errors). Explicitly
    requested formats without a bundle are errors; others are only skipped."""
    weights = loaded.weights
    bar, update = byte_progress_bar("verify bundles")
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
    return {"model_id": weights.source_label, "slug": weights.slug, "weight_sha256": weights.weight_sha256}


def run_validation(loaded: LoadedModel, artifacts_root: Path, selection: Selection = Selection(),
                   max_new_tokens: int = 32, max_abs_logit_diff: float | None = None,
                   min_top1_agreement: float | None = None, threads: int = 0,
                   perplexity_tokens: int = HELDOUT_MAX_TOKENS, baselines: Sequence[str] = ()) -> Outcome:
    """Compare every available runner, and each requested baseline (on the same tokens, judged by no floor),
    with the reference; save validation.json into the report folder."""
    started = time.perf_counter()
    weights = loaded.weights
    baselines = list(dict.fromkeys(baselines))
    check_baselines(baselines, weights)
    specs, bundles, skipped, errors = prepare(loaded, artifacts_root, selection)
    set_thread_count(threads)
    model, config = loaded.model, loaded.model.config
    prompts = load_prompts(loaded.tokenizer, config, max_new_tokens)
    heldout = load_heldout(loaded.tokenizer, perplexity_tokens)
    max_length = runner_max_length(prompts, heldout, max_new_tokens)
    reference = make_runner(REFERENCE_SPEC, bundles, model, max_length=max_length)
    compared = [spec for spec in specs if spec != REFERENCE_SPEC]
    with (baseline_model_files(weights) if baselines else contextlib.nullcontext()) as files, \
            tqdm(total=len(compared) + len(baselines) + 1, desc="validate", unit="runner") as bar:
        openers = [(spec.name, spec.to_dict(),
                    lambda spec=spec: make_runner(spec, bundles, model, max_length=max_length, threads=threads))
                   for spec in compared]
        baseline_openers = [baseline_opener(name, files, max_length, threads) for name in baselines]
        bar.set_postfix_str("reference")
        rows = compare_all(reference, openers, prompts, heldout, max_new_tokens,
                           lambda precision: thresholds_for(precision, config, max_abs_logit_diff, min_top1_agreement),
                           on_runner=progress_callback(bar, first_done=True), open_baselines=baseline_openers)
    baseline_rows = [row for row in rows if row.get("baseline")]
    runner_rows = [row for row in rows if not row.get("baseline")]
    piece = {"model": model_entry(loaded), "max_new_tokens": max_new_tokens, "heldout_tokens": len(heldout),
             "runners": runner_rows, "baselines": baseline_rows, "skipped": skipped, "bundle_errors": errors,
             "seconds": time.perf_counter() - started}
    report_files.save_piece(report_files.report_dir(artifacts_root, weights.slug), "validation", piece)
    failed = [row["runner"] for row in rows if row["verdict"] == "FAIL"]
    return Outcome(piece, failed, errors)


def baseline_opener(name: str, files: BaselineFiles, max_length: int, threads: int
                    ) -> tuple[str, dict[str, str], Callable[[], Runner]]:
    """(runner name, spec, opener) of a baseline for compare_all: validation runs it in this process."""
    spec = baseline_spec(name, files)
    return spec.name, spec.to_dict(), lambda: open_baseline_runner(spec, files.path_for(name), max_length, threads)


def progress_callback(bar: tqdm, first_done: bool = False) -> Callable[[str, bool], None]:
    """Shows the runner at work; counts it when it is done (`first_done`: the reference's own step, already
    running when the first runner is announced, is counted then)."""
    reference_running = first_done

    def on_runner(name: str, finished: bool) -> None:
        nonlocal reference_running
        if reference_running:
            bar.update(1)
            reference_running = False
        if finished:
            bar.update(1)
        else:
            bar.set_postfix_str(name)
    return on_runner


def run_bench(loaded: LoadedModel, artifacts_root: Path, selection: Selection = Selection(),
              settings: BenchSettings = BenchSettings(), bandwidth_megabytes: int = 1024,
              baselines: Sequence[str] = ()) -> Outcome:
    """Benchmark every available runner and each requested baseline (llama.cpp, transformers), each in a fresh
    process; save bench.json, with every runner's ratios to the baselines, into the report folder."""
    started = time.perf_counter()
    weights = loaded.weights
    baselines = list(dict.fromkeys(baselines))
    check_baselines(baselines, weights)
    specs, _, skipped, errors = prepare(loaded, artifacts_root, selection)
    specs, untimed = timed_specs(specs, selection)
    skipped += [asdict(entry) for entry in untimed]
    jobs = [BenchJob(spec, str(artifacts_root), weights.slug, weights.source_id, weights.weight_sha256, settings,
                     revision=weights.revision) for spec in specs]
    with baseline_model_files(weights) if baselines else contextlib.nullcontext() as files:
        baseline_jobs = [BenchJob(baseline_spec(name, files), str(artifacts_root), weights.slug, weights.source_id,
                                  weights.weight_sha256, settings, model_path=str(files.path_for(name)))
                         for name in baselines]
        with tqdm(total=(len(jobs) + len(baseline_jobs)) * settings.rounds, desc="bench", unit="runner") as bar:
            measured = bench_all(jobs, bandwidth_megabytes, on_runner=progress_callback(bar),
                                 baseline_jobs=baseline_jobs)
    piece = {"model": model_entry(loaded), **measured, "skipped": skipped, "bundle_errors": errors,
             "seconds": time.perf_counter() - started}
    report_files.save_piece(report_files.report_dir(artifacts_root, weights.slug), "bench", piece)
    failed = [row["runner"] for row in [*measured["runners"], *measured["baselines"]] if "error" in row]
    return Outcome(piece, failed, errors)


def timed_specs(specs: Sequence[RunnerSpec], selection: Selection) -> tuple[list[RunnerSpec], list[Skipped]]:
    """The runners bench measures, and the ones it leaves out with why: a backend whose speed means nothing
    (the MIL interpreter) is measured only when asked for by name."""
    asked = selection.backends or ()
    timed, untimed = [], []
    for spec in specs:
        reason = BACKENDS[spec.backend].untimed_reason
        (untimed.append(Skipped(spec.name, reason)) if reason and spec.backend not in asked else timed.append(spec))
    return timed, untimed


def save_timings(artifacts_root: Path, slug: str, timings: dict[str, Any]) -> None:
    """`gemma-export all`'s own stage times (the exports, the whole command) for the report's time table."""
    report_files.save_piece(report_files.report_dir(artifacts_root, slug), "timings", timings)


def write_report(artifacts_root: Path, slug: str) -> dict[str, Path]:
    """The report files, and the ONNX bundle's model card with the validation numbers."""
    folder = report_files.report_dir(artifacts_root, slug)
    if not any((folder / f"{piece}.json").is_file() for piece in report_files.RESULT_PIECES):
        raise UserError(f"{folder} holds no validation or benchmark results yet",
                        "run gemma-export validate (and bench) first")
    paths = report_files.write_report(folder)
    validation = report_files.load_pieces(folder).get("validation")
    if validation is not None:
        refresh_model_card(artifacts_root, slug, validation)
    return paths
