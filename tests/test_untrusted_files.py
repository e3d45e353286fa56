"""Model files, model ids and manifests come from strangers: nothing is unpickled, no remote code runs, headers
can't make us allocate what the file doesn't hold, names can't lead outside the artifacts folder, and the
HF token stays out of everything we print or write."""

from __future__ import annotations

import ast
import json
import os
import struct
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporters import artifact
from model import weights
from model.tokenizer import GemmaTokenizer
from model.weights import load_weights, save_hf_directory
from conftest import gemma_export
from test_bad_input_matrix import HubHandler, user_environment

REPO = Path(__file__).resolve().parents[1]
OUR_PACKAGES = ("model", "exporters", "validation", "gemma_export")
FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789abcdef"
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


# ---- no pickle, no remote code -----------------------------------------------------------------------------------

def unsafe_loads(source: str) -> list[str]:
    """Every place in `source` that could execute code hidden in a model file or fetched from a hub."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            found += [f"line {node.lineno}: imports {name}" for name in names
                      if name and name.split(".")[0] in PICKLING_MODULES]
        if not isinstance(node, ast.Call):
            continue
        keywords = {keyword.arg: keyword.value for keyword in node.keywords}
        for risky in ("trust_remote_code", "allow_pickle"):
            if risky in keywords and not (isinstance(keywords[risky], ast.Constant) and keywords[risky].value is False):
                found.append(f"line {node.lineno}: {risky}= is not False")
        if ast.unparse(node.func) == "torch.load":
            weights_only = keywords.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"line {node.lineno}: torch.load without weights_only=True")
    return found


def test_the_checker_finds_each_kind_of_unsafe_load():
    source = ("import pickle\nfrom joblib import load\nimport torch, numpy\n"
              "torch.load('m.pt')\ntorch.load('m.pt', weights_only=False)\ntorch.load('m.pt', weights_only=True)\n"
              "AutoModel.from_pretrained('x', trust_remote_code=True)\nnumpy.load('a.npy', allow_pickle=True)\n")
    assert [entry.split(":")[0] for entry in unsafe_loads(source)] == [
        "line 1", "line 2", "line 4", "line 5", "line 7", "line 8"]


def test_our_code_never_unpickles_or_runs_remote_code():
    files = sorted(path for package in OUR_PACKAGES for path in (REPO / package).rglob("*.py"))
    assert len(files) > 20
    problems = {str(path.relative_to(REPO)): found for path in files
                if (found := unsafe_loads(path.read_text(encoding="utf-8")))}
    assert problems == {}


# ---- headers that lie about sizes ----------------------------------------------------------------------------------

def gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def lying_gguf(path: Path, tensor_dims: tuple[int, ...] = (2**18, 2**20), string_length: int | None = None) -> Path:
    """A gemma3 GGUF whose one tensor claims 2^38 float32 values (1 TiB), or whose architecture string claims
    `string_length` bytes, followed by 64 real bytes."""
    kv = gguf_string("general.architecture") + struct.pack("<I", 8)
    kv += struct.pack("<Q", string_length) + b"gemma3" if string_length else gguf_string("gemma3")
    tensor = gguf_string("token_embd.weight") + struct.pack("<I", len(tensor_dims))
    tensor += b"".join(struct.pack("<Q", dim) for dim in tensor_dims) + struct.pack("<IQ", 0, 0)
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + kv + tensor
    path.write_bytes(header + b"\0" * (-len(header) % 32) + b"\0" * 64)
    return path


def lying_safetensors(folder: Path, tiny) -> Path:
    save_hf_directory(tiny.config, tiny.state_dict, folder)
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [2**18, 2**20],
                                                       "data_offsets": [0, 2**40]}}).encode()
    (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    return folder


PEAK_RSS_OF_A_LOAD = """
import json, resource, sys
import torch
from model.errors import UserError
from model.weights import load_weights
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_weights(sys.argv[1])
    message = None
except UserError as error:
    message = str(error)
grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"message": message, "grew_kib": grew_kib}))
"""


def peak_rss_growth_of_load(source: Path, tmp_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "GEMMA_EXPORT_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", PEAK_RSS_OF_A_LOAD, str(source)], capture_output=True, text=True,
                            cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny():
    return load_weights("random:tiny")


@pytest.mark.parametrize("make, cause", [
    (lambda tmp, tiny: lying_gguf(tmp / "terabyte-tensor.gguf"), "truncated"),
    (lambda tmp, tiny: lying_gguf(tmp / "terabyte-string.gguf", tensor_dims=(4,), string_length=2**40),
     "truncated"),
    (lambda tmp, tiny: lying_safetensors(tmp / "terabyte-safetensors", tiny), "truncated"),
], ids=["gguf tensor of 1 TiB", "gguf string of 1 TiB", "safetensors tensor of 1 TiB"])
def test_a_header_claiming_a_terabyte_fails_without_allocating_it(make, cause, tiny, tmp_path):
    measured = peak_rss_growth_of_load(make(tmp_path, tiny), tmp_path)
    assert measured["message"] is not None and cause in measured["message"], measured
    assert measured["grew_kib"] < 64 * 1024, measured  # 64 MiB, against the 1 TiB the header claims


# ---- names that try to leave the artifacts folder -------------------------------------------------------------------

NAME_PIECES = st.lists(st.sampled_from(["..", ".", "/", "\\", "a", "-", "~", "%2e", " ", "\x00", "é", "etc"]),
                       max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), NAME_PIECES))
def test_a_model_id_can_only_become_one_folder_inside_the_artifacts_root(name):
    root = Path("/artifacts-root")
    slug = weights.safe_slug(name)
    assert slug and "/" not in slug and "\\" not in slug and slug not in (".", "..") and not slug.startswith(".")
    assert os.path.normpath(root / slug / "onnx").startswith(f"{root}/{slug}/")
    artifact._check_slug_and_format(slug, "onnx")  # the bundle writer accepts every slug the weights loader makes


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["..", ".", "", "model.onnx", "sub", "..."]), min_size=1, max_size=6).map("/".join))
def test_a_manifest_path_is_accepted_only_inside_the_bundle(relative):
    bundle = Path("/bundles/tiny/onnx")
    if artifact._unsafe_path_reason(bundle, relative) is None:
        assert os.path.normpath(bundle / relative).startswith(f"{bundle}/")


def test_slug_and_format_from_a_caller_cannot_climb_out(tmp_path):
    for slug in ("../outside", "a/../../b", "..", "/etc"):
        with pytest.raises(artifact.UserError):
            artifact.load_bundle(tmp_path, slug, "onnx")
        with pytest.raises(artifact.UserError):
            artifact.BundleWriter(tmp_path, slug, "onnx")
    assert list(tmp_path.iterdir()) == []


# ---- the HF token --------------------------------------------------------------------------------------------------

def cached_hub_model(hf_home: Path, tiny) -> None:
    """owner/tiny-gemma in a Hugging Face cache, as `huggingface-cli download` leaves it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / "models--owner--tiny-gemma"
    snapshot = save_hf_directory(tiny.config, tiny.state_dict, repo / "snapshots" / commit)
    GemmaTokenizer.tiny().save(snapshot / "tokenizer.json")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def run_with_token(args: list[str], tmp_path: Path, extra: dict[str, str] | None = None
                   ) -> subprocess.CompletedProcess:
    env = user_environment(tmp_path, {"HF_TOKEN": FAKE_TOKEN, **(extra or {})})
    return gemma_export(*args, env=env, timeout=900)


@pytest.mark.slow
def test_the_hf_token_never_reaches_output_manifests_or_reports(tiny, tmp_path):
    cached_hub_model(tmp_path / "hf-home", tiny)
    out = tmp_path / "artifacts"
    model = ["--model", "owner/tiny-gemma", "--out", str(out)]
    exported = run_with_token(["export", "--format", "onnx", "--precision", "fp32", *model], tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    validated = run_with_token(["validate", *model, "--formats", "onnx", "--max-new-tokens", "2"], tmp_path)
    assert validated.returncode == 0, validated.stderr[-3000:]
    written = [path for path in out.rglob("*") if path.is_file()]
    names = {path.name for path in written}
    assert {"manifest.json", "report.json", "report.md", "report.html"} <= names
    for result in (exported, validated):
        assert FAKE_TOKEN not in result.stdout + result.stderr
    assert [path for path in written if FAKE_TOKEN.encode() in path.read_bytes()] == []
    manifest = json.loads((out / "owner--tiny-gemma" / "onnx" / "manifest.json").read_text())
    assert manifest["source"]["model_id"] == "owner/tiny-gemma"  # the id is recorded; the token is not


def test_the_hf_token_stays_out_of_hub_errors_even_with_debug(tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        hub = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
        result = run_with_token(["--debug", "generate", "--model", "owner/gated-gemma", "--prompt", "x"], tmp_path, hub)
    finally:
        server.shutdown()
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: owner/gated-gemma is gated")
    assert "Traceback" in result.stderr and FAKE_TOKEN not in result.stdout + result.stderr
