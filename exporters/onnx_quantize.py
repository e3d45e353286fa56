"""The int8 / int4 ONNX files: every weight matrix of the traced float32 graph replaced by its block grid.

- Each linear layer becomes `MatMulNBits` (com.microsoft) over its grid; a grid with per-block offsets (GGUF
  Q4_K: `d·sc·q − dmin·m`) keeps integer zero points, which onnxruntime's fast CPU kernels need, and subtracts
  the offsets as one small product of the input's block sums: Σ_b offset[n, b] · Σ_{k∈b} x[k].
- The tied embedding / LM head is one uint8 initializer read by both a `MatMulNBits` (the head) and a
  `GatherBlockQuantized` (the rows), so the 262,144 × 640 table is stored once, at 8 bits.

Where the grids come from is exporters/weight_grids.py's rule (a quantized source's own, else the float weights
rounded; the embedding at 8 bits).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import onnx_ir as ir

from exporters.weight_grids import EMBEDDING_BITS
from model.block_grids import BlockGrid
from model.gemma3 import Gemma3Model, stacked_parts
from model.weights import EMBEDDING

MS_DOMAIN = "com.microsoft"
# MatMulNBits accuracy level 4 quantizes activations to int8 per block on CPU: decode is many times faster than
# at level 0, which dequantizes every weight each call (BENCHMARKS.md).
ACCURACY_LEVEL = 4
# Level 4 rounds the input to int8 per block of the weights' grid, so the block size sets how finely activations
# are rounded: int8, the high-fidelity file, splits every grid into blocks of 16 (the same weights; one more
# scale per 16); int4, the fast one, keeps blocks of 32 (or the source's own, where smaller).
BLOCK_SIZE = {8: 16, 4: 32}


class Rewriter:
    """Adds initializers and nodes to one graph, with names derived from the node they replace."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph

    def constant(self, name: str, array: np.ndarray) -> ir.Value:
        dtype = ir.DataType.from_numpy(array.dtype)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype),
                         const_value=ir.tensor(np.ascontiguousarray(array), name=name))
        self.graph.register_initializer(value)
        return value

    def node(self, anchor: ir.Node, op_type: str, inputs: list[ir.Value], name: str, domain: str = "",
             **attributes: int) -> ir.Value:
        node = ir.Node(domain, op_type, inputs, name=name,
                       attributes=[ir.AttrInt64(key, value) for key, value in attributes.items()])
        self.graph.insert_before(anchor, node)
        return node.outputs[0]

    def take_place_of(self, old: ir.Node, new: ir.Value) -> None:
        """`new` is read wherever `old`'s output was, under its name, shape and type; `old` goes."""
        output = old.outputs[0]
        name, shape, value_type = output.name, output.shape, output.type
        output.replace_all_uses_with(new, replace_graph_outputs=True)
        output.name = f"{name}/replaced"
        self.graph.remove(old, safe=True)
        new.name, new.shape, new.type = name, shape, value_type

    def matmul_nbits(self, anchor: ir.Node, x: ir.Value, grid: BlockGrid, weight: ir.Value, name: str
                     ) -> ir.Value:
        """x [.., K] · gridᵀ → [.., N], offsets included; `weight` is the grid's packed values."""
        rows, cols = grid.shape
        blocks = cols // grid.block_size
        scales = self.constant(f"{name}/scales", grid.scales.reshape(-1))
        zero_points = self.constant(f"{name}/zero_points", packed_zero_points(grid))
        product = self.node(anchor, "MatMulNBits", [x, weight, scales, zero_points], name, MS_DOMAIN, K=cols,
                            N=rows, bits=grid.bits, block_size=grid.block_size, accuracy_level=ACCURACY_LEVEL)
        if grid.offsets is None:
            return product
        # Σ_b offsets[n, b] · (Σ_{k∈b} x[k]): a [.., blocks] × [blocks, N] product
        block_shape = self.constant(f"{name}/block_shape", np.array([0, 0, blocks, grid.block_size], np.int64))
        axis = self.constant(f"{name}/last_axis", np.array([-1], np.int64))
        by_block = self.node(anchor, "Reshape", [x, block_shape], f"{name}/by_block")
        block_sums = self.node(anchor, "ReduceSum", [by_block, axis], f"{name}/block_sums", keepdims=0)
        offsets = self.constant(f"{name}/offsets_t", np.ascontiguousarray(grid.offsets.T))
        correction = self.node(anchor, "MatMul", [block_sums, offsets], f"{name}/offset_product")
        return self.node(anchor, "Sub", [product, correction], f"{name}/minus_offsets")


def packed_values(grid: BlockGrid) -> np.ndarray:
    """[N, blocks, bytes per block]: 8-bit values as they are, 4-bit ones two per byte (low nibble first)."""
    rows, cols = grid.shape
    values = grid.values
    if grid.bits == 4:
        values = values[:, 0::2] | (values[:, 1::2] << np.uint8(4))
    return values.reshape(rows, cols // grid.block_size, -1)


def packed_zero_points(grid: BlockGrid) -> np.ndarray:
    """One byte per block at 8 bits; at 4 bits two per byte, each row padded to whole bytes."""
    if grid.bits == 8:
        return grid.zero_points.reshape(-1)
    rows, blocks = grid.zero_points.shape
    padded = np.zeros((rows, blocks + blocks % 2), dtype=np.uint8)
    padded[:, :blocks] = grid.zero_points
    return (padded[:, 0::2] | (padded[:, 1::2] << np.uint8(4))).reshape(-1)


def with_bits(grid: BlockGrid, bits: int) -> BlockGrid:
    """The same weights stored in more bits (values and zero points are the same small integers)."""
    return grid if grid.bits >= bits else replace(grid, bits=bits)


def weight_matmuls(graph: ir.Graph) -> list[ir.Node]:
    """The linear layers: MatMuls whose second input is a float initializer."""
    return [node for node in graph if node.op_type == "MatMul" and node.inputs[1].is_initializer()]


def matching_weight(weight: np.ndarray, weights: Mapping[tuple[int, int], list[tuple[str, np.ndarray]]]) -> str:
    """The parameter this MatMul weight ([K, N], the transpose) holds, bit for bit."""
    for name, parameter in weights.get(weight.shape[::-1], []):
        if np.array_equal(parameter, weight.T):
            return name
    raise RuntimeError(f"a {list(weight.shape)} MatMul weight of the traced graph equals no projection of the model")


def quantized_model_graph(graph: ir.Model, model: Gemma3Model, grids: Mapping[str, BlockGrid]) -> ir.Model:
    state = {name: tensor.float().numpy() for name, tensor in model.state_dict().items() if tensor.dim() == 2}
    return quantized_graph(graph, state, grids)


def quantized_graph(graph: ir.Model, weights: Mapping[str, np.ndarray], grids: Mapping[str, BlockGrid]
                    ) -> ir.Model:
    """A copy of `graph` with every weight matrix replaced by its grid (the traced graph stays as it was). Each
    MatMul weight is told apart by value: it must equal one of `weights` (the model's matrices but the
    embedding), bit for bit."""
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(graph))
    copy.opset_imports[MS_DOMAIN] = 1
    main = copy.graph
    rewriter = Rewriter(main)
    by_shape: dict[tuple[int, int], list[tuple[str, np.ndarray]]] = {}
    for name, weight in weights.items():
        if name != EMBEDDING:
            by_shape.setdefault(weight.shape, []).append((name, weight))
    for matmul in weight_matmuls(main):
        weight = matmul.inputs[1]
        parameter = matching_weight(weight.const_value.numpy(), by_shape)
        name = node_name(parameter)
        packed = rewriter.constant(f"{name}/values", packed_values(grids[parameter]))
        rewriter.take_place_of(matmul, rewriter.matmul_nbits(matmul, matmul.inputs[0], grids[parameter], packed,
                                                             name))
        del main.initializers[weight.name]
    replace_embedding_and_head(rewriter, with_bits(grids[EMBEDDING], EMBEDDING_BITS), weights[EMBEDDING].shape)
    return copy


def node_name(parameter: str) -> str:
    """A parameter's MatMulNBits node: its module, a stacked projection named by its parts
    (`layers.0.attention.q_proj+k_proj+v_proj`)."""
    parts = [part.rsplit(".", 2) for part in stacked_parts(parameter)]
    return f"{parts[0][0]}.{'+'.join(part[1] for part in parts)}"


def replace_embedding_and_head(rewriter: Rewriter, grid: BlockGrid, shape: tuple[int, int]) -> None:
    """The embedding's Gather and the head's MatMul(hidden, Transpose(embedding)) read one packed table."""
    main = rewriter.graph
    table = next(value for value in main.initializers.values()
                 if value.dtype == ir.DataType.FLOAT and tuple(value.shape) == tuple(shape))
    vocab, hidden = shape
    blocks = hidden // grid.block_size
    packed = rewriter.constant("embedding/values", packed_values(grid))  # [vocab, blocks, block] at 8 bits
    for reader, _ in list(table.uses()):
        if reader.op_type == "Gather":
            gather_rows(rewriter, reader, grid, packed, blocks)
        elif reader.op_type == "Transpose":
            for head, _ in list(reader.outputs[0].uses()):
                rewriter.take_place_of(head, rewriter.matmul_nbits(head, head.inputs[0], grid, packed, "lm_head"))
            main.remove(reader, safe=True)
        else:
            raise RuntimeError(f"the embedding is read by a {reader.op_type}: neither its Gather nor the head")
    del main.initializers[table.name]


def gather_rows(rewriter: Rewriter, gather: ir.Node, grid: BlockGrid, packed: ir.Value, blocks: int) -> None:
    """GatherBlockQuantized over the packed table ([vocab, blocks, block], quantized along the last axis), then
    the rows' offsets, and back to [.., hidden]."""
    name = "embedding"
    scales = rewriter.constant(f"{name}/row_scales", grid.scales[..., None])
    zero_points = rewriter.constant(f"{name}/row_zero_points", grid.zero_points[..., None])
    ids = gather.inputs[1]
    rows = rewriter.node(gather, "GatherBlockQuantized", [packed, ids, scales, zero_points], f"{name}/gather",
                         MS_DOMAIN, gather_axis=0, quantize_axis=2, block_size=grid.block_size, bits=grid.bits)
    if grid.offsets is not None:
        offsets = rewriter.constant(f"{name}/row_offsets", grid.offsets[..., None])
        row_offsets = rewriter.node(gather, "Gather", [offsets, ids], f"{name}/gather_offsets")
        rows = rewriter.node(gather, "Sub", [rows, row_offsets], f"{name}/minus_offsets")
    hidden_shape = rewriter.constant(f"{name}/hidden_shape", np.array([0, 0, blocks * grid.block_size], np.int64))
    rewriter.take_place_of(gather, rewriter.node(gather, "Reshape", [rows, hidden_shape], f"{name}/rows"))
