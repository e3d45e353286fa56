"""The machine's memory read bandwidth: the most bytes per second that any of several read kernels gets out of a
buffer far larger than the caches. Divides bytes-per-token to give the decode tok/s ceiling.

One kernel alone understates the ceiling: a matrix-vector product on one shape can run below what the memory
delivers (its kernel, not the memory, is the limit), and a runtime's decode can then read "above the ceiling".
So every kernel reads at two buffer sizes, and the ceiling is the best of them, each a median of repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

REPEATS = 7


def median_bytes_per_second(read: Callable[[], object], nbytes: int, repeats: int = REPEATS) -> float:
    read()  # the first pass faults pages in and warms the kernel
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        read()
        seconds.append(time.perf_counter() - started)
    return nbytes / statistics.median(seconds)


def read_kernels(megabytes: int) -> dict[str, tuple[Callable[[], object], int]]:
    """Name → (a pass over a `megabytes` fp32 buffer, bytes it reads): torch's matrix-vector product (the decode
    access pattern) and sum (every thread), numpy's sum (one thread, another library's loop)."""
    flat = torch.ones(megabytes * 2**20 // 4)  # filled, so every page is real memory
    side = int(flat.numel() ** 0.5)
    matrix, vector = flat[:side * side].view(side, side), torch.ones(side)
    array = flat.numpy()
    return {"torch.mv": (lambda: torch.mv(matrix, vector), matrix.numel() * 4),
            "torch.sum": (lambda: flat.sum(), flat.numel() * 4),
            "numpy.sum": (lambda: array.sum(), array.nbytes)}


def measure_read_bandwidths(megabytes: int = 1024) -> dict[str, float]:
    """'kernel @ size MB' → bytes per second, for each kernel at `megabytes` and at half of it."""
    measured = {}
    for size in (megabytes, max(1, megabytes // 2)):
        for name, (read, nbytes) in read_kernels(size).items():
            measured[f"{name} @ {size} MB"] = median_bytes_per_second(read, nbytes)
    return measured


def measure_read_bandwidth(megabytes: int = 1024) -> float:
    """The best read bandwidth of every kernel and size (bytes per second)."""
    return max(measure_read_bandwidths(megabytes).values())


def ceiling_tokens_per_second(weight_bytes_per_token: int, bandwidth_bytes_per_second: float) -> float:
    return bandwidth_bytes_per_second / weight_bytes_per_token
