"""Does each runner compute what the reference computes? Step by step, on the same prompts.

The reference (PyTorch eager, fp32) generates greedily and so decides the tokens. Each runner is then fed
those same tokens (teacher forcing), so step k of every runner sees the same context and its logits can be
compared with the reference's step k: max and mean |Δlogit|, cosine, KL(ref ‖ run), top-1 agreement, top-5
overlap, NaN/Inf. Each runner also generates greedily on its own, and the report says for how many steps
its tokens stay identical to the reference's. The held-out text is teacher-forced too (in one prefill where the
runtime answers every position's logits, else token by token): its steps join the prompts' in the gate (≥ 512
steps by default), and give each runner's perplexity.

Pass/fail floors live in one table per precision (`THRESHOLDS`); a verdict names the criterion that failed.
Mean KL divergence to the reference is the main number, as quantization is judged: top-1 agreement moves by
whole steps on near-tied logits, KL by how much probability moved.
"""

from __future__ import annotations

import gc
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from model.config import PRESETS, Gemma3Config
from model.errors import UserError
from model.interrupts import raise_if_interrupted
from model.tokenizer import GemmaTokenizer
from validation.runners import Runner, RunnerSpec, teacher_forced_logits, twin_spec

PROMPTS_FILE = Path(__file__).with_name("prompts.json")
HELDOUT_FILE = Path(__file__).with_name("heldout.txt")
HELDOUT_MAX_TOKENS = 512
TOP_K_OVERLAP = 5
# fp32 exports do the same arithmetic as the reference, in another order: a toy-sized model's logits agree to
# 1e-3; a real one's (hidden 640+, 18+ layers, logits ~±30) accumulate more rounding.
FP32_MAX_LOGIT_DIFF = {"tiny": 1e-3, "real": 5e-3}


@dataclass(frozen=True)
class Thresholds:
    """A runner passes when every criterion that is set holds; NaN/Inf logits always fail."""

    max_abs_logit_diff: float | None = None
    min_top1_agreement: float | None = None  # fraction of teacher-forced steps with the reference's top-1
    greedy_identical: bool = False  # its own greedy run must equal the reference's on every prompt
    max_mean_kl_divergence: float | None = None  # mean over the teacher-forced steps of KL(reference ‖ run)


THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(greedy_identical=True),  # and FP32_MAX_LOGIT_DIFF of the model's scale (thresholds_for)
    "bf16": Thresholds(min_top1_agreement=0.99, max_mean_kl_divergence=0.001),
    "fp16": Thresholds(min_top1_agreement=0.99, max_mean_kl_divergence=0.001),
    "int8": Thresholds(min_top1_agreement=0.97, max_mean_kl_divergence=0.01),
    "int4": Thresholds(min_top1_agreement=0.92, max_mean_kl_divergence=0.02),
}


# A toy-sized model with random weights has no confident predictions: its top two logits are often closer
# than any rounding moves them, so its top-1 agreement is noise (how much moves with the bits and the CPU's
# kernels; measured in BENCHMARKS.md) while its KL stays far below the real floors. Its top-1 floor only
# catches a broken export (which agrees on ~1/vocab of steps); KL keeps the table's floors.
TOY_MIN_TOP1_AGREEMENT = {"bf16": 0.5, "fp16": 0.5, "int8": 0.5, "int4": 0.25}


def model_scale(config: Gemma3Config) -> str:
    return "tiny" if config.hidden_size <= PRESETS["tiny"].hidden_size else "real"


def thresholds_for(precision: str, config: Gemma3Config, max_abs_logit_diff: float | None = None,
                   min_top1_agreement: float | None = None) -> Thresholds:
    """The table's floors for `precision` on this model, with the CLI's overrides (None keeps the table's)."""
    base = THRESHOLDS.get(precision, Thresholds())
    if precision == "fp32":
        base = replace(base, max_abs_logit_diff=FP32_MAX_LOGIT_DIFF[model_scale(config)])
    if model_scale(config) == "tiny" and precision in TOY_MIN_TOP1_AGREEMENT:
        base = replace(base, min_top1_agreement=TOY_MIN_TOP1_AGREEMENT[precision])
    if max_abs_logit_diff is not None:
        base = replace(base, max_abs_logit_diff=max_abs_logit_diff)
    if min_top1_agreement is not None:
        base = replace(base, min_top1_agreement=min_top1_agreement)
    return base


# ------------------------------------------------------------------------------------------------ prompts

@dataclass(frozen=True)
class Prompt:
    name: str
    ids: list[int]
    crosses_window: bool  # longer than the model's sliding window


def load_prompts(tokenizer: GemmaTokenizer, config: Gemma3Config, max_new_tokens: int,
                 path: Path = PROMPTS_FILE) -> list[Prompt]:
    """prompts.json tokenized with this model's tokenizer, each cut to leave room for `max_new_tokens`."""
    room = config.context_length - max_new_tokens
    prompts = []
    for entry in json.loads(path.read_text(encoding="utf-8"))["prompts"]:
        text = entry["text"] if "text" in entry else tokenizer.apply_chat_template(entry["messages"])
        ids = tokenizer.encode(text)[:room]
        prompts.append(Prompt(entry["name"], ids, len(ids) > config.sliding_window))
    return prompts


def load_heldout(tokenizer: GemmaTokenizer, max_tokens: int = HELDOUT_MAX_TOKENS,
                 path: Path = HELDOUT_FILE) -> list[int]:
    """The held-out text's first `max_tokens` tokens: each runner is teacher-forced through them."""
    return tokenizer.encode(path.read_text(encoding="utf-8"))[:max_tokens]


def runner_max_length(prompts: Sequence[Prompt], heldout_ids: Sequence[int], max_new_tokens: int) -> int:
    """The longest sequence a compared runner is asked for: a prompt with its greedy tokens, or the held-out text."""
    return max(max(len(prompt.ids) for prompt in prompts) + max_new_tokens, len(heldout_ids))


# ---------------------------------------------------------------------------------------------- reference

@dataclass
class ReferenceRun:
    prompt: Prompt
    tokens: list[int]  # the reference's greedy tokens
    step_logits: list[np.ndarray]  # step k: logits from which tokens[k] was chosen


# A runner's own greedy tokens on a prompt, and its logits at every step of the reference's tokens.
PromptRun = tuple[list[int], list[np.ndarray]]


@dataclass
class HeldoutRun:
    ids: list[int]
    step_logits: list[np.ndarray]  # step k: the reference's logits that predict ids[k + 1]
    perplexity: float  # the reference's, computed once for every runner's ratio


def greedy_run(runner: Runner, prompt_ids: Sequence[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and each step's logits (no stop tokens: every step of every runner is comparable)."""
    logits = [runner.prefill(prompt_ids)]
    tokens = [int(logits[-1].argmax())]
    while len(tokens) < steps:
        logits.append(runner.decode(tokens[-1]))
        tokens.append(int(logits[-1].argmax()))
    return tokens, logits


def greedy_and_forced(runner: Runner, prompt_ids: Sequence[int],
                      reference_tokens: Sequence[int]) -> tuple[list[int], list[np.ndarray]]:
    """The runner's own greedy tokens, and its teacher-forced logits at every step of `reference_tokens`.

    One pass where they agree: while its greedy tokens equal the reference's, each greedy step saw the
    reference's context, so its logits are the teacher-forced ones. Only after the first divergence does it
    run again, from a prefill of the prompt plus the reference's tokens up to there. (Two full passes cost
    twice the time of every runner, and minutes for a slow one like the numpy MIL runner.)"""
    own_tokens, logits = greedy_run(runner, prompt_ids, len(reference_tokens))
    agreeing = matching_prefix(own_tokens, reference_tokens)
    if agreeing + 1 < len(reference_tokens):
        resumed_prompt = [*prompt_ids, *reference_tokens[:agreeing + 1]]
        logits = logits[:agreeing + 1] + teacher_forced_logits(runner, resumed_prompt, reference_tokens[agreeing + 1:])
    return own_tokens, logits


def reference_runs(reference: Runner, prompts: Sequence[Prompt], steps: int) -> list[ReferenceRun]:
    return [ReferenceRun(prompt, *greedy_run(reference, prompt.ids, steps)) for prompt in prompts]


# ------------------------------------------------------------------------------------------------ metrics

def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.asarray(logits, dtype=np.float64) - logits.max()
    return shifted - np.log(np.exp(shifted).sum())


def top_k_ids(logits: np.ndarray, k: int) -> set[int]:
    """The ids of the k largest logits (a partition, not a sort: every runner's every step pays for this)."""
    return set(np.argpartition(logits, -k)[-k:].tolist())


def step_metrics(reference: np.ndarray, run: np.ndarray) -> dict[str, float]:
    """How far one step's logits are from the reference's. Non-finite logits make the distances NaN."""
    reference64, run64 = reference.astype(np.float64), run.astype(np.float64)
    difference = np.abs(reference64 - run64)
    norms = float(np.linalg.norm(reference) * np.linalg.norm(run))
    reference_log, run_log = log_softmax(reference64), log_softmax(run64)
    top_reference, top_run = top_k_ids(reference, TOP_K_OVERLAP), top_k_ids(run, TOP_K_OVERLAP)
    return {
        "max_abs_logit_diff": float(difference.max()),
        "mean_abs_logit_diff": float(difference.mean()),
        "cosine": float(reference64 @ run64 / norms) if norms else float("nan"),
        "kl_divergence": float((np.exp(reference_log) * (reference_log - run_log)).sum()),
        "top1_agrees": bool(reference.argmax() == run.argmax()),
        "top5_overlap": len(top_reference & top_run) / TOP_K_OVERLAP,
        "nonfinite_logits": int((~np.isfinite(run)).sum()),
    }


def matching_prefix(tokens: Sequence[int], reference: Sequence[int]) -> int:
    """Number of leading steps at which the two greedy runs chose the same token."""
    for step, (mine, theirs) in enumerate(zip(tokens, reference)):
        if mine != theirs:
            return step
    return min(len(tokens), len(reference))


def perplexity(step_logits: Sequence[np.ndarray], ids: Sequence[int]) -> float:
    """exp(mean negative log-likelihood) of ids[1:], step k's logits predicting ids[k + 1]."""
    total = -sum(float(log_softmax(logits)[token]) for logits, token in zip(step_logits, ids[1:]))
    return math.exp(total / (len(ids) - 1))


# ---------------------------------------------------------------------------------------------- comparison

def compare_prompt(runner: Runner, reference: ReferenceRun) -> dict[str, Any]:
    return prompt_row(reference, *greedy_and_forced(runner, reference.prompt.ids, reference.tokens))


def prompt_row(reference: ReferenceRun, own_tokens: list[int], forced: Sequence[np.ndarray]) -> dict[str, Any]:
    steps = [step_metrics(theirs, mine) for theirs, mine in zip(reference.step_logits, forced)]
    return {"prompt": reference.prompt.name, "prompt_tokens": len(reference.prompt.ids),
            "crosses_window": reference.prompt.crosses_window, "steps": steps,
            "greedy_match_steps": matching_prefix(own_tokens, reference.tokens),
            "greedy_tokens": own_tokens, "reference_tokens": reference.tokens}


def summarize(prompts: Sequence[dict[str, Any]], heldout_steps: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Every teacher-forced step of the prompts and of the held-out text together. numpy's max/min/mean keep a
    NaN (a runner with NaN logits), where Python's max() would skip it depending on the order."""
    steps = [*(step for prompt in prompts for step in prompt["steps"]), *heldout_steps]

    def values(name: str) -> np.ndarray:
        return np.array([step[name] for step in steps], dtype=np.float64)

    return {
        "teacher_forced_steps": len(steps),
        "max_abs_logit_diff": float(values("max_abs_logit_diff").max()),
        "mean_abs_logit_diff": float(values("mean_abs_logit_diff").mean()),
        "min_cosine": float(values("cosine").min()),
        "max_kl_divergence": float(values("kl_divergence").max()),
        "mean_kl_divergence": float(values("kl_divergence").mean()),
        "top1_agreement": float(values("top1_agrees").mean()),
        "top5_overlap": float(values("top5_overlap").mean()),
        "nonfinite_logits": sum(step["nonfinite_logits"] for step in steps),
        "greedy_match_steps": min(prompt["greedy_match_steps"] for prompt in prompts),
        "greedy_steps": min(len(prompt["reference_tokens"]) for prompt in prompts),
    }


def failures(summary: dict[str, Any], prompts: Sequence[dict[str, Any]], thresholds: Thresholds) -> list[str]:
    """Each failed criterion, named with the measured value and the limit."""
    found = []
    if summary["nonfinite_logits"]:
        found.append(f"{summary['nonfinite_logits']} NaN/Inf logits")
    limit = thresholds.max_abs_logit_diff
    # `not <=` so that a NaN difference fails too.
    if limit is not None and not summary["max_abs_logit_diff"] <= limit:
        found.append(f"max |Δlogit| {summary['max_abs_logit_diff']:.3g} > {limit:.3g}")
    limit = thresholds.max_mean_kl_divergence
    if limit is not None and not summary["mean_kl_divergence"] <= limit:
        found.append(f"mean KL {summary['mean_kl_divergence']:.3g} > {limit:.3g}")
    floor = thresholds.min_top1_agreement
    if floor is not None and not summary["top1_agreement"] >= floor:
        found.append(f"top-1 agreement {summary['top1_agreement']:.1%} < {floor:.0%}")
    if thresholds.greedy_identical:
        for prompt in prompts:
            if prompt["greedy_match_steps"] < len(prompt["reference_tokens"]):
                found.append(f"greedy run leaves the reference at step {prompt['greedy_match_steps']} of "
                             f"{len(prompt['reference_tokens'])} (prompt {prompt['prompt']!r})")
    return found


def compare_heldout(runner: Runner, heldout: HeldoutRun) -> tuple[list[dict[str, Any]], float]:
    """Step metrics against the reference over the held-out text, and the runner's perplexity on it."""
    logits = runner.teacher_forced(heldout.ids)
    steps = [step_metrics(theirs, mine) for theirs, mine in zip(heldout.step_logits, logits)]
    return steps, perplexity(logits, heldout.ids)


def compare_runner(runner: Runner, references: Sequence[ReferenceRun], heldout: HeldoutRun,
                   thresholds: Thresholds) -> dict[str, Any]:
    return compare_runner_keeping_runs(runner, references, heldout, thresholds)[0]


def compare_runner_keeping_runs(runner: Runner, references: Sequence[ReferenceRun], heldout: HeldoutRun,
                                thresholds: Thresholds) -> tuple[dict[str, Any], list[PromptRun]]:
    """The runner's row, and its own greedy tokens and teacher-forced logits on each prompt (for a twin)."""
    runs = [greedy_and_forced(runner, reference.prompt.ids, reference.tokens) for reference in references]
    prompts = [prompt_row(reference, *run) for reference, run in zip(references, runs)]
    heldout_steps, runner_perplexity = compare_heldout(runner, heldout)
    summary = summarize(prompts, heldout_steps)
    failed = failures(summary, prompts, thresholds)
    return {"runner": runner.name, **runner.spec.to_dict(), "verdict": "FAIL" if failed else "PASS",
            "failures": failed, "thresholds": asdict(thresholds), **summary,
            "perplexity": runner_perplexity,
            "perplexity_ratio": runner_perplexity / heldout.perplexity,
            "size_bytes": runner.size_bytes, "prompts": prompts, "heldout_steps": heldout_steps}, runs


# ---------------------------------------------------------------------------------------------------- twins
# A torch.export program and a TorchScript file traced from the same decoder (`Backend.twin_of`) run the same
# operations: where the twin's greedy tokens and every teacher-forced logit equal the first file's bit for bit
# on the probe prompt (prefill and decode both past the sliding window), judging every other step again would
# only repeat the first file's numbers. The row takes them and says so (`shortened`); any difference in a
# single bit, a NaN included, and the twin is judged on every step like any runner.

# Steps of the probe prompt a twin runs: its prefill and decode steps past the window, a fraction of the time.
TWIN_PROBE_STEPS = 8


def probe_index(references: Sequence[ReferenceRun]) -> int:
    return next((index for index, run in enumerate(references) if run.prompt.crosses_window), 0)


@dataclass
class TwinProbes:
    """`awaited`: the runners that a later runner is the twin of; `judged`: once one of them is judged, its row
    and probe run, kept until its twin is checked against them."""
    awaited: set[str] = field(default_factory=set)
    judged: dict[str, tuple[dict[str, Any], PromptRun]] = field(default_factory=dict)


def twin_row(judged: dict[str, Any], runner: Runner, probe: ReferenceRun) -> dict[str, Any]:
    return {**judged, "runner": runner.name, **runner.spec.to_dict(), "size_bytes": runner.size_bytes,
            "equal_to": judged["runner"],
            "shortened": [f"equals {judged['runner']} bit for bit on prompt {probe.prompt.name!r} (its first "
                          f"{len(probe.tokens)} greedy tokens and teacher-forced logits); its other steps are "
                          f"{judged['runner']}'s"]}


def compare_opened(open_runner: Callable[[], Runner], references: Sequence[ReferenceRun],
                   heldout: HeldoutRun, thresholds: Callable[[str], Thresholds],
                   twins: TwinProbes | None = None) -> dict[str, Any]:
    """Open one runner and compare it; the runner is garbage as soon as this returns. A runner whose twin is in
    `twins.judged` is first checked against it on the probe prompt."""
    runner = open_runner()
    twins = TwinProbes() if twins is None else twins
    index = probe_index(references)
    twin = twin_spec(runner.spec)
    if references and twin is not None and twin.name in twins.judged:
        judged, (tokens, logits) = twins.judged.pop(twin.name)
        probe = replace(references[index], tokens=references[index].tokens[:TWIN_PROBE_STEPS])
        own_tokens, forced = greedy_and_forced(runner, probe.prompt.ids, probe.tokens)
        if own_tokens == tokens[:len(probe.tokens)] and all(
                np.array_equal(mine, theirs) for mine, theirs in zip(forced, logits)):
            return twin_row(judged, runner, probe)
    row, runs = compare_runner_keeping_runs(runner, references, heldout, thresholds(runner.precision))
    if runner.name in twins.awaited:
        twins.judged[runner.name] = (row, runs[index])
    return row


def crashed_result(name: str, spec: dict[str, str], error: BaseException) -> dict[str, Any]:
    """A runner that raised while opening or running fails with the error as its reason."""
    reason = str(error) if isinstance(error, UserError) else f"crashed: {type(error).__name__}: {error}"
    return {"runner": name, **spec, "verdict": "FAIL", "failures": [reason], "prompts": []}


def compare_all(reference: Runner, open_runners: Iterable[tuple[str, dict[str, str], Callable[[], Runner]]],
                prompts: Sequence[Prompt], heldout_ids: Sequence[int], steps: int,
                thresholds: Callable[[str], Thresholds],
                on_runner: Callable[[str, bool], None] | None = None,
                open_baselines: Iterable[tuple[str, dict[str, str], Callable[[], Runner]]] = ()
                ) -> list[dict[str, Any]]:
    """The reference's own row (its perplexity, verdict "reference"), one compared row per runner, then one per
    baseline (`"baseline": True`, verdict "baseline": measured on the same tokens, judged by no floor). Each
    runner is opened only when its turn comes and dropped after, so one runtime's memory at a time. Every row
    has `seconds`, its wall time; `on_runner(name, finished)` is told when each starts and when it is done."""
    started = time.perf_counter()
    references = reference_runs(reference, prompts, steps)
    reference_logits = reference.teacher_forced(heldout_ids)
    heldout = HeldoutRun(list(heldout_ids), reference_logits, perplexity(reference_logits, heldout_ids))
    rows = [{"runner": reference.name, **reference.spec.to_dict(), "verdict": "reference", "failures": [],
             "perplexity": heldout.perplexity, "size_bytes": reference.size_bytes,
             "prompts": [{"prompt": run.prompt.name, "prompt_tokens": len(run.prompt.ids),
                          "crosses_window": run.prompt.crosses_window, "reference_tokens": run.tokens}
                         for run in references], "seconds": time.perf_counter() - started}]
    judged = [(name, spec, opener, thresholds, False) for name, spec, opener in open_runners]
    # The runners that a later runner is the twin of: their probe runs are kept until the twin is checked.
    names = {name for name, _, _, _, _ in judged}
    twins = TwinProbes({twin.name for twin in (twin_spec(RunnerSpec.from_dict(spec)) for _, spec, _, _, _ in judged)
                        if twin is not None and twin.name in names})
    unjudged = [(name, spec, opener, lambda precision: Thresholds(), True) for name, spec, opener in open_baselines]
    for name, spec, open_runner, floors, is_baseline in [*judged, *unjudged]:
        raise_if_interrupted()  # a Ctrl-C swallowed inside the last runtime (coremltools has bare excepts)
        if on_runner is not None:
            on_runner(name, False)
        started = time.perf_counter()
        try:
            row = compare_opened(open_runner, references, heldout, floors, None if is_baseline else twins)
        except Exception as error:  # noqa: BLE001 — one broken runtime must not hide the others' verdicts
            row = crashed_result(name, spec, error)
        if is_baseline:
            row.update(baseline=True, verdict="FAIL" if row["verdict"] == "FAIL" else "baseline")
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        if on_runner is not None:
            on_runner(name, True)
        # A `runner` variable in this loop would keep each runtime alive while the next one opens (two sets of
        # weights at once); reference cycles inside a runtime (modules, sessions) need a collection to go.
        gc.collect()
    return rows
