"""The grid of every weight matrix in a compressed (int8 / int4) file, the one rule both the ONNX and the Core ML
exporters follow: a quantized source's own grid where it has one (carried exactly), else the float weights
rounded by the float-source quantizer, the layers at the precision's bits and the embedding (which is also the
LM head) at 8 bits at least."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from model.block_grids import BlockGrid, least_squares_clipped, round_to_nearest, stacked
from model.gemma3 import Gemma3Model, source_state_dict, stacked_parts
from model.weights import EMBEDDING

QUANTIZED_BITS = {"int8": 8, "int4": 4}  # the compressed precisions and their layers' bits
EMBEDDING_BITS = 8
# How a float source's weights are rounded, picked by benchmarks/float_source_quantizers.py on the gate's
# numbers: least-squares clipping is closer to the model at 4 bits and the same at 8 (BENCHMARKS.md).
FLOAT_QUANTIZERS = {"round-to-nearest": round_to_nearest, "least-squares clipped": least_squares_clipped}
FLOAT_QUANTIZER = "least-squares clipped"


def model_grids(model: Gemma3Model, source_grids: Mapping[str, BlockGrid], bits: int, block_size: int,
                float_quantizer: str = FLOAT_QUANTIZER) -> dict[str, BlockGrid]:
    """Every weight matrix's grid, by the model's parameter names (`tensor_grids`, stacked)."""
    return stacked_grids(model, tensor_grids(model, source_grids, bits, block_size, float_quantizer))


def tensor_grids(model: Gemma3Model, source_grids: Mapping[str, BlockGrid], bits: int, block_size: int,
                 float_quantizer: str = FLOAT_QUANTIZER) -> dict[str, BlockGrid]:
    """The grid of every weight matrix of the checkpoint (model/weights.py's names), in blocks of at most
    `block_size` (a source's smaller blocks stay as they are); `float_quantizer` (a FLOAT_QUANTIZERS name) rounds
    the weights without a grid of their own."""
    return {name: source_grid(name, weight, source_grids, bits, block_size, float_quantizer)
            for name, weight in source_state_dict(model).items() if weight.dim() == 2}


def stacked_grids(model: Gemma3Model, grids: Mapping[str, BlockGrid]) -> dict[str, BlockGrid]:
    """The checkpoint's grids → the model's: a stacked projection's grid is its parts' grids stacked
    (model/block_grids.py's `stacked`: the smallest block size and the most bits among them)."""
    stacked_ones = {}
    for name, parameter in model.state_dict().items():
        if parameter.dim() == 2:
            parts = [grids[part] for part in stacked_parts(name)]
            stacked_ones[name] = parts[0] if len(parts) == 1 else stacked(parts)
    return stacked_ones


def source_grid(name: str, weight: torch.Tensor, source_grids: Mapping[str, BlockGrid], bits: int, block_size: int,
                float_quantizer: str) -> BlockGrid:
    """One source tensor's grid: the source's own, else its float weights rounded (the embedding at 8 bits)."""
    if name in source_grids:
        source = source_grids[name]
        return source.with_block_size(min(source.block_size, block_size))
    grid_bits = max(bits, EMBEDDING_BITS) if name == EMBEDDING else bits
    return FLOAT_QUANTIZERS[float_quantizer](weight.float().numpy(), grid_bits, block_size)
