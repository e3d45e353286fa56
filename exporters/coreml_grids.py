"""Core ML int8 / int4 packages whose weights are the block grids of exporters/weight_grids.py: a quantized
source's own grids (not its weights rounded again), or a float source's weights rounded.

Each weight constant of the converted fp16 program that is a model weight (a linear layer's weight, or a row
block of the tied embedding, which the LM head and the input lookup share) becomes a
`constexpr_blockwise_shift_scale` (iOS 18) of that tensor's grid: weight = scale · (data − offset), uint8 or
uint4 data, fp16 scales. Integer zero points are the offset as they are; a Q4_K block's minimum folds into a
float offset (zero point + minimum / scale). The package computes in fp16, so its weights are the source's up
to fp16 rounding of scale and offset, like every other weight of the package.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

from model.block_grids import BlockGrid


def row_block(grid: BlockGrid, start: int, stop: int) -> BlockGrid:
    offsets = None if grid.offsets is None else grid.offsets[start:stop]
    return replace(grid, values=grid.values[start:stop], scales=grid.scales[start:stop],
                   zero_points=grid.zero_points[start:stop], offsets=offsets)


def weight_key(weight: np.ndarray) -> tuple[tuple[int, ...], int]:
    return weight.shape, hash(np.ascontiguousarray(weight, dtype=np.float16).tobytes())


def grids_by_weight(grids: Mapping[str, BlockGrid], originals: Mapping[str, np.ndarray], embedding: str,
                    embedding_blocks: int) -> dict[tuple[tuple[int, ...], int], BlockGrid]:
    """Each constant the program holds (fp16 of the weight it was converted from: `originals`; the embedding in
    `embedding_blocks` row blocks), keyed by shape and content, → the grid that replaces it."""
    table = {}
    for name, grid in grids.items():
        pairs = [(grid, originals[name])]
        if name == embedding:
            rows = grid.shape[0] // embedding_blocks
            pairs = [(row_block(grid, start, start + rows), originals[name][start:start + rows])
                     for start in range(0, grid.shape[0], rows)]
        for part, original in pairs:
            table[weight_key(original)] = part
    return table


def shift_scale_arguments(grid: BlockGrid) -> dict[str, np.ndarray]:
    """data, scale and offset of `constexpr_blockwise_shift_scale` for one grid."""
    from coremltools.converters.mil.mil import types

    data_dtype = types.np_uint4_dtype if grid.bits == 4 else np.uint8
    data = grid.values.astype(data_dtype)
    scale = grid.scales.astype(np.float16)
    if grid.offsets is None:
        return {"data": data, "scale": scale, "offset": grid.zero_points.astype(data_dtype)}
    # weight = s·(q − z) − o = s·(q − (z + o/s)); a block with s = 0 is the constant −o: data 0, scale 1, offset o.
    flat = grid.scales == 0
    safe_scales = np.where(flat, 1.0, grid.scales)
    offset = grid.zero_points + grid.offsets / safe_scales
    offset = np.where(flat, grid.offsets, offset)
    data = np.where(np.repeat(flat, grid.block_size, axis=1), 0, grid.values).astype(data_dtype)
    return {"data": data, "scale": np.where(flat, 1.0, scale).astype(np.float16), "offset": offset.astype(np.float16)}


def with_source_grids(mlmodel: Any, grids: Mapping[str, BlockGrid], originals: Mapping[str, np.ndarray],
                      embedding: str, embedding_blocks: int) -> Any:
    """A new package whose weight constants are the grids': one per grid, `embedding_blocks` for the embedding's,
    or the export fails (a constant the conversion changed would otherwise stay fp16 without a word). Each
    constant is found by the float weight it was converted from (`originals`, by parameter name)."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.helper import block_context_manager
    from coremltools.models.utils import _apply_graph_pass

    table = grids_by_weight(grids, originals, embedding, embedding_blocks)
    replaced = []

    class CarrySourceGrids(AbstractGraphPass):
        def apply(self, prog: Any) -> None:
            for function in prog.functions.values():
                self.visit(function)

        @block_context_manager
        def visit(self, block: Any) -> None:
            for op in list(block.operations):
                for inner in op.blocks:
                    self.visit(inner)
                value = op.outputs[0].val if op.op_type == "const" else None
                if not isinstance(value, np.ndarray) or value.ndim != 2 or value.dtype != np.float16:
                    continue
                grid = table.get(weight_key(value))
                if grid is None:
                    continue
                compressed = mb.constexpr_blockwise_shift_scale(**shift_scale_arguments(grid), before_op=op,
                                                                name=f"{op.name}_source_grid")
                block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=compressed,
                                                   no_check_var_types=True)
                block.remove_ops([op])
                replaced.append(op.name)

    spec_version = mlmodel.get_spec().specificationVersion
    result = _apply_graph_pass(mlmodel, CarrySourceGrids(), spec_version=spec_version)
    expected = len(grids) - (embedding in grids) + embedding_blocks * (embedding in grids)
    if len(replaced) != expected:
        raise RuntimeError(f"{len(replaced)} of the program's weight constants matched a source grid, expected "
                           f"{expected}: the conversion changed a weight")
    return result
