"""Issue-6 accuracy yardstick: how often each compressed runner picks the fp32 reference's token, and how often
llama.cpp does on the same GGUF.

The reference is our fp32 model on the dequantized GGUF weights; every candidate is teacher-forced on the
reference's greedy tokens for the validation prompts (`validation/prompts.json`), exactly as `gemma-export
validate` judges a runner (`validation.compare.compare_prompt`), with more steps than CI uses so that one step is
not 4 % of the score. llama.cpp multiplies the GGUF's weights by activations rounded to 8 bits (Q8_K): its row
says how far from the fp32 reference the runtime a user would pick instead already is.

    python benchmarks/top1_agreement.py --model gemma-3-270m --out artifacts --steps 32 \
        --onnx int8 --onnx int4 --baseline llama.cpp

`--onnx-file PATH` judges any ONNX decoder file with our I/O (an experiment's file outside a bundle).
"""

from __future__ import annotations

from pathlib import Path

import click

from model.loading import load
from validation.baselines import LLAMA_CPP, open_baseline
from validation.compare import compare_prompt, load_prompts, reference_runs, summarize
from validation.onnx_runtime import OnnxDecoder, weight_bytes_per_token
from validation.runners import REFERENCE_SPEC, Runner, RunnerSpec, load_bundles, make_runner


@click.command()
@click.option("--model", "model_id", default="gemma-3-270m", show_default=True)
@click.option("--out", "artifacts_root", type=click.Path(path_type=Path), default=Path("artifacts"), show_default=True)
@click.option("--steps", default=32, show_default=True, help="teacher-forced steps per prompt")
@click.option("--onnx", "onnx_precisions", multiple=True, help="ONNX precisions of the bundle in --out to judge")
@click.option("--onnx-file", "onnx_files", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="any ONNX decoder file with our I/O, judged as it is")
@click.option("--baseline", "baselines", multiple=True, type=click.Choice([LLAMA_CPP]))
def main(model_id: str, artifacts_root: Path, steps: int, onnx_precisions: tuple[str, ...],
         onnx_files: tuple[Path, ...], baselines: tuple[str, ...]) -> None:
    loaded = load(model_id)
    config = loaded.model.config
    prompts = load_prompts(loaded.tokenizer, config, steps)
    max_length = max(len(prompt.ids) for prompt in prompts) + steps
    bundles, problems = load_bundles(artifacts_root, loaded.weights.slug, ["onnx"] if onnx_precisions else [],
                                     loaded.weights.weight_sha256)
    if problems:
        raise click.ClickException(problems[0].reason)
    references = reference_runs(make_runner(REFERENCE_SPEC, bundles, loaded.model, max_length=max_length),
                                prompts, steps)
    candidates = [(f"onnxruntime {precision}",
                   lambda precision=precision: make_runner(RunnerSpec("onnxruntime", precision), bundles,
                                                           max_length=max_length))
                  for precision in onnx_precisions]
    candidates += [(f"onnxruntime {path}",
                    lambda path=path: Runner(RunnerSpec("onnxruntime", "file"), OnnxDecoder(path), config.vocab_size,
                                             path.stat().st_size, weight_bytes_per_token(path), max_length))
                   for path in onnx_files]
    candidates += [(f"{baseline} {loaded.weights.gguf_file.name}",
                    lambda baseline=baseline: open_baseline({"backend": baseline}, loaded.weights.gguf_file,
                                                            context_tokens=max_length))
                   for baseline in baselines]
    print(f"{len(prompts)} prompts × {steps} teacher-forced steps against pytorch fp32 (dequantized GGUF)")
    print("| runner | top-1 agreement | top-5 overlap | max \\|Δlogit\\| | mean KL | greedy prefix (min) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, open_runner in candidates:
        runner = open_runner()
        summary = summarize([compare_prompt(runner, reference) for reference in references])
        print(f"| {name} | {summary['top1_agreement']:.1%} | {summary['top5_overlap']:.1%} | "
              f"{summary['max_abs_logit_diff']:.2f} | {summary['mean_kl_divergence']:.4f} | "
              f"{summary['greedy_match_steps']}/{steps} |", flush=True)
        del runner


if __name__ == "__main__":
    main()
