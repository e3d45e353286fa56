"""One interface over every way this project runs Gemma: the reference PyTorch model (eager or compiled) and
each exported file in its own runtime.

    runner = make_runner(RunnerSpec("onnxruntime", "int8", "cpu"), bundles)
    logits = runner.prefill([2, 651, 6037])    # float32 [vocab]: logits of the prompt's last token
    logits = runner.decode(int(logits.argmax()))
    runner.reset()

This file is the only place in validation/ that knows formats exist: `BACKENDS` says which bundle and variant
a backend reads and where it can run, `available_specs` says what this host can run (and why not the rest),
and `make_runner` opens one. Every runtime module is imported inside its opener, so a host without
coremltools or onnxruntime can still validate the others.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import platform
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporters.artifact import Bundle, BundleVariant, load_bundle
from exporters.executorch import unavailable_reason as executorch_unavailable_reason
from exporters.registry import FORMATS
from model.errors import UserError
from model.gemma3 import Gemma3Model
from validation.app_runtimes import genai_unavailable_reason, transformers_js_unavailable_reason
from validation.coreml_runtime import COMPUTE_UNITS as COREML_COMPUTE_UNITS

TORCH_DEVICES = ("cpu", "cuda", "mps")
# ONNX Runtime execution providers by their short names (the CLI takes either form).
ONNX_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "coreml": "CoreMLExecutionProvider"}
# The reference generator's cache: enough for every validation prompt and benchmark run on every preset.
DEFAULT_MAX_LENGTH = 2048


@dataclass(frozen=True)
class Backend:
    name: str
    bundle_format: str | None  # None: runs the reference model itself, no bundle needed
    variant_suffix: str  # manifest key of a variant = precision + suffix (torch.export programs: "-pt2")
    # What `RunnerSpec.device` names for it: "device", "provider", "compute units", "runtime" or "delegate".
    target_kind: str
    targets: tuple[str, ...]
    # Why bench leaves it out unless asked for by name (`--backends`); None: bench measures it by default.
    untimed_reason: str | None = None
    # The backend whose file holds the same computation from the same trace (validation/compare.py's twins).
    twin_of: str | None = None


BACKENDS: dict[str, Backend] = {backend.name: backend for backend in (
    Backend("pytorch", None, "", "device", TORCH_DEVICES),
    Backend("pytorch-compile", None, "", "device", TORCH_DEVICES),
    Backend("torchscript", "torchscript", "", "device", TORCH_DEVICES),
    Backend("torch-export", "torchscript", "-pt2", "device", TORCH_DEVICES, twin_of="torchscript"),
    Backend("onnxruntime", "onnx", "", "provider", tuple(ONNX_PROVIDERS)),
    Backend("coreml", "coreml", "", "compute units", COREML_COMPUTE_UNITS),
    # The ExecuTorch runtime over the .pte, its products delegated to XNNPACK (exporters/executorch.py).
    Backend("executorch", "executorch", "", "delegate", ("xnnpack",)),
    Backend("coreml-mil", "coreml", "", "device", ("numpy",),
            untimed_reason="an interpreter checking the Core ML program's numerics (validation); its speed says "
                           "nothing about Core ML on a device: measured only with --backends coreml-mil"),
    # The runtimes apps embed, over the ONNX bundle folder as shipped (validation/app_runtimes.py).
    Backend("onnxruntime-genai", "onnx", "", "runtime", ("cpu",)),
    Backend("transformers-js", "onnx", "", "runtime", ("node",)),
)}
REFERENCE_BACKEND = "pytorch"
REFERENCE_PRECISION = "fp32"
# What `--formats pytorch` selects: the backends that run the model in memory rather than a bundle.
IN_MEMORY_FORMAT = "pytorch"
FORMAT_CHOICES = (IN_MEMORY_FORMAT, *FORMATS)


@dataclass(frozen=True)
class RunnerSpec:
    """What to run: a backend, a precision and where (torch device, ORT provider short name, Core ML units)."""

    backend: str
    precision: str
    device: str = "cpu"

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision} {self.device}"

    @property
    def variant_key(self) -> str:
        return self.precision + BACKENDS[self.backend].variant_suffix

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> "RunnerSpec":
        return cls(data["backend"], data["precision"], data["device"])


REFERENCE_SPEC = RunnerSpec(REFERENCE_BACKEND, REFERENCE_PRECISION, "cpu")


def twin_spec(spec: RunnerSpec) -> RunnerSpec | None:
    """The runner whose file was traced from the same decoder (a `.pt2` program's `.pt`), if any (a baseline's
    backend is none of ours: it has none)."""
    backend = BACKENDS.get(spec.backend)
    twin = None if backend is None else backend.twin_of
    return None if twin is None else RunnerSpec(twin, spec.precision, spec.device)


@dataclass(frozen=True)
class Skipped:
    runner: str
    reason: str


# ---------------------------------------------------------------------------------------------------- host

@dataclass(frozen=True)
class Host:
    system: str  # platform.system(): Linux, Darwin, Windows
    cuda: bool
    mps: bool
    onnx_providers: tuple[str, ...]
    cpp_compiler: bool  # torch.compile's CPU backend (inductor) compiles C++
    mil_runner: bool  # validation/mil.py (Core ML programs run with numpy) is installed
    # Why onnxruntime-genai / transformers.js (node) / the ExecuTorch runtime cannot run here, None when they can.
    genai_missing: str | None = "not detected"
    node_missing: str | None = "not detected"
    executorch_missing: str | None = "not detected"

    @classmethod
    def detect(cls) -> "Host":
        return cls(system=platform.system(), cuda=torch.cuda.is_available(),
                   mps=getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
                   onnx_providers=installed_onnx_providers(),
                   cpp_compiler=any(shutil.which(name) for name in ("c++", "g++", "clang++")),
                   mil_runner=importlib.util.find_spec("validation.mil") is not None,
                   genai_missing=genai_unavailable_reason(), node_missing=transformers_js_unavailable_reason(),
                   executorch_missing=executorch_unavailable_reason())


def installed_onnx_providers() -> tuple[str, ...]:
    try:
        import onnxruntime
    except ImportError:
        return ()
    return tuple(onnxruntime.get_available_providers())


def unavailable_reason(backend: Backend, target: str, host: Host) -> str | None:
    """Why `backend` cannot run on `target` here, or None when it can."""
    if backend.name == "coreml" and host.system != "Darwin":
        return "Core ML runtime needs macOS"
    if backend.name == "coreml-mil" and not host.mil_runner:
        return "the Core ML MIL runner (validation/mil.py) is not installed"
    if backend.name == "onnxruntime-genai" and host.genai_missing:
        return host.genai_missing
    if backend.name == "transformers-js" and host.node_missing:
        return host.node_missing
    if backend.name == "executorch" and host.executorch_missing:
        return host.executorch_missing
    if backend.target_kind == "provider":
        provider = ONNX_PROVIDERS[target]
        if provider not in host.onnx_providers:
            return f"onnxruntime has no {provider} here (it has {', '.join(host.onnx_providers) or 'none'})"
        return None
    if target == "cuda" and not host.cuda:
        return "CUDA not available"
    if target == "mps" and not host.mps:
        return "MPS not available (needs macOS on Apple silicon)"
    if backend.name == "pytorch-compile" and target == "cpu" and not host.cpp_compiler:
        return "torch.compile on CPU needs a C++ compiler (g++ or clang++)"
    return None


# ------------------------------------------------------------------------------------------------ bundles

@dataclass(frozen=True)
class BundleProblem:
    format: str
    reason: str
    is_error: bool  # a broken or mismatched bundle (an error), rather than one that was never exported


def load_bundles(artifacts_root: Path, slug: str, formats: Sequence[str], weight_sha256: str,
                 progress: Callable[[int, int], None] | None = None, verify: bool = True
                 ) -> tuple[dict[str, Bundle], list[BundleProblem]]:
    """The verified bundles of `formats` (every file's sha256 checked, unless `verify` is False: for a process
    whose parent verified them just before starting it) that were exported from these weights, and what is
    wrong with each of the others."""
    bundles: dict[str, Bundle] = {}
    problems: list[BundleProblem] = []
    for fmt in formats:
        folder = Path(artifacts_root) / slug / fmt
        if not folder.exists():
            problems.append(BundleProblem(fmt, f"no {fmt} bundle in {folder.parent}: run gemma-export export "
                                               f"--format {fmt}", is_error=False))
            continue
        try:
            bundle = load_bundle(artifacts_root, slug, fmt, verify=verify, progress=progress)
            check_bundle_source(bundle, weight_sha256)
        except UserError as error:
            problems.append(BundleProblem(fmt, str(error), is_error=True))
            continue
        bundles[fmt] = bundle
    return bundles, problems


def check_bundle_source(bundle: Bundle, weight_sha256: str) -> None:
    source = bundle.manifest["source"]
    if source.get("weight_sha256") != weight_sha256:
        raise UserError(f"{bundle.path} was exported from other weights ({source.get('model_id')}, sha256 "
                        f"{str(source.get('weight_sha256'))[:12]}…) than the model being validated "
                        f"(sha256 {weight_sha256[:12]}…)",
                        "re-export it from this model, or pass its --model (and --revision)")


# -------------------------------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class Selection:
    """What the user asked for; None means everything. Targets named here must be available (UserError)."""

    formats: tuple[str, ...] | None = None  # bundle formats, plus "pytorch" for the in-memory backends
    precisions: tuple[str, ...] | None = None
    devices: tuple[str, ...] | None = None  # torch devices
    providers: tuple[str, ...] | None = None  # ONNX Runtime providers (short or full names)
    compute_units: tuple[str, ...] | None = None
    backends: tuple[str, ...] | None = None  # backend names (BACKENDS), e.g. only the app runtimes

    def requested_targets(self, backend: Backend) -> tuple[str, ...] | None:
        if backend.target_kind == "provider":
            return None if self.providers is None else tuple(provider_short_name(p) for p in self.providers)
        if backend.target_kind == "compute units":
            return self.compute_units
        if backend.target_kind in ("runtime", "delegate"):  # one target each: nothing to choose
            return None
        return None if backend.name == "coreml-mil" else self.devices


def provider_short_name(provider: str) -> str:
    by_full_name = {full.lower(): short for short, full in ONNX_PROVIDERS.items()}
    short = by_full_name.get(provider.lower(), provider.lower())
    if short not in ONNX_PROVIDERS:
        raise UserError(f"unknown ONNX Runtime provider {provider!r}",
                        f"use one of: {', '.join(ONNX_PROVIDERS)} (or their full names)")
    return short


def check_requested_targets(selection: Selection, host: Host) -> None:
    """An unavailable device, provider or compute unit asked for by name is an error, not a silent skip."""
    asked = [(BACKENDS["pytorch"], selection.devices), (BACKENDS["onnxruntime"], selection.providers),
             (BACKENDS["coreml"], selection.compute_units)]
    for backend, targets in asked:
        for target in targets or ():
            name = provider_short_name(target) if backend.target_kind == "provider" else target
            if name not in backend.targets:
                raise UserError(f"unknown {backend.target_kind} {target!r}",
                                f"use one of: {', '.join(backend.targets)}")
            if reason := unavailable_reason(backend, name, host):
                raise UserError(f"{backend.target_kind} {target!r} was requested but is not available: {reason}",
                                f"leave it out (available here: {', '.join(available_targets(backend, host))})")


def available_targets(backend: Backend, host: Host) -> list[str]:
    return [target for target in backend.targets if unavailable_reason(backend, target, host) is None] or ["none"]


def backend_precisions(backend: Backend, bundles: Mapping[str, Bundle]) -> list[str]:
    if backend.bundle_format is None:
        return [REFERENCE_PRECISION]
    keys = bundles[backend.bundle_format].precisions
    suffix = backend.variant_suffix
    return sorted(key.removesuffix(suffix) for key in keys
                  if (key.endswith(suffix) if suffix else "-" not in key))


def available_specs(bundles: Mapping[str, Bundle], host: Host, selection: Selection = Selection(),
                    problems: Sequence[BundleProblem] = ()) -> tuple[list[RunnerSpec], list[Skipped]]:
    """Every runner this host can run from `bundles` within `selection`, and each one it cannot, with why."""
    check_requested_targets(selection, host)
    reasons = {problem.format: problem.reason for problem in problems}
    specs: list[RunnerSpec] = []
    skipped: list[Skipped] = []
    for backend in BACKENDS.values():
        fmt = backend.bundle_format or IN_MEMORY_FORMAT
        if selection.formats is not None and fmt not in selection.formats:
            continue
        if selection.backends is not None and backend.name not in selection.backends \
                and backend.name != REFERENCE_BACKEND:
            continue
        if backend.bundle_format is not None and backend.bundle_format not in bundles:
            skipped.append(Skipped(backend.name, reasons.get(fmt, f"no {fmt} bundle")))
            continue
        requested = selection.requested_targets(backend)
        for precision in backend_precisions(backend, bundles):
            if selection.precisions is not None and precision not in selection.precisions:
                continue
            for target in requested or backend.targets:
                spec = RunnerSpec(backend.name, precision, target)
                reason = unavailable_reason(backend, target, host)
                (skipped.append(Skipped(spec.name, reason)) if reason else specs.append(spec))
    return specs, skipped


# ------------------------------------------------------------------------------------------------ runners

class Runner:
    """Batch-1 prefill/decode over any decoder that has `prefill([1, seq] ids)`, `decode(0-d token)` and
    `reset()`, with logits turned into one float32 numpy vector and the facts bench and report need."""

    def __init__(self, spec: RunnerSpec, decoder: Any, vocab_size: int, size_bytes: int,
                 weight_bytes_per_token: int, context_tokens: int) -> None:
        self.spec = spec
        self.name, self.precision, self.device = spec.name, spec.precision, spec.device
        self.decoder = decoder
        self.vocab_size = vocab_size
        self.size_bytes = size_bytes  # on disk for a bundle; parameters in memory for the in-memory model
        self.weight_bytes_per_token = weight_bytes_per_token
        self.context_tokens = context_tokens  # the most tokens (prompt + generated) one sequence may hold

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Start a new sequence with `ids` → logits of its last token."""
        if not 0 < len(ids) <= self.context_tokens:
            raise UserError(f"{self.name} takes prompts of 1..{self.context_tokens} tokens, got {len(ids)}",
                            "shorten the prompt")
        return self._vector(self.decoder.prefill(np.asarray([ids], dtype=np.int64)))

    def decode(self, token: int) -> np.ndarray:
        # A 0-d array: every decoder reads it as one token (int(), reshape(-1, 1) and torch alike).
        return self._vector(self.decoder.decode(np.asarray(token, dtype=np.int64)))

    def teacher_forced(self, ids: Sequence[int]) -> list[np.ndarray]:
        """Logits predicting ids[1:], each from the tokens before it: one prefill where the decoder answers
        every position's logits (`prefill_every_position`), else a prefill and a decode step per token."""
        every_position = getattr(self.decoder, "prefill_every_position", None)
        if every_position is None:
            return teacher_forced_logits(self, ids[:1], ids[1:])
        context = ids[:-1]
        if not 0 < len(context) <= self.context_tokens:
            raise UserError(f"{self.name} takes texts of 1..{self.context_tokens} tokens, got {len(context)}",
                            "shorten the text")
        logits = every_position(np.asarray([context], dtype=np.int64))
        if isinstance(logits, torch.Tensor):
            logits = logits.detach().float().cpu().numpy()
        return list(np.asarray(logits, dtype=np.float32).reshape(-1, self.vocab_size))

    def reset(self) -> None:
        self.decoder.reset()

    def _vector(self, logits: Any) -> np.ndarray:
        if isinstance(logits, torch.Tensor):
            logits = logits.detach().float().cpu().numpy()
        # Decoders answer [1, vocab] or [1, 1, vocab]; the last row is the last token's.
        return np.asarray(logits, dtype=np.float32).reshape(-1, self.vocab_size)[-1]


def teacher_forced_logits(runner: Runner, prompt_ids: Sequence[int], forced_tokens: Sequence[int]) -> list[np.ndarray]:
    """The runner's logits at every step when it is fed the reference's tokens instead of its own."""
    logits = [runner.prefill(prompt_ids)]
    for token in forced_tokens[:-1]:
        logits.append(runner.decode(token))
    return logits


class GeneratorDecoder:
    """The reference model's `Generator` as a decoder: prefill starts a new sequence."""

    def __init__(self, model: Gemma3Model, device: str, max_length: int, compile: bool) -> None:
        from model.generate import Generator

        model = model if next(model.parameters()).device.type == device else copy.deepcopy(model).to(device)
        self.generator = Generator(model, 1, max_length, compile=compile)

    def prefill(self, ids: np.ndarray) -> torch.Tensor:
        self.generator.reset()
        return self.generator.prefill(torch.from_numpy(ids))

    def prefill_every_position(self, ids: np.ndarray) -> torch.Tensor:
        """The model's full forward over ids (no cache): every position's logits."""
        self.generator.reset()
        model = self.generator.model
        with torch.no_grad():
            return model(torch.from_numpy(ids).to(next(model.parameters()).device))

    def decode(self, token: np.ndarray) -> torch.Tensor:
        return self.generator.decode(torch.from_numpy(token))

    def reset(self) -> None:
        self.generator.reset()


class ForwardOnDevice:
    """A saved decoder's forward moved to `device`: inputs follow it there, outputs (the past) stay there."""

    def __init__(self, forward: Any, device: str) -> None:
        self.forward = forward.to(device)
        self.device = torch.device(device)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.forward(*(tensor.to(self.device) for tensor in inputs))


@dataclass(frozen=True)
class OpenContext:
    """What an opener may use: the verified bundles, the reference model (in-memory backends only)."""

    bundles: Mapping[str, Bundle]
    model: Gemma3Model | None
    max_length: int
    threads: int  # 0: the runtime's default (all cores)


def variant_size(variant: BundleVariant) -> int:
    """Bytes of a variant's files (a Core ML .mlpackage is a folder)."""
    total = 0
    for path in variant.files:
        if path.is_dir():
            total += sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())
        else:
            total += path.stat().st_size
    return total


def open_in_memory(spec: RunnerSpec, context: OpenContext) -> Runner:
    model = context.model
    if model is None:
        raise ValueError(f"{spec.backend} runs the reference model: pass it to make_runner")
    length = min(context.max_length, model.config.context_length)
    decoder = GeneratorDecoder(model, spec.device, length, compile=spec.backend == "pytorch-compile")
    weight_bytes = model.weight_bytes_per_token
    return Runner(spec, decoder, model.config.vocab_size, weight_bytes, weight_bytes, length)


def open_bundle_file(spec: RunnerSpec, context: OpenContext) -> Runner:
    backend = BACKENDS[spec.backend]
    bundle = context.bundles[backend.bundle_format]
    variant = bundle.variant(spec.variant_key)
    try:
        decoder = DECODER_OPENERS[spec.backend](variant, spec, context)
    except UserError:
        raise
    except Exception as error:  # its hashes matched the manifest, yet the runtime cannot read it
        raise UserError(f"{spec.backend} cannot load {variant.files[0].name} ({type(error).__name__}: "
                        f"{first_line(error)})", f"re-export it: gemma-export export --format "
                        f"{backend.bundle_format} --precision {spec.precision}") from error
    size = variant_size(variant)
    context_tokens = min(bundle.config.context_length, variant.options.get("max_context", bundle.config.context_length))
    # A decode step reads every weight once. The weights are (nearly all of) the file, except where a format
    # keeps a table that is only gathered from (ONNX: the embedding beside the LM head).
    read_per_token = WEIGHT_BYTES_PER_TOKEN.get(spec.backend, lambda _variant: size)(variant)
    return Runner(spec, decoder, bundle.config.vocab_size, size, read_per_token, context_tokens)


def first_line(error: BaseException, limit: int = 200) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else ""


def open_torchscript(variant: BundleVariant, spec: RunnerSpec, context: OpenContext) -> Any:
    from validation.torchscript_runtime import TorchScriptDecoder
    return on_device(TorchScriptDecoder(variant.files[0]), spec.device)


def open_torch_export(variant: BundleVariant, spec: RunnerSpec, context: OpenContext) -> Any:
    from validation.torchscript_runtime import ExportedProgramDecoder
    return on_device(ExportedProgramDecoder(variant.files[0]), spec.device)


def on_device(decoder: Any, device: str) -> Any:
    if device != "cpu":
        decoder.forward = ForwardOnDevice(decoder.forward, device)
    return decoder


def open_onnxruntime(variant: BundleVariant, spec: RunnerSpec, context: OpenContext) -> Any:
    from validation.onnx_runtime import OnnxDecoder
    return OnnxDecoder(variant.files[0], providers=[ONNX_PROVIDERS[spec.device]], intra_op_threads=context.threads)


def open_coreml(variant: BundleVariant, spec: RunnerSpec, context: OpenContext) -> Any:
    from validation.coreml_runtime import CoreMLRuntimeDecoder
    return CoreMLRuntimeDecoder(variant.files[0], compute_units=spec.device)


def open_coreml_mil(variant: BundleVariant, spec: RunnerSpec, context: OpenContext) -> Any:
    from validation.mil import MILRunner
    return MILRunner(variant.files[0])


def open_onnxruntime_genai(variant: BundleVariant, spec: RunnerSpec, context: OpenContext) -> Any:
    from validation.app_runtimes import GenaiDecoder
    bundle = context.bundles["onnx"]
    return GenaiDecoder(bundle.path, variant.files[0].relative_to(bundle.path).as_posix(), context.threads)


def open_transformers_js(variant: BundleVariant, spec: RunnerSpec, context: OpenContext) -> Any:
    from validation.app_runtimes import TransformersJsDecoder
    return TransformersJsDecoder(context.bundles["onnx"].path, spec.precision)


def open_executorch(variant: BundleVariant, spec: RunnerSpec, context: OpenContext) -> Any:
    from validation.executorch_runtime import ExecuTorchDecoder
    return ExecuTorchDecoder(variant.files[0], context.threads)


def onnx_weight_bytes_per_token(variant: BundleVariant) -> int:
    from validation.onnx_runtime import weight_bytes_per_token
    return weight_bytes_per_token(variant.files[0])


# Backends whose files hold more than a decode step reads; the others read their whole file per token.
WEIGHT_BYTES_PER_TOKEN: dict[str, Callable[[BundleVariant], int]] = {
    "onnxruntime": onnx_weight_bytes_per_token, "onnxruntime-genai": onnx_weight_bytes_per_token,
    "transformers-js": onnx_weight_bytes_per_token,
    "executorch": lambda variant: int(variant.options["weight_bytes_per_token"])}

DECODER_OPENERS: dict[str, Callable[[BundleVariant, RunnerSpec, OpenContext], Any]] = {
    "torchscript": open_torchscript, "torch-export": open_torch_export, "onnxruntime": open_onnxruntime,
    "coreml": open_coreml, "coreml-mil": open_coreml_mil,
    "onnxruntime-genai": open_onnxruntime_genai, "transformers-js": open_transformers_js,
    "executorch": open_executorch,
}


def make_runner(spec: RunnerSpec, bundles: Mapping[str, Bundle], model: Gemma3Model | None = None,
                max_length: int = DEFAULT_MAX_LENGTH, threads: int = 0) -> Runner:
    """Open `spec` from verified `bundles` (see load_bundles); the in-memory backends need `model`."""
    if spec.backend not in BACKENDS:
        raise UserError(f"unknown backend {spec.backend!r}", f"use one of: {', '.join(BACKENDS)}")
    backend = BACKENDS[spec.backend]
    if backend.bundle_format is not None and backend.bundle_format not in bundles:
        raise UserError(f"{spec.name} needs the {backend.bundle_format} bundle",
                        f"run gemma-export export --format {backend.bundle_format}")
    context = OpenContext(bundles, model, max_length, threads)
    return (open_in_memory if backend.bundle_format is None else open_bundle_file)(spec, context)


def set_thread_count(threads: int) -> None:
    """PyTorch intra-op threads for the in-memory and torch-file backends (ORT takes its own setting)."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
