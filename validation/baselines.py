"""What a user would run instead of our exports, measured beside them: llama.cpp (through llama-cpp-python) on the
model's GGUF file, and Hugging Face transformers (fp32, its own DynamicCache) on the same weights.

A baseline answers the runner calls (`prefill(ids) -> logits`, `decode(token) -> logits`), so bench times it with
the same functions, prompts and repeats as our runners, each in its own process; only the opening differs.
Its process gets paths, never our weights, so its peak RSS is the baseline's own; and the llama.cpp process never
imports torch (a llama-cpp-python user doesn't, and torch's ~250 MB would count against llama.cpp), which is why
this module imports torch, transformers and our model package only inside the functions that need them.

    check_baselines(["llama.cpp"], loaded.weights)            # one clear UserError now, not a failed row later
    with baseline_model_files(loaded.weights) as files:       # the GGUF, or a folder transformers reads
        runner = open_baseline(baseline_spec("llama.cpp", files), files.path_for("llama.cpp"), 784, threads=2)
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from model.weights import LoadedWeights
    from validation.runners import RunnerSpec

LLAMA_CPP = "llama.cpp"
TRANSFORMERS = "transformers"
BASELINE_CHOICES = (LLAMA_CPP, TRANSFORMERS)
# Each runner row gets runner ÷ baseline for these: above 1 the runner is faster (tok/s), or slower to its first
# token and bigger (time to first token, peak RSS).
RATIO_METRICS = ("decode_tokens_per_second", "prefill_tokens_per_second", "time_to_first_token_seconds",
                 "peak_rss_bytes")
# transformers runs the model in float32 with PyTorch's fused attention, the way from_pretrained loads it.
TRANSFORMERS_PRECISION = "fp32"
TRANSFORMERS_ATTENTION = "sdpa"
BASELINE_DEVICE = "cpu"


@dataclass(frozen=True)
class BaselineFiles:
    """The model as each baseline reads it: a GGUF file (llama.cpp, and transformers with `gguf_file=`) or a
    Hugging Face folder (transformers, preferred where there is one: it needs no dequantizing)."""

    gguf_file: Path | None
    hf_directory: Path | None

    def path_for(self, baseline: str) -> Path:
        path = self.gguf_file if baseline == LLAMA_CPP or self.hf_directory is None else self.hf_directory
        if path is None:
            raise ValueError(f"no model file for the {baseline} baseline")
        return path


def check_baselines(baselines: Sequence[str], weights: LoadedWeights) -> None:
    """Every requested baseline can run on this model here, or one clear UserError saying why not. Baselines are
    only ever asked for by name, so one that can't run is an error, not a skip."""
    from model.errors import UserError

    for baseline in baselines:
        if baseline not in BASELINE_CHOICES:
            raise UserError(f"unknown baseline {baseline!r}", f"use one of: {', '.join(BASELINE_CHOICES)}")
        if baseline == LLAMA_CPP and not llama_cpp_installed():
            raise UserError("llama-cpp-python is not installed", 'pip install -e ".[baseline]"')
        if baseline == LLAMA_CPP and weights.gguf_file is None:
            raise UserError(f"the llama.cpp baseline needs a GGUF model, and {weights.source_label} is not one",
                            "use --model gemma-3-270m or a .gguf file, or leave out --baseline llama.cpp")
        if baseline == TRANSFORMERS and importlib.util.find_spec("transformers") is None:
            raise UserError("transformers is not installed", 'pip install -e ".[test]"')


def llama_cpp_installed() -> bool:
    try:
        import llama_cpp  # noqa: F401 — imported, not just found: its shared library must load too
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def baseline_model_files(weights: LoadedWeights) -> Iterator[BaselineFiles]:
    """The model's own files where it has them (a GGUF, a local folder); otherwise (random:<preset>, a hub
    snapshot we keep no folder of) our weights written as a temporary Hugging Face folder."""
    from model.weights import save_hf_directory

    source = Path(weights.source_id).expanduser()
    if weights.gguf_file is not None or source.is_dir():
        yield BaselineFiles(weights.gguf_file, source.resolve() if source.is_dir() else None)
        return
    with tempfile.TemporaryDirectory(prefix="gemma-baseline-") as folder:
        yield BaselineFiles(None, save_hf_directory(weights.config, weights.state_dict, Path(folder)))


def baseline_spec(baseline: str, files: BaselineFiles) -> RunnerSpec:
    """llama.cpp runs the GGUF's own quantization (its precision, e.g. Q4_K_M); transformers runs fp32."""
    from validation.runners import RunnerSpec

    if baseline == LLAMA_CPP:
        return RunnerSpec(LLAMA_CPP, gguf_quantization(files.path_for(LLAMA_CPP)), BASELINE_DEVICE)
    return RunnerSpec(TRANSFORMERS, TRANSFORMERS_PRECISION, BASELINE_DEVICE)


def gguf_quantization(path: Path) -> str:
    """A GGUF's file type without llama.cpp's prefixes: Q4_K_M, F16, F32 …"""
    import gguf

    field = gguf.GGUFReader(path, "r").fields.get("general.file_type")
    if field is None:
        return "gguf"
    return gguf.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_").removeprefix("ALL_")


def import_runtime(baseline: str) -> None:
    """Import the baseline's library before its load is timed, as our runners' torch is imported before theirs."""
    importlib.import_module("llama_cpp" if baseline == LLAMA_CPP else "transformers")


def open_baseline(spec: Mapping[str, str], model_path: Path, context_tokens: int, threads: int = 0,
                  every_position: bool = False) -> Any:
    """A runner over the baseline named by `spec["backend"]` with room for `context_tokens`; `every_position`:
    one that also answers every position's logits of a prefill (validation's teacher forcing; bench times the
    runner as apps run it, keeping the last logits only)."""
    threads = threads or os.cpu_count() or 1
    if spec["backend"] == LLAMA_CPP:
        return (TeacherForcedLlamaCpp if every_position else LlamaCppRunner)(model_path, context_tokens, threads)
    return open_transformers(spec, model_path, context_tokens, threads)


def open_baseline_runner(spec: RunnerSpec, model_path: Path, context_tokens: int, threads: int = 0) -> Any:
    """The baseline as a validation.runners.Runner, for validation to compare in its own process (which has
    torch already) on the same tokens as our runners."""
    from validation.runners import Runner

    opened = open_baseline(spec.to_dict(), model_path, context_tokens, threads, every_position=True)
    if isinstance(opened, Runner):
        return opened
    return Runner(spec, opened, opened.vocab_size, opened.size_bytes, opened.weight_bytes_per_token,
                  opened.context_tokens)


class LlamaCppRunner:
    """llama-cpp-python's `Llama.eval` over the GGUF, with the runner calls bench times: prefill evaluates the
    prompt (in llama.cpp's batches of 512), decode one token; the logits are the last evaluated token's, read from
    the context (`logits_all=False` keeps only those). Not a validation.runners.Runner: that module needs torch."""

    logits_all = False

    def __init__(self, path: Path, context_tokens: int, threads: int) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llama = llama_cpp.Llama(model_path=str(path), n_ctx=context_tokens, n_threads=threads,
                                     n_threads_batch=threads, logits_all=self.logits_all, verbose=False)
        self.context_tokens = min(self.llama.n_ctx(), llama_cpp.llama_model_n_ctx_train(self.llama.model))
        self.vocab_size = self.llama.n_vocab()
        # A decode step reads every weight once; the quantized weights are (nearly all of) the file.
        self.size_bytes = self.weight_bytes_per_token = path.stat().st_size

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        if not 0 < np.asarray(ids).size <= self.context_tokens:
            raise ValueError(f"llama.cpp takes prompts of 1..{self.context_tokens} tokens, got {len(ids)}")
        self.llama.reset()
        self.llama.eval([int(token) for token in np.asarray(ids).reshape(-1)])  # a list, or Runner's [1, n]
        return self.last_logits()

    def decode(self, token: int) -> np.ndarray:
        self.llama.eval([int(token)])
        return self.last_logits()

    def reset(self) -> None:
        self.llama.reset()

    def last_logits(self) -> np.ndarray:
        row = self.llama_cpp.llama_get_logits_ith(self.llama.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self.vocab_size,)).copy()


class TeacherForcedLlamaCpp(LlamaCppRunner):
    """llama.cpp keeping every evaluated position's logits (`logits_all`), so a text is teacher-forced in one
    prefill, as the runners that can do so are (validation.runners.Runner.teacher_forced)."""

    logits_all = True

    def prefill_every_position(self, ids: np.ndarray) -> np.ndarray:
        """[positions, vocab]: row k is the logits after ids[..k]."""
        tokens = [int(token) for token in np.asarray(ids).reshape(-1)]
        self.llama.reset()
        self.llama.eval(tokens)
        return np.array(self.llama.scores[:len(tokens)], dtype=np.float32)


def open_transformers(spec: Mapping[str, str], model_path: Path, context_tokens: int, threads: int) -> Any:
    import torch

    from validation.runners import Runner, RunnerSpec

    torch.set_num_threads(threads)
    decoder = TransformersDecoder(model_path)
    weight_bytes = sum(parameter.numel() * parameter.element_size() for parameter in decoder.model.parameters())
    context = min(context_tokens, decoder.model.config.max_position_embeddings)
    return Runner(RunnerSpec.from_dict(spec), decoder, decoder.model.config.vocab_size, weight_bytes, weight_bytes,
                  context)


class TransformersDecoder:
    """`Gemma3ForCausalLM` with the cache and calls its `generate()` uses: a `DynamicCache` built from the config
    (sliding layers bounded by the window), the prompt in one forward that keeps only the last logits, then one
    forward per token."""

    def __init__(self, path: Path) -> None:
        import torch
        from transformers import Gemma3ForCausalLM

        options: dict[str, Any] = {"dtype": torch.float32, "attn_implementation": TRANSFORMERS_ATTENTION}
        if path.is_file():  # a GGUF: transformers dequantizes it to float32
            options["gguf_file"] = path.name
            path = path.parent
        self.model = Gemma3ForCausalLM.from_pretrained(path, **options).eval()
        self.cache: Any = None

    def prefill(self, ids: np.ndarray) -> Any:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)
        return self.forward(ids, logits_to_keep=1)

    def decode(self, token: np.ndarray) -> Any:
        return self.forward(token.reshape(1, 1))

    def reset(self) -> None:
        self.cache = None

    def forward(self, ids: np.ndarray, **options: Any) -> Any:
        import torch

        with torch.inference_mode():
            output = self.model(input_ids=torch.from_numpy(ids), past_key_values=self.cache, use_cache=True,
                                **options)
        return output.logits[:, -1]


# ---------------------------------------------------------------------------------------------------- ratios

def ratios(runner: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, float | None]:
    """runner ÷ baseline for each of RATIO_METRICS (None where either side has no number)."""
    return {metric: runner[metric] / baseline[metric] if runner.get(metric) and baseline.get(metric) else None
            for metric in RATIO_METRICS}


def add_ratios(runners: Sequence[dict[str, Any]], baselines: Sequence[Mapping[str, Any]]) -> None:
    """Give every measured runner row `vs_baselines`: {baseline name: ratios} for each measured baseline."""
    measured = [baseline for baseline in baselines if "error" not in baseline]
    for row in runners:
        if "error" not in row and measured:
            row["vs_baselines"] = {baseline["runner"]: ratios(row, baseline) for baseline in measured}
