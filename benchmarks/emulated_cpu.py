"""The validation gate with the kernels another CPU kind picks: the fp32 reference computed natively once, then
each runner judged inside `qemu-x86_64 -cpu <model>` (Debian's qemu-user, 7.2+ emulates AVX2 and FMA), where
torch, oneDNN and onnxruntime's MLAS choose their kernels from the CPUID the emulated CPU reports. An AVX-512
machine can so check what an AVX2-only one computes, 100-200× slower (numbers only: no speeds from here).

    python benchmarks/emulated_cpu.py --artifacts ROOT --runner "onnxruntime int8 cpu" --cpu Haswell-v4

The runner's row (mean KL, top-1, verdict, …) is printed as JSON and saved beside the reference in --work.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.loading import load  # noqa: E402
from validation.compare import (HELDOUT_MAX_TOKENS, HeldoutRun, Prompt, ReferenceRun, compare_runner,  # noqa: E402
                                load_heldout, load_prompts, perplexity, reference_runs, runner_max_length,
                                thresholds_for)
from validation.runners import REFERENCE_SPEC, RunnerSpec, load_bundles, make_runner, set_thread_count  # noqa: E402

MAX_NEW_TOKENS = 32  # gemma-export validate's default


def save_reference(path: Path, references: list[ReferenceRun], heldout: HeldoutRun) -> None:
    arrays = {"heldout_ids": np.asarray(heldout.ids), "heldout_logits": np.stack(heldout.step_logits)}
    for index, run in enumerate(references):
        arrays |= {f"prompt{index}_ids": np.asarray(run.prompt.ids), f"prompt{index}_tokens": np.asarray(run.tokens),
                   f"prompt{index}_logits": np.stack(run.step_logits)}
    np.savez(path, **arrays)
    path.with_suffix(".json").write_text(json.dumps({
        "prompts": [{"name": run.prompt.name, "crosses_window": run.prompt.crosses_window} for run in references],
        "perplexity": heldout.perplexity}))


def read_reference(path: Path) -> tuple[list[ReferenceRun], HeldoutRun]:
    meta = json.loads(path.with_suffix(".json").read_text())
    with np.load(path) as arrays:
        references = [ReferenceRun(Prompt(entry["name"], arrays[f"prompt{i}_ids"].tolist(), entry["crosses_window"]),
                                   arrays[f"prompt{i}_tokens"].tolist(), list(arrays[f"prompt{i}_logits"]))
                      for i, entry in enumerate(meta["prompts"])]
        heldout = HeldoutRun(arrays["heldout_ids"].tolist(), list(arrays["heldout_logits"]), meta["perplexity"])
    return references, heldout


@click.command()
@click.option("--model", "model_id", default="gemma-3-270m", show_default=True)
@click.option("--artifacts", type=click.Path(path_type=Path), required=True, help="Root holding the bundles.")
@click.option("--runner", "runners", multiple=True, help='Repeatable, e.g. "onnxruntime int8 cpu".')
@click.option("--cpu", default="Haswell-v4", show_default=True, help="qemu's CPU model (AVX2 + FMA, no AVX-512).")
@click.option("--work", type=click.Path(path_type=Path), default=Path("/tmp/emulated-cpu"), show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--judge", default=None, hidden=True, help="Internal: judge this runner in this process.")
def main(model_id: str, artifacts: Path, runners: tuple[str, ...], cpu: str, work: Path, threads: int,
         judge: str | None) -> None:
    loaded = load(model_id)
    set_thread_count(threads)
    reference_path = work / f"{loaded.weights.slug}-reference.npz"
    bundles, _ = load_bundles(artifacts, loaded.weights.slug, ["torchscript", "onnx", "coreml"],
                              loaded.weights.weight_sha256)
    if judge is not None:
        judge_runner(loaded, bundles, RunnerSpec(*judge.split()), reference_path, work, threads)
        return
    if shutil.which("qemu-x86_64") is None:
        raise click.UsageError("qemu-x86_64 is not installed; install Debian's qemu-user (7.2 or later emulates AVX2)")
    work.mkdir(parents=True, exist_ok=True)
    if not reference_path.exists():
        save_reference(reference_path, *native_reference(loaded, bundles))
    for name in runners:
        started = time.perf_counter()
        judged = subprocess.run(["qemu-x86_64", "-cpu", cpu, sys.executable, __file__, "--model", model_id,
                                 "--artifacts", str(artifacts), "--work", str(work), "--threads", str(threads),
                                 "--judge", name], stderr=subprocess.PIPE, text=True)
        if judged.returncode != 0:
            # qemu warns about every CPUID feature TCG lacks: the runner's own last line is the cause
            lines = [line for line in judged.stderr.splitlines() if "TCG doesn't support" not in line]
            raise click.ClickException(f"{name} under -cpu {cpu}: {lines[-1] if lines else judged.returncode}")
        row = json.loads((work / f"{name.replace(' ', '_')}.json").read_text())
        print(json.dumps({"cpu": cpu, "emulated_seconds": round(time.perf_counter() - started), **row}), flush=True)


def native_reference(loaded, bundles) -> tuple[list[ReferenceRun], HeldoutRun]:
    prompts = load_prompts(loaded.tokenizer, loaded.model.config, MAX_NEW_TOKENS)
    heldout_ids = load_heldout(loaded.tokenizer, HELDOUT_MAX_TOKENS)
    reference = make_runner(REFERENCE_SPEC, bundles, loaded.model,
                            max_length=runner_max_length(prompts, heldout_ids, MAX_NEW_TOKENS))
    logits = reference.teacher_forced(heldout_ids)
    return reference_runs(reference, prompts, MAX_NEW_TOKENS), HeldoutRun(heldout_ids, logits,
                                                                         perplexity(logits, heldout_ids))


def judge_runner(loaded, bundles, spec: RunnerSpec, reference_path: Path, work: Path, threads: int) -> None:
    """Inside the emulated CPU: the runner's row against the saved reference, as `gemma-export validate` makes it."""
    import torch

    references, heldout = read_reference(reference_path)
    length = runner_max_length([run.prompt for run in references], heldout.ids, MAX_NEW_TOKENS)
    runner = make_runner(spec, bundles, loaded.model, max_length=length, threads=threads)
    row = compare_runner(runner, references, heldout, thresholds_for(spec.precision, loaded.model.config))
    summary = {key: value for key, value in row.items() if key not in ("prompts", "heldout_steps")}
    summary["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    (work / f"{spec.name.replace(' ', '_')}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
