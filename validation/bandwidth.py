"""The machine's memory read bandwidth, measured the way decode reads weights: one pass over a buffer far
larger than the caches, median of repeats. Divides bytes-per-token to give the tok/s ceiling."""

from __future__ import annotations

import statistics
import time

import torch


def measure_read_bandwidth(megabytes: int = 1024, repeats: int = 7) -> float:
    """Bytes per second of a matrix-vector product over a `megabytes` fp32 matrix (the decode access pattern)."""
    side = int((megabytes * 2**20 / 4) ** 0.5)
    matrix = torch.ones(side, side)  # filled, so every page is real memory
    vector = torch.ones(side)
    torch.mv(matrix, vector)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mv(matrix, vector)
        seconds.append(time.perf_counter() - started)
    return matrix.numel() * matrix.element_size() / statistics.median(seconds)


def ceiling_tokens_per_second(weight_bytes_per_token: int, bandwidth_bytes_per_second: float) -> float:
    return bandwidth_bytes_per_second / weight_bytes_per_token
