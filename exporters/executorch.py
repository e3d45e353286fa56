"""ExecuTorch export: a `.pte` program for the ExecuTorch runtime (Android, iOS, Linux, macOS apps), its matrix
products delegated to XNNPACK (the CPU backend).

The program holds the reference model's own static KV cache (model/kv_cache.py: one slot per position of
`max_context` for full layers, a ring of `sliding_window` slots for sliding ones) as mutable buffers that the
runtime keeps between calls, and two methods over it:

- `prefill(input_ids int64 [1, n], cache_position int64 [1]) -> logits float32 [1, vocab]`, n in
  2..`max_prefill_chunk` (a longer prompt is fed in chunks of at most that many tokens; the chunk cannot be
  longer than the sliding window, whose ring it writes);
- `decode(input_ids int64 [1, 1], cache_position int64 [1]) -> logits float32 [1, vocab]`: the same
  computation at a static shape (XNNPACK plans a fixed shape once).

`cache_position` is the position of the chunk's first token; logits are those of its last token. A chunk at
position p first forgets every cached key at position p or later, so a new sequence is a prefill at 0 (no
reset call, no reload) and an app can rewind to any earlier position.

Precisions: fp32, and fp16 (model/gemma3.py's 16-bit weights, products and KV cache, the residual stream and norms
in float32; the LM head in fp16, `CachedDecoder.lm_head`), judged like every 16-bit file by the validation gate.

What an app needs to run it is in the program itself, as ExecuTorch's LLM runners read it (constant methods:
`get_max_context_len`, `get_max_seq_len`, `get_vocab_size`, `get_bos_id`, `get_eos_ids`, ...), beside the
bundle's tokenizer.json and config.json.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib.util
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.fx.experimental._config as symbolic_shapes_config
import torch.nn.functional as F
from torch import nn

from exporters.progress import Progress, report
from exporters.registry import FORMATS, PRECISION_DTYPES, check_precisions
from exporters.signature import ExportedVariant, tensor_spec
from model.config import Gemma3Config
from model.errors import UserError
from model.gemma3 import Gemma3Model
from model.kv_cache import KVCache

PRECISIONS = FORMATS["executorch"].precisions
PROGRAM_NAMES = {"fp32": "model.pte", "fp16": "model_fp16.pte"}
METHODS = ("prefill", "decode")
DEFAULT_MAX_CONTEXT = 2048
# The longest prompt chunk of one prefill call: XNNPACK plans its buffers for the largest shape it may see, so
# a bound that covers ordinary prompts in one call and not much more (and never more than a sliding layer's ring).
MAX_PREFILL_CHUNK = 512
# XNNPACK partitioner configs left out of the delegate: ExecuTorch's XNNPACK GELU ignores `approximate="tanh"` and
# computes the exact (erf) GELU, which moved the real model's logits by 0.01; Gemma's feed-forward uses the tanh
# form, which the portable kernel computes (BENCHMARKS.md, "ExecuTorch").
UNDELEGATED_CONFIGS = ("GeluConfig",)
FILE_MAGIC = b"ET12"  # bytes 4..8 of a .pte (its flatbuffer's file identifier)
# The build `make setup` installs: its native runtime is built against one torch (torch==2.13.0).
EXECUTORCH_VERSION = "1.5.1"


class CachedDecoder(nn.Module):
    """The reference model over its own `KVCache`, one chunk per call: (input_ids [1, n], cache_position [1]) →
    float32 logits [1, vocab] of the chunk's last token."""

    def __init__(self, model: Gemma3Model, max_context: int) -> None:
        super().__init__()
        self.model = model
        self.cache = KVCache(model.config, 1, max_context, dtype=next(model.parameters()).dtype)

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        positions = cache_position + torch.arange(input_ids.shape[1])
        for layer in self.cache.layers:  # forget what a previous sequence (or a rewound one) left from here on
            layer.key_positions.masked_fill_(layer.key_positions >= cache_position, -1)
        hidden = self.model.hidden_states(input_ids, cache=self.cache, cache_position=positions)
        return self.lm_head(hidden[:, -1])

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits. A 16-bit program multiplies in 16 bits and widens the logits (rounded to fp16: at most
        2^-11 of each): XNNPACK has no float32 product over 16-bit weights, and the model's own head (rows widened
        to float32 a chunk at a time) runs outside the delegate, in portable kernels (BENCHMARKS.md)."""
        weight = self.model.embed_tokens.weight
        if weight.dtype == torch.float32:
            return self.model.lm_head(hidden)
        return F.linear(hidden.to(weight.dtype), weight).float()


def export(model: Gemma3Model, out_dir: Path, precision: str = "fp32", max_context: int | None = None,
           progress: Progress = None) -> ExportedVariant:
    """Lower `model`, cast to `precision` (fp16: model/gemma3.py's 16-bit weights, products and KV cache, the rest
    float32), to XNNPACK and write out_dir/<PROGRAM_NAMES[precision]>, verified against the eager model of that
    precision."""
    check_precisions("executorch", [precision])
    if reason := unavailable_reason():
        raise UserError(reason, "run make setup, or pip install -e '.[executorch]' beside torch==2.13.0")
    config = model.config
    max_context = check_max_context(config, max_context)
    if next(model.parameters()).dtype != PRECISION_DTYPES[precision]:
        model = copy.deepcopy(model).to(PRECISION_DTYPES[precision])  # the caller's model stays as it was
    chunk = max_prefill_chunk(config, max_context)
    path = Path(out_dir) / PROGRAM_NAMES[precision]
    program_bytes = lowered_program(model.eval(), config, max_context, chunk, progress)
    report(progress, f"save {path.name}")
    path.write_bytes(program_bytes)
    del program_bytes
    gc.collect()
    report(progress, f"verify {path.name}")
    verify(model, path, max_context, chunk, VERIFY_TOLERANCE[precision])
    return ExportedVariant(precision=precision, files=[path.name], io=program_io(config, chunk),
                           options=export_options(model, max_context, chunk), logits_dtype="float32")


def unavailable_reason() -> str | None:
    """Why ExecuTorch cannot export or run here, or None."""
    if importlib.util.find_spec("executorch") is None:
        return f"ExecuTorch is not installed (make setup installs executorch=={EXECUTORCH_VERSION})"
    return None


def check_max_context(config: Gemma3Config, max_context: int | None) -> int:
    if max_context is None:  # 2048, or the whole context of a model that has less
        return min(DEFAULT_MAX_CONTEXT, config.context_length)
    if not 2 <= max_context <= config.context_length:
        raise UserError(f"max_context {max_context} is outside 2..{config.context_length} (the model's context)",
                        "pass e.g. 2048")
    return max_context


def max_prefill_chunk(config: Gemma3Config, max_context: int) -> int:
    """The longest chunk one prefill call takes: a sliding layer's ring holds min(window, max_context) slots, and
    a chunk longer than its ring would overwrite keys its own earlier tokens still read."""
    return max(2, min(MAX_PREFILL_CHUNK, config.sliding_window, max_context))


def lowered_program(model: Gemma3Model, config: Gemma3Config, max_context: int, chunk: int, progress: Progress
                    ) -> bytes:
    """torch.export of both methods → edge dialect, XNNPACK-delegated → the ExecuTorch program's bytes."""
    with quiet_native_output():
        from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
        from executorch.exir.passes import MemoryPlanningPass
        from executorch.exir.passes.init_mutable_pass import InitializedMutableBufferPass

    programs = {}
    for method in METHODS:
        report(progress, f"export {method}")
        programs[method] = exported_method(model, max_context, method, chunk)
    report(progress, "lower to XNNPACK")
    edge = to_edge_transform_and_lower(programs, partitioner=[xnnpack_partitioner()],
                                       constant_methods=runner_metadata(config, max_context, chunk))
    del programs
    buffer_names = mutated_buffer_names(edge.exported_program(method) for method in METHODS)
    report(progress, "to ExecuTorch")
    # Both methods read and write the same cache (share_mutable_buffers), which is allocated by the program,
    # not passed in (alloc_graph_input=False), and starts from its initial values (InitializedMutableBufferPass;
    # without it key_positions would start at 0, "written", instead of -1).
    program = edge.to_executorch(ExecutorchBackendConfig(
        passes=[InitializedMutableBufferPass(buffer_names)], emit_mutable_buffer_names=True,
        memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True)))
    return program.buffer


def mutated_buffer_names(programs: Iterable[Any]) -> list[str]:
    """The buffers functional programs (edge dialect) write: the cache's (model/kv_cache.py's LayerKVCache), by
    their own names (the patterns InitializedMutableBufferPass looks for in each placeholder's name, e.g.
    b_cache_layers_0_keys)."""
    return sorted({name.rsplit(".", 1)[-1] for program in programs
                   for name in program.graph_signature.buffers_to_mutate.values()})


def xnnpack_partitioner() -> Any:
    """XNNPACK's partitioner with every op config it has but UNDELEGATED_CONFIGS."""
    with quiet_native_output():
        from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return XnnpackPartitioner(configs=[config for config in ALL_PARTITIONER_CONFIGS
                                       if config.__name__ not in UNDELEGATED_CONFIGS])


def exported_method(model: Gemma3Model, max_context: int, method: str, chunk: int) -> Any:
    """One method's torch.export program over a fresh cache (each program owns its buffers; the lowering shares
    them by name)."""
    decoder = CachedDecoder(model, max_context).eval()
    length = 1 if method == "decode" else chunk
    example = (torch.zeros(1, length, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    dynamic = None if method == "decode" else ({1: torch.export.Dim("seq", min=2, max=chunk)}, None)
    # Size-oblivious: a traced size of 1 or 0 would otherwise be specialized on (the export of seq = 1 must
    # not assume anything of the cache's sizes).
    with torch.no_grad(), symbolic_shapes_config.patch(backed_size_oblivious=True):
        return torch.export.export(decoder, example, dynamic_shapes=dynamic, strict=False)


def runner_metadata(config: Gemma3Config, max_context: int, chunk: int) -> dict[str, Any]:
    """Constant methods of the program, under the names ExecuTorch's LLM runners read."""
    return {"get_max_context_len": max_context, "get_max_seq_len": chunk, "get_vocab_size": config.vocab_size,
            "get_n_layers": config.num_layers, "get_bos_id": config.bos_token_id,
            "get_eos_ids": list(config.eos_token_ids), "get_pad_id": config.pad_token_id, "use_kv_cache": True,
            "enable_dynamic_shape": True}


def export_options(model: Gemma3Model, max_context: int, chunk: int) -> dict[str, Any]:
    """The manifest's record of the program. `weight_bytes_per_token`: what a decode step reads (the file holds the
    embedding twice, the lookup's table and the delegated LM head's, and a step reads one row of the first)."""
    from importlib.metadata import version

    config = model.config
    ring = min(config.sliding_window, max_context)
    return {"weight_bytes_per_token": model.weight_bytes_per_token, "max_context": max_context,
            "max_prefill_chunk": chunk, "methods": list(METHODS), "delegate": "XNNPACK",
            "undelegated": list(UNDELEGATED_CONFIGS),
            "kv_cache": f"program buffers: full layers {max_context} slots, sliding layers a ring of {ring}",
            "metadata_methods": sorted(runner_metadata(config, max_context, chunk)),
            "executorch_version": version("executorch"), "torch_version": torch.__version__}


def program_io(config: Gemma3Config, chunk: int) -> dict[str, list[dict[str, Any]]]:
    return {"inputs": [tensor_spec("input_ids", "int64", [1, f"seq (prefill 2..{chunk}, decode 1)"]),
                       tensor_spec("cache_position", "int64", [1])],
            "outputs": [tensor_spec("logits", "float32", [1, config.vocab_size])]}


def verify(model: Gemma3Model, path: Path, max_context: int, chunk: int, tolerance: float) -> None:
    """The saved program must give the eager model's logits over a prompt that crosses the sliding window in
    chunks and then decode steps, twice: the second sequence starts over the first one's cache."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    length = min(max_context, config.sliding_window + chunk + VERIFY_DECODE_STEPS)
    ids = torch.randint(0, config.vocab_size, (1, length), generator=generator)
    with torch.no_grad():
        expected = model(ids)[0]
    program = ExecuTorchProgram(path)
    prompt = length - VERIFY_DECODE_STEPS

    def check(logits: torch.Tensor, position: int) -> None:
        difference = (logits[0] - expected[position]).abs().max().item()
        if not difference <= tolerance:
            raise RuntimeError(f"{path.name} differs from PyTorch by {difference} at position {position}")

    for _ in range(2):
        for end, logits in program.prefill(ids[:, :prompt]):
            check(logits, end - 1)
        for position in range(prompt, length):
            check(program.run(ids[:, position:position + 1], position), position)


VERIFY_DECODE_STEPS = 3
# Logit tolerance against the eager model of the same precision: a broken lowering is off by whole units. fp16:
# XNNPACK's 16-bit kernels round elsewhere than PyTorch's (BENCHMARKS.md, "ExecuTorch"); how close the program is
# to the float32 model is the validation gate's to judge.
VERIFY_TOLERANCE = {"fp32": 1e-3, "fp16": 0.25}


class ExecuTorchProgram:
    """A loaded `.pte`: its prefill and decode methods over the cache buffers they share. The runtime aborts the
    process on some malformed files instead of raising, so the file's identifier is checked first (its bytes
    against the manifest's sha256 are the bundle reader's check)."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        check_program_file(Path(path))
        with quiet_native_output():
            from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
            from executorch.runtime import Runtime

            _unsafe_reset_threadpool(threads or os.cpu_count() or 1)  # XNNPACK's thread pool
            # The Program must outlive its methods (they point into it), so it is kept here.
            self.program = Runtime.get().load_program(Path(path))
            self.methods = {name: self.program.load_method(name) for name in METHODS}
        self.max_context = self.constant("get_max_context_len")
        self.max_prefill_chunk = self.constant("get_max_seq_len")

    def constant(self, name: str) -> int:
        return int(self.program.load_method(name).execute([])[0])

    def prefill(self, input_ids: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """A new sequence ([1, n]) from position 0, in chunks of at most max_prefill_chunk tokens (the first one
        makes the program forget any previous sequence's keys): (end of each chunk, its last token's logits)."""
        for start in range(0, input_ids.shape[1], self.max_prefill_chunk):
            end = min(start + self.max_prefill_chunk, input_ids.shape[1])
            yield end, self.run(input_ids[:, start:end], start)

    def run(self, input_ids: torch.Tensor, position: int) -> torch.Tensor:
        """Logits [1, vocab] of the last of `input_ids` ([1, n], n ≤ max_prefill_chunk) placed at `position`."""
        length = input_ids.shape[1]
        if not 1 <= length <= self.max_prefill_chunk or not 0 <= position <= self.max_context - length:
            raise UserError(f"a chunk of {length} tokens at position {position} does not fit the program "
                            f"(chunks of 1..{self.max_prefill_chunk} tokens, context {self.max_context})",
                            "shorten the prompt, or re-export with a larger --max-context")
        method = self.methods["decode" if length == 1 else "prefill"]
        return method.execute([input_ids.contiguous(), torch.tensor([position], dtype=torch.long)])[0]


def check_program_file(path: Path) -> None:
    with open(path, "rb") as file:
        header = file.read(8)
    if header[4:8] != FILE_MAGIC:
        raise UserError(f"{path} is not an ExecuTorch program (no {FILE_MAGIC.decode()} identifier at byte 4)",
                        "re-export it: gemma-export export --format executorch")


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """ExecuTorch's first import and load print notices that say nothing about the export or the run (torchao's
    optional CUDA kernels, cpuinfo's CPU probing), some from native code: stdout and stderr are silenced at the
    file-descriptor level while they run."""
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        with open(os.devnull, "w") as sink:
            for fd in saved:
                os.dup2(sink.fileno(), fd)
            yield
    finally:
        for fd, copy_of_fd in saved.items():
            os.dup2(copy_of_fd, fd)
            os.close(copy_of_fd)
