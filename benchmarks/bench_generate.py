"""Issue-2 benchmark of the reference model: decode without a cache (full recompute), with the KV cache, and
with KV cache + torch.compile; prefill at 512 tokens; peak RSS; the machine's read bandwidth — one run, side
by side, medians. Usage: python benchmarks/bench_generate.py [--model gemma-3-270m] [--new-tokens 256]"""

from __future__ import annotations

import resource
import statistics
import time

import click
import torch

from model.generate import Generator
from model.loading import load
from validation.bandwidth import ceiling_tokens_per_second, measure_read_bandwidth


def decode_without_cache(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """tok/s of greedy decoding that recomputes the whole sequence for every token (the seed's baseline)."""
    ids = prompt
    started = time.perf_counter()
    with torch.inference_mode():
        for _ in range(new_tokens):
            next_id = model.lm_head(model.hidden_states(ids)[:, -1]).argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return new_tokens / (time.perf_counter() - started)


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that the clock measures it (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_decode(generator: Generator, prompt: torch.Tensor, new_tokens: int) -> tuple[float, list[int]]:
    """One greedy run after a fresh prefill → (decode tok/s, the tokens). Shared with bench_cuda.py."""
    generator.reset()
    token = generator.prefill(prompt).argmax(-1)
    tokens = [token]
    synchronize(prompt.device)
    started = time.perf_counter()
    for _ in range(new_tokens):
        token = generator.decode(token).argmax(-1)
        tokens.append(token)
    synchronize(prompt.device)
    return new_tokens / (time.perf_counter() - started), torch.cat(tokens).tolist()


def decode_with_cache(model, prompt: torch.Tensor, new_tokens: int, compile: bool, repeats: int) -> float:
    generator = Generator(model, 1, prompt.shape[1] + new_tokens + 1, compile=compile)
    # The first run warms up (and compiles).
    rates = [timed_decode(generator, prompt, new_tokens)[0] for _ in range(repeats + 1)]
    return statistics.median(rates[1:])


def prefill_rate(model, length: int, repeats: int) -> float:
    """Median prefill tok/s of a `length`-token prompt on the model's device (after one warm-up run)."""
    device = model.embed_tokens.weight.device
    prompt = torch.randint(10, model.config.vocab_size, (1, length), device=device)
    generator = Generator(model, 1, length)
    rates = []
    for _ in range(repeats + 1):
        generator.reset()
        synchronize(device)
        started = time.perf_counter()
        generator.prefill(prompt)
        synchronize(device)
        rates.append(length / (time.perf_counter() - started))
    return statistics.median(rates[1:])


@click.command()
@click.option("--model", "model_id", default="gemma-3-270m")
@click.option("--new-tokens", default=256)
@click.option("--repeats", default=3)
def main(model_id: str, new_tokens: int, repeats: int) -> None:
    loaded = load(model_id)
    model = loaded.model
    prompt = torch.tensor([loaded.tokenizer.encode("The capital of France is")])
    bandwidth = measure_read_bandwidth()
    ceiling = ceiling_tokens_per_second(model.weight_bytes_per_token, bandwidth)
    rows = {
        "no cache (full recompute)": decode_without_cache(model, prompt, new_tokens),
        "KV cache": decode_with_cache(model, prompt, new_tokens, compile=False, repeats=repeats),
        "KV cache + torch.compile": decode_with_cache(model, prompt, new_tokens, compile=True, repeats=repeats),
    }
    print(f"threads {torch.get_num_threads()} | read bandwidth {bandwidth / 1e9:.1f} GB/s | weights "
          f"{model.weight_bytes_per_token / 1e9:.2f} GB/token | fp32 ceiling {ceiling:.1f} tok/s")
    baseline = rows["no cache (full recompute)"]
    for name, rate in rows.items():
        print(f"decode {name:28s} {rate:7.1f} tok/s  {100 * rate / ceiling:5.1f} % of ceiling  "
              f"{rate / baseline:5.1f}x vs no cache")
    print(f"prefill 512 tokens {prefill_rate(model, 512, repeats):.0f} tok/s")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
