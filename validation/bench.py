"""Speed and memory of every runner: load time, time to first token, prefill and decode tok/s, peak RSS, and
decode speed as a share of the memory-bandwidth ceiling (weight bytes read per token ÷ read bandwidth).

Each runner is measured in a fresh process (`python -m validation.bench --one <job json>`), so its peak RSS is
its own and the memory of one runtime is given back before the next starts. Timings are medians of
`repeats` runs after one warm-up run that is not counted; where the warm-up shows that a slow runner's runs would
not fit the budget (`budget_s` per measurement), it gets fewer runs or decode tokens and its row lists what was
cut (`shortened`), so one slow interpreter or 16-bit CPU kernel costs seconds, not minutes. The baselines (validation/baselines.py: llama.cpp,
transformers) are measured the same way in the same run, and every runner row gets its ratio to each of them.
With `rounds` > 1 every runner and baseline is measured that many times, a round at a time and in alternating
order, and each number is the median over the rounds: on a shared machine one process can land in a busy minute,
and a ratio is only as good as the two numbers it divides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from validation.baselines import BASELINE_CHOICES, add_ratios, import_runtime, open_baseline
from validation.memory import peak_rss_bytes

if TYPE_CHECKING:
    from validation.runners import Runner, RunnerSpec

# torch and the runners are imported inside the functions that need them: a baseline's process (see
# validation/baselines.py) measures llama.cpp with this module and must not carry torch in its peak RSS.

DECODE_PROBE_TOKENS = 16  # the decode warm-up, then as many again to measure how many tokens fit the budget
RESULT_PREFIX = "BENCH-RESULT "
SUBPROCESS_TIMEOUT_S = 3600
FIRST_ORDINARY_TOKEN = 3  # ids 0-2 are <pad>, <eos>, <bos>


@dataclass(frozen=True)
class BenchSettings:
    threads: int = 0  # 0: every core
    ttft_prompt_tokens: int = 16
    prefill_tokens: int = 512
    decode_tokens: int = 256
    repeats: int = 3
    rounds: int = 1  # bench_all measures every runner and baseline this many times (see combine_rounds)
    # The most seconds the timed runs of one measurement (TTFT, prefill, decode) may take: a runner too slow to
    # fit gets fewer runs or decode tokens, and its row says so ("shortened"); a fast one is never cut.
    budget_s: float = 30.0

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")


@dataclass(frozen=True)
class BenchJob:
    """Everything a fresh process needs to open one runner the way validation does."""

    spec: RunnerSpec
    artifacts_root: str
    slug: str
    model_id: str
    weight_sha256: str
    settings: BenchSettings
    model_path: str = ""  # the GGUF file or Hugging Face folder a baseline opens; "" for our runners
    revision: str | None = None  # the hub revision of model_id, if one was asked for

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "spec": self.spec.to_dict()})

    @classmethod
    def from_json(cls, text: str) -> "BenchJob":
        from validation.runners import RunnerSpec

        data = json.loads(text)
        return cls(**{**data, "spec": RunnerSpec.from_dict(data["spec"]),
                      "settings": BenchSettings(**data["settings"])})


def prompt_ids(length: int, vocab_size: int) -> list[int]:
    """A fixed prompt of ordinary tokens (no control tokens), the same for every runner."""
    span = vocab_size - FIRST_ORDINARY_TOKEN
    return [FIRST_ORDINARY_TOKEN + (index * 7919) % span for index in range(length)]


def median_seconds(action: Callable[[], None], repeats: int, budget_s: float) -> tuple[float, int]:
    """(median seconds of the timed runs, how many ran): `repeats` after the warm-up, fewer where the warm-up
    says they would not fit `budget_s` (never fewer than one)."""
    started = time.perf_counter()
    action()  # the warm-up, not counted
    fitting = fitting_runs(time.perf_counter() - started, repeats, budget_s)
    seconds = []
    for _ in range(fitting):
        started = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), fitting


def fitting_runs(one_run_s: float, repeats: int, budget_s: float) -> int:
    return max(1, min(repeats, int(budget_s / one_run_s))) if one_run_s > 0 else repeats


def time_to_first_token(runner: Runner, settings: BenchSettings) -> tuple[float, int]:
    ids = prompt_ids(settings.ttft_prompt_tokens, runner.vocab_size)
    return median_seconds(lambda: int(runner.prefill(ids).argmax()), settings.repeats, settings.budget_s)


def prefill_tokens_per_second(runner: Runner, length: int, settings: BenchSettings) -> tuple[float, int]:
    ids = prompt_ids(length, runner.vocab_size)
    seconds, runs = median_seconds(lambda: runner.prefill(ids), settings.repeats, settings.budget_s)
    return length / seconds, runs


def decode_tokens_per_second(runner: Runner, settings: BenchSettings) -> tuple[float, int, int]:
    """(tok/s, tokens per run, timed runs): greedy decode after a short prompt, the prefill outside the timed
    part. A few tokens warm it up, a few more measure how many fit the budget: `decode_tokens` per run and
    `repeats` runs where they fit, fewer (at least DECODE_PROBE_TOKENS in one run) where they do not."""
    ids = prompt_ids(settings.ttft_prompt_tokens, runner.vocab_size)

    def run(tokens: int) -> float:
        token = int(runner.prefill(ids).argmax())
        started = time.perf_counter()
        for _ in range(tokens):
            token = int(runner.decode(token).argmax())
        return time.perf_counter() - started

    probe = min(settings.decode_tokens, DECODE_PROBE_TOKENS)
    run(probe)  # the warm-up: a runtime's first steps can compile or plan (torch.compile, TorchScript)
    per_token = run(probe) / probe
    fitting_tokens = int(settings.budget_s / per_token) if per_token > 0 else settings.decode_tokens
    tokens = max(probe, min(settings.decode_tokens, fitting_tokens))
    runs = fitting_runs(per_token * tokens, settings.repeats, settings.budget_s)
    return statistics.median(tokens / run(tokens) for _ in range(runs)), tokens, runs


def run_job(job: BenchJob) -> dict[str, Any]:
    """Open and measure one of our runners in this process (reading our weights or bundle is not timed)."""
    from model.loading import load
    from validation.runners import BACKENDS, load_bundles, make_runner, set_thread_count

    settings = job.settings
    set_thread_count(settings.threads)
    backend = BACKENDS[job.spec.backend]
    model = load(job.model_id, revision=job.revision).model if backend.bundle_format is None else None
    # bench_all's caller verified every file's sha256 before starting this process (prepare): hashing a
    # format's whole bundle again in each runner's process would cost more than measuring some runners.
    bundles, problems = ({}, []) if model is not None else load_bundles(
        Path(job.artifacts_root), job.slug, [backend.bundle_format], job.weight_sha256, verify=False)
    if problems:
        raise RuntimeError(problems[0].reason)
    started = time.perf_counter()
    runner = make_runner(job.spec, bundles, model, threads=settings.threads)
    return measure(runner, settings, load_seconds=time.perf_counter() - started)


def baseline_context_tokens(settings: BenchSettings) -> int:
    """Room enough that `measure` runs the full prefill length (it leaves the TTFT prompt and decode room)."""
    return settings.prefill_tokens + settings.ttft_prompt_tokens + settings.decode_tokens


def run_baseline_job(data: dict[str, Any]) -> dict[str, Any]:
    """Open and measure a baseline (a BenchJob's JSON, read without our runners' modules) in this process; its
    load time is all of its own reading of the model."""
    settings = BenchSettings(**data["settings"])
    import_runtime(data["spec"]["backend"])
    started = time.perf_counter()
    runner = open_baseline(data["spec"], Path(data["model_path"]), baseline_context_tokens(settings),
                           settings.threads)
    return measure(runner, settings, load_seconds=time.perf_counter() - started)


def measure(runner: Runner, settings: BenchSettings, load_seconds: float) -> dict[str, Any]:
    room = runner.context_tokens - settings.decode_tokens - settings.ttft_prompt_tokens
    prefill_length = max(1, min(settings.prefill_tokens, room))
    ttft, ttft_runs = time_to_first_token(runner, settings)
    prefill, prefill_runs = prefill_tokens_per_second(runner, prefill_length, settings)
    decode, decode_tokens, decode_runs = decode_tokens_per_second(runner, settings)
    measured = {"load_seconds": load_seconds, "time_to_first_token_seconds": ttft,
                "prefill_tokens": prefill_length, "prefill_tokens_per_second": prefill,
                "decode_tokens": decode_tokens, "decode_tokens_per_second": decode,
                "size_bytes": runner.size_bytes, "weight_bytes_per_token": runner.weight_bytes_per_token,
                "threads": settings.threads or os.cpu_count(),
                "peak_rss_bytes": peak_rss_bytes() + child_peak_rss_bytes(runner)}
    shortened = shortened_measurements(settings, ttft_runs, prefill_runs, decode_tokens, decode_runs)
    return {**measured, "shortened": shortened} if shortened else measured


def shortened_measurements(settings: BenchSettings, ttft_runs: int, prefill_runs: int, decode_tokens: int,
                           decode_runs: int) -> list[str]:
    """What the budget cut, in words for the report: a slow runner's numbers rest on fewer runs or tokens."""
    cut = [f"{name}: {runs} of {settings.repeats} timed runs"
           for name, runs in (("TTFT", ttft_runs), ("prefill", prefill_runs), ("decode", decode_runs))
           if runs < settings.repeats]
    if decode_tokens < settings.decode_tokens:
        cut.append(f"decode: {decode_tokens} of {settings.decode_tokens} tokens per run")
    return cut


def child_peak_rss_bytes(runner: Any) -> int:
    """A runtime in a child process of its own (transformers.js under node) adds that process's peak; runners
    without a decoder (the baselines) have none."""
    decoder = getattr(runner, "decoder", None)
    return decoder.child_peak_rss_bytes() if hasattr(decoder, "child_peak_rss_bytes") else 0


def run_job_in_subprocess(job: BenchJob) -> dict[str, Any]:
    """`run_job` in a fresh interpreter; its last stdout line carries the result."""
    completed = subprocess.run([sys.executable, "-m", "validation.bench", "--one", job.to_json()],
                               capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
                               cwd=Path(__file__).resolve().parents[1])
    results = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not results:
        last_line = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"benchmark process exited with {completed.returncode}: {last_line}")
    return json.loads(results[-1].removeprefix(RESULT_PREFIX))


def with_ceiling(measured: dict[str, Any], bandwidth_bytes_per_second: float) -> dict[str, Any]:
    from validation.bandwidth import ceiling_tokens_per_second

    ceiling = ceiling_tokens_per_second(measured["weight_bytes_per_token"], bandwidth_bytes_per_second)
    return {**measured, "ceiling_tokens_per_second": ceiling,
            "percent_of_ceiling": 100 * measured["decode_tokens_per_second"] / ceiling}


def measure_jobs(jobs: Sequence[BenchJob], bandwidth: float,
                 on_runner: Callable[[str, bool], None] | None) -> list[dict[str, Any]]:
    """Each job in its own process, one row each, with `seconds` (the process's wall time, start to exit); a job
    that fails has its error in its row. `on_runner(name, finished)` is told when each starts and is done."""
    rows = []
    for job in jobs:
        if on_runner is not None:
            on_runner(job.spec.name, False)
        row: dict[str, Any] = {"runner": job.spec.name, **job.spec.to_dict()}
        started = time.perf_counter()
        try:
            row.update(with_ceiling(run_job_in_subprocess(job), bandwidth))
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            row["error"] = str(error)
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        if on_runner is not None:
            on_runner(job.spec.name, True)
    return rows


def bench_all(jobs: Sequence[BenchJob], bandwidth_megabytes: int = 1024,
              on_runner: Callable[[str, bool], None] | None = None,
              baseline_jobs: Sequence[BenchJob] = ()) -> dict[str, Any]:
    """Measure the read bandwidth once, then each runner and each baseline in its own process, `rounds` times
    (the jobs' settings); every runner row gets `vs_baselines`, its ratio to each baseline that was measured."""
    from validation.bandwidth import measure_read_bandwidths

    bandwidths = measure_read_bandwidths(bandwidth_megabytes)
    bandwidth = max(bandwidths.values())
    every_job = [*jobs, *baseline_jobs]
    settings = every_job[0].settings if every_job else BenchSettings()
    rounds = [measure_round(jobs, baseline_jobs, bandwidth, on_runner, reverse=index % 2 == 1)
              for index in range(settings.rounds)]
    rows = [combine_rounds([runners[index] for runners, _ in rounds]) for index in range(len(jobs))]
    baselines = [combine_rounds([measured[index] for _, measured in rounds]) for index in range(len(baseline_jobs))]
    return {"read_bandwidth_bytes_per_second": bandwidth, "bandwidth_buffer_megabytes": bandwidth_megabytes,
            "read_bandwidth_by_kernel": bandwidths,
            "settings": asdict(settings) if every_job else {}, "runners": rows, "baselines": baselines}


def measure_round(jobs: Sequence[BenchJob], baseline_jobs: Sequence[BenchJob], bandwidth: float,
                  on_runner: Callable[[str, bool], None] | None,
                  reverse: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every runner and baseline once → (runner rows with their ratios, baseline rows). Every other round runs
    in reverse order, so the runner measured just before a baseline in one round is measured just after it in
    the next, and a machine's load that drifts during a run does not favour one side of a ratio."""
    order = [*jobs, *baseline_jobs]
    measured = measure_jobs(order[::-1] if reverse else order, bandwidth, on_runner)
    if reverse:
        measured.reverse()
    runners, baselines = measured[:len(jobs)], measured[len(jobs):]
    add_ratios(runners, baselines)
    return runners, baselines


# Timings: the median over the rounds; peak RSS: the highest; the rest (sizes, token counts) is the same in each.
MEDIAN_OVER_ROUNDS = ("load_seconds", "time_to_first_token_seconds", "prefill_tokens_per_second",
                      "decode_tokens_per_second", "ceiling_tokens_per_second", "percent_of_ceiling")


def combine_rounds(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One runner's (or baseline's) rows from every round → one row. A ratio to a baseline is the median of the
    rounds' ratios, each of two numbers measured minutes apart, not the ratio of medians taken a run apart. A
    round that failed fails the row with its error: a runner that crashes once in three is not fine."""
    failed = [row for row in rounds if "error" in row]
    if failed:
        return {**failed[0], "rounds": len(rounds), "failed_rounds": len(failed)}
    combined = {**rounds[0], "rounds": len(rounds)}
    for metric in MEDIAN_OVER_ROUNDS:
        if metric in combined:
            combined[metric] = statistics.median(row[metric] for row in rounds)
    if "peak_rss_bytes" in combined:
        combined["peak_rss_bytes"] = max(row["peak_rss_bytes"] for row in rounds)
    if "seconds" in combined:  # what the runner cost the whole bench: every round's process
        combined["seconds"] = sum(row["seconds"] for row in rounds)
    if len(rounds) > 1:
        combined["decode_tokens_per_second_by_round"] = [row["decode_tokens_per_second"] for row in rounds]
    # Ratios only to baselines measured in every round (a baseline that failed a round fails its own row).
    every_round = [name for name in combined.pop("vs_baselines", {})
                   if all(name in row.get("vs_baselines", {}) for row in rounds)]
    if every_round:
        combined["vs_baselines"] = {name: median_ratios([row["vs_baselines"][name] for row in rounds])
                                    for name in every_round}
    return combined


def median_ratios(ratios_by_round: Sequence[dict[str, float | None]]) -> dict[str, float | None]:
    """Each metric's median over the rounds that have a number for it (None where none has)."""
    result = {}
    for metric in ratios_by_round[0]:
        values = [ratios[metric] for ratios in ratios_by_round if ratios.get(metric) is not None]
        result[metric] = statistics.median(values) if values else None
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Benchmark one runner (used by `gemma-export bench`).")
    parser.add_argument("--one", required=True, help="a BenchJob as JSON")
    text = parser.parse_args(argv).one
    data = json.loads(text)
    measured = (run_baseline_job(data) if data["spec"]["backend"] in BASELINE_CHOICES
                else run_job(BenchJob.from_json(text)))
    print(RESULT_PREFIX + json.dumps(measured), flush=True)


if __name__ == "__main__":
    main()
