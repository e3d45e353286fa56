"""The generate loop over a TorchScript (`model.pt`) or torch.export (`model.pt2`) file of
`exporters/torchscript.py`: the past, attention mask and positions live in the loop, the file holds no state.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from exporters.torchscript import load_exported_program, load_torchscript


class ExplicitCacheRunner:
    """Drives an exported explicit-cache decoder: `prefill(ids) -> logits`, `decode(token) -> logits`
    ([batch, vocab] float32 of the last position); the past, attention mask and positions live inside."""

    def __init__(self, path: Path) -> None:
        self.forward, metadata = self.load(Path(path))
        self.metadata = json.loads(metadata)
        self.reset()

    @staticmethod
    def load(path: Path) -> tuple[Callable[..., tuple[torch.Tensor, ...]], str]:
        """(the decoder's forward, its decoder.json)."""
        raise NotImplementedError

    def reset(self) -> None:
        self.past: list[torch.Tensor] = []
        self.attention_mask = torch.zeros(0, 0, dtype=torch.long)
        self.next_positions = torch.zeros(0, dtype=torch.long)

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        meta = self.metadata
        shape = (batch, meta["num_kv_heads"], 0, meta["head_dim"])
        return [torch.zeros(shape, dtype=getattr(torch, meta["kv_dtype"])) for _ in range(2 * meta["num_layers"])]

    def prefill(self, input_ids: torch.Tensor | list[int], attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Start a new sequence: ids [batch, seq] (or one list), left-padded where attention_mask is 0."""
        return self.prefill_every_position(input_ids, attention_mask)[:, -1]

    def prefill_every_position(self, input_ids: torch.Tensor | list[int], attention_mask: torch.Tensor | None = None
                               ) -> torch.Tensor:
        """`prefill`, answering every position's logits [batch, seq, vocab]: a text teacher-forced in one call."""
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        input_ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        self.past = self.empty_past(input_ids.shape[0])
        self.attention_mask = mask[:, :0]
        # HF's rule: a token's position is the number of real tokens before it (padding gets 0, it is masked).
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return self._step(input_ids, mask, position_ids)

    def decode(self, token: torch.Tensor | int) -> torch.Tensor:
        """Feed one token per row ([batch]) → logits for the next one."""
        input_ids = torch.as_tensor(token, dtype=torch.long).reshape(-1, 1)
        return self._step(input_ids, torch.ones_like(input_ids), self.next_positions[:, None])[:, -1]

    def greedy(self, input_ids: torch.Tensor | list[int], max_new_tokens: int,
               attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The file's own generate loop: new tokens [batch, max_new_tokens] and each step's logits."""
        step_logits = [self.prefill(input_ids, attention_mask)]
        tokens = [step_logits[-1].argmax(-1)]
        while len(tokens) < max_new_tokens:
            step_logits.append(self.decode(tokens[-1]))
            tokens.append(step_logits[-1].argmax(-1))
        return torch.stack(tokens, dim=1), step_logits

    def _step(self, input_ids: torch.Tensor, new_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        self.attention_mask = torch.cat([self.attention_mask, new_mask], dim=1)
        with torch.no_grad():
            outputs = self.forward(input_ids, self.attention_mask, position_ids, *self.past)
        self.past = list(outputs[1:])
        self.next_positions = position_ids[:, -1] + 1
        return outputs[0].float()


class TorchScriptDecoder(ExplicitCacheRunner):
    load = staticmethod(load_torchscript)

    def _step(self, input_ids: torch.Tensor, new_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        # TorchScript's optimizing executor makes a 16-bit file's decode step several times slower than plain
        # interpretation of the same graph (an fp32 file's is the same either way): BENCHMARKS.md.
        with torch.jit.optimized_execution(False):
            return super()._step(input_ids, new_mask, position_ids)


class ExportedProgramDecoder(ExplicitCacheRunner):
    load = staticmethod(load_exported_program)


def open_decoder(path: Path) -> ExplicitCacheRunner:
    """The runner for either file, chosen by its suffix (`.pt2` is torch.export, anything else TorchScript)."""
    return ExportedProgramDecoder(path) if Path(path).suffix == ".pt2" else TorchScriptDecoder(path)
