"""The bad-input matrix: every broken thing a user can hand `gemma-export`, run as a user runs it (a subprocess).

Each case must end in one line `error: <cause>; <fix>` on stderr, a non-zero exit, no traceback, and no new
partial bundle or manifest in the output folder. Set BAD_INPUT_MATRIX_REPORT=<file.md> to write the outcomes
as a markdown table (the README's reliability table).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from exporters.artifact import BundleWriter
from exporters.signature import decoder_io
from model.tokenizer import GemmaTokenizer
from model.weights import LoadedWeights, load_weights, save_hf_directory
from conftest import gemma_export
from test_weights import write_tiny_gguf

REPO = Path(__file__).resolve().parents[1]
TINY_SLUG = "random-tiny"
OUTCOMES: dict[str, tuple[str, str]] = {}  # case name → (outcome, the error line)


# ---- running the CLI like a user ---------------------------------------------------------------------------------

def user_environment(home: Path, extra: dict[str, str]) -> dict[str, str]:
    """No token, an empty hub cache, offline unless a case says otherwise, a private dequantization cache."""
    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update({"HF_HOME": str(home / "hf-home"), "HF_HUB_OFFLINE": "1", "GEMMA_EXPORT_CACHE": str(home / "cache"),
                "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
    env.pop("HF_HUB_CACHE", None)
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], preexec_fn: Callable[[], None] | None = None
            ) -> subprocess.CompletedProcess:
    return gemma_export(*args, env=env, preexec_fn=preexec_fn)


def bundle_state(out: Path) -> list[str]:
    """Manifests and staging / set-aside folders under the output folder: what a failed run must not add."""
    if not out.is_dir():
        return []
    found = [p.relative_to(out).as_posix() for p in out.rglob("*")
             if p.name == "manifest.json" or ".tmp-" in p.name or ".old-" in p.name]
    return sorted(found)


def error_line(result: subprocess.CompletedProcess) -> str:
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


# ---- a fake Hugging Face hub on localhost: the real huggingface_hub code path, answers we choose ---------------

class HubHandler(BaseHTTPRequestHandler):
    """Answers like huggingface.co does for a gated repo, a missing revision and a missing repo."""

    def answer(self) -> None:
        if "/revision/v9" in self.path:
            status, code = 404, "RevisionNotFound"
        elif "gated" in self.path:
            status, code = 403, "GatedRepo"
        else:
            status, code = 404, "RepoNotFound"
        body = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def online(hub: str) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub, "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}


# ---- broken inputs, each built in the case's own folder -----------------------------------------------------------

@dataclass
class Workspace:
    root: Path
    out: Path
    tiny: LoadedWeights  # random:tiny's weights
    hub: str

    def hf_dir(self, name: str = "tiny-hf") -> Path:
        folder = save_hf_directory(self.tiny.config, self.tiny.state_dict, self.root / name)
        GemmaTokenizer.tiny().save(folder / "tokenizer.json")
        return folder

    def edit_tensors(self, change: Callable[[dict], None]) -> Path:
        folder = self.hf_dir()
        tensors = load_file(folder / "model.safetensors")
        change(tensors)
        save_file(tensors, folder / "model.safetensors")
        return folder


def export_args(model: str, ws: Workspace, *extra: str) -> list[str]:
    return ["export", "--format", "torchscript", "--model", model, "--out", str(ws.out), *extra]


def generate_args(model: str, prompt: str = "Hello", *extra: str) -> list[str]:
    return ["generate", "--model", model, "--prompt", prompt, "--max-new-tokens", "2", *extra]


def no_config(ws: Workspace) -> list[str]:
    folder = ws.hf_dir()
    (folder / "config.json").unlink()
    return export_args(str(folder), ws)


def truncated_safetensors(ws: Workspace) -> list[str]:
    weights = ws.hf_dir() / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    return export_args(str(weights.parent), ws)


def garbled_header(ws: Workspace) -> list[str]:
    weights = ws.hf_dir() / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:20] = b"\x00garbled!!\xff\xfe"
    weights.write_bytes(bytes(data))
    return export_args(str(weights.parent), ws)


def wrong_shape(ws: Workspace) -> list[str]:
    folder = ws.edit_tensors(lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(128, 63)}))
    return export_args(str(folder), ws)


def wrong_dtype(ws: Workspace) -> list[str]:
    folder = ws.edit_tensors(lambda t: t.update({"model.embed_tokens.weight": torch.zeros(512, 64, dtype=torch.int8)}))
    return export_args(str(folder), ws)


def missing_tensor(ws: Workspace) -> list[str]:
    folder = ws.edit_tensors(lambda t: t.pop("model.layers.0.self_attn.q_norm.weight"))
    return export_args(str(folder), ws)


def not_gguf(ws: Workspace) -> list[str]:
    path = ws.root / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF" * 10)
    return export_args(str(path), ws)


def truncated_gguf(ws: Workspace) -> list[str]:
    path = write_tiny_gguf(ws.root / "tiny.gguf", ws.tiny)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return export_args(str(path), ws)


def other_architecture_gguf(ws: Workspace) -> list[str]:
    return export_args(str(write_tiny_gguf(ws.root / "llama.gguf", ws.tiny, architecture="llama")), ws)


def unparsable_tokenizer(ws: Workspace) -> list[str]:
    folder = ws.hf_dir()
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": [', encoding="utf-8")
    return export_args(str(folder), ws)


def token_id_beyond_vocab(ws: Workspace) -> list[str]:
    """A 300-token model with the 512-token tiny tokenizer beside it: its text pieces have ids ≥ 363."""
    config = ws.tiny.config.replace(vocab_size=300)
    state_dict = {**ws.tiny.state_dict, "embed_tokens.weight": ws.tiny.state_dict["embed_tokens.weight"][:300]}
    folder = save_hf_directory(config, state_dict, ws.root / "small-vocab")
    GemmaTokenizer.tiny().save(folder / "tokenizer.json")
    return generate_args(str(folder), "the")


def read_only_out(ws: Workspace) -> list[str]:
    ws.out.mkdir()
    ws.out.chmod(0o555)
    return export_args("random:tiny", ws)


def file_as_out(ws: Workspace) -> list[str]:
    ws.out.write_text("a file where the artifacts folder should be")
    return export_args("random:tiny", ws)


def bundle_with(ws: Workspace, fmt: str, precision: str, main: str, write: Callable[[Path], None]) -> None:
    """A bundle from the tiny weights whose manifest is valid, holding whatever `write` puts at `main`."""
    with BundleWriter(ws.out, TINY_SLUG, fmt) as bundle:
        write(bundle.path / main)
        bundle.add_variant(precision, files=[main], io=decoder_io(ws.tiny.config))
        bundle.finish(config=ws.tiny.config, tokenizer=GemmaTokenizer.tiny(),
                      source={"model_id": ws.tiny.source_id, "weight_sha256": ws.tiny.weight_sha256})


def validate_args(ws: Workspace, *formats: str) -> list[str]:
    flags = [flag for fmt in formats for flag in ("--formats", fmt)]
    return ["validate", "--model", "random:tiny", "--out", str(ws.out), *flags, "--max-new-tokens", "1"]


def modified_and_deleted(ws: Workspace) -> list[str]:
    """One validate run, two damaged bundles: a model file edited after export (same size, other bytes) and a
    model file deleted."""
    bundle_with(ws, "torchscript", "fp32", "model.pt", lambda path: path.write_bytes(b"A" * 4096))
    bundle_with(ws, "onnx", "fp32", "model.onnx", lambda path: path.write_bytes(b"B" * 4096))
    bundle_with(ws, "executorch", "fp32", "model.pte", lambda path: path.write_bytes(b"C" * 4096))
    (ws.out / TINY_SLUG / "torchscript" / "model.pt").write_bytes(b"A" * 4095 + b"Z")
    (ws.out / TINY_SLUG / "executorch" / "model.pte").write_bytes(b"C" * 4095 + b"Z")
    (ws.out / TINY_SLUG / "onnx" / "model.onnx").unlink()
    return validate_args(ws, "torchscript", "onnx", "executorch")


def garbage_model_files(ws: Workspace) -> list[str]:
    """Bundles whose manifests vouch for garbage: an .onnx that isn't protobuf, a .mlpackage with a broken
    Manifest.json, a .pte of random bytes (the ExecuTorch runtime would abort the process on it: its identifier is
    checked first)."""
    def garbage_mlpackage(path: Path) -> None:
        path.mkdir()
        (path / "Manifest.json").write_text("garbage", encoding="utf-8")
    bundle_with(ws, "onnx", "fp32", "model.onnx", lambda path: path.write_bytes(b"not an onnx model" * 64))
    bundle_with(ws, "coreml", "fp16", "model.mlpackage", garbage_mlpackage)
    noise = torch.Generator().manual_seed(0)
    random_bytes = torch.randint(0, 256, (8192,), dtype=torch.uint8, generator=noise).numpy().tobytes()
    bundle_with(ws, "executorch", "fp32", "model.pte", lambda path: path.write_bytes(random_bytes))
    return validate_args(ws, "onnx", "coreml", "executorch")


@dataclass
class Case:
    name: str
    build: Callable[[Workspace], list[str]]
    causes: tuple[str, ...]  # fragments the error line must contain
    env: Callable[[Workspace], dict[str, str]] = lambda ws: {}
    last_line: str = "error: "
    exit_code: int = 2
    fix_required: bool = True


CASES = [
    Case("unknown model id", lambda ws: export_args("no-such-model", ws), ("unknown model id 'no-such-model'",)),
    Case("hub id, no network, empty cache", lambda ws: export_args("owner/tiny-gemma", ws),
         ("can't reach the Hugging Face hub", "not in the local cache")),
    Case("hub id, gated, no HF_TOKEN", lambda ws: export_args("owner/gated-gemma", ws),
         ("owner/gated-gemma is gated", "HF_TOKEN"), env=lambda ws: online(ws.hub)),
    Case("hub id, revision that doesn't exist", lambda ws: export_args("owner/tiny-gemma", ws, "--revision", "v9"),
         ("revision 'v9' doesn't exist in owner/tiny-gemma",), env=lambda ws: online(ws.hub)),
    Case("hub id, no such repository", lambda ws: export_args("owner/missing-gemma", ws),
         ("unknown model id 'owner/missing-gemma'", "no such repository"), env=lambda ws: online(ws.hub)),
    Case("folder without config.json", no_config, ("has no config.json",)),
    Case("safetensors truncated", truncated_safetensors, ("truncated",)),
    Case("safetensors header garbled", garbled_header, ("garbled safetensors header",)),
    Case("safetensors tensor of the wrong shape", wrong_shape,
         ("model.layers.2.mlp.up_proj.weight has shape [128, 63], expected [128, 64]",)),
    Case("safetensors tensor of the wrong dtype", wrong_dtype, ("model.embed_tokens.weight", "I8", "not a float")),
    Case("safetensors tensor missing", missing_tensor, ("missing tensor model.layers.0.self_attn.q_norm.weight",)),
    Case("file that isn't GGUF", not_gguf, ("is not a GGUF file",)),
    Case("GGUF truncated", truncated_gguf, ("truncated",)),
    Case("GGUF of another architecture", other_architecture_gguf, ("'llama' model, not gemma3",)),
    Case("tokenizer.json that doesn't parse", unparsable_tokenizer, ("cannot read tokenizer file",)),
    Case("prompt longer than the context", lambda ws: generate_args("random:tiny", "the " * 1100),
         ("context of 1024",)),
    Case("--max-new-tokens negative", lambda ws: validate_args(ws)[:-1] + ["-5"],
         ("--max-new-tokens", "-5 is not in the range")),
    Case("--max-new-tokens absurd", lambda ws: generate_args("random:tiny", "x", "--max-new-tokens", "9" * 30),
         ("--max-new-tokens",)),
    Case("token id ≥ vocabulary", token_id_beyond_vocab, ("outside the vocabulary (0..299)",)),
    Case("unknown format", lambda ws: ["export", "--format", "tflite", "--model", "random:tiny"],
         ("--format", "'tflite' is not one of")),
    Case("unknown precision", lambda ws: export_args("random:tiny", ws, "--precision", "fp8"),
         ("torchscript has no precision 'fp8'",)),
    Case("unknown device", lambda ws: validate_args(ws) + ["--device", "tpu"], ("--device", "'tpu' is not one of")),
    Case("unknown ONNX Runtime provider", lambda ws: validate_args(ws) + ["--provider", "TensorRTish"],
         ("unknown ONNX Runtime provider 'TensorRTish'",)),
    Case("output folder read-only", read_only_out, ("cannot write to",)),
    Case("a file where the output folder should be", file_as_out, ("is a file where a folder should be",)),
    Case("bundle file modified after export / deleted", modified_and_deleted,
         ("model.pt was modified after export (sha256 mismatch)", "model.onnx listed in the manifest is missing",
          "model.pte was modified after export (sha256 mismatch)")),
    Case("a .onnx / .mlpackage / .pte that is garbage", garbage_model_files,
         ("FAIL onnxruntime fp32 cpu: onnxruntime cannot load model.onnx (InvalidProtobuf",
          "FAIL coreml-mil fp16 numpy: coreml-mil cannot load model.mlpackage",
          "FAIL executorch fp32 xnnpack: ", "model.pte is not an ExecuTorch program (no ET12 identifier at byte 4)",
          "re-export it: gemma-export export --format onnx --precision fp32"),
         last_line="validation failed for: ", exit_code=1, fix_required=False),
]


def drop_permission_override() -> None:
    """For root: drop CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH from the bounding set before exec, so the child
    honours file modes like any user."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2
    for capability in (cap_dac_override, cap_dac_read_search):
        if libc.prctl(pr_capbset_drop, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def preexec_for(case: Case) -> Callable[[], None] | None:
    if case.build is not read_only_out or os.geteuid() != 0:
        return None
    try:  # an exception in preexec_fn reaches the parent as SubprocessError
        subprocess.run([sys.executable, "-c", "pass"], preexec_fn=drop_permission_override, check=True)
    except subprocess.SubprocessError:
        pytest.skip("running as root without CAP_SETPCAP: a read-only folder can't be made to refuse root's writes")
    return drop_permission_override


@pytest.fixture(scope="module")
def tiny_weights():
    """random:tiny's weights only (conftest's `tiny` is the loaded model)."""
    return load_weights("random:tiny")


@pytest.fixture(scope="module", autouse=True)
def matrix_report():
    yield
    destination = os.environ.get("BAD_INPUT_MATRIX_REPORT")
    if destination:
        Path(destination).write_text(markdown_table(), encoding="utf-8")


NOTES = [
    "Every case also asserts: no traceback, and no new manifest or staging folder under the output folder; "
    "with `--debug` the same kind of error prints its traceback before the line.",
    "Hub cases run the real huggingface_hub code against a local stand-in for huggingface.co (HF_ENDPOINT). "
    "The read-only case, when run as root, drops CAP_DAC_OVERRIDE so the folder's mode is honoured. "
    "A full disk is simulated in-process (the model file's write fails with ENOSPC).",
    "A garbage model file behind a valid manifest fails that runner by name with the cause and the fix "
    "(`FAIL <runner>: <runtime> cannot load <file> (…); re-export it: …`), and validation exits 1 naming it.",
]


def markdown_table() -> str:
    passed = sum(outcome == "pass" for outcome, _ in OUTCOMES.values())
    rows = [f"Bad-input matrix (`tests/test_bad_input_matrix.py`): {len(OUTCOMES)} cases, {passed} pass.", "",
            "| # | bad input | outcome | what the user sees (last line, exit code) |", "|---|---|---|---|"]
    for number, (name, (outcome, line)) in enumerate(OUTCOMES.items(), 1):
        shown = line.replace("|", "/").replace("`", "'")
        rows.append(f"| {number} | {name} | {outcome} | {shown} |")
    return "\n".join(rows) + "\n\n" + "\n\n".join(NOTES) + "\n"


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_ends_in_one_clear_line(case, tiny_weights, fake_hub, tmp_path):
    ws = Workspace(tmp_path, tmp_path / "artifacts", tiny_weights, fake_hub)
    args = case.build(ws)
    preexec_fn = preexec_for(case)
    before = bundle_state(ws.out)
    result = run_cli(args, user_environment(tmp_path, case.env(ws)), preexec_fn)
    line = error_line(result)
    shown = line if case.last_line == "error: " else " / ".join(
        [row for row in result.stderr.splitlines() if row.startswith("FAIL ")] + [line])
    OUTCOMES[case.name] = ("fail", f"{shown.replace(str(tmp_path), '<tmp>')} (exit {result.returncode})")
    assert result.returncode == case.exit_code, result.stderr[-3000:]
    assert line.startswith(case.last_line), result.stderr[-3000:]
    for cause in case.causes:
        assert cause in (line if case.last_line == "error: " else result.stderr), (cause, result.stderr[-3000:])
    if case.fix_required:
        assert "; " in line, f"no fix named: {line}"
    assert "Traceback" not in result.stdout + result.stderr
    assert bundle_state(ws.out) == before
    OUTCOMES[case.name] = ("pass", OUTCOMES[case.name][1])


def test_disk_full_during_export_leaves_no_half_bundle(tmp_path, monkeypatch, capsys):
    """ENOSPC can't be provoked for real without root mounts: the model file's write fails halfway instead."""
    from gemma_export.cli import cli
    from gemma_export.errors import run_cli as run_in_process

    def disk_fills_up(module, path, **kwargs):
        Path(path).write_bytes(b"the first half of a model")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(torch.jit, "save", disk_fills_up)
    out = tmp_path / "artifacts"
    with warnings.catch_warnings():
        code = run_in_process(cli, ["export", "--format", "torchscript", "--model", "random:tiny", "--out", str(out)])
    logging.disable(logging.NOTSET)  # run_cli quiets logging for the process; the other tests need it back
    line = error_line(subprocess.CompletedProcess([], code, "", capsys.readouterr().err))
    OUTCOMES["disk full while writing the model (in-process)"] = (
        "pass" if code == 2 else "fail", f"{line.replace(str(tmp_path), '<tmp>')} (exit {code})")
    assert code == 2
    assert line.startswith("error: no space left on the device while writing") and "; free some disk space" in line
    assert bundle_state(out) == []
    assert [p.name for p in (out / TINY_SLUG).iterdir() if not p.name.endswith(".lock")] == []


def test_debug_shows_the_traceback_for_a_bad_input(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a gguf")
    result = run_cli(["--debug", "export", "--format", "onnx", "--model", str(path), "--out", str(tmp_path / "a")],
                     user_environment(tmp_path, {}))
    assert result.returncode == 2
    assert "Traceback (most recent call last)" in result.stderr
    assert error_line(result).startswith(f"error: {path} is not a GGUF file")
