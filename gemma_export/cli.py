"""The `gemma-export` click group. Each command is a thin layer over model/, exporters/, validation/."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import torch

from exporters.artifact import Bundle
from exporters.progress import StepProgress
from exporters.registry import FORMATS, check_format_options, check_precisions, export_bundle, precisions_help
from gemma_export.errors import debug_option, entry_point
from gemma_export.options import model_options
from gemma_export.validation_commands import (all_budget_option, backends_option, baseline_option, finish,
                                              perplexity_tokens_option, selection_from, stage_summary)
from gemma_export.validation_commands import register as register_validation_commands
from validation.bench import BenchSettings
from validation.pipeline import run_bench, run_validation, save_timings, write_report
from validation.runners import IN_MEMORY_FORMAT, REFERENCE_PRECISION
from model.errors import UserError
from model.generate import GenerationResult, Sampling, generate
from model.loading import DTYPES, load
from model.weights import DEFAULT_MODEL, source_slug


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@debug_option
def cli() -> None:
    """Export Gemma 3 to TorchScript, ONNX and Core ML, and prove the exports equal the reference."""


@cli.command("generate")
@model_options()
@click.option("--prompt", required=True, help="Text to continue (or the user message with --chat).")
@click.option("--max-new-tokens", type=click.IntRange(0, 32_768), default=64, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda", "mps"]), default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True)
@click.option("--compile", "use_compile", is_flag=True, help="torch.compile the decode step.")
@click.option("--cuda-graph", is_flag=True, help="Replay the decode step as one CUDA graph (--device cuda).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the Gemma chat template.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(min=1), default=None)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=None)
@click.option("--seed", type=int, default=None)
def generate_command(model_id: str, revision: str | None, prompt: str, max_new_tokens: int, device: str,
                     dtype: str, use_compile: bool, cuda_graph: bool, chat: bool, temperature: float,
                     top_k: int | None, top_p: float | None, seed: int | None) -> None:
    """Stream a continuation, then print prefill/decode tok/s and the memory bandwidth achieved."""
    if cuda_graph and device != "cuda":  # Generator checks it too; here before minutes of loading weights
        raise UserError(f"--cuda-graph needs --device cuda, got --device {device}",
                        "add --device cuda, or leave out --cuda-graph")
    loaded = load(model_id, device=device, dtype=dtype, revision=revision)
    tokenizer = loaded.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    input_ids = torch.tensor([tokenizer.encode(text)])
    stream = tokenizer.stream_decoder()

    def print_new_text(token: torch.Tensor) -> None:
        if int(token[0]) in loaded.model.config.eos_token_ids:
            return
        sys.stdout.write(stream.push(int(token[0])))
        sys.stdout.flush()

    sys.stdout.write(prompt if not chat else "")
    result = generate(loaded.model, input_ids, max_new_tokens,
                      sampling=Sampling(temperature, top_k, top_p, seed), compile=use_compile,
                      on_tokens=print_new_text, cuda_graph=cuda_graph)
    sys.stdout.write("\n")
    sys.stdout.flush()
    click.echo(speed_summary(result, loaded.model.weight_bytes_per_token), err=True)


def speed_summary(result: GenerationResult, weight_bytes_per_token: int) -> str:
    decode = result.decode_tokens_per_second
    return (f"prompt {result.prompt_tokens} tokens, generated {result.tokens.shape[1]} | "
            f"prefill {result.prefill_tokens_per_second:.1f} tok/s | decode {decode:.1f} tok/s | "
            f"bandwidth achieved {decode * weight_bytes_per_token / 1e9:.1f} GB/s")


requantize_option = click.option(
    "--requantize", is_flag=True,
    help="A quantized GGUF tensor whose type has no exact grid here (e.g. IQ2_XS) is rounded onto a new grid "
         "for the int8/int4 files instead of failing the export; every other tensor keeps its own grid.")


@cli.command("export")
@model_options()
@click.option("--format", "fmt", type=click.Choice(list(FORMATS)), required=True)
@click.option("--precision", "precisions", multiple=True,
              help=f"Repeatable. {precisions_help()}.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True)
@click.option("--wait", is_flag=True, help="Wait for another export into the same bundle instead of failing.")
@click.option("--max-context", type=click.IntRange(min=1), default=None,
              help="Core ML and ExecuTorch: the fixed KV-cache length of the package or program (default 2048, "
                   "up to the model's context, e.g. 32768).")
@requantize_option
def export_command(model_id: str, revision: str | None, fmt: str, precisions: tuple[str, ...], out_dir: Path,
                   wait: bool, max_context: int | None, requantize: bool) -> None:
    """Export the model to a verified artifact bundle: artifacts/<model>/<format>/."""
    chosen = check_precisions(fmt, list(precisions))
    format_options = {} if max_context is None else {"max_context": max_context}
    check_format_options(fmt, format_options)
    started = time.perf_counter()
    loaded = load(model_id, revision=revision)
    with StepProgress(f"export {fmt}") as progress:
        bundle = export_bundle(loaded, fmt, chosen, out_dir, progress=progress, wait=wait,
                               format_options=format_options, requantize=requantize)
    click.echo(bundle_summary(bundle, time.perf_counter() - started))


def bundle_summary(bundle: Bundle, seconds: float) -> str:
    lines = [f"{bundle.format} bundle {bundle.path} ({', '.join(bundle.precisions)}) in {seconds:.0f} s"]
    for entry in bundle.manifest["files"]:
        lines.append(f"  {entry['size'] / 2**20:9.1f} MiB  {entry['path']}")
    total = sum(entry["size"] for entry in bundle.manifest["files"])
    lines.append(f"  {total / 2**20:9.1f} MiB  total; manifest.json lists every file's sha256")
    return "\n".join(lines)


@cli.command("all")
@model_options()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True)
@click.option("--formats", multiple=True, type=click.Choice(list(FORMATS)), help="Repeatable; default: all.")
@click.option("--precisions", "precision_filters", multiple=True,
              help="Repeatable; default: every precision of each format. `fp32` picks it in every format that has "
                   "it, `onnx:int4` in that format only.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True, help="0 = every core.")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=32, show_default=True)
@perplexity_tokens_option
@click.option("--decode-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@all_budget_option
@click.option("--bench/--no-bench", "with_bench", default=True, show_default=True,
              help="--no-bench: export, validate and report only (the report then has no speed columns).")
@requantize_option
@baseline_option
@backends_option
@click.option("--verbose", is_flag=True, help="At the end, each runner's validate and bench time too, not only each "
                                               "stage's.")
def all_command(model_id: str, revision: str | None, out_dir: Path, formats: tuple[str, ...],
                precision_filters: tuple[str, ...], threads: int, max_new_tokens: int, perplexity_tokens: int,
                decode_tokens: int, repeats: int, budget_s: float, with_bench: bool, requantize: bool,
                baselines: tuple[str, ...], verbose: bool, backends: tuple[str, ...]) -> None:
    """Export every format and precision, validate, bench and report (what the host can't run is skipped,
    and the report says why)."""
    command_started = time.perf_counter()
    plan = export_plan(formats or tuple(FORMATS), precision_filters)
    loaded = load(model_id, revision=revision)
    export_seconds = {}
    for fmt, precisions in plan.items():
        started = time.perf_counter()
        with StepProgress(f"export {fmt}") as progress:
            bundle = export_bundle(loaded, fmt, precisions, out_dir, progress=progress, requantize=requantize)
        export_seconds[fmt] = time.perf_counter() - started
        click.echo(bundle_summary(bundle, export_seconds[fmt]))
    # Only the precisions exported now are judged (not an older bundle's other variants), beside
    # the in-memory PyTorch runners: the reference and its torch.compile'd twin.
    exported = {precision for precisions in plan.values() for precision in precisions} | {REFERENCE_PRECISION}
    selection = selection_from((*plan, IN_MEMORY_FORMAT), tuple(sorted(exported)), (), (), (), backends)
    validation = run_validation(loaded, out_dir, selection, max_new_tokens=max_new_tokens, threads=threads,
                                perplexity_tokens=perplexity_tokens, baselines=baselines)
    bench = (run_bench(loaded, out_dir, selection, BenchSettings(threads=threads, decode_tokens=decode_tokens,
                                                                  repeats=repeats, budget_s=budget_s),
                       baselines=baselines)
             if with_bench else None)
    timings = {"exports": export_seconds, "total_seconds": time.perf_counter() - command_started}
    save_timings(out_dir, loaded.weights.slug, timings)
    paths = write_report(out_dir, loaded.weights.slug)
    click.echo(stage_summary(timings, validation, bench, verbose), err=True)
    finish(validation, paths, "validation")  # exits non-zero naming failing runners before bench is judged
    if bench is not None:
        finish(bench, None, "bench")  # the report's paths are printed once, above


def export_plan(formats: tuple[str, ...], precision_filters: tuple[str, ...]) -> dict[str, list[str]]:
    """Format → precisions to export. A filter is `precision` (every format that has it) or `format:precision`."""
    plan = {fmt: [] for fmt in formats}
    for item in precision_filters:
        fmt, _, precision = item.rpartition(":")
        targets = [fmt] if fmt else [name for name in formats if precision in FORMATS[name].precisions]
        if fmt:
            check_precisions(fmt, [precision])
            if fmt not in plan:
                raise UserError(f"--precisions {item} names {fmt}, which this run does not export",
                                f"add --formats {fmt} or drop that filter")
        if not targets:
            raise UserError(f"no format in this run has precision {precision!r}",
                            "use e.g. fp32, fp16, int8, int4 or format:precision")
        for target in targets:
            if precision not in plan[target]:
                plan[target].append(precision)
    if not precision_filters:
        return {fmt: list(FORMATS[fmt].precisions) for fmt in formats}
    return {fmt: precisions for fmt, precisions in plan.items() if precisions}


@cli.command("push")
@click.option("--repo-id", required=True, help="The hub repository to upload into, e.g. me/gemma-3-270m-onnx "
              "(created if missing).")
@click.option("--model", "model_id", default=DEFAULT_MODEL, show_default=True,
              help="The model whose ONNX bundle (<out>/<model>/onnx) is pushed.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True)
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), default=None,
              help="An ONNX bundle folder to push instead of <out>/<model>/onnx.")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", default=None, help="Branch to commit to (default: main).")
def push_command(repo_id: str, model_id: str, out_dir: Path, bundle_dir: Path | None, private: bool,
                 revision: str | None) -> None:
    """Upload the ONNX bundle, as it is, to a Hugging Face model repository (token: HF_TOKEN)."""
    from huggingface_hub import get_token

    from exporters.hf_repo import push

    folder = bundle_dir if bundle_dir is not None else out_dir / source_slug(model_id) / "onnx"
    click.echo(f"pushed {folder} to {repo_id}: {push(folder, repo_id, get_token(), private, revision)}")


register_validation_commands(cli)
main = entry_point(cli)
