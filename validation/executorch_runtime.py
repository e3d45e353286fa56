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
        tokens = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).reshape(1, -1)
        for end, logits in self.program.prefill(tokens):
            self.position = end
        return logits

    def decode(self, token: np.ndarray) -> torch.Tensor:
        logits = self.program.run(torch.tensor([[int(token)]], dtype=torch.long), self.position)
        self.position += 1
        return logits

    def reset(self) -> None:
        self.position = 0
