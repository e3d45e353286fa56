"""`gemma-export bench --rounds N`: every runner and baseline is measured N times, in alternating order, and the
report holds the medians, the highest peak RSS and, per baseline, the median of each round's ratio. The runner
processes are replaced by scripted numbers: what is tested is the bookkeeping, not the speed of a machine."""

from __future__ import annotations

import pytest

import validation.bandwidth
import validation.bench
from validation.bench import BenchJob, BenchSettings, bench_all
from validation.report import BASELINE_NOTE, baseline_note
from validation.runners import RunnerSpec

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
    monkeypatch.setattr(validation.bandwidth, "measure_read_bandwidth", lambda megabytes: 1e5)
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
