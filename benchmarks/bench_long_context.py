"""Issue-6 benchmark: PyTorch decode speed deep into the context, decode attention before and after.

`sdpa` is the decode attention as it was (SDPA with `enable_gqa=True` at every length), `matmul` as it is
(`model.gemma3.decode_attention` from DECODE_MATMUL_MIN_KEYS keys on: keys @ queries, softmax, blocked values).
(The commit before this one compared `repeat_interleave` with `enable_gqa`: see BENCHMARKS.md.)
Both run in one process, interleaved repeat by repeat, so load from other jobs hits them alike; the table has
medians and the ratio matmul ÷ sdpa.

Decode at a position P starts from a synthetic cache of P tokens (random keys and values, every slot valid and
placed where a real prompt would have put it: full layers at 0..P-1, sliding layers' rings at P mod window):
the step does the same work as after a real P-token prompt without minutes of prefill. The Generator is sized
for P + the decoded tokens, as `gemma-export generate` sizes it for prompt + --max-new-tokens.

    python benchmarks/bench_long_context.py --model gemma-3-270m --positions 100 --positions 8000 --decode-tokens 16
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click
import torch

import model.gemma3 as gemma3
from model.generate import Generator
from model.loading import load
from validation.bench import FIRST_ORDINARY_TOKEN

@contextmanager
def attention(kind: str) -> Iterator[None]:
    """`model.gemma3`'s decode attention for the block: as shipped (`matmul`) or SDPA at every length (`sdpa`)."""
    shipped = gemma3.DECODE_MATMUL_MIN_KEYS
    gemma3.DECODE_MATMUL_MIN_KEYS = shipped if kind == "matmul" else math.inf
    try:
        yield
    finally:
        gemma3.DECODE_MATMUL_MIN_KEYS = shipped


def generator_at(model, position: int, decode_tokens: int) -> Generator:
    """A Generator whose cache looks like after a `position`-token prompt (see the module docstring)."""
    generator = Generator(model, 1, position + decode_tokens + 1)
    torch.manual_seed(0)
    for layer in generator.cache.layers:
        layer.keys.normal_()
        layer.values.normal_()
        filled = torch.arange(max(0, position - layer.slots), position)
        layer.key_positions[filled % layer.slots] = filled
        layer.key_valid[:, filled % layer.slots] = True
    generator.position = position
    generator.row_positions.fill_(position)
    return generator


def decode_rate(make: Callable[[], Generator], decode_tokens: int) -> float:
    generator = make()
    token = torch.tensor([FIRST_ORDINARY_TOKEN])
    started = time.perf_counter()
    for _ in range(decode_tokens):
        token = generator.decode(token).argmax(-1)
    return decode_tokens / (time.perf_counter() - started)


@click.command()
@click.option("--model", "model_id", default="gemma-3-270m", show_default=True)
@click.option("--positions", type=int, multiple=True, default=(100, 8000), show_default=True)
@click.option("--decode-tokens", type=int, default=16, show_default=True)
@click.option("--repeats", type=int, default=5, show_default=True)
@click.option("--threads", type=int, default=None, help="torch threads (default: torch's)")
def main(model_id: str, positions: tuple[int, ...], decode_tokens: int, repeats: int, threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    model = load(model_id).model.eval()
    kinds = ("sdpa", "matmul")
    rates: dict[tuple[int, str], list[float]] = {(p, k): [] for p in positions for k in kinds}
    for position in positions:  # warm-up: first-call allocations are nobody's cost
        for kind in kinds:
            with attention(kind):
                decode_rate(lambda: generator_at(model, position, 2), 2)
    for _ in range(repeats):
        for position in positions:
            for kind in kinds:
                with attention(kind):
                    rates[position, kind].append(decode_rate(lambda: generator_at(model, position, decode_tokens),
                                                             decode_tokens))
    print(f"{model_id}, {torch.get_num_threads()} threads, {decode_tokens} tokens × {repeats} repeats (medians)")
    print("| position | SDPA tok/s | matmul decode attention tok/s | matmul ÷ sdpa |")
    print("|---:|---:|---:|---:|")
    for position in positions:
        before, after = (statistics.median(rates[position, kind]) for kind in kinds)
        print(f"| {position} | {before:.1f} | {after:.1f} | {after / before:.2f}× |")
    for kind in kinds:
        first = statistics.median(rates[positions[0], kind])
        for position in positions[1:]:
            print(f"{kind} at {position} ÷ {kind} at {positions[0]}: "
                  f"{statistics.median(rates[position, kind]) / first:.2f}")


if __name__ == "__main__":
    main()
