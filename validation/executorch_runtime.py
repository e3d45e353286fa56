"""The ExecuTorch runtime's own generate loop over a `.pte` bundle file (exporters/executorch.py says what the
program holds and loads it): the prompt in chunks through `prefill`, then one `decode` call per token."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from exporters.executorch import ExecuTorchProgram


class ExecuTorchDecoder:
    """Batch-1 decoder for validation/runners.py."""

    def __init__(self, path: Path, threads: int = 0) -> None:
        self.program = ExecuTorchProgram(path, threads)
        self.position = 0

    def prefill(self, ids: np.ndarray) -> torch.Tensor:
        """A new sequence: a chunk at position 0 makes the program forget the previous one's keys."""
        tokens = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).reshape(1, -1)
        chunk = self.program.max_prefill_chunk
        for start in range(0, tokens.shape[1], chunk):
            logits = self.program.run(tokens[:, start:start + chunk], start)
        self.position = tokens.shape[1]
        return logits

    def decode(self, token: np.ndarray) -> torch.Tensor:
        logits = self.program.run(torch.tensor([[int(token)]], dtype=torch.long), self.position)
        self.position += 1
        return logits

    def reset(self) -> None:
        self.position = 0
