"""Pre-allocated KV cache with static shapes.

Full-attention layers keep one slot per position of the context. Sliding-window layers keep a ring of
`sliding_window` slots: a query at position p needs keys p - window + 1 .. p, exactly one ring's worth, so a
32k-token context costs full layers 32k slots and sliding layers 512. Every buffer is allocated once; a decode
step writes one slot and reads fixed-size tensors, which is what `torch.compile` and tracing want.

Each layer's cache returns, for the attention of the current chunk, the keys/values it may attend to plus
`key_positions` (the cache index each key came from, -1 for a never-written slot) and `key_valid` (False for
left-padding), from which the attention builds its causal / sliding-window mask.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import Gemma3Config


class LayerKVCache(nn.Module):
    """Keys/values of one layer: `slots` positions, a plain array (full) or a ring (sliding)."""

    def __init__(self, batch_size: int, num_kv_heads: int, slots: int, head_dim: int, is_ring: bool,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.slots = slots
        self.is_ring = is_ring
        shape = (batch_size, num_kv_heads, slots, head_dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("key_positions", torch.full((slots,), -1, dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("key_valid", torch.zeros((batch_size, slots), dtype=torch.bool, device=device),
                             persistent=False)

    def reset(self) -> None:
        self.keys.zero_()
        self.values.zero_()
        self.key_positions.fill_(-1)
        self.key_valid.zero_()

    def update(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store the chunk's keys/values (cache indices `positions`, [seq]) and return what it attends to."""
        if self.is_ring:
            return self._update_ring(keys, values, positions, valid)
        self.keys.index_copy_(2, positions, keys)
        self.values.index_copy_(2, positions, values)
        self.key_positions.index_copy_(0, positions, positions)
        self.key_valid.index_copy_(1, positions, valid)
        return self.keys, self.values, self.key_positions, self.key_valid

    def _update_ring(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # The chunk attends to the ring as it was *before* this write plus its own keys: writing first would
        # overwrite keys that the chunk's earlier queries still need.
        attend = (torch.cat([self.keys, keys], dim=2), torch.cat([self.values, values], dim=2),
                  torch.cat([self.key_positions, positions]), torch.cat([self.key_valid, valid], dim=1))
        # Only the newest `slots` tokens can ever be needed again. A comparison rather than min(): an exported
        # program whose chunk is bounded by the ring (exporters/executorch.py) resolves it at export time, where
        # min() would stay a symbolic op in the graph.
        keep = self.slots if keys.shape[2] > self.slots else keys.shape[2]
        kept_positions = positions[-keep:]
        slots = kept_positions % self.slots
        self.keys.index_copy_(2, slots, keys[:, :, -keep:])
        self.values.index_copy_(2, slots, values[:, :, -keep:])
        self.key_positions.index_copy_(0, slots, kept_positions)
        self.key_valid.index_copy_(1, slots, valid[:, -keep:])
        return attend


class KVCache(nn.Module):
    """One `LayerKVCache` per layer, sized for `max_length` tokens (prompt + everything generated)."""

    def __init__(self, config: Gemma3Config, batch_size: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.max_length = max_length
        self.layers = nn.ModuleList(
            LayerKVCache(batch_size, config.num_kv_heads,
                         min(config.sliding_window, max_length) if config.is_sliding(i) else max_length,
                         config.head_dim, is_ring=config.is_sliding(i), dtype=dtype, device=device)
            for i in range(config.num_layers))

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()

    @property
    def nbytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())


class ConcatLayerKVCache:
    """One layer of the Hugging Face-style cache: past tensors in, past + new out (`present`).

    This is the form exported graphs use (explicit `past_key_values.{i}` inputs, `present.{i}` outputs, any
    past length). Sliding layers stay windowed through the mask, whatever the past length. A layer's past may
    also hold only the newest of the mask's tokens (a sliding layer's last `window - 1` is all it ever reads):
    its keys are then the last ones of `attention_mask`, and their positions count from there.
    """

    def __init__(self, past_keys: torch.Tensor, past_values: torch.Tensor, key_valid: torch.Tensor) -> None:
        self.past_keys, self.past_values, self.key_valid = past_keys, past_values, key_valid
        self.present: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        _, _, key_positions, key_valid = self.update_apart(keys, values)
        return (*self.present, key_positions, key_valid)

    def update_apart(self, keys: torch.Tensor, values: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Record the present (past + new), but return the past keys/values as they came in (the chunk's own
        are the caller's), with the positions/validity of past + chunk: an attention that reads past and chunk
        apart reads no concatenated copy, so only the `present` output needs one."""
        past_keys, past_values = self.past_keys.to(keys.dtype), self.past_values.to(values.dtype)
        self.present = (torch.cat([past_keys, keys], dim=2), torch.cat([past_values, values], dim=2))
        length = past_keys.shape[2] + keys.shape[2]
        return (past_keys, past_values, *self.positions_and_validity(length, keys.device))

    def positions_and_validity(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [length] and validity [batch, length] of the layer's last `length` keys."""
        first = self.key_valid.shape[1] - length  # 0 unless this past was cut to its newest keys
        return torch.arange(length, device=device) + first, self.key_valid[:, first:]


class ConcatKVCache:
    """All layers of a concat cache. `attention_mask` is [batch, past + seq] (1 = token, 0 = padding)."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor) -> None:
        valid = attention_mask.bool()
        self.layers = [ConcatLayerKVCache(keys, values, valid) for keys, values in past]

    def presents(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.present for layer in self.layers]
