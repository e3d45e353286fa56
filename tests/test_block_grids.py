"""Compressed files carry a quantized source's own weights: every GGUF block type we take maps onto a block grid
whose weights are bit for bit the `gguf` package's dequantization, and the int8 / int4 ONNX files built from
those grids reconstruct exactly the same float32 weights (a small GGUF written here with Q8_0, Q4_0, Q5_0, Q4_K
and Q6_K tensors; the real Q4_K_M GGUF in the real test)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch

from conftest import gguf_writer, real_bundle_path
from exporters.coreml import export_many as coreml_export_many
from exporters.coreml_grids import grids_by_weight
from exporters.onnx import BLOCK_SIZE, MODEL_FILES, export_many
from exporters.registry import export_bundle
from exporters.weight_grids import FLOAT_QUANTIZERS, model_grids, stacked_grids, tensor_grids
from model.block_grids import (GGUF_BLOCK_TYPES, BlockGrid, grid_from_gguf_blocks, least_squares_clipped,
                               round_to_nearest, stacked)
from model.config import Gemma3Config
from model.errors import UserError
from model.gemma3 import source_state_dict
from model.loading import build_model
from model.weights import EMBEDDING, GGUF_NAMES, load_weights, parameter_shapes, source_block_grids, source_names
from validation.mil import MILExecutor, load_program
from validation.onnx_runtime import OnnxDecoder

gguf = pytest.importorskip("gguf")

# Byte offsets of each block's float16 scale fields (d; dmin for Q4_K), and of Q6_K's int8 sub-block scales:
# random bytes there would make infinities or absurd weights.
HALF_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q5_0": (0,), "Q4_K": (0, 2), "Q6_K": (208,)}
Q6_K_SCALES = slice(192, 208)


def random_blocks(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A [rows, bytes per row] tensor of random `type_name` blocks with modest scales, as a GGUF stores it."""
    elements, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    raw = rng.integers(0, 256, size=(rows * cols // elements, size), dtype=np.uint8)
    for offset in HALF_FIELDS[type_name]:
        raw[:, offset:offset + 2] = rng.uniform(0.002, 0.02, raw.shape[0]).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if type_name == "Q6_K":
        raw[:, Q6_K_SCALES] = rng.integers(-4, 5, (raw.shape[0], 16)).astype(np.int8).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("type_name", sorted(GGUF_BLOCK_TYPES))
def test_each_block_type_rebuilds_the_gguf_dequantization_bit_for_bit(type_name):
    rows, cols = 6, 512
    raw = random_blocks(type_name, rows, cols, np.random.default_rng(1))
    grid = grid_from_gguf_blocks(type_name, raw, rows, cols)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(rows, cols)
    assert grid.values.max() < 2 ** grid.bits and grid.scales.shape == (rows, cols // grid.block_size)
    np.testing.assert_array_equal(grid.weight().view(np.uint32), expected.astype(np.float32).view(np.uint32))


def test_stacked_grids_keep_each_part_and_round_to_nearest_is_within_half_a_step():
    rng = np.random.default_rng(2)
    q6 = grid_from_gguf_blocks("Q6_K", random_blocks("Q6_K", 2, 256, rng), 2, 256)  # blocks of 16, 8-bit
    q4k = grid_from_gguf_blocks("Q4_K", random_blocks("Q4_K", 3, 256, rng), 3, 256)  # 32, 4-bit, offsets
    both = stacked([q4k, q6])
    assert (both.block_size, both.bits, both.shape) == (16, 8, (5, 256))
    np.testing.assert_array_equal(both.weight(), np.concatenate([q4k.weight(), q6.weight()]))
    weight = rng.normal(size=(4, 64)).astype(np.float32)
    rounded = round_to_nearest(weight, 4, 32)
    step = np.repeat(rounded.scales, 32, axis=1)
    assert np.all(np.abs(rounded.weight() - weight) <= step / 2 + 1e-7)


def test_least_squares_clipping_never_loses_to_round_to_nearest_and_wins_on_outliers():
    rng = np.random.default_rng(3)
    weight = rng.normal(scale=0.02, size=(64, 128)).astype(np.float32)
    weight[::7, ::29] *= 10  # one outlier in some blocks: clipping it buys a finer step for the rest
    for bits in (4, 8):
        plain, clipped = round_to_nearest(weight, bits, 32), least_squares_clipped(weight, bits, 32)
        assert (clipped.bits, clipped.block_size, clipped.offsets) == (bits, 32, None)
        assert clipped.values.max() <= 2 ** bits - 1
        errors = [((grid.weight() - weight) ** 2).reshape(64, 4, 32).sum(-1) for grid in (plain, clipped)]
        assert np.all(errors[1] <= errors[0] * (1 + 1e-6))  # the full range is one of the candidates
    plain4, clipped4 = round_to_nearest(weight, 4, 32), least_squares_clipped(weight, 4, 32)
    error4 = [((grid.weight() - weight) ** 2).sum() for grid in (plain4, clipped4)]
    assert error4[1] < error4[0]


def test_a_float_source_gets_its_layers_at_the_precisions_bits_and_the_embedding_at_eight(tiny):
    for bits, block_size in ((4, 32), (8, 16)):
        grids = model_grids(tiny.model, {}, bits, block_size)
        matrices = {name for name, parameter in tiny.model.state_dict().items() if parameter.dim() == 2}
        assert set(grids) == matrices
        for name, grid in grids.items():
            assert grid.bits == (max(bits, 8) if name == EMBEDDING else bits), name
            assert grid.block_size == block_size and grid.source_type == "least-squares clipped"
            weight = tiny.model.state_dict()[name].numpy()
            step = grid.per_element(grid.scales)
            clipped = (grid.values == 0) | (grid.values == 2 ** grid.bits - 1)
            # within half a step wherever the block's range was not clipped
            assert np.all((np.abs(grid.weight() - weight) <= step / 2 + 1e-7) | clipped), name


# ---- a small GGUF with every type, through the ONNX exporter ------------------------------------------------

# K-quants need rows of whole 256-weight super-blocks: hidden 256 and intermediate 512.
SMALL = Gemma3Config(vocab_size=512, context_length=256, hidden_size=256, intermediate_size=512, num_layers=2,
                     num_heads=2, num_kv_heads=1, head_dim=128, sliding_window=8, sliding_window_pattern=2,
                     query_pre_attn_scalar=128)
# Our parameter (suffix) → its GGUF type, per layer: one stacked projection mixes 4- and 8-bit grids and blocks of
# 16 and 32 (q|k|v, gate|up), and o / down carry Q4_K's offsets.
LAYER_TYPES = [{"q_proj": "Q5_0", "k_proj": "Q8_0", "v_proj": "Q6_K", "o_proj": "Q4_K", "gate_proj": "Q4_0",
                "up_proj": "Q5_0", "down_proj": "Q6_K"},
               {"q_proj": "Q4_K", "k_proj": "Q5_0", "v_proj": "Q5_0", "o_proj": "Q6_K", "gate_proj": "Q5_0",
                "up_proj": "Q4_K", "down_proj": "Q4_K"}]


def type_of(ours: str) -> str | None:
    if ours == "embed_tokens.weight":
        return "Q8_0"
    if ours.endswith("norm.weight"):
        return None
    layer, part = int(ours.split(".")[1]), ours.split(".")[-2]
    return LAYER_TYPES[layer][part]


def write_mixed_gguf(path: Path, config: Gemma3Config, unsupported: str | None = None) -> Path:
    """A gemma3 GGUF of `config` with LAYER_TYPES' block types (random blocks); `unsupported` names a tensor
    written as IQ2_XS instead."""
    rng = np.random.default_rng(3)
    writer = gguf_writer(path, config)
    shapes = parameter_shapes(config)
    for ours, gguf_name in source_names(GGUF_NAMES, config.num_layers).items():
        shape = shapes[ours]
        type_name = "IQ2_XS" if ours == unsupported else type_of(ours)
        if type_name is None:
            writer.add_tensor(gguf_name, rng.normal(0, 0.1, shape).astype(np.float32) + np.float32(1.0))
        elif type_name == "IQ2_XS":
            elements, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ2_XS]
            raw = rng.integers(0, 256, (shape[0], shape[1] // elements * size), dtype=np.uint8)
            raw.reshape(-1, size)[:, :2] = np.array([0.01], np.float16).view(np.uint8)
            writer.add_tensor(gguf_name, raw, raw_dtype=gguf.GGMLQuantizationType.IQ2_XS)
        else:
            writer.add_tensor(gguf_name, random_blocks(type_name, *shape, rng),
                              raw_dtype=gguf.GGMLQuantizationType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def onnx_weights(path: Path) -> dict[str, np.ndarray]:
    """Every weight matrix an int8/int4 file holds, rebuilt as onnxruntime reads it: scale · (value − zero
    point) per block, minus the offset product's offsets; keyed by the MatMulNBits node's name."""
    model = onnx.load(str(path))
    arrays = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    weights = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attributes = {attribute.name: attribute.i for attribute in node.attribute}
        rows, cols, bits, block = attributes["N"], attributes["K"], attributes["bits"], attributes["block_size"]
        blocks = cols // block
        packed, scales, zero_points = (arrays[name] for name in node.input[1:4])
        grid = BlockGrid(unpacked(packed.reshape(rows, -1), bits)[:, :cols], scales.reshape(rows, blocks),
                         unpacked(zero_points.reshape(rows, -1), bits)[:, :blocks],
                         arrays[f"{node.name}/offsets_t"].T if f"{node.name}/offsets_t" in arrays else None,
                         block, bits, "onnx")
        weights[node.name] = grid.weight()
    return weights


def unpacked(packed: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return packed
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[0], -1)


def expected_weights(state: dict[str, torch.Tensor], node_name: str) -> np.ndarray:
    if node_name == "lm_head":
        return state["embed_tokens.weight"].numpy()
    prefix, parts = node_name.rsplit(".", 1)
    return np.concatenate([state[f"{prefix}.{part}.weight"].numpy() for part in parts.split("+")])


def assert_bit_identical(file: Path, state: dict[str, torch.Tensor], matrices: int) -> None:
    rebuilt = onnx_weights(file)
    assert len(rebuilt) == matrices
    for name, weight in rebuilt.items():
        expected = expected_weights(state, name)
        assert weight.shape == expected.shape, name
        assert float(np.abs(weight - expected).max()) == 0.0, name


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory):
    return write_mixed_gguf(tmp_path_factory.mktemp("gguf") / "mixed.gguf", SMALL)


def test_int8_and_int4_onnx_files_hold_every_gguf_weight_exactly(mixed_gguf, tmp_path):
    weights = load_weights(str(mixed_gguf))
    model = build_model(weights, torch.device("cpu"), torch.float32)
    grids = source_block_grids(weights)
    assert {grid.source_type for grid in grids.values()} == set(GGUF_BLOCK_TYPES)
    variants = export_many(model, tmp_path, ["int8", "int4"], source_grids=grids)
    prompt = np.array([list(range(3, 23))])
    with torch.no_grad():
        reference = model(torch.from_numpy(prompt))[0].numpy()
    for variant in variants:
        assert variant.options["quantization"]["weight_grids"] == {
            "Q8_0": 2, "Q4_0": 1, "Q5_0": 5, "Q4_K": 4, "Q6_K": 3}
        file = tmp_path / variant.files[0]
        assert_bit_identical(file, weights.state_dict, 4 * SMALL.num_layers + 1)
        logits = OnnxDecoder(file).extend(prompt)[0]
        # exact weights; what is left is MatMulNBits rounding activations to int8 per block
        assert np.corrcoef(logits.ravel(), reference.ravel())[0, 1] > 0.999
        assert float(np.abs(logits - reference).max()) < 0.05 * float(np.abs(reference).max())


@pytest.mark.parametrize("quantizer", list(FLOAT_QUANTIZERS))
@pytest.mark.slow
def test_the_float_quantizer_asked_for_is_the_one_the_file_holds(tiny, tmp_path, quantizer):
    """export_bundle(float_quantizer=…) reaches the exporter (benchmarks/float_source_quantizers.py compares them
    this way): the int4 file's weights are that quantizer's grids of the float weights, bit for bit."""
    bundle = export_bundle(tiny, "onnx", ["int4"], tmp_path, float_quantizer=quantizer)
    rebuilt = onnx_weights(bundle.path / "onnx" / "model_q4.onnx")
    state = source_state_dict(tiny.model)
    grids = tensor_grids(tiny.model, {}, 4, BLOCK_SIZE[4], quantizer)
    assert {grid.source_type for grid in grids.values()} == {quantizer}
    for name, weight in rebuilt.items():
        parts = ["embed_tokens.weight"] if name == "lm_head" else [
            f"{name.rsplit('.', 1)[0]}.{part}.weight" for part in name.rsplit(".", 1)[1].split("+")]
        expected = np.concatenate([grids[part].weight() for part in parts])
        assert float(np.abs(weight - expected).max()) == 0.0, name
    assert any(float(np.abs(weight - expected_weights(state, name)).max()) > 0 for name, weight in rebuilt.items())


def test_a_type_without_an_exact_grid_is_named_and_requantized_only_when_asked(tmp_path):
    path = write_mixed_gguf(tmp_path / "iq2.gguf", SMALL, unsupported="layers.1.feed_forward.up_proj.weight")
    weights = load_weights(str(path))
    with pytest.raises(UserError) as error:
        source_block_grids(weights)
    assert "blk.1.ffn_up.weight is IQ2_XS" in error.value.cause and "--requantize" in error.value.fix
    grids = source_block_grids(weights, requantize=True)
    assert "layers.1.feed_forward.up_proj.weight" not in grids and len(grids) == 7 * SMALL.num_layers + 1 - 1


@pytest.mark.real
def test_real_int4_onnx_file_holds_the_gguf_weights_exactly(real, real_bundles):
    """The real Q4_K_M GGUF's own grids (Q8_0 embedding and head, Q5_0, Q6_K, Q4_K) in `model_q4.onnx` of the
    real `gemma-export all` bundle: every weight matrix bit for bit the dequantized GGUF."""
    file = real_bundle_path(real_bundles, "onnx") / MODEL_FILES["int4"]
    assert_bit_identical(file, real.weights.state_dict, 4 * real.model.config.num_layers + 1)


def coreml_grid_weights(path: Path) -> list[np.ndarray]:
    """The weights each `constexpr_blockwise_shift_scale` of a saved package decompresses to (fp16), as the MIL
    runner evaluates them at load."""
    program = load_program(path)[1]
    function = program.functions["main"]
    constants = MILExecutor(function).constants
    return [constants[op.outputs[0].name].astype(np.float32) for op in function.operations
            if op.op_type == "constexpr_blockwise_shift_scale"]


def assert_package_holds_grids(path: Path, model, source_grids: dict[str, BlockGrid], chunks: int) -> None:
    """Every weight constant of the package is its source grid (stacked as the model stacks q|k|v and gate|up):
    scale · (data − offset) within the fp16 rounding of scale, offset and product (Q4_K's minimum is a float
    offset); none left fp16 or re-rounded."""
    grids = stacked_grids(model, source_grids)
    parts = list(grids_by_weight(grids, {name: grid.weight() for name, grid in grids.items()}, EMBEDDING,
                                 chunks).values())
    rebuilt = coreml_grid_weights(path)
    assert len(rebuilt) == len(parts) == len(grids) - 1 + chunks
    for weight in rebuilt:
        candidates = [part for part in parts if part.shape == weight.shape]
        part = min(candidates, key=lambda part: float(np.abs(part.weight() - weight).max()))
        # fp16 rounds the scale, the offset and the product, each by at most 2^-11 of what it holds
        scales = np.abs(part.per_element(part.scales))
        terms = scales * (part.values + part.per_element(part.zero_points).astype(np.float32))
        if part.offsets is not None:
            terms = terms + np.abs(part.per_element(part.offsets))
        assert np.all(np.abs(weight - part.weight()) <= 2.0 ** -9 * terms + 2.0 ** -24), part.source_type
        parts = [other for other in parts if other is not part]
    assert parts == []


def test_coreml_int4_package_holds_every_gguf_weight_up_to_fp16_rounding(mixed_gguf, tmp_path):
    pytest.importorskip("coremltools")
    weights = load_weights(str(mixed_gguf))
    model = build_model(weights, torch.device("cpu"), torch.float32)
    grids = source_block_grids(weights)
    chunks = 4
    [variant] = coreml_export_many(model, tmp_path, ["int4"], max_context=64, query_lengths=(1, 4),
                                   lm_head_chunks=chunks, source_grids=grids)
    assert_package_holds_grids(tmp_path / variant.files[0], model, grids, chunks)
