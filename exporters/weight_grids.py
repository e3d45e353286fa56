"""The grid of every weight matrix in a compressed (int8 / int4) file, the one rule both the ONNX and the Core ML
exporters follow: a quantized source's own grid where it has one (carried exactly), else the float weights
rounded by the float-source quantizer, the layers at the precision's bits and the embedding (which is also the
LM head) at 8 bits at least."""

from __future__ import annotations

from collections.abc import Mapping

from model.block_grids import BlockGrid, least_squares_clipped, round_to_nearest
from model.gemma3 import Gemma3Model
from model.weights import EMBEDDING

QUANTIZED_BITS = {"int8": 8, "int4": 4}  # the compressed precisions and their layers' bits
EMBEDDING_BITS = 8
# How a float source's weights are rounded, picked by benchmarks/float_source_quantizers.py on the gate's
# numbers: least-squares clipping is closer to the model at 4 bits and the same at 8 (BENCHMARKS.md).
FLOAT_QUANTIZERS = {"round-to-nearest": round_to_nearest, "least-squares clipped": least_squares_clipped}
FLOAT_QUANTIZER = "least-squares clipped"


def model_grids(model: Gemma3Model, source_grids: Mapping[str, BlockGrid], bits: int, block_size: int,
                float_quantizer: str = FLOAT_QUANTIZER) -> dict[str, BlockGrid]:
    """Every weight matrix's grid, in blocks of at most `block_size` (a source's smaller blocks stay as they
    are); `float_quantizer` (a FLOAT_QUANTIZERS name) rounds the weights without a grid of their own."""
    grids = {}
    for name, parameter in model.state_dict().items():
        if parameter.dim() != 2:
            continue
        if name in source_grids:
            source = source_grids[name]
            grids[name] = source.with_block_size(min(source.block_size, block_size))
        else:
            grid_bits = max(bits, EMBEDDING_BITS) if name == EMBEDDING else bits
            grids[name] = FLOAT_QUANTIZERS[float_quantizer](parameter.float().numpy(), grid_bits, block_size)
    return grids
