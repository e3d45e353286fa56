"""Running an exported Core ML package: `ChunkedStatefulDecoder`, the one prefill/decode loop over a package's
`(input_ids, cache_position) -> logits` with the KV cache in its states, and `CoreMLRuntimeDecoder`, that loop
on the Core ML runtime (macOS only). The MIL interpreter (`validation/mil.py`) runs the same loop with numpy.

The package's contract (inputs, enumerated query lengths, the options in its metadata) is written by
`exporters/coreml.py`; this module only reads it.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.errors import UserError

COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")


def package_metadata(path: Path) -> dict[str, str]:
    """The options the exporter stored in the package (max_context, query_lengths, ...)."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    return dict(spec.description.metadata.userDefined)


class ChunkedStatefulDecoder:
    """`prefill(ids) -> logits`, `decode(token) -> logits` (float32 [1, vocab]), `reset()` over a stateful
    package; the KV cache lives in its states. A prompt goes in chunks of the package's query lengths, longest
    first (600 = 512 + 64 + 24 × 1). A subclass runs the program: `predict(inputs) -> outputs` and
    `reset_state()` (a fresh cache)."""

    def __init__(self, max_context: int, query_lengths: Sequence[int]) -> None:
        self.max_context = max_context
        self.query_lengths = query_lengths
        self.reset()

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        raise NotImplementedError

    def reset_state(self) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        self.reset_state()
        self.position = 0

    def prefill(self, input_ids: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        self.reset()
        ids = np.asarray(input_ids, dtype=np.int32).reshape(-1)
        logits = None
        for chunk in prompt_chunks(len(ids), self.query_lengths):
            logits = self._step(ids[self.position:self.position + chunk])
        return logits

    def decode(self, token: int | torch.Tensor) -> torch.Tensor:
        return self._step(np.asarray([int(token)], dtype=np.int32))

    def _step(self, ids: np.ndarray) -> torch.Tensor:
        check_room(self.position, len(ids), self.max_context)
        outputs = self.predict({"input_ids": ids[None], "cache_position": np.array([self.position], np.int32)})
        self.position += len(ids)
        return torch.from_numpy(np.asarray(outputs["logits"], dtype=np.float32).reshape(1, -1))


class CoreMLRuntimeDecoder(ChunkedStatefulDecoder):
    """The real Core ML runtime (macOS only); the KV cache lives in the model's state."""

    def __init__(self, path: Path, compute_units: str = "CPU_AND_NE") -> None:
        if platform.system() != "Darwin":
            raise UserError("Core ML prediction needs macOS; use the MIL runner",
                            "validate with validation.mil.MILRunner on this machine")
        if compute_units not in COMPUTE_UNITS:
            raise UserError(f"unknown compute units {compute_units!r}", f"use one of: {', '.join(COMPUTE_UNITS)}")
        import coremltools as ct

        metadata = package_metadata(Path(path))
        self.mlmodel = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, compute_units))
        super().__init__(int(metadata["max_context"]),
                         sorted(int(n) for n in metadata["query_lengths"].strip("[]").split(",")))

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        return self.mlmodel.predict(inputs, state=self.state)

    def reset_state(self) -> None:
        self.state = self.mlmodel.make_state()


def prompt_chunks(length: int, query_lengths: Sequence[int]) -> list[int]:
    """Chunk sizes that cover `length` tokens exactly, longest allowed size first (1 is always allowed)."""
    if length < 1:
        raise UserError("the prompt is empty", "pass at least one token")
    chunks = []
    for size in sorted(query_lengths, reverse=True):
        while length >= size:
            chunks.append(size)
            length -= size
    return chunks


def covering_chunks(length: int, query_lengths: Sequence[int], room: int | None = None) -> list[int]:
    """Chunk sizes that cover at least `length` tokens with little padding, `room` tokens at most: the one chunk
    that holds the rest where it fits and wastes fewer tokens than the longest chunk that fits the rest, else that
    longest chunk."""
    chunks: list[int] = []
    while length > 0:
        fitting = max(size for size in query_lengths if size <= length)
        covering = min((size for size in query_lengths
                        if length <= size and (room is None or size <= room - sum(chunks))), default=None)
        chunk = covering if covering is not None and (fitting == 1 or covering - length < fitting) else fitting
        chunks.append(chunk)
        length -= chunk
    return chunks


def check_room(position: int, new_tokens: int, max_context: int) -> None:
    if position + new_tokens > max_context:
        raise UserError(f"{position + new_tokens} tokens exceed the package's max_context of {max_context}",
                        "shorten the prompt, generate fewer tokens or export with a larger max_context")
