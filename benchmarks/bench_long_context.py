"""Issue-6 benchmark: PyTorch decode speed deep into the context, grouped-query attention before and after.

`repeat` is the attention as it was (each kv head's keys and values copied `num_heads / num_kv_heads` times with
repeat_interleave before SDPA), `gqa` as it is (`enable_gqa=True`: SDPA reads the shared kv head in place).
Both run in one process, interleaved repeat by repeat, so load from other jobs hits them alike; the table has
medians and the ratio gqa ÷ repeat.

Decode at a position P starts from a synthetic cache of P tokens (random keys and values, every slot valid and
placed where a real prompt would have put it: full layers at 0..P-1, sliding layers' rings at P mod window):
the step does the same work as after a real P-token prompt without minutes of prefill. The Generator is sized
for P + the decoded tokens, as `gemma-export generate` sizes it for prompt + --max-new-tokens.

    python benchmarks/bench_long_context.py --model gemma-3-270m --positions 100 --positions 8000 --decode-tokens 16
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click
import torch
import torch.nn.functional as F

import model.gemma3 as gemma3
from model.generate import Generator
from model.loading import load
from validation.bench import FIRST_ORDINARY_TOKEN

SDPA = F.scaled_dot_product_attention


def sdpa_with_repeated_heads(q, k, v, attn_mask=None, scale=None, enable_gqa=False):
    """The attention before issue 6: kv heads copied to every query head, then plain SDPA."""
    if enable_gqa:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return SDPA(q, k, v, attn_mask=attn_mask, scale=scale)


@contextmanager
def attention(kind: str) -> Iterator[None]:
    """`model.gemma3`'s SDPA for the block: as shipped (`gqa`) or the old copying version (`repeat`)."""
    gemma3.F.scaled_dot_product_attention = sdpa_with_repeated_heads if kind == "repeat" else SDPA
    try:
        yield
    finally:
        gemma3.F.scaled_dot_product_attention = SDPA


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
    kinds = ("repeat", "gqa")
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
    print("| position | repeat_interleave tok/s | enable_gqa tok/s | gqa ÷ repeat |")
    print("|---:|---:|---:|---:|")
    for position in positions:
        before, after = (statistics.median(rates[position, kind]) for kind in kinds)
        print(f"| {position} | {before:.1f} | {after:.1f} | {after / before:.2f}× |")
    first = statistics.median(rates[positions[0], "gqa"])
    for position in positions[1:]:
        print(f"gqa at {position} ÷ gqa at {positions[0]}: {statistics.median(rates[position, 'gqa']) / first:.2f}")


if __name__ == "__main__":
    main()
