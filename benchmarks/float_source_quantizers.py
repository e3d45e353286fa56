"""Which rounding a float source's int4/int8 ONNX files get, decided by the gate's numbers: the default model's
weights written as a float Hugging Face folder (a float source: no grids of its own), exported once per
quantizer of `exporters.weight_grids.FLOAT_QUANTIZERS` and judged by `gemma-export validate`'s gate (mean KL,
top-1, perplexity ratio over the prompts and the held-out text) against that folder's fp32 reference.

    python benchmarks/float_source_quantizers.py --out /tmp/quantizers --precision int4

The default model's weights were quantized once already (Q4_K_M): a float source's rounding here starts from
those values, so the numbers rank the quantizers, not what a bf16 checkpoint would reach.
"""

from __future__ import annotations

from pathlib import Path

import click

import exporters.weight_grids as weight_grids
from exporters.registry import export_bundle
from validation.pipeline import run_validation
from model.loading import load
from model.weights import save_hf_directory
from validation.runners import Selection

GATE_COLUMNS = ("teacher_forced_steps", "mean_kl_divergence", "top1_agreement", "perplexity_ratio",
                "max_abs_logit_diff")


@click.command()
@click.option("--model", "model_id", default="gemma-3-270m", show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True)
@click.option("--precision", "precisions", multiple=True, default=("int4",), show_default=True)
@click.option("--quantizer", "quantizers", multiple=True, default=tuple(weight_grids.FLOAT_QUANTIZERS),
              show_default=True)
def main(model_id: str, out_dir: Path, precisions: tuple[str, ...], quantizers: tuple[str, ...]) -> None:
    source = load(model_id)
    folder = out_dir / "float-source"
    if not (folder / "model.safetensors").is_file():
        save_hf_directory(source.weights.config, source.weights.state_dict, folder)
    loaded = load(str(folder))
    print("| quantizer | precision | " + " | ".join(GATE_COLUMNS) + " | size MB |")
    print("|---|---|" + "---:|" * (len(GATE_COLUMNS) + 1))
    for quantizer in quantizers:
        root = out_dir / quantizer.replace(" ", "-")
        export_bundle(loaded, "onnx", list(precisions), root, float_quantizer=quantizer)
        outcome = run_validation(loaded, root, Selection(formats=("onnx",), precisions=precisions))
        for row in outcome.piece["runners"]:
            if row["verdict"] == "reference":
                continue
            print(f"| {quantizer} | {row['precision']} | "
                  + " | ".join(f"{row[column]:.4g}" for column in GATE_COLUMNS)
                  + f" | {row['size_bytes'] / 1e6:.0f} |", flush=True)


if __name__ == "__main__":
    main()
