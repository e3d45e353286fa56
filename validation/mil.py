"""Core ML numerics without Core ML: read a saved `.mlpackage`'s ML Program back and execute it with numpy.

`MILRunner(path)` loads the package's MIL program the way coremltools reads it (`milproto.load` over the
model spec, blob weights through `libmilstoragepython`), then runs the `main` function op by op. Semantics
follow the coremltools op documentation; precision follows the program: every op computes from its inputs
widened to float32 and rounds its result to the dtype the program declares for that output, so an fp16
program rounds after every op, as fp16 hardware does (accumulating products in fp32, as the GPU and Neural
Engine do). The fused iOS 18 attention is emulated as its decomposition would run in fp16: scores, softmax
weights and output each rounded to the program's dtype. `constexpr_*` ops (compressed weights) are
dequantized once at load. States (`read_state`, `coreml_update_state`) live in the runner between calls.

An op outside `OPS` fails at load time with its name, before any numbers are produced.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.errors import UserError
from validation.coreml_runtime import ChunkedStatefulDecoder, covering_chunks, package_metadata

Value = Any  # np.ndarray, or a tuple of them for ops with several outputs
OpFunction = Callable[[Any, dict[str, Any]], Value]

WEIGHTS_FOLDER = ("Data", "com.apple.CoreML", "weights")


def as_float32(x: np.ndarray) -> np.ndarray:
    """Floating inputs widened to float32 (fp16 → fp32 is exact); integers and booleans as they are."""
    x = np.asarray(x)
    return converted(x, np.dtype(np.float32)) if x.dtype == np.float16 else x


# Arrays from this many elements convert between float16 and float32 through torch: the same IEEE rounding
# (to nearest, ties to even; inf past 65504), with vector instructions numpy's casts lack (BENCHMARKS.md).
TORCH_CAST_ELEMENTS = 4096
HALF_AND_SINGLE = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}


def converted(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """x as dtype, not copied when it already is."""
    if x.dtype == dtype:
        return x
    if x.size >= TORCH_CAST_ELEMENTS and x.dtype in HALF_AND_SINGLE and dtype in HALF_AND_SINGLE \
            and x.flags.writeable:  # torch.from_numpy warns about read-only memory
        return torch.from_numpy(np.ascontiguousarray(x)).to(HALF_AND_SINGLE[dtype]).numpy()
    return x.astype(dtype)


def output_dtype(var: Any) -> np.dtype:
    from coremltools.converters.mil.mil import types

    return np.dtype(types.nptype_from_builtin(var.dtype))


# --- elementwise -------------------------------------------------------------------------------------------

def binary(function: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> OpFunction:
    return lambda op, a: function(as_float32(a["x"]), as_float32(a["y"]))


def unary(function: Callable[[np.ndarray], np.ndarray]) -> OpFunction:
    return lambda op, a: function(as_float32(a["x"]))


def real_div(op: Any, a: dict[str, Any]) -> np.ndarray:
    x, y = as_float32(a["x"]), as_float32(a["y"])
    if np.issubdtype(np.asarray(x).dtype, np.integer) and np.issubdtype(np.asarray(y).dtype, np.integer):
        return np.floor_divide(x, y)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.true_divide(x, y)


def epsilon_of(a: dict[str, Any], default: float) -> float:
    return float(a["epsilon"]) if a.get("epsilon") is not None else default


def rsqrt(op: Any, a: dict[str, Any]) -> np.ndarray:
    """1 / sqrt(x + epsilon) (epsilon defaults to 1e-12)."""
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(as_float32(a["x"]) + np.float32(epsilon_of(a, 1e-12)))


def inverse(op: Any, a: dict[str, Any]) -> np.ndarray:
    """1 / (x + epsilon) (epsilon defaults to 1e-4)."""
    with np.errstate(divide="ignore"):
        return 1.0 / (as_float32(a["x"]) + np.float32(epsilon_of(a, 1e-4)))


def clip(op: Any, a: dict[str, Any]) -> np.ndarray:
    return np.minimum(np.maximum(as_float32(a["x"]), np.float32(a["alpha"])), np.float32(a["beta"]))


def gelu(op: Any, a: dict[str, Any]) -> np.ndarray:
    x = as_float32(a["x"])
    mode = str(a.get("mode") or "EXACT")
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x ** 3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1.0 + np.exp(np.float32(-1.702) * x))
    return 0.5 * x * (1.0 + torch.special.erf(torch.from_numpy(x / np.float32(math.sqrt(2)))).numpy())


def select(op: Any, a: dict[str, Any]) -> np.ndarray:
    return np.where(a["cond"], as_float32(a["a"]), as_float32(a["b"]))


def cast(op: Any, a: dict[str, Any]) -> np.ndarray:
    """The target dtype is the output var's; float → int truncates toward zero, as coremltools does."""
    x = as_float32(a["x"])
    target = output_dtype(op.outputs[0])
    return np.trunc(x) if np.issubdtype(target, np.integer) and x.dtype.kind == "f" else x


# --- reductions, products ----------------------------------------------------------------------------------

def reduction(function: Callable[..., np.ndarray]) -> OpFunction:
    def reduce(op: Any, a: dict[str, Any]) -> np.ndarray:
        axes = a.get("axes")
        axis = None if axes is None else tuple(int(i) for i in np.atleast_1d(axes))
        keep = bool(a.get("keep_dims")) if a.get("keep_dims") is not None else False
        return function(as_float32(a["x"]), axis=axis, keepdims=keep)
    return reduce


def linear(op: Any, a: dict[str, Any], weight_cache: dict[int, np.ndarray]) -> np.ndarray:
    """x @ weightᵀ + bias, accumulated in float32 (fp16 weights are widened once and cached)."""
    weight = a["weight"]
    key = id(weight)
    if key not in weight_cache:
        weight_cache[key] = np.ascontiguousarray(as_float32(weight).T)
    out = matmul32(as_float32(a["x"]), weight_cache[key])
    return out + as_float32(a["bias"]) if a.get("bias") is not None else out


def matmul(op: Any, a: dict[str, Any]) -> np.ndarray:
    x, y = as_float32(a["x"]), as_float32(a["y"])
    if a.get("transpose_x"):
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y"):
        y = np.swapaxes(y, -1, -2)
    return matmul32(x, y)


def matmul32(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """float32 matrix product through torch's BLAS: numpy's matmul falls back to a slow loop for stacked or
    transposed operands, and this runner must decode the 270M model at a few tokens per second."""
    return torch.matmul(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))).numpy()


def softmax(op: Any, a: dict[str, Any]) -> np.ndarray:
    return softmax_along(as_float32(a["x"]), int(a.get("axis", -1)))


def softmax_along(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = x - x.max(axis=axis, keepdims=True)
    exponentials = np.exp(shifted)
    return exponentials / exponentials.sum(axis=axis, keepdims=True)


def scaled_dot_product_attention(op: Any, a: dict[str, Any]) -> np.ndarray:
    """softmax(q kᵀ / sqrt(E) + mask) v; a bool mask keeps True positions (False → -inf). Intermediates are
    rounded to the program's dtype, as the op's fp16 decomposition would be."""
    dtype = output_dtype(op.outputs[0])
    q, k, v = as_float32(a["query"]), a["key"], a["value"]
    mask = a.get("attn_mask")
    if mask is not None and mask.dtype == np.bool_:
        # Keys no query may see get weight exactly 0: leave them out (a decode step at position p of a
        # 2048-slot cache reads p + 1 keys, not 2048). The result is the same.
        visible = np.flatnonzero(mask.reshape(-1, mask.shape[-1]).any(axis=0))
        k, v, mask = np.take(k, visible, axis=-2), np.take(v, visible, axis=-2), np.take(mask, visible, axis=-1)
    k, v = as_float32(k), as_float32(v)
    scores = round_to(matmul32(q, np.swapaxes(k, -1, -2)) * np.float32(1 / math.sqrt(q.shape[-1])), dtype)
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == np.bool_ else scores + as_float32(mask)
    weights = round_to(softmax_along(scores, -1), dtype)
    return matmul32(weights, v)


def round_to(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    return as_float32(converted(np.asarray(x), np.dtype(np.float16))) if dtype == np.float16 else x


# --- shapes and indexing -----------------------------------------------------------------------------------

def reshape(op: Any, a: dict[str, Any]) -> np.ndarray:
    return np.reshape(a["x"], [int(n) for n in a["shape"]])


def transpose(op: Any, a: dict[str, Any]) -> np.ndarray:
    return np.transpose(a["x"], [int(n) for n in a["perm"]])


def expand_dims(op: Any, a: dict[str, Any]) -> np.ndarray:
    x = a["x"]
    rank = np.ndim(x) + len(a["axes"])
    return np.expand_dims(x, tuple(int(i) % rank for i in a["axes"]))


def squeeze(op: Any, a: dict[str, Any]) -> np.ndarray:
    axes = a.get("axes")
    return np.squeeze(a["x"], axis=None if axes is None else tuple(int(i) for i in axes))


def concat(op: Any, a: dict[str, Any]) -> np.ndarray:
    values = [np.asarray(as_float32(v)) for v in a["values"]]
    axis = int(a["axis"])
    if a.get("interleave"):
        stacked = np.stack(values, axis=axis + 1 if axis >= 0 else axis)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


def split(op: Any, a: dict[str, Any]) -> tuple[np.ndarray, ...]:
    x, axis = a["x"], int(a["axis"])
    if a.get("split_sizes") is not None:
        boundaries = np.cumsum([int(n) for n in a["split_sizes"]])[:-1]
        return tuple(np.split(x, boundaries, axis=axis))
    return tuple(np.split(x, int(a["num_splits"]), axis=axis))


def tile(op: Any, a: dict[str, Any]) -> np.ndarray:
    return np.tile(a["x"], [int(n) for n in a["reps"]])


def gather(op: Any, a: dict[str, Any]) -> np.ndarray:
    """Negative indices count from the end (iOS 17 semantics with validate_indices=False)."""
    x, axis = a["x"], int(a.get("axis", 0))
    indices = np.asarray(a["indices"]).astype(np.int64)
    if int(a.get("batch_dims") or 0):
        raise NotImplementedError("gather with batch_dims > 0 is not implemented in the MIL runner")
    return np.take(x, np.where(indices < 0, indices + np.shape(x)[axis], indices), axis=axis)


def slices(shape: Sequence[int], a: dict[str, Any]) -> tuple[tuple[Any, ...], list[int]]:
    """numpy index of slice_by_index / slice_update's begin/end/stride/masks, and the axes it squeezes."""
    rank = len(shape)
    begin, end = [int(n) for n in a["begin"]], [int(n) for n in a["end"]]
    stride = [int(n) for n in a["stride"]] if a.get("stride") is not None else [1] * rank
    begin_mask = list(a["begin_mask"]) if a.get("begin_mask") is not None else [False] * rank
    end_mask = list(a["end_mask"]) if a.get("end_mask") is not None else [False] * rank
    squeeze_mask = list(a["squeeze_mask"]) if a.get("squeeze_mask") is not None else [False] * rank
    index, squeezed = [], []
    for axis in range(rank):
        if squeeze_mask[axis]:
            index.append(slice(begin[axis], begin[axis] + 1 if begin[axis] != -1 else None))
            squeezed.append(axis)
            continue
        start = None if begin_mask[axis] else begin[axis]
        stop = None if end_mask[axis] else end[axis]
        index.append(slice(start, stop, stride[axis]))
    return tuple(index), squeezed


def slice_by_index(op: Any, a: dict[str, Any]) -> np.ndarray:
    x = np.asarray(a["x"])
    index, squeezed = slices(x.shape, a)
    return np.squeeze(x[index], axis=tuple(squeezed)) if squeezed else x[index]


def slice_update(op: Any, a: dict[str, Any]) -> np.ndarray:
    x = np.array(a["x"])  # a copy: the input may be read again (a state read before this write)
    index, _ = slices(x.shape, a)
    region = x[index]
    update = np.asarray(a["update"])
    if update.size != region.size:
        raise ValueError(f"slice_update {op.name}: update {update.shape} does not fit slice {region.shape}")
    x[index] = update.reshape(region.shape)
    return x


def shape(op: Any, a: dict[str, Any]) -> np.ndarray:
    return np.array(np.shape(a["x"]), dtype=np.int32)


def range_1d(op: Any, a: dict[str, Any]) -> np.ndarray:
    return np.arange(as_float32(a["start"]), as_float32(a["end"]), as_float32(a["step"]))


def fill_like(op: Any, a: dict[str, Any]) -> np.ndarray:
    return np.full(np.shape(a["ref_tensor"]), a.get("value", 0.0))


def fill(op: Any, a: dict[str, Any]) -> np.ndarray:
    return np.full([int(n) for n in a["shape"]], a.get("value", 0.0))


def band_part(op: Any, a: dict[str, Any]) -> np.ndarray:
    x = np.asarray(a["x"])
    lower, upper = int(a.get("lower", -1)), int(a.get("upper", -1))
    rows, cols = np.indices(x.shape[-2:])
    keep = ((lower < 0) | (rows - cols <= lower)) & ((upper < 0) | (cols - rows <= upper))
    return np.where(keep, x, np.zeros_like(x))


# --- compressed constants (evaluated once at load) ---------------------------------------------------------

def constexpr_affine_dequantize(op: Any, a: dict[str, Any]) -> np.ndarray:
    """scale * (quantized_data - zero_point), scale / zero_point broadcast along `axis` (iOS 16)."""
    data = np.asarray(a["quantized_data"]).astype(np.float32)
    axis = int(a["axis"]) % data.ndim
    shape = [1] * data.ndim
    scale, zero_point = np.asarray(a["scale"]).astype(np.float32), np.asarray(a["zero_point"]).astype(np.float32)
    if scale.ndim:
        shape[axis] = scale.size
    return scale.reshape(shape) * (data - zero_point.reshape(shape if zero_point.ndim else []))


def constexpr_blockwise_shift_scale(op: Any, a: dict[str, Any]) -> np.ndarray:
    """scale * (data - offset), each scale/offset element covering a block of data.shape / scale.shape."""
    data = np.asarray(a["data"]).astype(np.float32)
    scale = np.asarray(a["scale"]).astype(np.float32)
    offset = np.asarray(a["offset"]).astype(np.float32) if a.get("offset") is not None else None
    for axis, (size, count) in enumerate(zip(data.shape, scale.shape)):
        block = size // count
        scale = np.repeat(scale, block, axis=axis)
        offset = np.repeat(offset, block, axis=axis) if offset is not None else None
    return scale * (data - offset) if offset is not None else scale * data


CONSTEXPR_OPS: dict[str, OpFunction] = {
    "constexpr_affine_dequantize": constexpr_affine_dequantize,
    "constexpr_blockwise_shift_scale": constexpr_blockwise_shift_scale,
}

OPS: dict[str, OpFunction] = {
    "add": binary(np.add), "sub": binary(np.subtract), "mul": binary(np.multiply), "real_div": real_div,
    "maximum": binary(np.maximum), "minimum": binary(np.minimum), "pow": binary(np.power),
    "equal": binary(np.equal), "not_equal": binary(np.not_equal), "less": binary(np.less),
    "less_equal": binary(np.less_equal), "greater": binary(np.greater), "greater_equal": binary(np.greater_equal),
    "logical_and": binary(np.logical_and), "logical_or": binary(np.logical_or),
    "logical_not": unary(np.logical_not),
    "abs": unary(np.abs), "sqrt": unary(np.sqrt), "exp": unary(np.exp), "tanh": unary(np.tanh),
    "sin": unary(np.sin), "cos": unary(np.cos), "square": unary(np.square),
    "rsqrt": rsqrt, "inverse": inverse, "clip": clip, "gelu": gelu, "select": select, "cast": cast,
    "reduce_max": reduction(np.max), "reduce_mean": reduction(np.mean), "reduce_sum": reduction(np.sum),
    "matmul": matmul, "softmax": softmax, "scaled_dot_product_attention": scaled_dot_product_attention,
    "reshape": reshape, "transpose": transpose, "expand_dims": expand_dims, "squeeze": squeeze,
    "concat": concat, "split": split, "tile": tile, "gather": gather, "slice_by_index": slice_by_index,
    "slice_update": slice_update, "shape": shape, "range_1d": range_1d, "fill_like": fill_like, "fill": fill,
    "band_part": band_part,
}
# Ops that keep the runner's state or weights, handled by the executor itself.
EXECUTOR_OPS = ("const", "linear", "read_state", "coreml_update_state")


class MILExecutor:
    """Runs one MIL function (a coremltools pymil `Function`) with numpy; states persist between calls."""

    def __init__(self, function: Any) -> None:
        self.function = function
        self.state_names = [name for name, var in function.inputs.items() if is_state(var)]
        self.input_names = [name for name, var in function.inputs.items() if not is_state(var)]
        self.output_names = [var.name for var in function.outputs]
        self.constants: dict[str, Any] = {}
        self.steps: list[tuple[Any, OpFunction | None, dict[str, Any]]] = []
        self.weight_cache: dict[int, np.ndarray] = {}
        self._compile()
        self.states: dict[str, np.ndarray] = {}
        self.reset()

    def _compile(self) -> None:
        unknown = sorted({op.op_type for op in self.function.operations
                          if op.op_type not in OPS and op.op_type not in CONSTEXPR_OPS
                          and op.op_type not in EXECUTOR_OPS})
        if unknown:
            raise NotImplementedError(f"the MIL runner does not implement the op(s): {', '.join(unknown)}")
        for op in self.function.operations:
            if op.op_type == "const":
                self.constants[op.outputs[0].name] = np.asarray(op.outputs[0].val)
            elif op.op_type in CONSTEXPR_OPS:
                arguments = {name: self.constants[var.name] for name, var in op.inputs.items()}
                value = CONSTEXPR_OPS[op.op_type](op, arguments)
                self.constants[op.outputs[0].name] = value.astype(output_dtype(op.outputs[0]))
            else:
                self.steps.append((op, OPS.get(op.op_type), argument_names(op)))

    def reset(self) -> None:
        """Every state back to zeros (a fresh `make_state()`)."""
        from coremltools.converters.mil.mil import types

        for name in self.state_names:
            stored = self.function.inputs[name].sym_type.wrapped_type()
            self.states[name] = np.zeros(stored.get_shape(), dtype=types.nptype_from_builtin(stored.get_primitive()))

    def run(self, inputs: dict[str, np.ndarray], every_position: bool = False) -> dict[str, np.ndarray]:
        """The function's outputs; `every_position`: with the op that keeps only the chunk's last position
        passing every position on, so the logits are [1, chunk, vocab] (teacher forcing a text)."""
        values: dict[str, Any] = dict(self.constants)
        for name in self.input_names:
            values[name] = np.asarray(inputs[name]).astype(output_dtype(self.function.inputs[name]))
        keep_every_position = self.last_position_slice if every_position else None
        for op, function, names in self.steps:
            arguments = {key: (tuple(values[n] for n in name) if isinstance(name, tuple) else values[name])
                         for key, name in names.items()}
            outputs = arguments["x"] if op is keep_every_position else self._execute(op, function, arguments)
            with np.errstate(over="ignore"):  # an fp16 result past 65504 is inf, as on the device
                for var, value in zip(op.outputs, outputs if isinstance(outputs, tuple) else (outputs,)):
                    values[var.name] = converted(np.asarray(value), output_dtype(var))
        return {name: values[name] for name in self.output_names}

    @functools.cached_property
    def last_position_slice(self) -> Any:
        return last_position_slice(self.function)

    def _execute(self, op: Any, function: OpFunction | None, arguments: dict[str, Any]) -> Value:
        if op.op_type == "linear":
            return linear(op, arguments, self.weight_cache)
        if op.op_type == "read_state":
            return self.states[op.inputs["input"].name]
        if op.op_type == "coreml_update_state":
            name = op.inputs["state"].name
            self.states[name] = np.asarray(arguments["value"]).astype(self.states[name].dtype)
            return self.states[name]
        return function(op, arguments)


def last_position_slice(function: Any) -> Any:
    """The op that cuts the final hidden states to the chunk's last position before the norm and the LM head
    (exporters/coreml.py: `x[:, -1:]`): the last slice in the program whose input spans the chunk's symbolic
    length and whose output is one position long. Every op after it works per position."""
    for op in reversed(function.operations):
        if op.op_type == "slice_by_index":
            before, after = op.inputs["x"].shape, op.outputs[0].shape
            if len(before) == 3 and len(after) == 3 and not isinstance(before[1], int) and after[1] == 1:
                return op
            break
    raise NotImplementedError("the program has no last-position slice before its LM head")


def is_state(var: Any) -> bool:
    from coremltools.converters.mil.mil import types

    return types.is_state(var.sym_type)


def argument_names(op: Any) -> dict[str, Any]:
    """Each op input → the name of the var it reads (a tuple of names for tuple inputs such as concat's);
    state inputs are read by the executor itself."""
    names: dict[str, Any] = {}
    for key, var in op.inputs.items():
        if isinstance(var, (tuple, list)):
            names[key] = tuple(v.name for v in var)
        elif not is_state(var):
            names[key] = var.name
    return names


def load_program(path: Path) -> tuple[Any, Any]:
    """(the package's model spec, its MIL program) read from the saved files."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto import load as milproto

    path = Path(path)
    if not (path / "Manifest.json").exists():
        raise UserError(f"{path} is not a Core ML package", "export one with `gemma-export export --format coreml`")
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    program = milproto.load(spec, spec.specificationVersion, str(path.joinpath(*WEIGHTS_FOLDER)))
    return spec, program


class MILRunner(ChunkedStatefulDecoder):
    """The exported decoder, executed from its saved MIL program by `ChunkedStatefulDecoder`'s loop, the one
    the Core ML runtime runs; the KV cache states live in the executor."""

    def __init__(self, path: Path) -> None:
        spec, program = load_program(Path(path))
        self.executor = MILExecutor(program.functions["main"])
        self.every_position = False  # set while `prefill_every_position` runs its chunks
        metadata = package_metadata(Path(path))
        super().__init__(int(metadata["max_context"]), enumerated_lengths(spec))

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with single_threaded_products(inputs["input_ids"].shape[1] == 1):
            return self.executor.run(inputs, self.every_position)

    def reset_state(self) -> None:
        self.executor.reset()

    def prefill_every_position(self, input_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """[positions, vocab]: the logits after each prefix of `input_ids`, from prompt chunks as `prefill` runs
        them, with the program's last-position slice passing every position on (validation's teacher forcing)."""
        self.reset()
        ids = np.asarray(input_ids, dtype=np.int32).reshape(-1)
        chunks = covering_chunks(len(ids), self.query_lengths, room=self.max_context)
        # Positions past the text only follow it (causal attention): padding the last chunk with copies of the
        # last token leaves every real position's logits as they are, and saves a one-token step per token.
        padded = np.concatenate([ids, np.full(sum(chunks) - len(ids), ids[-1], dtype=np.int32)])
        self.every_position = True
        try:
            logits = [self._step(padded[self.position:self.position + chunk]).numpy().reshape(chunk, -1)
                      for chunk in chunks]
        finally:
            self.every_position = False
        return np.concatenate(logits)[:len(ids)]


@contextmanager
def single_threaded_products(active: bool) -> Iterator[None]:
    """One torch thread while `active`: matrix × vector products are memory-bound, and on a busy machine
    waking a second thread for each of a decode step's ~180 small products costs more than the product."""
    threads = torch.get_num_threads()
    if active and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def enumerated_lengths(spec: Any) -> list[int]:
    """The query lengths `input_ids` accepts (its enumerated shapes, or its one fixed shape)."""
    array = next(i for i in spec.description.input if i.name == "input_ids").type.multiArrayType
    shapes = [list(s.shape) for s in array.enumeratedShapes.shapes] or [list(array.shape)]
    return sorted({int(s[-1]) for s in shapes})
