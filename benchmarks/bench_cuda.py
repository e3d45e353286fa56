"""Issue-6 GPU benchmark: PyTorch decode of the Gemma 3 270M architecture with the KV cache — eager,
`torch.compile`d, and the decode step replayed as one CUDA graph (`Generator(cuda_graph=True)`, eager and
compiled step) — plus prefill at 512.

Weights: random, in the real 270M's shapes (`--preset 270m`). The GPU machines lent to this project reach no
hub and cannot carry the 250 MB GGUF; decode speed depends on shapes and dtype, not on the values. Timings are
CUDA-synchronized, medians of `--repeats` runs after a warm-up run; every variant runs in this one process.
The greedy tokens of each variant are compared with eager's (bf16 ties may flip a token, so they are counted,
not asserted). On a machine without CUDA it runs eager and compiled on the CPU and says why the graphs are left
out (a smoke run: `--preset tiny --device cpu`).

    python benchmarks/bench_cuda.py --dtype bfloat16 --dtype float32 --new-tokens 256 --repeats 5
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import click
import torch

from model.config import PRESETS
from model.gemma3 import Gemma3Model
from model.generate import Generator

# The CPU bench's timing loops (CUDA-synchronized there): run as `python benchmarks/bench_cuda.py`.
from bench_generate import prefill_rate, timed_decode

PROMPT_TOKENS = 16
SEED_A100_COMPILED_TOK_S = 99.0  # the seed article's A100 figure, KV cache + torch.compile


def random_model(preset: str, device: str, dtype: torch.dtype) -> Gemma3Model:
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma3Model(PRESETS[preset])
    for parameter in model.parameters():  # Gemma-like scale: an N(0, 0.02) init keeps activations finite
        torch.nn.init.normal_(parameter, std=0.02)
    return model.to(dtype=dtype).eval()


def measure_decode(make_generator: Callable[[], Generator], prompt: torch.Tensor, new_tokens: int, repeats: int
                   ) -> tuple[float, list[int]]:
    """Median decode tok/s over `repeats` runs after a warm-up run (which compiles / records), and the tokens."""
    generator = make_generator()
    runs = [timed_decode(generator, prompt, new_tokens) for _ in range(repeats + 1)]
    return statistics.median(rate for rate, _ in runs[1:]), runs[-1][1]


def variants(model: Gemma3Model, max_length: int, cuda: bool) -> dict[str, Callable[[], Generator]]:
    def made(compile: bool, cuda_graph: bool = False) -> Callable[[], Generator]:
        return lambda: Generator(model, 1, max_length, compile=compile, cuda_graph=cuda_graph)

    found = {"eager (KV cache)": made(False), "torch.compile": made(True)}
    if cuda:  # model.generate.CapturedDecodeStep: recorded at the first decode, replayed after
        found |= {"CUDA graph (eager step)": made(False, True), "CUDA graph (compiled step)": made(True, True)}
    return found


@click.command()
@click.option("--preset", default="270m", show_default=True, type=click.Choice(sorted(PRESETS)))
@click.option("--device", default="cuda" if torch.cuda.is_available() else "cpu", show_default=True)
@click.option("--dtype", "dtypes", multiple=True, default=("bfloat16",), show_default=True,
              type=click.Choice(["bfloat16", "float16", "float32"]))
@click.option("--new-tokens", default=256, show_default=True)
@click.option("--prefill-tokens", default=512, show_default=True)
@click.option("--repeats", default=5, show_default=True)
def main(preset: str, device: str, dtypes: tuple[str, ...], new_tokens: int, prefill_tokens: int,
         repeats: int) -> None:
    cuda = device.startswith("cuda")
    if cuda:
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        print(f"device: {device}, torch {torch.__version__}; CUDA graph variants left out: no CUDA device")
    print(f"model: {preset} architecture, random weights; {PROMPT_TOKENS}-token prompt, {new_tokens} new tokens, "
          f"median of {repeats} runs (one warm-up run first)")
    print("| dtype | variant | decode tok/s | × eager | × seed A100 (99 tok/s) | tokens equal to eager |")
    print("|---|---|---:|---:|---:|---:|")
    prefill = {}
    for dtype_name in dtypes:
        model = random_model(preset, device, getattr(torch, dtype_name))
        prompt = torch.randint(10, model.config.vocab_size, (1, PROMPT_TOKENS),
                               generator=torch.Generator().manual_seed(1)).to(device)
        max_length = PROMPT_TOKENS + new_tokens + 1
        eager_rate, eager_tokens = None, None
        for name, make in variants(model, max_length, cuda).items():
            rate, tokens = measure_decode(make, prompt, new_tokens, repeats)
            if eager_rate is None:
                eager_rate, eager_tokens = rate, tokens
            same = sum(a == b for a, b in zip(tokens, eager_tokens))
            print(f"| {dtype_name} | {name} | {rate:.1f} | {rate / eager_rate:.2f}× | "
                  f"{rate / SEED_A100_COMPILED_TOK_S:.2f}× | {same}/{len(tokens)} |", flush=True)
        prefill[dtype_name] = prefill_rate(model, prefill_tokens, repeats)
        del model
        if cuda:
            torch.cuda.empty_cache()
    for dtype_name, rate in prefill.items():
        print(f"prefill @{prefill_tokens} (eager) {dtype_name}: {rate:.0f} tok/s")


if __name__ == "__main__":
    main()
