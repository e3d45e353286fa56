"""How close the 8- and 4-bit weight formats ExecuTorch's XNNPACK backend can hold get to the model, before any
program is lowered: the layers' weights rounded in PyTorch onto each format, the inputs of the layers rounded as
XNNPACK's dynamic quantization rounds them (asymmetric int8 per token), and the gate's own step metrics (mean KL,
top-1 against the fp32 model) over the held-out text, teacher-forced.

    python benchmarks/xnnpack_weight_formats.py --tokens 512

XNNPACK's formats in ExecuTorch 1.5.1 (backends/xnnpack/operators/node_visitor.py): int8 per output channel
(symmetric, a float32 scale), int4 per output channel, int4 per group of the input (symmetric, the group scales
stored in bf16); no per-block zero point or offset, and every quantized linear layer takes int8 dynamic
activations. The embedding (the LM head) keeps the source's weights in every row below.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import click
import numpy as np
import torch

from model.gemma3 import Gemma3Model, Linear, stacked_parts
from model.loading import load
from model.weights import source_block_grids
from validation.compare import load_heldout, step_metrics

CLIP_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # per-block range shrinks tried (least squared error wins)


def symmetric_blocks(weight: torch.Tensor, bits: int, block: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """`weight` rounded to symmetric `bits`-bit integers per block of `block` inputs, each block's scale (stored in
    `scale_dtype`) the one of CLIP_FACTORS with the least squared error: what the format can hold at best."""
    rows, cols = weight.shape
    blocks = weight.reshape(rows, cols // block, block)
    largest = 2 ** (bits - 1) - 1
    magnitude = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    best, best_error = blocks, None
    for factor in CLIP_FACTORS:
        scale = (magnitude * factor / largest).to(scale_dtype).float()
        rounded = torch.clamp(torch.round(blocks / scale), -largest - 1, largest) * scale
        error = ((rounded - blocks) ** 2).sum(-1, keepdim=True)
        if best_error is None:
            best, best_error = rounded, error
        else:
            best, best_error = torch.where(error < best_error, rounded, best), torch.minimum(error, best_error)
    return best.reshape(rows, cols)


def int8_per_channel(weight: torch.Tensor, name: str, types: dict[str, str]) -> torch.Tensor:
    return symmetric_blocks(weight, 8, weight.shape[1], torch.float32)


def int4_per_group(weight: torch.Tensor, name: str, types: dict[str, str]) -> torch.Tensor:
    return symmetric_blocks(weight, 4, 32, torch.bfloat16)


def int4_where_the_source_is_4_bit(weight: torch.Tensor, name: str, types: dict[str, str]) -> torch.Tensor:
    """4-bit groups only for the source's 4-bit tensors (Q4_K), int8 per channel for the rest: the int4 ONNX
    file's rule (a source's 5- to 8-bit grids stay 8-bit) in XNNPACK's formats."""
    four_bit = any(types.get(part) == "Q4_K" for part in stacked_parts(name))
    return int4_per_group(weight, name, types) if four_bit else int8_per_channel(weight, name, types)


LAYOUTS: dict[str, Callable[[torch.Tensor, str, dict[str, str]], torch.Tensor]] = {
    "int8 per channel": int8_per_channel,
    "int4 per group of 32 (bf16 scales)": int4_per_group,
    "int4 where the source is Q4_K, int8 per channel elsewhere": int4_where_the_source_is_4_bit,
}


def dynamic_int8(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
    """A linear layer's input rounded as XNNPACK's dynamic quantization does: asymmetric int8 per token."""
    x = args[0].float()
    low, high = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = ((high - low) / 255).clamp(min=1e-12)
    zero_point = torch.round(-low / scale) - 128
    return ((torch.clamp(torch.round(x / scale) + zero_point, -128, 127) - zero_point) * scale,)


def rounded_model(model: Gemma3Model, layout: Callable, types: dict[str, str], dynamic: bool) -> Gemma3Model:
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in copied.named_parameters():
            if parameter.dim() == 2 and not name.startswith("embed_tokens"):
                parameter.copy_(layout(parameter.float(), name, types))
    if dynamic:
        for module in copied.modules():
            if isinstance(module, Linear):
                module.register_forward_pre_hook(dynamic_int8)
    return copied


def gate_numbers(reference: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    steps = [step_metrics(expected, actual) for expected, actual in zip(reference, logits)]
    return (float(np.mean([step["kl_divergence"] for step in steps])),
            float(np.mean([step["top1_agrees"] for step in steps])))


@click.command()
@click.option("--model", "model_id", default="gemma-3-270m", show_default=True)
@click.option("--tokens", default=512, show_default=True, help="Held-out tokens, teacher-forced.")
def main(model_id: str, tokens: int) -> None:
    loaded = load(model_id)
    model = loaded.model.eval()
    types = {name: grid.source_type for name, grid in source_block_grids(loaded.weights, requantize=True).items()}
    ids = torch.tensor([load_heldout(loaded.tokenizer, tokens)])
    with torch.no_grad():
        reference = model(ids)[0].numpy()
    print("| layers' weights | activations | mean KL | top-1 |\n|---|---|---:|---:|")
    for label, layout in LAYOUTS.items():
        for dynamic in (False, True):
            with torch.no_grad():
                logits = rounded_model(model, layout, types, dynamic)(ids)[0].numpy()
            kl, top1 = gate_numbers(reference, logits)
            activations = "int8 per token (XNNPACK)" if dynamic else "float32 (no XNNPACK kernel)"
            print(f"| {label} | {activations} | {kl:.4g} | {top1:.1%} |", flush=True)


if __name__ == "__main__":
    main()
