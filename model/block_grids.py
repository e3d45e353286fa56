"""Weight matrices as blocks of small integers: the grids a quantized file stores, read from a GGUF exactly or
made by rounding float weights.

A `BlockGrid` holds a [rows, cols] matrix as blocks of `block_size` along each row:

    weight = scales · (values − zero_points) − offsets        (per block; offsets only for Q4_K-like grids)

which is what ONNX Runtime's `MatMulNBits` / `GatherBlockQuantized` (with a separate offset term) and Core ML's
`constexpr_blockwise_shift_scale` compute. Each GGUF type below maps onto it without rounding anything: the
float32 weights `weight()` rebuilds are bit for bit what the `gguf` package dequantizes the tensor to (the
same fp32 products in the same order), so a file built from these grids holds the source's own weights.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from model.errors import UserError

SUPER_BLOCK = 256  # the k-quants' super-block (Q4_K, Q6_K)


@dataclass(frozen=True)
class BlockGrid:
    values: np.ndarray  # uint8 [rows, cols], each < 2**bits
    scales: np.ndarray  # float32 [rows, cols // block_size]
    zero_points: np.ndarray  # uint8 [rows, cols // block_size]
    offsets: np.ndarray | None  # float32 [rows, cols // block_size], subtracted after scaling; None = all 0
    block_size: int
    bits: int
    source_type: str  # the GGUF type it came from, or "round-to-nearest"

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape

    def per_element(self, per_block: np.ndarray) -> np.ndarray:
        return np.repeat(per_block, self.block_size, axis=1)

    def weight(self) -> np.ndarray:
        """The float32 matrix, as the runtimes (and the `gguf` package) compute it."""
        centred = (self.values.astype(np.int16) - self.per_element(self.zero_points).astype(np.int16))
        weight = self.per_element(self.scales) * centred.astype(np.float32)
        return weight if self.offsets is None else weight - self.per_element(self.offsets)

    def with_block_size(self, block_size: int) -> "BlockGrid":
        """The same weights in smaller blocks (a block's scale, zero point and offset repeated)."""
        if block_size == self.block_size:
            return self
        if self.block_size % block_size:
            raise ValueError(f"cannot split blocks of {self.block_size} into blocks of {block_size}")
        times = self.block_size // block_size
        offsets = None if self.offsets is None else np.repeat(self.offsets, times, axis=1)
        return replace(self, scales=np.repeat(self.scales, times, axis=1),
                       zero_points=np.repeat(self.zero_points, times, axis=1), offsets=offsets,
                       block_size=block_size)


def stacked(grids: list[BlockGrid]) -> BlockGrid:
    """Grids of matrices with the same columns, one under the other (the fused q|k|v or gate|up projection):
    in the smallest block size and the most bits among them, offsets 0 where a part has none."""
    block_size = min(grid.block_size for grid in grids)
    grids = [grid.with_block_size(block_size) for grid in grids]
    any_offsets = any(grid.offsets is not None for grid in grids)
    offsets = (np.concatenate([np.zeros_like(grid.scales) if grid.offsets is None else grid.offsets for grid in grids])
               if any_offsets else None)
    types = sorted({grid.source_type for grid in grids})
    return BlockGrid(np.concatenate([grid.values for grid in grids]), np.concatenate([grid.scales for grid in grids]),
                     np.concatenate([grid.zero_points for grid in grids]), offsets, block_size,
                     max(grid.bits for grid in grids), "+".join(types))


# ------------------------------------------------------------------------------------------ rounding floats

def round_to_nearest(weight: np.ndarray, bits: int, block_size: int) -> BlockGrid:
    """Asymmetric round-to-nearest per block (a float source has no grid of its own): each block's range,
    widened to include 0, is cut into 2**bits − 1 steps."""
    rows, cols = weight.shape
    blocks = weight.astype(np.float32).reshape(rows, cols // block_size, block_size)
    values, scales, zero_points = rounded_blocks(blocks, bits, 1.0)
    return BlockGrid(values.reshape(rows, cols).astype(np.uint8), scales, zero_points.astype(np.uint8), None,
                     block_size, bits, "round-to-nearest")


CLIP_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # the range shrinks tried per block


def least_squares_clipped(weight: np.ndarray, bits: int, block_size: int) -> BlockGrid:
    """Asymmetric per-block rounding whose range is chosen per block, among the block's full range shrunk by each
    of CLIP_FACTORS, for the least squared error of the reconstructed weights: clipping a block's one or two
    outliers buys a finer step for all the others (the search llama.cpp's and AWQ's quantizers make)."""
    rows, cols = weight.shape
    blocks = weight.astype(np.float32).reshape(rows, cols // block_size, block_size)
    best: tuple[np.ndarray, ...] | None = None
    for factor in CLIP_FACTORS:
        values, scales, zero_points = rounded_blocks(blocks, bits, factor)
        error = (((values - zero_points[..., None]) * scales[..., None] - blocks) ** 2).sum(axis=-1)
        if best is None:
            best = (error, values, scales, zero_points)
            continue
        better = error < best[0]
        best = tuple(np.where(better[..., None] if kept.ndim == 3 else better, candidate, kept)
                     for kept, candidate in zip(best, (error, values, scales, zero_points)))
    assert best is not None
    _, values, scales, zero_points = best
    return BlockGrid(values.reshape(rows, cols).astype(np.uint8), scales.astype(np.float32),
                     zero_points.astype(np.uint8), None, block_size, bits, "least-squares clipped")


def rounded_blocks(blocks: np.ndarray, bits: int, factor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, scales, zero points) of round-to-nearest over each block's range (widened to 0) times `factor`;
    values outside the shrunk range clip to the grid's ends."""
    low = np.minimum(blocks.min(axis=-1), 0.0) * factor
    high = np.maximum(blocks.max(axis=-1), 0.0) * factor
    top = 2 ** bits - 1
    scales = ((high - low) / top).astype(np.float32)
    scales[scales == 0] = 1.0
    zero_points = np.clip(np.rint(-low / scales), 0, top)
    values = np.clip(np.rint(blocks / scales[..., None]) + zero_points[..., None], 0, top)
    return values, scales, zero_points


# ------------------------------------------------------------------------------------------- GGUF block types
# Each decoder takes the tensor's blocks, [n_blocks, bytes per block], and returns (values [n_blocks, elements],
# scales, zero point, offsets) per sub-block; the layouts are llama.cpp's (ggml-common.h), as the gguf package
# reads them.

def half(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)


def low_then_high_nibbles(packed: np.ndarray, group: int) -> np.ndarray:
    """Bytes whose low nibbles hold one group of `group` values and high nibbles the next."""
    n = packed.shape[0]
    grouped = packed.reshape(n, -1, 1, group) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (grouped & np.uint8(0x0F)).reshape(n, -1)


def decode_q8_0(blocks: np.ndarray) -> tuple:
    values = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return values, half(blocks[:, :2]), 128, None


def decode_q4_0(blocks: np.ndarray) -> tuple:
    return low_then_high_nibbles(blocks[:, 2:], 16), half(blocks[:, :2]), 8, None


def decode_q5_0(blocks: np.ndarray) -> tuple:
    high_bits = blocks[:, 2:6].copy().view(np.uint32) >> np.arange(32, dtype=np.uint32)[None]
    values = low_then_high_nibbles(blocks[:, 6:], 16) | ((high_bits & 1).astype(np.uint8) << 4)
    return values, half(blocks[:, :2]), 16, None


def decode_q6_k(blocks: np.ndarray) -> tuple:
    n = blocks.shape[0]
    low = blocks[:, :128].reshape(n, -1, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    low = (low & np.uint8(0x0F)).reshape(n, -1, 32)
    high = blocks[:, 128:192].reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    high = (high & np.uint8(0x03)).reshape(n, -1, 32)
    values = (low | (high << 4)).reshape(n, SUPER_BLOCK)
    scales = half(blocks[:, 208:210]) * blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
    return values, scales, 32, None


def decode_q4_k(blocks: np.ndarray) -> tuple:
    from gguf.quants import Q4_K

    scale_codes, minimum_codes = Q4_K.get_scale_min(blocks[:, 4:16])
    scales = half(blocks[:, :2]) * scale_codes.astype(np.float32)
    offsets = half(blocks[:, 2:4]) * minimum_codes.astype(np.float32)
    return low_then_high_nibbles(blocks[:, 16:], 32), scales, 0, offsets


@dataclass(frozen=True)
class BlockType:
    elements: int  # weights per GGUF block
    sub_block: int  # weights per scale
    bits: int
    decode: object


GGUF_BLOCK_TYPES = {
    "Q8_0": BlockType(32, 32, 8, decode_q8_0),
    "Q4_0": BlockType(32, 32, 4, decode_q4_0),
    "Q5_0": BlockType(32, 32, 8, decode_q5_0),  # 5-bit values: an 8-bit grid holds them
    "Q6_K": BlockType(SUPER_BLOCK, 16, 8, decode_q6_k),
    "Q4_K": BlockType(SUPER_BLOCK, 32, 4, decode_q4_k),
}


def grid_from_gguf_blocks(type_name: str, raw: np.ndarray, rows: int, cols: int) -> BlockGrid:
    kind = GGUF_BLOCK_TYPES[type_name]
    blocks = np.ascontiguousarray(raw).reshape(rows * cols // kind.elements, -1)
    values, scales, zero_point, offsets = kind.decode(blocks)
    per_row = cols // kind.sub_block
    scales = np.asarray(scales, dtype=np.float32).reshape(rows, per_row)
    offsets = None if offsets is None else np.asarray(offsets, dtype=np.float32).reshape(rows, per_row)
    return BlockGrid(values.reshape(rows, cols).astype(np.uint8), scales,
                     np.full((rows, per_row), zero_point, dtype=np.uint8), offsets, kind.sub_block, kind.bits,
                     type_name)


def gguf_grids(path: Path, names: dict[str, str], shapes: dict[str, tuple[int, ...]],
               requantize: bool = False) -> dict[str, BlockGrid]:
    """Our 2-D parameter name → its GGUF grid, for every quantized tensor (float tensors have none). A type
    with no exact grid here is an error naming the tensor and type, unless `requantize`: then it is left out
    and the exporter rounds its dequantized weights like a float source's."""
    import gguf

    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(path, "r").tensors}
    grids = {}
    for ours, shape in shapes.items():
        tensor = tensors[names[ours]]
        type_name = tensor.tensor_type.name
        if len(shape) != 2 or type_name in ("F32", "F16", "BF16"):
            continue
        if type_name not in GGUF_BLOCK_TYPES:
            if requantize:
                continue
            raise UserError(f"GGUF tensor {names[ours]} is {type_name}, which has no exact block grid here "
                            f"(exact: {', '.join(GGUF_BLOCK_TYPES)})",
                            "pass --requantize to round its dequantized weights onto a new grid instead")
        grids[ours] = grid_from_gguf_blocks(type_name, np.asarray(tensor.data), *shape)
    return grids
