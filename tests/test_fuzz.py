"""Property-based fuzzing of everything that reads untrusted input: config readers, GGUF / safetensors headers,
the bundle manifest reader and the CLI's option parsing. Every generated input is either accepted or refused
with a UserError (for the CLI: exit 0, or exit 2 with one `error: ` line); any other exception is a bug.

`make test` runs the bounded profile; `make fuzz` (HYPOTHESIS_PROFILE=fuzz) runs fifty times as many examples.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import struct
import warnings
from pathlib import Path

import numpy
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from exporters.artifact import BundleWriter, load_bundle
from exporters.signature import decoder_io
from model.config import Gemma3Config, from_gguf_metadata, from_hf_config, load_hf_config
from model.errors import UserError
from model.weights import load_weights, read_safetensors_header, save_hf_directory
from test_weights import write_tiny_gguf

settings.register_profile("bounded", max_examples=100, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
settings.register_profile("fuzz", parent=settings.get_profile("bounded"), max_examples=5000)
FUZZ = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "bounded"))


def accepted_or_user_error(function, *args):
    """Run `function`; a UserError is a fine answer, and so is a result. Anything else propagates: a bug."""
    try:
        return function(*args)
    except UserError as error:
        assert str(error).strip(), "a UserError must name the cause"
        return None


# ---- JSON-like values, biased towards the edges ------------------------------------------------------------------

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 40),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["gemma3", "gemma3_text", "llama", "linear", "sliding_attention",
                                     "full_attention"]))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
HF_KEYS = ["vocab_size", "max_position_embeddings", "hidden_size", "num_attention_heads", "num_key_value_heads",
           "head_dim", "intermediate_size", "num_hidden_layers", "sliding_window", "sliding_window_pattern",
           "rope_local_base_freq", "rope_theta", "rope_scaling", "query_pre_attn_scalar", "rms_norm_eps",
           "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "layer_types", "model_type",
           "text_config"]
TINY_HF = Gemma3Config(vocab_size=512, context_length=64, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=128, num_layers=6, sliding_window=8, sliding_window_pattern=3).to_hf_config()
HF_CONFIGS = st.one_of(
    st.dictionaries(st.sampled_from(HF_KEYS), JSON_VALUES, max_size=8),  # mostly garbage
    st.dictionaries(st.sampled_from(HF_KEYS), JSON_VALUES, max_size=3).map(lambda edits: {**TINY_HF, **edits}),
    JSON_VALUES,
)


@FUZZ
@given(HF_CONFIGS)
def test_from_hf_config_accepts_or_refuses(data):
    config = accepted_or_user_error(from_hf_config, data)
    if config is not None:
        assert config == Gemma3Config.from_dict(config.to_dict())  # what is accepted is a consistent config


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(st.one_of(st.binary(max_size=300), HF_CONFIGS.map(lambda data: json.dumps(data).encode()),
                 st.integers(1, 5000).map(lambda depth: b"[" * depth + b"]" * depth)))
def test_load_hf_config_accepts_or_refuses_any_bytes(scratch, raw):
    path = scratch / "config.json"
    path.write_bytes(raw)
    accepted_or_user_error(load_hf_config, path)


GGUF_KEYS = ["general.architecture", "tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id",
             "tokenizer.ggml.padding_token_id"] + [f"gemma3.{key}" for key in (
                 "context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
                 "attention.head_count_kv", "attention.key_length", "attention.sliding_window",
                 "attention.sliding_window_pattern", "rope.freq_base", "rope.scaling.factor",
                 "attention.layer_norm_rms_epsilon")]
GGUF_VALUES = st.one_of(JSON_VALUES, st.integers(0, 2**64 - 1).map(numpy.uint64),
                        st.floats(width=32).map(numpy.float32))


@FUZZ
@given(st.dictionaries(st.sampled_from(GGUF_KEYS), GGUF_VALUES, max_size=10),
       st.sampled_from(["gemma3", "llama", None]))
def test_from_gguf_metadata_accepts_or_refuses(metadata, architecture):
    if architecture is not None:
        metadata = {**metadata, "general.architecture": architecture}
    accepted_or_user_error(from_gguf_metadata, metadata)


# ---- GGUF and safetensors files whose bytes lie -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return load_weights("random:tiny")


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tiny, tmp_path_factory) -> bytes:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny).read_bytes()


@pytest.fixture(scope="module", autouse=True)
def private_weight_cache(tmp_path_factory):
    """Dequantized mutants go into a throwaway cache, not the user's."""
    previous = os.environ.get("GEMMA_EXPORT_CACHE")
    os.environ["GEMMA_EXPORT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("GEMMA_EXPORT_CACHE")
    else:
        os.environ["GEMMA_EXPORT_CACHE"] = previous


HEADER_BYTES = 2048  # the GGUF header, key/values and tensor table of the tiny file live in its first ~2 KB
# Edits a fuzzer would make: overwrite bytes, plant a huge or small count/length, cut the file short.
EDITS = st.lists(st.one_of(
    st.tuples(st.just("bytes"), st.integers(0, HEADER_BYTES), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("u64"), st.integers(0, HEADER_BYTES), st.sampled_from(
        [0, 1, 2, 7, 255, 2**16, 2**31, 2**32 - 1, 2**40, 2**63 - 1, 2**64 - 1])),
    st.tuples(st.just("u32"), st.integers(0, HEADER_BYTES), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("cut"), st.integers(0, 10**6), st.none()),
), min_size=1, max_size=4)


def apply_edits(data: bytes, edits) -> bytes:
    mutated = bytearray(data)
    for kind, offset, value in edits:
        if kind == "cut":
            mutated = mutated[: offset % (len(mutated) + 1)]
            continue
        patch = {"bytes": lambda: value, "u64": lambda: struct.pack("<Q", value),
                 "u32": lambda: struct.pack("<I", value)}[kind]()
        offset = offset % max(len(mutated), 1)
        mutated[offset: offset + len(patch)] = patch
    return bytes(mutated)


@FUZZ
@given(EDITS)
def test_a_mutated_gguf_loads_or_is_refused(tiny_gguf_bytes, scratch, edits):
    path = scratch / "mutant.gguf"
    path.write_bytes(apply_edits(tiny_gguf_bytes, edits))
    loaded = accepted_or_user_error(load_weights, str(path))
    if loaded is not None:
        assert all(tensor.dtype.is_floating_point for tensor in loaded.state_dict.values())


@pytest.fixture(scope="module")
def tiny_safetensors_bytes(tiny, tmp_path_factory) -> bytes:
    return (save_hf_directory(tiny.config, tiny.state_dict, tmp_path_factory.mktemp("hf")) / "model.safetensors"
            ).read_bytes()


TENSOR_ENTRIES = st.fixed_dictionaries({}, optional={
    "dtype": st.one_of(st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "F8_E4M3", "X9"]), JSON_VALUES),
    "shape": st.one_of(st.lists(st.integers(-2, 2**40), max_size=4), JSON_VALUES),
    "data_offsets": st.one_of(st.lists(st.integers(-2, 2**41), min_size=2, max_size=2), JSON_VALUES),
})
SAFETENSORS_HEADERS = st.dictionaries(st.text(max_size=10), st.one_of(TENSOR_ENTRIES, JSON_VALUES), max_size=4)


@FUZZ
@given(st.one_of(SAFETENSORS_HEADERS.map(lambda header: json.dumps(header).encode()), st.binary(max_size=200)),
       st.integers(0, 4096), st.sampled_from(["exact", "huge", "short"]))
def test_a_crafted_safetensors_header_is_checked_or_refused(scratch, header, data_bytes, declared):
    length = {"exact": len(header), "huge": 2**62, "short": max(len(header) - 3, 0)}[declared]
    path = scratch / "crafted.safetensors"
    path.write_bytes(length.to_bytes(8, "little") + header + b"\0" * data_bytes)
    accepted_or_user_error(read_safetensors_header, path)


@FUZZ
@given(EDITS)
def test_a_mutated_safetensors_folder_loads_or_is_refused(tiny, tiny_safetensors_bytes, scratch, edits):
    folder = scratch / "mutant-hf"
    if not (folder / "config.json").is_file():
        save_hf_directory(tiny.config, tiny.state_dict, folder)
    (folder / "model.safetensors").write_bytes(apply_edits(tiny_safetensors_bytes, edits))
    accepted_or_user_error(load_weights, str(folder))


# ---- the manifest reader --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle_dir(tiny, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bundles")
    with BundleWriter(root, "tiny", "onnx") as bundle:
        (bundle.path / "model.onnx").write_bytes(b"graph")
        (bundle.path / "model.onnx.data").write_bytes(b"weights")
        bundle.add_variant("fp32", files=["model.onnx"], io=decoder_io(tiny.config), opset=18)
        return bundle.finish(config=tiny.config, tokenizer=str(write_tokenizer(root)),
                             source={"model_id": "random:tiny", "weight_sha256": tiny.weight_sha256}).path


def write_tokenizer(root: Path) -> Path:
    (root / "tokenizer.json").write_text("{}", encoding="utf-8")
    return root / "tokenizer.json"


def replace_at(document, path: list, value):
    """`document` with the value found by walking `path` (keys / indexes, each taken modulo what is there)
    replaced by `value`."""
    if not path or not isinstance(document, (dict, list)) or not document:
        return value
    copy = dict(document) if isinstance(document, dict) else list(document)
    keys = list(copy) if isinstance(copy, dict) else list(range(len(copy)))
    key = keys[path[0] % len(keys)]
    copy[key] = replace_at(copy[key], path[1:], value)
    return copy


PATH_VALUES = st.sampled_from(["../outside", "/etc/passwd", "a\\b", "", ".", "manifest.json", "model.onnx/",
                               "x\x00y", "./model.onnx", "model.onnx", "config.json"])


@FUZZ
@given(st.lists(st.integers(0, 50), min_size=1, max_size=5), st.one_of(JSON_VALUES, PATH_VALUES),
       st.booleans())
def test_a_mutated_manifest_loads_or_is_refused(bundle_dir, path, value, verify):
    manifest_file = bundle_dir / "manifest.json"
    original = manifest_file.read_text(encoding="utf-8")
    try:
        manifest_file.write_text(json.dumps(replace_at(json.loads(original), path, value)), encoding="utf-8")
        accepted_or_user_error(load_bundle, bundle_dir, None, None, verify)
    finally:
        manifest_file.write_text(original, encoding="utf-8")


@FUZZ
@given(st.one_of(st.binary(max_size=200), JSON_VALUES.map(lambda data: json.dumps(data).encode())))
def test_any_manifest_bytes_load_or_are_refused(bundle_dir, raw):
    manifest_file = bundle_dir / "manifest.json"
    original = manifest_file.read_bytes()
    try:
        manifest_file.write_bytes(raw)
        assert accepted_or_user_error(load_bundle, bundle_dir) is None  # nothing but the real manifest is valid
    finally:
        manifest_file.write_bytes(original)


# ---- CLI option parsing --------------------------------------------------------------------------------------------

class Parsed(UserError):
    """Raised by the stand-in loader: the options were parsed and validated; nothing heavy runs."""


def stand_in_load(model_id="gemma-3-270m", device="cpu", dtype="float32", revision=None):
    from model.loading import resolve_device, resolve_dtype
    resolve_device(device)
    resolve_dtype(dtype)
    raise Parsed("options parsed", "nothing to do")


def option_names() -> list[str]:
    from gemma_export.cli import cli
    return sorted({name for command in cli.commands.values() for parameter in command.params
                   for name in [*parameter.opts, *parameter.secondary_opts] if name.startswith("-")})


@pytest.fixture(scope="module")
def cli_without_work():
    """The real click group and run_cli, with model loading replaced by a stand-in that stops after parsing."""
    import gemma_export.cli
    import gemma_export.validation_commands
    patch = pytest.MonkeyPatch()
    for module in (gemma_export.cli, gemma_export.validation_commands):
        patch.setattr(module, "load", stand_in_load)
    patch.setattr(gemma_export.validation_commands, "source_slug", lambda *args, **kwargs: stand_in_load())
    yield gemma_export.cli.cli
    patch.undo()
    logging.disable(logging.NOTSET)  # run_cli quiets logging for the whole process


OPTION_VALUES = st.one_of(
    st.sampled_from(["cpu", "cuda", "tpu", "fp32", "fp16", "int4", "fp8", "onnx", "onnx:int4", "tflite:fp32",
                     "coreml", "torchscript", "random:tiny", "0", "-1", "1e9", "nan", "inf", "", "-", "--", "=",
                     "--prompt=", "float16", "int3", "CPUExecutionProvider"]),
    st.integers(-2**70, 2**70).map(str), st.floats().map(str), st.text(max_size=10),
)


@FUZZ
@given(st.data())
def test_any_command_line_is_parsed_or_refused_in_one_line(cli_without_work, data):
    from gemma_export.errors import run_cli

    names = option_names()
    prefix = data.draw(st.lists(st.sampled_from(["--debug", "--help", "--bogus"]), max_size=1))
    command = data.draw(st.sampled_from([*cli_without_work.commands, "bogus"]))
    rest = data.draw(st.lists(st.one_of(st.sampled_from(names), OPTION_VALUES), max_size=10))
    assume("\x00" not in "".join(rest))  # a real argv can't hold NUL bytes
    stdout, stderr = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = run_cli(cli_without_work, [*prefix, command, *rest])
    lines = stderr.getvalue().strip().splitlines()
    assert code in (0, 2), stderr.getvalue()
    if code == 2:
        assert lines and lines[-1].startswith("error: "), stderr.getvalue()
