"""Memory stays within what the README promises: a long context costs its pre-allocated KV cache and nothing
that grows per token, and a validation over several backends holds one backend at a time.

Every measurement runs in a fresh subprocess and reads /proc/self/status (VmRSS now, VmHWM the peak; writing
5 to /proc/self/clear_refs resets the peak), so pytest's own memory and earlier tests do not blur it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.config import PRESETS

REPO = Path(__file__).resolve().parents[1]
MiB = 2**20
# What allocators keep after a chunk's temporaries are freed (glibc arenas, torch's small-block caches).
STEADY_SLACK_BYTES = 64 * MiB

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")

MEASURE_LONG_CONTEXT = r"""
import ctypes, gc, json, sys
import torch
from model.config import Gemma3Config
from model.gemma3 import Gemma3Model
from model.generate import Generator
from model.loading import load
from validation.memory import reset_peak_rss, status_bytes

source, max_length, filled, chunk, decode_steps, threads = sys.argv[1], *map(int, sys.argv[2:])
torch.manual_seed(0)
torch.set_num_threads(threads)
model = Gemma3Model(Gemma3Config.from_dict(json.loads(source))) if source.startswith("{") else load(source).model
model.eval()
ids = torch.randint(0, model.config.vocab_size, (1, max_length))
# Warm-up: the first prefill and decode allocate thread pools, kernel scratch and allocator arenas once per
# process; that is not the cache's doing.
warm = Generator(model, 1, 2 * chunk)
warm.decode(warm.prefill(ids[:, :chunk]).argmax(-1))
del warm
gc.collect()
# Hand the heap's free memory back first (loading the weights freed large temporaries): a cache that reused
# already-resident free memory would not show in the growth at all.
ctypes.CDLL("libc.so.6").malloc_trim(0)
reset_peak_rss()
base = status_bytes()["VmRSS"]
generator = Generator(model, 1, max_length)
for start in range(0, filled, chunk):
    logits = generator.prefill(ids[:, start:min(start + chunk, filled)])
if filled < max_length - chunk - decode_steps:
    # Jump to the end of the context: write keys/values into every remaining slot of the full-attention layers,
    # as a prefill of those tokens would (the sliding layers' rings are already full), then prefill the last
    # chunk for real. Computing the skipped tokens would take 64 chunks of ~10-45 s on two cores, and memory
    # does not depend on it: a full layer attends over all its slots at every step, filled or not.
    end = max_length - chunk - decode_steps
    for layer in generator.cache.layers:
        if not layer.is_ring:
            layer.keys[:, :, filled:end].normal_()
            layer.values[:, :, filled:end].normal_()
            layer.key_positions[filled:end] = torch.arange(filled, end)
            layer.key_valid[:, filled:end] = True
    generator.position = end
    generator.row_positions.fill_(end)
    logits = generator.prefill(ids[:, end:end + chunk])
token = logits.argmax(-1)
after_prefill = status_bytes()["VmRSS"]
for _ in range(decode_steps):
    token = generator.decode(token).argmax(-1)
final = status_bytes()
ctypes.CDLL("libc.so.6").malloc_trim(0)
print(json.dumps({"base": base, "after_prefill": after_prefill, "final": final["VmRSS"], "peak": final["VmHWM"],
                  "trimmed": status_bytes()["VmRSS"], "position": generator.position,
                  "cache_bytes": generator.cache.nbytes, "documented_cache_bytes": model.config.kv_cache_bytes(max_length)}))
"""


def measure_long_context(source: str, max_length: int, filled: int, chunk: int, decode_steps: int) -> dict:
    arguments = [source, *map(str, (max_length, filled, chunk, decode_steps, ALLOCATING_THREADS))]
    completed = subprocess.run([sys.executable, "-c", MEASURE_LONG_CONTEXT, *arguments], cwd=REPO,
                               capture_output=True, text=True, timeout=1800,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    assert completed.returncode == 0, completed.stderr[-3000:]
    measured = json.loads(completed.stdout.strip().splitlines()[-1])
    print({key: (value / MiB if key not in ("position",) else value) for key, value in measured.items()})
    return measured


def chunk_temporaries_bytes(config, max_length: int, chunk: int) -> int:
    """The biggest short-lived tensors of one full-attention layer on a chunk (model/gemma3.py): the
    [chunk, max_length] masks — about six boolean intermediates of `attention_mask_for` and the float copy
    scaled_dot_product_attention makes of it (its CPU flash kernel tiles the scores, torch.profiler shows no
    [heads, chunk, max_length] tensor); the chunk's queries, keys and values with their norm and RoPE
    intermediates (about eight [chunk, heads × head_dim] floats); the feed-forward's gate, up and product."""
    masks = (6 + 4) * chunk * max_length
    projections = 8 * chunk * config.num_heads * config.head_dim * 4
    feed_forward = 3 * chunk * config.intermediate_size * 4
    return masks + projections + feed_forward


# glibc gives each allocating thread its own heap arena and each keeps its freed chunks for reuse: the script
# runs torch with this many threads (its main thread and one intra-op worker). Measured on the toy model below,
# six runs: 7.8-30.1 MiB kept beyond the cache after prefill with the default arenas, 3.6-7.9 MiB with
# MALLOC_ARENA_MAX=1; malloc_trim always brought it to the cache (+0.0 MiB).
ALLOCATING_THREADS = 2


def assert_cache_is_the_only_growth(measured: dict, config, max_length: int, chunk: int) -> None:
    cache = measured["cache_bytes"]
    # The documented figure is the keys and values; the buffer total adds positions (int64) and validity flags.
    assert measured["documented_cache_bytes"] <= cache <= measured["documented_cache_bytes"] * 1.01
    assert measured["position"] == max_length
    # Once every slot is written the cache is resident: growth at least the documented cache...
    assert measured["final"] - measured["base"] >= measured["documented_cache_bytes"] * 0.95
    # ...and what stays alive is the cache: once the heap's free memory is handed back, nothing else remains.
    assert measured["trimmed"] - measured["base"] <= cache + STEADY_SLACK_BYTES
    # Before that, glibc keeps freed chunk temporaries (the 16 MiB masks at 32k) for reuse: never more than
    # one chunk's temporaries per arena, after prefill and after the decode steps alike.
    kept = ALLOCATING_THREADS * chunk_temporaries_bytes(config, max_length, chunk)
    assert measured["after_prefill"] - measured["base"] <= cache + kept
    assert measured["final"] - measured["base"] <= cache + kept
    # Decoding at the end of the context grows nothing per token.
    assert measured["final"] - measured["after_prefill"] <= 8 * MiB
    # The peak is what stays resident plus one full layer's temporaries on one chunk.
    assert measured["peak"] - measured["after_prefill"] <= chunk_temporaries_bytes(config, max_length, chunk) \
        + STEADY_SLACK_BYTES


# A toy config with a KV cache big enough to stand out of allocator noise (head_dim 256 × 4 kv heads × 3 full
# layers = 48 MiB at 2048 tokens) and little compute, so its whole context is prefilled for real, in 512-token
# chunks that cross the sliding window of 8 many times.
WIDE_TINY = PRESETS["tiny"].replace(context_length=2048, num_heads=4, num_kv_heads=4, head_dim=256,
                                    sliding_window_pattern=2, layer_types=())


@pytest.mark.slow
def test_long_context_on_a_toy_model_grows_by_the_cache_only():
    max_length, chunk, decode_steps = WIDE_TINY.context_length, 512, 32
    measured = measure_long_context(json.dumps(WIDE_TINY.to_dict()), max_length, max_length - decode_steps,
                                    chunk, decode_steps)
    assert measured["documented_cache_bytes"] == WIDE_TINY.kv_cache_bytes(max_length) > 48 * MiB
    assert_cache_is_the_only_growth(measured, WIDE_TINY, max_length, chunk)


@pytest.mark.real
def test_32k_context_on_the_real_model_grows_by_the_documented_cache_only():
    """README: the 270m KV cache at 32k tokens is 217,055,232 bytes (207 MiB, fp32).

    Chosen: a Generator for 32,768 tokens; the first 512 tokens prefilled for real (the sliding layers'
    rings of 512 fill), the full layers' remaining slots written directly, the last 512-token chunk
    prefilled for real at positions 32,248..32,759 (the rings wrap) and 8 decode steps to position 32,768.
    A chunk at this length costs ~5 s on a quiet 2-core machine and ~45 s on a loaded one, so filling all 64
    for real would take 5-50 minutes; the memory of a chunk does not depend on how many came before (see
    the script). Measured (loaded 2 cores): about 4-7 minutes in all, most of it loading the weights."""
    config = PRESETS["270m"]
    max_length, chunk, decode_steps = 32_768, 512, 8
    measured = measure_long_context("gemma-3-270m", max_length, chunk, chunk, decode_steps)
    assert measured["documented_cache_bytes"] == 217_055_232
    assert_cache_is_the_only_growth(measured, config, max_length, chunk)


# ------------------------------------------------------------------------------------- one backend at a time

MEASURE_VALIDATION = r"""
import json, sys
from pathlib import Path
import torch
import validation.pipeline as pipeline
from model.loading import load
from validation.memory import reset_peak_rss, status_bytes
from validation.runners import REFERENCE_SPEC, Selection
# Imported before the baseline: a runtime's import is paid once per process, whatever the number of backends.
import exporters.onnx, exporters.torchscript, onnxruntime


out, ballast_bytes = Path(sys.argv[1]), int(sys.argv[2])
loaded = load("random:tiny")
opened = []
open_runner = pipeline.make_runner


def open_runner_with_ballast(spec, *args, **kwargs):
    runner = open_runner(spec, *args, **kwargs)
    if spec != REFERENCE_SPEC and ballast_bytes:
        # Written, so resident: stands in for the weights a real-size backend holds while it is open.
        runner.ballast = torch.ones(ballast_bytes // 4)
    opened.append(spec.name)
    return runner


pipeline.make_runner = open_runner_with_ballast
reset_peak_rss()
base = status_bytes()["VmRSS"]
selection = Selection(formats=("torchscript", "onnx"), backends=("torchscript", "torch-export", "onnxruntime"))
outcome = pipeline.run_validation(loaded, out, selection, max_new_tokens=4, threads=2)
final = status_bytes()
print(json.dumps({"base": base, "final": final["VmRSS"], "peak": final["VmHWM"], "opened": opened,
                  "verdicts": {row["runner"]: row["verdict"] for row in outcome.piece["runners"]}}))
"""
# Large against the runtimes' own peak (~250 MiB here): two ballasts at once then exceed 1.5 ballasts whatever
# the runtimes were doing at that moment.
BALLAST_BYTES = 1024 * MiB


@pytest.fixture(scope="module")
def tiny_bundles(tmp_path_factory, tiny) -> Path:
    from exporters.registry import export_bundle

    root = tmp_path_factory.mktemp("bundles")
    for fmt in ("torchscript", "onnx"):
        export_bundle(tiny, fmt, ["fp32"], root)
    return root


def measure_validation(artifacts_root: Path, ballast_bytes: int) -> dict:
    completed = subprocess.run([sys.executable, "-c", MEASURE_VALIDATION, str(artifacts_root), str(ballast_bytes)],
                               cwd=REPO, capture_output=True, text=True, timeout=1800,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    assert completed.returncode == 0, completed.stderr[-3000:]
    measured = json.loads(completed.stdout.strip().splitlines()[-1])
    print({key: value / MiB if isinstance(value, int) else value for key, value in measured.items()})
    return measured


@pytest.mark.slow
def test_validation_holds_one_backend_at_a_time(tiny_bundles):
    """A tiny model's backends weigh a few MiB, lost in the noise of the runtimes themselves; so the same
    validation runs twice, once with a 1 GiB ballast tensor attached to every compared runner. The extra
    peak is one ballast when each runner is released before the next opens, two or more when runners
    overlap (as they did while compare_all's loop variable held the previous one during the next open:
    measured with 1 GiB ballasts, peak 2,136 MiB over base before the fix, 1,273 MiB after; 249 MiB
    without ballast)."""
    plain = measure_validation(tiny_bundles, 0)
    weighted = measure_validation(tiny_bundles, BALLAST_BYTES)
    compared = ["torchscript fp32 cpu", "torch-export fp32 cpu", "onnxruntime fp32 cpu"]
    assert weighted["opened"] == plain["opened"] == ["pytorch fp32 cpu", *compared]
    assert [weighted["verdicts"][name] for name in compared] == ["PASS"] * 3
    extra_peak = (weighted["peak"] - weighted["base"]) - (plain["peak"] - plain["base"])
    assert 0.9 * BALLAST_BYTES <= extra_peak <= 1.5 * BALLAST_BYTES
    # And every ballast is gone by the end: nothing of the compared runners outlives the validation.
    assert (weighted["final"] - weighted["base"]) - (plain["final"] - plain["base"]) <= 0.25 * BALLAST_BYTES
