"""Running an exported ONNX decoder with onnxruntime: `OnnxDecoder`, the generate loop validation, the tests and
the benchmarks drive, and `weight_bytes_per_token`, what one decode step of a file reads.

The file's contract (I/O names, the optional `num_logits_to_keep` and `full_presents_new_only` inputs, the
sliding past's own axis and the window in the metadata) is written by `exporters/onnx.py`; this module only
reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from exporters.onnx import LOGITS_TO_KEEP, NEW_ONLY_PRESENTS, SLIDING_PAST_AXIS, SLIDING_WINDOW_KEY

# Tables that a decode step only gathers one row from (the token embedding): not read whole per token.
GATHER_OPS = {"Gather", "GatherBlockQuantized"}


def weight_bytes_per_token(path: str | Path) -> int:
    """Bytes of initializers one decode step reads: every weight but the tables that are only gathered from.
    The file size would count the int8 file's float32 embedding (671 MB, one row used per token) as read."""
    graph = onnx.load(str(path), load_external_data=False).graph
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for initializer in graph.initializer:
        if consumers.get(initializer.name, set()) <= GATHER_OPS:  # gathered only, or unused
            continue
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(initializer.data_type).itemsize
        total += int(np.prod(initializer.dims, dtype=np.int64)) * itemsize
    return total


ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def session_options(intra_op_threads: int = 0) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    # Spinning ORT threads keep burning the cores after run() and slow the PyTorch code that runs next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Errors only: warnings are for developers (each session would note that num_logits_to_keep, an input with
    # a default, is not constant-folded).
    options.log_severity_level = 3
    return options


class OnnxDecoder:
    """Greedy prefill/decode over an exported decoder with onnxruntime: feeds `present` back as the past,
    grows the attention mask and derives position ids from it (HF rule: cumsum(mask) - 1).

    The pasts stay ORT values between steps (`run_with_ort_values`): onnxruntime allocates each `present` and
    the next step reads it as its past in place, instead of a copy out to numpy and one back in per tensor per
    step. A prompt asks for its last position's logits only (`num_logits_to_keep` = 1). A sliding layer reads
    only its last `window - 1` past keys: once its past is a window longer than that, it is cut back to them
    (files that carry the window in their metadata), so no step copies a long past into a sliding `present`.
    With one row and one KV head (Gemma 3 270M decoding a prompt) and files that have `full_presents_new_only`,
    the full-attention layers' cache lives in buffers of this loop's own (`FullPastBuffer`): a step returns only
    their new keys, written into the buffer's next slots, and the next step's past is a view of the buffer, so
    no step copies a long past into a full layer's `present` either.
    """

    def __init__(self, model_path: Path | str, providers: Sequence[str] = ("CPUExecutionProvider",),
                 intra_op_threads: int = 0) -> None:
        self.session = ort.InferenceSession(str(model_path), session_options(intra_op_threads),
                                            providers=list(providers))
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        optional_inputs = {i.name for i in self.session.get_overridable_initializers()}
        # Files exported before num_logits_to_keep existed compute the logits of every position.
        self.can_keep_logits = LOGITS_TO_KEEP in optional_inputs
        # Files exported before sliding pasts had their own axis keep every past whole.
        window = self.session.get_modelmeta().custom_metadata_map.get(SLIDING_WINDOW_KEY)
        self.sliding_window = int(window) if window else None
        self.sliding_pasts = [index for index, spec in enumerate(self.past_inputs)
                              if spec.shape[2] == SLIDING_PAST_AXIS]
        # Files exported before full_presents_new_only return past + new from every layer.
        self.can_return_new_only = NEW_ONLY_PRESENTS in optional_inputs
        self.full_pasts = [index for index in range(len(self.past_inputs)) if index not in self.sliding_pasts]
        self.reset()

    def reset(self) -> None:
        self.past: list[ort.OrtValue] | None = None
        self.attention_mask: np.ndarray | None = None
        self.full_buffers: dict[int, FullPastBuffer] = {}

    def start_from(self, past: Sequence[np.ndarray], attention_mask: np.ndarray) -> None:
        """Continue after a given cache (one array per `past_key_values` input) and its mask [batch, past]."""
        self.past = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tensor)) for tensor in past]
        self.attention_mask = np.asarray(attention_mask, dtype=np.int64)
        self.full_buffers = {}
        if self.can_return_new_only and all(FullPastBuffer.fits(past[index]) for index in self.full_pasts):
            self.full_buffers = {index: FullPastBuffer(past[index]) for index in self.full_pasts}
            for index, buffer in self.full_buffers.items():
                self.past[index] = buffer.past()
        self.cut_sliding_pasts()

    def cut_sliding_pasts(self) -> None:
        """Cut each sliding layer's past back to its last `window - 1` keys once it is `window` longer: one
        small copy per layer every `window` steps, and each step's Concat stays within two windows. The sliding
        pasts grow and are cut together, so one length decides for all (one check per step, not 30)."""
        if self.sliding_window is None or not self.sliding_pasts:
            return
        keep = self.sliding_window - 1
        length = self.past[self.sliding_pasts[0]].shape()[2]
        if length < keep + self.sliding_window:
            return
        for index in self.sliding_pasts:
            newest = self.past[index].numpy()[:, :, length - keep:]
            # Copied into memory onnxruntime owns, like a present's: an OrtValue wrapping a numpy array hands
            # out views of it from .numpy(), which would outlive the array once this one is replaced.
            self.past[index] = ort.OrtValue.ortvalue_from_shape_and_type(newest.shape, newest.dtype)
            self.past[index].update_inplace(np.ascontiguousarray(newest))

    def extend(self, input_ids: Any, attention_mask: Any = None, logits_to_keep: int = 0) -> np.ndarray:
        """Run a chunk of tokens after what is cached → float32 logits [batch, seq, vocab], or of the last
        `logits_to_keep` positions only when that is > 0 (and the file has `num_logits_to_keep`)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        chunk_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if self.past is None:
            self.start_from([self.empty_past(spec, batch) for spec in self.past_inputs],
                            np.zeros((batch, 0), dtype=np.int64))
        self.attention_mask = np.concatenate([self.attention_mask, chunk_mask], axis=1)
        position_ids = np.clip(np.cumsum(self.attention_mask, axis=1) - 1, 0, None)[:, -seq:]
        inputs = {"input_ids": input_ids, "attention_mask": self.attention_mask,
                  "position_ids": np.ascontiguousarray(position_ids)}
        if logits_to_keep > 0 and self.can_keep_logits:
            inputs[LOGITS_TO_KEEP] = np.array(logits_to_keep, dtype=np.int64)
        if self.full_buffers:
            inputs[NEW_ONLY_PRESENTS] = np.array(True)
        feeds = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in inputs.items()}
        feeds.update((spec.name, past) for spec, past in zip(self.past_inputs, self.past))
        # OrtValues in and out: the presents come back as ORT-owned values and are fed in place as the next
        # pasts. (Not an io_binding: it refuses to bind num_logits_to_keep, an input with a default.)
        logits, *self.past = self.session.run_with_ort_values(self.output_names, feeds)
        for index, buffer in self.full_buffers.items():
            self.past[index] = buffer.append(self.past[index].numpy())
        self.cut_sliding_pasts()
        return logits.numpy()

    def prefill(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """Start over with a (left-padded) prompt → logits of its last token [batch, vocab]."""
        self.reset()
        return self.extend(input_ids, attention_mask, logits_to_keep=1)[:, -1]

    def prefill_every_position(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """`prefill`, answering every position's logits [batch, seq, vocab]: a text teacher-forced in one call."""
        self.reset()
        return self.extend(input_ids, attention_mask)

    def decode(self, token: Any) -> np.ndarray:
        """One token per row → logits of the next one [batch, vocab]."""
        return self.extend(np.asarray(token, dtype=np.int64).reshape(-1, 1))[:, -1]

    def generate(self, input_ids: Any, max_new_tokens: int, attention_mask: Any = None) -> np.ndarray:
        """Greedy tokens [batch, max_new_tokens] (no stop tokens: callers compare whole runs)."""
        logits = self.prefill(input_ids, attention_mask)
        tokens = []
        for step in range(max_new_tokens):
            tokens.append(logits.argmax(-1))
            if step < max_new_tokens - 1:
                logits = self.decode(tokens[-1])
        return np.stack(tokens, axis=1)

    @staticmethod
    def empty_past(spec: ort.NodeArg, batch: int) -> np.ndarray:
        _, kv_heads, _, head_dim = spec.shape
        return np.zeros((batch, kv_heads, 0, head_dim), dtype=ORT_DTYPES[spec.type])


class FullPastBuffer:
    """A full-attention layer's keys (or values) for `OnnxDecoder`, in a buffer with room to grow: the step's
    past is a view of its first `length` slots and the step's new keys are written after them. With one row
    and one KV head those slots are one contiguous block, so the view is what onnxruntime reads, without a
    copy. Out of room, it moves to a buffer twice its length (amortized: one copy per doubling)."""

    MIN_ROOM = 1024  # slots: a ~1k-token run never moves

    def __init__(self, past: np.ndarray) -> None:
        self.length = past.shape[2]
        self.slots = np.empty((*past.shape[:2], max(self.MIN_ROOM, 2 * self.length), past.shape[3]), past.dtype)
        self.slots[:, :, :self.length] = past

    @staticmethod
    def fits(past: np.ndarray) -> bool:
        """Only [1, 1, length, dim] pasts are a contiguous run of slots."""
        return past.shape[0] * past.shape[1] == 1

    def append(self, new: np.ndarray) -> ort.OrtValue:
        """Write the step's new keys after the past → the next step's past (a view of the buffer)."""
        end = self.length + new.shape[2]
        if end > self.slots.shape[2]:
            grown = np.empty((*self.slots.shape[:2], 2 * end, self.slots.shape[3]), self.slots.dtype)
            grown[:, :, :self.length] = self.slots[:, :, :self.length]
            self.slots = grown
        self.slots[:, :, self.length:end] = new
        self.length = end
        return self.past()

    def past(self) -> ort.OrtValue:
        # onnxruntime reads the numpy memory in place (no copy); the OrtValue keeps the array alive.
        return ort.OrtValue.ortvalue_from_numpy(self.slots[:, :, :self.length])
