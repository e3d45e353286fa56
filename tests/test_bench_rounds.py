"""`gemma-export bench --rounds N`: every runner and baseline is measured N times, in alternating order, and the
report holds the medians, the highest peak RSS and, per baseline, the median of each round's ratio. The runner
processes are replaced by scripted numbers: what is tested is the bookkeeping, not the speed of a machine."""

from __future__ import annotations

import numpy as np
import pytest

import validation.bandwidth
import validation.bench
from validation.bench import BenchJob, BenchSettings, bench_all
from validation.report import BASELINE_NOTE, baseline_note
from validation.pipeline import timed_specs
from validation.runners import RunnerSpec, Selection

RUNNER = RunnerSpec("onnxruntime", "int4", "cpu")
BASELINE = RunnerSpec("llama.cpp", "Q4_K_M", "cpu")
# Per round, in the order the rounds run. Each round's ratio is 2.0, 1.25, 2.0 (median 2.0) while the ratio of
# the medians would be 50 / 30 = 1.67: the report must hold the former.
DECODE = {RUNNER.name: [40.0, 50.0, 60.0], BASELINE.name: [20.0, 40.0, 30.0]}
PEAK_RSS = {RUNNER.name: [3e8, 5e8, 4e8], BASELINE.name: [2e8, 2e8, 2e8]}
TTFT = {RUNNER.name: [0.05, 0.07, 0.06], BASELINE.name: [0.1, 0.1, 0.1]}
FAILING_ROUNDS: dict[str, tuple[int, ...]] = {}  # runner name → rounds (0-based) whose process fails


def job(spec: RunnerSpec, rounds: int) -> BenchJob:
    settings = BenchSettings(threads=1, decode_tokens=4, repeats=1, rounds=rounds)
    return BenchJob(spec, "artifacts", "slug", "model", "0" * 64, settings)


@pytest.fixture
def scripted(monkeypatch):
    """Replace the measuring processes by the numbers above; returns the runner names in the order measured."""
    calls: list[str] = []

    def run_job_in_subprocess(measured_job: BenchJob) -> dict:
        name = measured_job.spec.name
        index = calls.count(name)
        calls.append(name)
        if index in FAILING_ROUNDS.get(name, ()):
            raise RuntimeError(f"benchmark process exited with 1: {name} crashed")
        return {"load_seconds": 1.0 + index, "time_to_first_token_seconds": TTFT[name][index],
                "prefill_tokens": 16, "prefill_tokens_per_second": 100.0 * (index + 1),
                "decode_tokens": 4, "decode_tokens_per_second": DECODE[name][index],
                "size_bytes": 1000, "weight_bytes_per_token": 1000, "threads": 1,
                "peak_rss_bytes": PEAK_RSS[name][index]}

    FAILING_ROUNDS.clear()
    monkeypatch.setattr(validation.bench, "run_job_in_subprocess", run_job_in_subprocess)
    monkeypatch.setattr(validation.bandwidth, "measure_read_bandwidths", lambda megabytes: {"scripted": 1e5})
    return calls


def test_rounds_alternate_and_report_medians_and_the_median_ratio(scripted):
    measured = bench_all([job(RUNNER, 3)], 16, baseline_jobs=[job(BASELINE, 3)])
    assert scripted == [RUNNER.name, BASELINE.name, BASELINE.name, RUNNER.name, RUNNER.name, BASELINE.name]
    [row], [baseline] = measured["runners"], measured["baselines"]
    assert row["rounds"] == 3 and measured["settings"]["rounds"] == 3
    assert row["decode_tokens_per_second"] == 50.0 and baseline["decode_tokens_per_second"] == 30.0
    assert row["decode_tokens_per_second_by_round"] == [40.0, 50.0, 60.0]
    assert row["time_to_first_token_seconds"] == pytest.approx(0.06)
    assert row["peak_rss_bytes"] == 5e8  # the highest, not the median
    assert row["percent_of_ceiling"] == pytest.approx(100 * 50.0 / 100.0)  # ceiling: 1e5 B/s ÷ 1000 B/token
    ratios = row["vs_baselines"][BASELINE.name]
    assert ratios["decode_tokens_per_second"] == pytest.approx(2.0)  # median of 2.0, 1.25, 2.0; not 50/30
    assert ratios["time_to_first_token_seconds"] == pytest.approx(0.6)  # median of 0.5, 0.7, 0.6
    assert ratios["peak_rss_bytes"] == pytest.approx(2.0)  # median of 1.5, 2.5, 2.0


def test_one_round_is_the_plain_measurement(scripted):
    measured = bench_all([job(RUNNER, 1)], 16, baseline_jobs=[job(BASELINE, 1)])
    assert scripted == [RUNNER.name, BASELINE.name]
    [row] = measured["runners"]
    assert row["decode_tokens_per_second"] == 40.0 and row["peak_rss_bytes"] == 3e8
    assert "decode_tokens_per_second_by_round" not in row
    assert row["vs_baselines"][BASELINE.name]["decode_tokens_per_second"] == pytest.approx(2.0)


def test_a_round_that_fails_fails_the_row_with_its_error(scripted):
    FAILING_ROUNDS[BASELINE.name] = (1,)
    measured = bench_all([job(RUNNER, 3)], 16, baseline_jobs=[job(BASELINE, 3)])
    [row], [baseline] = measured["runners"], measured["baselines"]
    assert baseline["error"].endswith("llama.cpp Q4_K_M cpu crashed") and baseline["failed_rounds"] == 1
    # No ratio to a baseline that did not measure in every round; the runner's own numbers stand.
    assert "vs_baselines" not in row and "error" not in row and row["decode_tokens_per_second"] == 50.0


def test_report_says_how_many_rounds_the_numbers_are_medians_of():
    assert baseline_note({"bench": {"settings": {"rounds": 1}}}) == BASELINE_NOTE
    assert baseline_note({"bench": {}}) == BASELINE_NOTE  # bench.json written before --rounds existed
    assert "Medians of 3 rounds" in baseline_note({"bench": {"settings": {"rounds": 3}}})


def test_zero_rounds_is_refused():
    with pytest.raises(ValueError, match="rounds must be at least 1"):
        BenchSettings(rounds=0)


# ------------------------------------------------------------------------------------- the time budget

class PacedRunner:
    """A runner whose prefill and decode take a fixed time on a counter that stands for bench's clock: what the
    budget cuts is decided from the warm-up's speed, so the counts here are exact."""

    vocab_size, context_tokens, size_bytes, weight_bytes_per_token = 32, 4096, 1000, 1000

    def __init__(self, monkeypatch, prefill_s: float, decode_s: float) -> None:
        self.clock, self.prefill_s, self.decode_s = 0.0, prefill_s, decode_s
        self.prefills = self.decodes = 0
        monkeypatch.setattr(validation.bench.time, "perf_counter", lambda: self.clock)

    def prefill(self, ids) -> np.ndarray:
        self.clock += self.prefill_s
        self.prefills += 1
        return np.zeros(self.vocab_size)

    def decode(self, token) -> np.ndarray:
        self.clock += self.decode_s
        self.decodes += 1
        return np.zeros(self.vocab_size)


def test_a_fast_runner_is_measured_in_full(monkeypatch):
    runner = PacedRunner(monkeypatch, prefill_s=0.01, decode_s=0.001)
    settings = BenchSettings(decode_tokens=256, repeats=3, budget_s=30.0)
    measured = validation.bench.measure(runner, settings, load_seconds=1.0)
    assert "shortened" not in measured
    assert measured["decode_tokens"] == 256 and measured["decode_tokens_per_second"] == pytest.approx(1000.0)
    # TTFT and prefill: a warm-up and 3 timed prefills each; decode: a 16-token warm-up, a 16-token probe of its
    # speed, then 3 runs of 256 (each run after its own prefill).
    assert runner.decodes == 2 * 16 + 3 * 256 and runner.prefills == 4 + 4 + 2 + 3


def test_a_slow_runner_is_cut_to_the_budget_and_says_so(monkeypatch):
    runner = PacedRunner(monkeypatch, prefill_s=4.0, decode_s=0.5)
    settings = BenchSettings(decode_tokens=256, repeats=3, budget_s=10.0)
    measured = validation.bench.measure(runner, settings, load_seconds=1.0)
    # Prefill: 4 s a run, 2 runs fit 10 s. Decode: 0.5 s a token, 20 tokens fit, in one run.
    assert measured["decode_tokens"] == 20 and measured["decode_tokens_per_second"] == pytest.approx(2.0)
    assert measured["time_to_first_token_seconds"] == pytest.approx(4.0)
    assert measured["shortened"] == ["TTFT: 2 of 3 timed runs", "prefill: 2 of 3 timed runs",
                                     "decode: 1 of 3 timed runs", "decode: 20 of 256 tokens per run"]
    assert runner.decodes == 2 * 16 + 20


def test_the_slowest_runner_still_gets_one_run_of_the_probe_length(monkeypatch):
    runner = PacedRunner(monkeypatch, prefill_s=100.0, decode_s=10.0)
    measured = validation.bench.measure(runner, BenchSettings(decode_tokens=256, repeats=3, budget_s=10.0), 1.0)
    assert measured["decode_tokens"] == validation.bench.DECODE_PROBE_TOKENS
    assert measured["decode_tokens_per_second"] == pytest.approx(0.1)
    assert "prefill: 1 of 3 timed runs" in measured["shortened"]


def test_a_runner_slow_only_in_its_first_steps_is_not_cut(monkeypatch):
    """torch.compile and TorchScript spend their first decode steps compiling: the warm-up absorbs that, and the
    speed that sets the budget is measured after it."""
    runner = PacedRunner(monkeypatch, prefill_s=0.01, decode_s=0.001)
    fast_decode = runner.decode

    def decode(token):
        if runner.decodes < validation.bench.DECODE_PROBE_TOKENS:
            runner.clock += 5.0  # compiling
        return fast_decode(token)

    runner.decode = decode
    measured = validation.bench.measure(runner, BenchSettings(decode_tokens=256, repeats=3, budget_s=30.0), 1.0)
    assert measured["decode_tokens"] == 256 and "shortened" not in measured


def test_the_mil_interpreter_is_timed_only_when_asked_for_by_name():
    """Bench leaves the numpy MIL interpreter out by default (its numerics are validation's; its speed is not
    Core ML's) and lists it as skipped with how to ask for it; `--backends coreml-mil` measures it."""
    specs = [RunnerSpec("onnxruntime", "int4", "cpu"), RunnerSpec("coreml-mil", "int4", "numpy")]
    timed, untimed = timed_specs(specs, Selection())
    assert timed == specs[:1]
    assert [entry.runner for entry in untimed] == ["coreml-mil int4 numpy"]
    assert "--backends coreml-mil" in untimed[0].reason
    assert timed_specs(specs, Selection(backends=("coreml-mil", "onnxruntime"))) == (specs, [])
