"""Each op of the numpy MIL runner against numpy / torch references, on small programs built with the MIL
builder; fp16 programs must round like fp16 arithmetic does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from validation.mil import MILExecutor, load_program  # noqa: E402

DTYPES = {np.dtype(np.float16): types.fp16, np.dtype(np.float32): types.fp32, np.dtype(np.int32): types.int32,
          np.dtype(np.bool_): types.bool}


def run(build, *inputs: np.ndarray) -> list[np.ndarray]:
    """Build a one-function program from `build(*input_vars)` and execute it with the MIL runner."""
    specs = [mb.TensorSpec(shape=x.shape, dtype=DTYPES[x.dtype]) for x in inputs]
    program = mb.program(input_specs=specs, opset_version=ct.target.iOS18)(build)
    function = program.functions["main"]
    executor = MILExecutor(function)
    outputs = executor.run({name: x for name, x in zip(function.inputs, inputs)})
    return list(outputs.values())


def random(*shape: int, dtype=np.float32, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


# --- fp16 rounding -----------------------------------------------------------------------------------------

def test_fp16_add_rounds_to_nearest_even():
    x, y = np.array([2048.0, 1.0], np.float16), np.array([1.0, 2.0 ** -11], np.float16)
    out, = run(lambda x, y: mb.add(x=x, y=y), x, y)
    assert out.dtype == np.float16
    assert out.tolist() == [2048.0, 1.0]  # 2049 and 1 + 2⁻¹¹ are ties → even


@pytest.mark.parametrize("op, reference", [("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                                           ("real_div", np.divide), ("maximum", np.maximum),
                                           ("minimum", np.minimum)])
def test_fp16_binary_ops_equal_numpy_fp16(op, reference):
    x, y = random(64, dtype=np.float16, seed=1, scale=30), random(64, dtype=np.float16, seed=2, scale=3)
    out, = run(lambda x, y: getattr(mb, op)(x=x, y=y), x, y)
    np.testing.assert_array_equal(out, reference(x, y))  # numpy computes fp16 ops correctly rounded


def test_fp16_square_overflows_like_hardware():
    x = np.array([300.0, 255.0], np.float16)
    out, = run(lambda x: mb.mul(x=x, y=x), x)
    assert np.isinf(out[0]) and out[1] == np.float16(65024.0)


def test_fp16_reduce_mean_accumulates_in_fp32():
    x = np.full((1, 4096), 1.0 + 2.0 ** -10, np.float16)
    out, = run(lambda x: mb.reduce_mean(x=x, axes=[-1], keep_dims=True), x)
    assert out.shape == (1, 1) and out[0, 0] == np.float16(1.0 + 2.0 ** -10)


def test_cast_rounds_and_truncates():
    x = np.array([1.0 + 2.0 ** -12, 65519.0, 70000.0, -2.7], np.float32)
    half, whole = run(lambda x: (mb.cast(x=x, dtype="fp16"), mb.cast(x=x, dtype="int32")), x)
    assert half.tolist() == [1.0, 65504.0, float("inf"), np.float16(-2.7)]
    assert whole.tolist() == [1, 65519, 70000, -2]


# --- math ----------------------------------------------------------------------------------------------------

def test_unary_math_ops():
    x = np.abs(random(3, 5, seed=3)) + 0.1
    outs = run(lambda x: (mb.abs(x=mb.mul(x=x, y=-1.0)), mb.rsqrt(x=x, epsilon=1e-3), mb.inverse(x=x, epsilon=1e-2),
                          mb.clip(x=x, alpha=0.5, beta=1.0), mb.sqrt(x=x), mb.exp(x=x)), x)
    expected = [x, 1 / np.sqrt(x + 1e-3), 1 / (x + 1e-2), np.clip(x, 0.5, 1.0), np.sqrt(x), np.exp(x)]
    for out, reference in zip(outs, expected):
        np.testing.assert_allclose(out, reference, rtol=1e-6)


@pytest.mark.parametrize("mode, approximate", [("TANH_APPROXIMATION", "tanh"), ("EXACT", "none")])
def test_gelu_equals_torch(mode, approximate):
    x = random(4, 33, seed=4, scale=3)
    out, = run(lambda x: mb.gelu(x=x, mode=mode), x)
    np.testing.assert_allclose(out, F.gelu(torch.from_numpy(x), approximate=approximate).numpy(), atol=2e-6)


def test_reductions():
    x = random(2, 3, 7, seed=5)
    outs = run(lambda x: (mb.reduce_max(x=x, axes=[-1], keep_dims=True), mb.reduce_mean(x=x, axes=[1]),
                          mb.reduce_sum(x=x, axes=[0, 2])), x)
    np.testing.assert_allclose(outs[0], x.max(-1, keepdims=True))
    np.testing.assert_allclose(outs[1], x.mean(1), rtol=1e-6)
    np.testing.assert_allclose(outs[2], x.sum((0, 2)), rtol=1e-5)


def test_linear_and_matmul_equal_torch():
    x, weight, bias = random(1, 5, 16, seed=6), random(8, 16, seed=7), random(8, seed=8)
    lin, = run(lambda x: mb.linear(x=x, weight=weight, bias=bias), x)
    np.testing.assert_allclose(lin, F.linear(*map(torch.from_numpy, (x, weight, bias))).numpy(), rtol=1e-5, atol=1e-5)
    y = random(1, 8, 16, seed=9)
    product, = run(lambda x, y: mb.matmul(x=x, y=y, transpose_y=True), x, y)
    np.testing.assert_allclose(product, x @ y.transpose(0, 2, 1), rtol=1e-5, atol=1e-5)


def test_fp16_linear_is_fp32_accumulation_rounded_once():
    x, weight = random(1, 256, dtype=np.float16, seed=10), random(4, 256, dtype=np.float16, seed=11)
    out, = run(lambda x: mb.linear(x=x, weight=weight), x)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, (x.astype(np.float32) @ weight.astype(np.float32).T).astype(np.float16))


@pytest.mark.parametrize("dtype, tolerance", [(np.float32, 1e-5), (np.float16, 3e-3)])
def test_sdpa_with_bool_mask_equals_torch(dtype, tolerance):
    q, k, v = random(1, 2, 6, 16, seed=12), random(1, 2, 9, 16, seed=13), random(1, 2, 9, 16, seed=14)
    mask = np.tril(np.ones((6, 9), bool), k=3)[None, None]
    out, = run(lambda q, k, v, m: mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=m),
               q.astype(dtype), k.astype(dtype), v.astype(dtype), mask)
    reference = F.scaled_dot_product_attention(*(torch.from_numpy(t.astype(dtype).astype(np.float32))
                                                 for t in (q, k, v)), attn_mask=torch.from_numpy(mask))
    assert out.dtype == dtype
    np.testing.assert_allclose(out.astype(np.float32), reference.numpy(), atol=tolerance)


def test_softmax_and_comparisons():
    x, y = random(3, 4, seed=15), random(3, 4, seed=16)
    outs = run(lambda x, y: (mb.softmax(x=x, axis=-1), mb.less(x=x, y=y), mb.less_equal(x=x, y=x),
                             mb.greater(x=x, y=y), mb.greater_equal(x=x, y=y),
                             mb.logical_and(x=mb.less(x=x, y=y), y=mb.greater(x=x, y=0.0)),
                             mb.select(cond=mb.less(x=x, y=y), a=x, b=y)), x, y)
    np.testing.assert_allclose(outs[0], torch.softmax(torch.from_numpy(x), -1).numpy(), rtol=1e-6)
    expected = [x < y, x <= x, x > y, x >= y, (x < y) & (x > 0), np.where(x < y, x, y)]
    for out, reference in zip(outs[1:], expected):
        np.testing.assert_array_equal(out, reference)


# --- shapes and indexing -----------------------------------------------------------------------------------

def test_shape_ops_equal_numpy():
    x = random(2, 3, 4, seed=17)
    outs = run(lambda x: (mb.reshape(x=x, shape=[1, -1, 4]), mb.transpose(x=x, perm=[0, 2, 1]),
                          mb.expand_dims(x=x, axes=[1]), mb.squeeze(x=mb.expand_dims(x=x, axes=[0]), axes=[0]),
                          mb.concat(values=(x, x), axis=-1), mb.tile(x=x, reps=[1, 2, 1]), mb.shape(x=x)), x)
    expected = [x.reshape(1, -1, 4), x.transpose(0, 2, 1), x[:, None], x, np.concatenate([x, x], -1),
                torch.from_numpy(x).repeat(1, 2, 1).numpy(), np.array([2, 3, 4])]
    for out, reference in zip(outs, expected):
        np.testing.assert_array_equal(out, reference)


def test_split_and_interleaved_concat():
    x = random(2, 6, seed=18)
    first, second = run(lambda x: mb.split(x=x, split_sizes=[2, 4], axis=1), x)
    np.testing.assert_array_equal(first, x[:, :2])
    np.testing.assert_array_equal(second, x[:, 2:])
    interleaved, = run(lambda x: mb.concat(values=(x, x), axis=0, interleave=True), x)
    np.testing.assert_array_equal(interleaved, np.stack([x, x], 1).reshape(4, 6))


def test_gather_equals_take():
    table = random(10, 3, seed=19)
    indices = np.array([[0, 9, 4]], np.int32)
    out, = run(lambda i: mb.gather(x=table, indices=i, axis=0), indices)
    np.testing.assert_array_equal(out, table[indices])


def test_slice_by_index_with_masks():
    x = random(2, 5, 4, seed=20)
    out, = run(lambda x: mb.slice_by_index(x=x, begin=[1, 1, 0], end=[2, 4, 0], stride=[1, 2, 1],
                                           end_mask=[False, False, True], squeeze_mask=[True, False, False]), x)
    np.testing.assert_array_equal(out, x[1, 1:4:2, :])


def test_slice_update_writes_a_copy():
    x, update = np.zeros((1, 2, 8, 3), np.float16), random(1, 2, 3, 3, dtype=np.float16, seed=21)
    start = np.array([4], np.int32)

    def build(x, update, start):
        end = mb.add(x=start, y=3)
        begin = mb.concat(values=([0, 0], start, [0]), axis=0)
        stop = mb.concat(values=([1, 2], end, [3]), axis=0)
        return mb.slice_update(x=x, update=update, begin=begin, end=stop), x
    updated, original = run(build, x, update, start)
    expected = x.copy()
    expected[:, :, 4:7] = update
    np.testing.assert_array_equal(updated, expected)
    assert not original.any()


def test_range_and_fill_like():
    def build(n):
        ramp = mb.range_1d(start=0, end=mb.squeeze(x=n), step=1)
        return ramp, mb.fill_like(ref_tensor=ramp, value=1.0)
    ramp, ones = run(build, np.array([5], np.int32))
    np.testing.assert_array_equal(ramp, np.arange(5))
    np.testing.assert_array_equal(ones, np.ones(5))


# --- states --------------------------------------------------------------------------------------------------

def test_state_read_and_update_persist_between_calls():
    specs = [mb.StateTensorSpec((1, 4), dtype=types.fp16), mb.TensorSpec((1, 4), dtype=types.fp16)]

    @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
    def accumulate(state, x):
        total = mb.add(x=mb.read_state(input=state), y=x)
        mb.coreml_update_state(state=state, value=total)
        return mb.mul(x=mb.read_state(input=state), y=np.float16(2.0))

    executor = MILExecutor(accumulate.functions["main"])
    x = np.array([[1, 2, 3, 0.5]], np.float16)
    first = list(executor.run({"x": x}).values())[0]
    second = list(executor.run({"x": x}).values())[0]
    np.testing.assert_array_equal(first, 2 * x)
    np.testing.assert_array_equal(second, 4 * x)
    executor.reset()
    np.testing.assert_array_equal(list(executor.run({"x": x}).values())[0], 2 * x)


# --- compressed weights --------------------------------------------------------------------------------------

def test_blockwise_shift_scale_equals_coremltools_and_formula():
    data = np.random.default_rng(22).integers(-128, 127, (4, 64)).astype(np.int8)
    scale = np.random.default_rng(23).uniform(0.01, 0.1, (4, 2)).astype(np.float16)
    offset = np.random.default_rng(24).integers(-3, 3, (4, 2)).astype(np.int8)

    @mb.program(input_specs=[mb.TensorSpec((1, 64), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def program(x):
        weight = mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset)
        return mb.linear(x=x, weight=weight)

    executor = MILExecutor(program.functions["main"])
    dequantized = next(v for k, v in executor.constants.items() if v.shape == (4, 64) and v.dtype == np.float16)
    shifted = data.astype(np.float32) - np.repeat(offset, 32, 1)
    expected = (np.repeat(scale.astype(np.float32), 32, 1) * shifted).astype(np.float16)
    np.testing.assert_array_equal(dequantized, expected)
    op = next(op for op in program.functions["main"].operations if op.op_type == "constexpr_blockwise_shift_scale")
    np.testing.assert_array_equal(dequantized, op.materialized_val_inference())


def test_affine_dequantize_equals_coremltools():
    data = np.random.default_rng(25).integers(0, 255, (3, 8)).astype(np.uint8)
    scale, zero_point = np.array([0.5, 0.25, 0.125], np.float32), np.array([128, 100, 3], np.uint8)

    @mb.program(input_specs=[mb.TensorSpec((1, 8), dtype=types.fp32)], opset_version=ct.target.iOS16)
    def program(x):
        weight = mb.constexpr_affine_dequantize(quantized_data=data, zero_point=zero_point, scale=scale, axis=0)
        return mb.linear(x=x, weight=weight)

    executor = MILExecutor(program.functions["main"])
    op = next(op for op in program.functions["main"].operations if op.op_type == "constexpr_affine_dequantize")
    dequantized = executor.constants[op.outputs[0].name]
    np.testing.assert_array_equal(dequantized, op.materialized_val_inference())
    np.testing.assert_array_equal(dequantized[1], 0.25 * (data[1].astype(np.float32) - 100))


def test_int4_package_dequantizes_like_coremltools(tiny, tmp_path):
    from exporters import coreml

    variant = coreml.export(tiny.model, tmp_path, "int4", max_context=16, query_lengths=(1,))
    _, program = load_program(tmp_path / variant.files[0])
    function = program.functions["main"]
    executor = MILExecutor(function)
    compressed = [op for op in function.operations if op.op_type.startswith("constexpr_")]
    # Every weight matrix as its grid (exporters/weight_grids.py), the tied embedding as the LM head's chunks.
    matrices = sum(parameter.dim() == 2 for parameter in tiny.model.state_dict().values())
    assert len(compressed) == matrices - 1 + coreml.DEFAULT_LM_HEAD_CHUNKS
    assert {op.op_type for op in compressed} == {"constexpr_blockwise_shift_scale"}
    for op in [*compressed[:8], *compressed[-2:]]:
        np.testing.assert_array_equal(executor.constants[op.outputs[0].name], op.materialized_val_inference())


def test_unimplemented_op_is_named():
    @mb.program(input_specs=[mb.TensorSpec((2,), dtype=types.fp32)], opset_version=ct.target.iOS18)
    def program(x):
        return mb.sigmoid(x=x)

    with pytest.raises(NotImplementedError, match="sigmoid"):
        MILExecutor(program.functions["main"])
