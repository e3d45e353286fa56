"""Issue-6 benchmark: ONNX Runtime decode/prefill of exported files, side by side in one process, interleaved.

Each `--variant label=path[,loop=plain|decoder][,threads=N]` is one ONNX file driven by one loop:
`decoder` is `validation.onnx_runtime.OnnxDecoder` as it is now, `plain` the original session.run loop (numpy in and
out, the present copied back as the past) kept here for before/after runs. Every repeat measures every variant
once, in turn, so load from other jobs on the machine hits them alike; the table has medians and the ratio of
each variant to the first.

Decode at a position P starts from a synthetic past of P tokens (random keys and values, mask all ones): the
step does the same work as after a real P-token prompt without spending minutes to prefill 8000 tokens.

    python benchmarks/bench_onnx_decode.py --variant before=/tmp/a/model_q4.onnx,loop=plain \\
        --variant after=/tmp/b/model_q4.onnx --positions 100 --positions 8000 --decode-tokens 32 --repeats 5
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import click
import numpy as np
import onnxruntime as ort

from validation.bench import FIRST_ORDINARY_TOKEN
from validation.onnx_runtime import OnnxDecoder, session_options


class PlainLoop:
    """The loop OnnxDecoder had before issue 6: `session.run` with numpy feeds, presents fed back as pasts."""

    def __init__(self, path: str, threads: int) -> None:
        self.session = ort.InferenceSession(path, session_options(threads), providers=["CPUExecutionProvider"])
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.past: list[np.ndarray] = []
        self.attention_mask = np.zeros((1, 0), np.int64)

    def start_at(self, past_length: int) -> None:
        self.past = synthetic_past(self.past_inputs, past_length)
        self.attention_mask = np.ones((1, past_length), np.int64)

    def extend(self, input_ids: np.ndarray) -> np.ndarray:
        seq = input_ids.shape[1]
        self.attention_mask = np.concatenate([self.attention_mask, np.ones((1, seq), np.int64)], axis=1)
        position_ids = (np.cumsum(self.attention_mask, axis=1) - 1)[:, -seq:]
        feeds = {"input_ids": input_ids, "attention_mask": self.attention_mask, "position_ids": position_ids}
        feeds.update(zip((spec.name for spec in self.past_inputs), self.past))
        logits, *self.past = self.session.run(self.output_names, feeds)
        return logits[:, -1]


class DecoderLoop:
    """`OnnxDecoder` as the tests and validation use it."""

    def __init__(self, path: str, threads: int) -> None:
        self.decoder = OnnxDecoder(path, intra_op_threads=threads)

    def start_at(self, past_length: int) -> None:
        self.decoder.reset()
        if past_length:
            self.decoder.start_from(synthetic_past(self.decoder.past_inputs, past_length),
                                    np.ones((1, past_length), np.int64))

    def extend(self, input_ids: np.ndarray) -> np.ndarray:
        # Only the last position's logits are used: ask for those only (files with num_logits_to_keep).
        return self.decoder.extend(input_ids, logits_to_keep=1)[:, -1]


LOOPS = {"plain": PlainLoop, "decoder": DecoderLoop}


def synthetic_past(past_inputs: list[Any], length: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal((1, spec.shape[1], length, spec.shape[3]), dtype=np.float32)
            for spec in past_inputs]


@dataclass
class Variant:
    label: str
    path: str
    loop: str = "decoder"
    threads: int = 0

    @classmethod
    def parse(cls, text: str) -> "Variant":
        label, _, rest = text.partition("=")
        path, *options = rest.split(",")
        fields = dict(option.split("=", 1) for option in options)
        return cls(label, path, fields.get("loop", "decoder"), int(fields.get("threads", 0)))


def prompt(length: int, vocab_size: int = 262144) -> np.ndarray:
    return np.array([[FIRST_ORDINARY_TOKEN + (i * 7919) % (vocab_size - FIRST_ORDINARY_TOKEN)
                      for i in range(length)]], np.int64)


def decode_rate(loop: Any, position: int, tokens: int) -> float:
    loop.start_at(position)
    token = int(loop.extend(prompt(1)).argmax())
    started = time.perf_counter()
    for _ in range(tokens):
        token = int(loop.extend(np.array([[token]], np.int64)).argmax())
    return tokens / (time.perf_counter() - started)


def seconds_of_prefill(loop: Any, length: int) -> float:
    loop.start_at(0)
    started = time.perf_counter()
    loop.extend(prompt(length))
    return time.perf_counter() - started


def measure_once(loop: Any, positions: list[int], decode_tokens: int, prefill_tokens: int,
                 ttft_tokens: int) -> dict[str, float]:
    row = {f"decode tok/s @{p}": decode_rate(loop, p, decode_tokens) for p in positions}
    if prefill_tokens:
        row[f"prefill tok/s @{prefill_tokens}"] = prefill_tokens / seconds_of_prefill(loop, prefill_tokens)
    if ttft_tokens:
        row[f"TTFT ms @{ttft_tokens}"] = 1000 * seconds_of_prefill(loop, ttft_tokens)
    return row


def print_table(variants: list[Variant], medians: dict[str, dict[str, float]]) -> None:
    metrics = list(next(iter(medians.values())))
    print("| variant | " + " | ".join(metrics) + " |")
    print("|---" * (len(metrics) + 1) + "|")
    base = medians[variants[0].label]
    for variant in variants:
        cells = [f"{medians[variant.label][m]:.1f} ({medians[variant.label][m] / base[m]:.2f}×)" for m in metrics]
        print(f"| {variant.label} | " + " | ".join(cells) + " |")


@click.command()
@click.option("--variant", "variant_texts", multiple=True, required=True,
              help="label=path[,loop=plain|decoder][,threads=N]; the first is the baseline of the ratios.")
@click.option("--positions", type=int, multiple=True, default=(100,), show_default=True,
              help="Past lengths to decode from (repeatable).")
@click.option("--decode-tokens", default=32, show_default=True)
@click.option("--prefill-tokens", default=0, show_default=True, help="0: skip the prefill measurement.")
@click.option("--ttft-tokens", default=0, show_default=True, help="0: skip the time-to-first-token measurement.")
@click.option("--repeats", default=5, show_default=True)
def main(variant_texts: tuple[str, ...], positions: tuple[int, ...], decode_tokens: int, prefill_tokens: int,
         ttft_tokens: int, repeats: int) -> None:
    variants = [Variant.parse(text) for text in variant_texts]
    loops = {v.label: LOOPS[v.loop](v.path, v.threads) for v in variants}
    for loop in loops.values():  # warm-up, not counted
        measure_once(loop, list(positions), 4, min(prefill_tokens, 32), ttft_tokens)
    rows: dict[str, list[dict[str, float]]] = {v.label: [] for v in variants}
    for repeat in range(repeats):
        for variant in variants:
            rows[variant.label].append(measure_once(loops[variant.label], list(positions), decode_tokens,
                                                    prefill_tokens, ttft_tokens))
        print(f"repeat {repeat + 1}/{repeats}: " + "; ".join(
            f"{label} " + ", ".join(f"{value:.1f}" for value in runs[-1].values()) for label, runs in rows.items()),
            flush=True)
    medians = {label: {metric: statistics.median(run[metric] for run in runs) for metric in runs[0]}
               for label, runs in rows.items()}
    print_table(variants, medians)


if __name__ == "__main__":
    main()
