"""TorchScript (`model.pt`, `torch.jit.trace`) and torch.export (`model.pt2`) exports of the explicit-cache
decoder, and the two loaders that read either file back (the export's verification and
`validation/torchscript_runtime.py`, the loop that drives them, use both).

Both files compute `Gemma3Model.forward_with_past` with the Hugging Face I/O of `exporters.signature`, as
flat positional tensors: `input_ids, attention_mask, position_ids, past_key_values.0.key, .0.value, ...` in,
`(logits, present.0.key, present.0.value, ...)` out. They hold no state, so one graph serves prefill
(past = 0) and decode (seq = 1) for any batch. Each archive carries `decoder.json` (layer count, KV shape
and dtype, I/O names), so a script that imports nothing but torch can build the empty past and run it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx.experimental._config as symbolic_shapes_config
from torch import nn

from exporters.progress import Progress, report
from exporters.registry import PRECISION_DTYPES, check_precisions
from exporters.signature import ExportedVariant, decoder_io
from model.config import Gemma3Config
from model.gemma3 import Gemma3Model

METADATA_FILE = "decoder.json"
# Trace-time sizes, all ≥ 2 and all different, so that a size baked into the graph by mistake cannot pass
# the verification (batch 3, seq 1 and 2, past 0 and beyond the sliding window).
EXAMPLE_SHAPES = {"batch": 2, "seq": 3, "past": 4}
# Logit tolerance of the verification against the eager model of the same precision (both run the same
# kernels: the measured difference is 0 on the tiny model, and within these on the real one).
VERIFY_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2, "fp16": 5e-2}

class ExplicitCacheDecoder(nn.Module):
    """`forward_with_past` with flat tensors in and out: the form tracers and exporters accept."""

    def __init__(self, model: Gemma3Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past_keys_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        past = list(zip(past_keys_values[0::2], past_keys_values[1::2]))
        logits, presents = self.model.forward_with_past(input_ids, attention_mask, position_ids, past)
        return (logits, *(tensor for key_value in presents for tensor in key_value))


def export(model: Gemma3Model, out_dir: Path, precision: str = "fp32", progress: Progress = None
           ) -> list[ExportedVariant]:
    """Write `model.pt` and `model.pt2` (or `model-<precision>.pt/.pt2`) into out_dir, each verified."""
    return [export_torchscript(model, out_dir, precision, progress),
            export_exported_program(model, out_dir, precision, progress)]


def export_torchscript(model: Gemma3Model, out_dir: Path, precision: str = "fp32", progress: Progress = None
                       ) -> ExportedVariant:
    decoder = decoder_in_precision(model, precision)
    path = Path(out_dir) / f"{file_stem(precision)}.pt"
    report(progress, f"trace {path.name}")
    with torch.no_grad():
        # check_trace re-runs the same shapes, which proves nothing here; verify() runs other shapes instead.
        traced = torch.jit.trace(decoder, example_inputs(decoder.model), check_trace=False)
    report(progress, f"save {path.name}")
    torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: metadata_json(decoder.model, precision)})
    report(progress, f"verify {path.name}")
    verify(decoder, load_torchscript(path)[0], precision)
    options = {"method": "torch.jit.trace", "example_shapes": EXAMPLE_SHAPES, "check_trace": False,
               "torch_version": torch.__version__}
    return variant(decoder.model.config, precision, path.name, options)


def export_exported_program(model: Gemma3Model, out_dir: Path, precision: str = "fp32", progress: Progress = None
                            ) -> ExportedVariant:
    decoder = decoder_in_precision(model, precision)
    path = Path(out_dir) / f"{file_stem(precision)}.pt2"
    report(progress, f"export {path.name}")
    # Export assumes a traced size is never 0 or 1 unless told otherwise; past = 0 (prefill) and seq = 1
    # (decode) are the two sizes every caller needs, so size-oblivious reasoning is switched on.
    with torch.no_grad(), symbolic_shapes_config.patch(backed_size_oblivious=True):
        program = torch.export.export(decoder, example_inputs(decoder.model),
                                      dynamic_shapes=dynamic_shapes(decoder.model.config))
    report(progress, f"save {path.name}")
    torch.export.save(program, str(path), extra_files={METADATA_FILE: metadata_json(decoder.model, precision)})
    report(progress, f"verify {path.name}")
    verify(decoder, load_exported_program(path)[0], precision)
    options = {"method": "torch.export.export", "example_shapes": EXAMPLE_SHAPES, "strict": False,
               "backed_size_oblivious": True, "dynamic_dims": ["batch", "seq", "past"],
               "torch_version": torch.__version__}
    return variant(decoder.model.config, precision, path.name, options)


def file_stem(precision: str) -> str:
    return "model" if precision == "fp32" else f"model-{precision}"


def decoder_in_precision(model: Gemma3Model, precision: str) -> ExplicitCacheDecoder:
    check_precisions("torchscript", [precision])
    dtype = PRECISION_DTYPES[precision]
    if next(model.parameters()).dtype != dtype:
        model = copy.deepcopy(model).to(dtype)  # the caller's model stays as it was
    return ExplicitCacheDecoder(model.eval())


def kv_dtype_name(precision: str) -> str:
    return str(PRECISION_DTYPES[precision]).removeprefix("torch.")


def variant(config: Gemma3Config, precision: str, file_name: str, options: dict[str, Any]) -> ExportedVariant:
    return ExportedVariant(precision=precision, files=[file_name], io=decoder_io(config, kv_dtype_name(precision)),
                           options=options, logits_dtype="float32")


def metadata_json(model: Gemma3Model, precision: str) -> str:
    """What a consumer needs to drive the file with nothing but torch (stored inside the archive)."""
    config = model.config
    return json.dumps({"num_layers": config.num_layers, "num_kv_heads": config.num_kv_heads,
                       "head_dim": config.head_dim, "vocab_size": config.vocab_size,
                       "kv_dtype": kv_dtype_name(precision), "io": decoder_io(config, kv_dtype_name(precision))})


def decoder_inputs(model: Gemma3Model, batch: int, seq: int, past: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random token ids and past keys/values with every row fully valid and positions past .. past + seq - 1."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, past + seq, dtype=torch.long)
    position_ids = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    kv_shape = (batch, config.num_kv_heads, past, config.head_dim)
    past_keys_values = [torch.randn(kv_shape, generator=generator).to(dtype) for _ in range(2 * config.num_layers)]
    return (input_ids, attention_mask, position_ids, *past_keys_values)


def example_inputs(model: Gemma3Model) -> tuple[torch.Tensor, ...]:
    return decoder_inputs(model, EXAMPLE_SHAPES["batch"], EXAMPLE_SHAPES["seq"], EXAMPLE_SHAPES["past"])


def dynamic_shapes(config: Gemma3Config) -> tuple[Any, ...]:
    batch = torch.export.Dim("batch", min=1)
    seq = torch.export.Dim("seq", min=1, max=config.context_length)
    past = torch.export.Dim("past", min=0, max=config.context_length)
    kv = {0: batch, 2: past}
    # The mask's length is past + seq; export works that out itself (a Dim cannot name a sum of two Dims).
    return ({0: batch, 1: seq}, {0: batch, 1: torch.export.Dim.AUTO}, {0: batch, 1: seq},
            tuple(kv for _ in range(2 * config.num_layers)))


def verify(decoder: ExplicitCacheDecoder, exported: Callable[..., tuple[torch.Tensor, ...]], precision: str) -> None:
    """The saved file must equal the eager decoder at sizes other than the traced ones: a prefill with
    past = 0, and a decode step of another batch size, with left padding, past the sliding window."""
    model = decoder.model
    prefill = decoder_inputs(model, batch=1, seq=2, past=0, seed=1)
    decode = decoder_inputs(model, batch=3, seq=1, past=model.config.sliding_window + 1, seed=2)
    decode[1][1, :2] = 0  # row 1 is left-padded
    for inputs in (prefill, decode):
        with torch.no_grad():
            expected, actual = decoder(*inputs), exported(*inputs)
        difference = max((e.float() - a.float()).abs().max().item() for e, a in zip(expected, actual))
        if len(actual) != len(expected) or not difference <= VERIFY_TOLERANCE[precision]:
            shapes = [tuple(t.shape) for t in inputs[:3]]
            raise RuntimeError(f"exported decoder differs from PyTorch by {difference} for inputs {shapes}")


def load_torchscript(path: Path) -> tuple[Callable[..., tuple[torch.Tensor, ...]], str]:
    """The saved TorchScript decoder's forward and its decoder.json."""
    extra_files = {METADATA_FILE: ""}
    module = torch.jit.load(str(path), _extra_files=extra_files)
    return module.eval(), extra_files[METADATA_FILE]


def load_exported_program(path: Path) -> tuple[Callable[..., tuple[torch.Tensor, ...]], str]:
    """The saved torch.export program's forward and its decoder.json."""
    extra_files = {METADATA_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra_files)
    return program.module(), extra_files[METADATA_FILE]
