"""The ONNX bundle as a Hugging Face model repository that app runtimes load unmodified (exporters/hf_repo.py,
validation/app_runtimes.py): onnxruntime-genai and transformers.js (node) run the folder of `gemma-export all`
as it is, with greedy tokens equal to PyTorch's; Optimum loads it; the manifest covers every file, an edited one
fails validate by its name; `gemma-export push` uploads it to a local stand-in for the hub.

tiny: the ONNX bundle of `tiny_all` (conftest: fp32 and int4, validated by `gemma-export all`), never written
to here (the tests that edit files copy it). real: the ONNX bundle of `real_bundles`, own short loops.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from conftest import gemma_export, real_bundle_path
from exporters.artifact import MANIFEST, load_bundle
from exporters.hf_repo import CHAT_TEMPLATE, GENAI_CONFIG
from model.generate import generate
from validation import app_runtimes
from validation.runners import BACKENDS, Host, Selection, available_specs, unavailable_reason

NEW_TOKENS = 24
ROOT_FILES = {"README.md", "config.json", "generation_config.json", "genai_config.json", "special_tokens_map.json",
              "tokenizer.json", "tokenizer_config.json", "manifest.json"}
needs_node = pytest.mark.skipif(app_runtimes.transformers_js_unavailable_reason() is not None,
                                reason=str(app_runtimes.transformers_js_unavailable_reason()))
needs_genai = pytest.mark.skipif(app_runtimes.genai_unavailable_reason() is not None,
                                 reason=str(app_runtimes.genai_unavailable_reason()))


@pytest.fixture(scope="module")
def tiny_bundle(tiny_all) -> Path:
    out, result = tiny_all
    assert result.returncode == 0, result.stderr[-3000:]
    return load_bundle(out, "random-tiny", "onnx").path


@pytest.fixture(scope="module")
def tiny_prompts(tiny):
    """Two prompts past the tiny window (8), from the tokenizer."""
    prompts = [tiny.tokenizer.encode("The history of computing is a story of abstraction layered upon abstraction"),
               tiny.tokenizer.encode("Assemblers turned mnemonics into numbers and compilers turned formulas")]
    assert all(len(ids) > tiny.model.config.sliding_window for ids in prompts)
    return prompts


def reference_tokens(loaded, ids: list[int], stop: bool = False) -> list[int]:
    stops = list(loaded.model.config.eos_token_ids) if stop else []
    return generate(loaded.model, ids, NEW_TOKENS, stop_token_ids=stops).tokens[0].tolist()


# ---- layout ---------------------------------------------------------------------------------------------------

def test_bundle_is_a_hugging_face_repository_and_the_manifest_covers_every_file(tiny_bundle, tiny):
    files = {path.relative_to(tiny_bundle).as_posix() for path in tiny_bundle.rglob("*") if path.is_file()}
    assert {name for name in files if "/" not in name} == ROOT_FILES
    assert {name for name in files if "/" in name} == {"onnx/model.onnx", "onnx/model.onnx_data",
                                                       "onnx/model_q4.onnx", "onnx/model_q4.onnx_data"}
    manifest = json.loads((tiny_bundle / MANIFEST).read_text())
    assert {entry["path"] for entry in manifest["files"]} == files - {MANIFEST}
    genai = json.loads((tiny_bundle / GENAI_CONFIG).read_text())
    assert genai["model"]["type"] == "gemma3_text" and genai["model"]["decoder"]["filename"] == "onnx/model.onnx"
    assert genai["search"]["past_present_share_buffer"] is False
    assert genai["model"]["eos_token_id"] == list(tiny.model.config.eos_token_ids)
    assert json.loads((tiny_bundle / "config.json").read_text())["model_type"] == "gemma3_text"


def test_chat_template_renders_what_our_tokenizer_writes(tiny_bundle, tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bundle)
    assert json.loads((tiny_bundle / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of France?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<bos>" + tiny.tokenizer.apply_chat_template(messages)
    text = "The capital of France is"
    assert tokenizer(text)["input_ids"] == tiny.tokenizer.encode(text)


def test_model_card_has_hub_metadata_sizes_and_the_validation_numbers(tiny_bundle):
    card = (tiny_bundle / "README.md").read_text()
    front = card.split("---")[1]
    for line in ("license: gemma", "library_name: transformers.js", "- onnx", "- transformers.js",
                 "- onnxruntime-genai"):
        assert line in front.splitlines(), line
    report = json.loads((tiny_bundle.parent / "report" / "report.json").read_text())
    rows = {row["runner"]: row for row in report["validation"]["runners"]}
    fp32_row = next(line for line in card.splitlines() if line.startswith("| fp32 |"))
    size = sum((tiny_bundle / name).stat().st_size for name in ("onnx/model.onnx", "onnx/model.onnx_data"))
    assert f"{size / 2**20:.1f} MiB" in fp32_row
    for runner in ("onnxruntime fp32 cpu", "onnxruntime-genai fp32 cpu", "transformers-js fp32 node"):
        row = rows[runner]
        assert f"top-1 {row['top1_agreement']:.3f}" in fp32_row and f"greedy {row['greedy_steps']}/" in fp32_row
    assert "```js" in card and "import onnxruntime_genai as og" in card and "ORTModelForCausalLM" in card


# ---- runtimes -------------------------------------------------------------------------------------------------

@needs_genai
def test_onnxruntime_genai_greedy_tokens_equal_pytorch(tiny_bundle, tiny, tiny_prompts):
    for precision, model_file in (("fp32", "onnx/model.onnx"),):
        decoder = app_runtimes.GenaiDecoder(tiny_bundle, model_file)
        for ids in tiny_prompts:
            assert decoder.generate(ids, NEW_TOKENS) == reference_tokens(tiny, ids, stop=True), precision


@needs_node
def test_transformers_js_greedy_tokens_equal_pytorch(tiny_bundle, tiny, tiny_prompts):
    decoder = app_runtimes.TransformersJsDecoder(tiny_bundle, "fp32")
    try:
        for ids in tiny_prompts:
            assert decoder.generate(ids, NEW_TOKENS) == reference_tokens(tiny, ids)
    finally:
        decoder.close()


def teacher_forcing_matches_step_by_step(decoder, ids: list[int], vocab_size: int) -> None:
    """One prefill's every-position logits (validation's teacher forcing) equal a prefill and a decode step per
    token, up to summation order."""
    at_once = decoder.prefill_every_position(np.asarray([ids[:-1]]))
    stepped = [decoder.prefill(np.asarray([ids[:1]])), *(decoder.decode(np.asarray([[token]])) for token in ids[1:-1])]
    assert at_once.shape == (len(ids) - 1, vocab_size)
    assert max(float(np.abs(row - np.asarray(step).reshape(-1)).max()) for row, step in zip(at_once, stepped)) <= 1e-4


@needs_genai
def test_onnxruntime_genai_teacher_forces_in_one_prefill(tiny_bundle, tiny, tiny_prompts):
    decoder = app_runtimes.GenaiDecoder(tiny_bundle, "onnx/model.onnx")
    teacher_forcing_matches_step_by_step(decoder, max(tiny_prompts, key=len), tiny.model.config.vocab_size)


@needs_node
def test_transformers_js_teacher_forces_in_one_prefill(tiny_bundle, tiny, tiny_prompts):
    decoder = app_runtimes.TransformersJsDecoder(tiny_bundle, "fp32")
    try:
        teacher_forcing_matches_step_by_step(decoder, max(tiny_prompts, key=len), tiny.model.config.vocab_size)
    finally:
        decoder.close()


@needs_genai
def test_the_model_cards_genai_snippet_runs_as_written_and_starts_with_bos(tiny_bundle, tiny):
    """The card's onnxruntime-genai code, run as a user pastes it (only the folder filled in): Gemma's text
    starts with <bos>, which genai's encode leaves out unless told (without it the real model writes
    "The capital of France is France. . . ."), and it generates past the prompt."""
    card = (tiny_bundle / "README.md").read_text(encoding="utf-8")
    [snippet] = [block for block in re.findall(r"```python\n(.*?)```", card, re.S) if "onnxruntime_genai" in block]
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(snippet.replace("path/to/this/folder", str(tiny_bundle)), namespace)  # noqa: S102 — our own card
    sequence = [int(token) for token in namespace["generator"].get_sequence(0)]
    prompt = tiny.tokenizer.encode("The capital of France is")
    assert prompt[0] == tiny.tokenizer.bos_token_id and sequence[:len(prompt)] == prompt
    assert len(sequence) > len(prompt) and printed.getvalue().strip()


def test_app_runtimes_in_the_report_meet_the_floors(tiny_bundle):
    """`gemma-export all` judged both runtimes on both files like every backend: PASS, fp32 greedy all equal."""
    report = json.loads((tiny_bundle.parent / "report" / "report.json").read_text())
    rows = {row["runner"]: row for row in report["validation"]["runners"]}
    for name in ("onnxruntime-genai fp32 cpu", "onnxruntime-genai int4 cpu", "transformers-js fp32 node",
                 "transformers-js int4 node"):
        if name.startswith("transformers-js") and app_runtimes.transformers_js_unavailable_reason():
            continue
        assert rows[name]["verdict"] == "PASS", (name, rows[name].get("failures"))
    for name in ("onnxruntime-genai fp32 cpu", "transformers-js fp32 node"):
        if name in rows:
            assert rows[name]["greedy_match_steps"] == rows[name]["greedy_steps"]
            assert rows[name]["max_abs_logit_diff"] <= 1e-3


def test_optimum_loads_the_bundle_folder_as_it_is(tiny_bundle, tiny, tiny_prompts):
    import torch
    optimum_onnxruntime = pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx is not installed")
    model = optimum_onnxruntime.ORTModelForCausalLM.from_pretrained(tiny_bundle, subfolder="onnx",
                                                                    file_name="model.onnx", use_cache=True)
    ids = torch.tensor([tiny_prompts[0]])
    output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                            min_new_tokens=NEW_TOKENS, do_sample=False)
    assert output[0, ids.shape[1]:].tolist() == reference_tokens(tiny, tiny_prompts[0])


def test_missing_node_skips_transformers_js_with_the_reason(monkeypatch):
    monkeypatch.setattr(app_runtimes.shutil, "which", lambda name: None)
    reason = app_runtimes.transformers_js_unavailable_reason()
    assert reason == "Node.js is not installed (transformers.js runs under node)"
    host = Host(system="Linux", cuda=False, mps=False, onnx_providers=("CPUExecutionProvider",), cpp_compiler=True,
                mil_runner=True, genai_missing=None, node_missing=reason)
    assert unavailable_reason(BACKENDS["transformers-js"], "node", host) == reason
    assert unavailable_reason(BACKENDS["onnxruntime-genai"], "cpu", host) is None


def test_backends_selection_judges_only_the_named_runtimes_beside_the_reference(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    host = Host(system="Linux", cuda=False, mps=False, onnx_providers=("CPUExecutionProvider",), cpp_compiler=True,
                mil_runner=True, genai_missing=None, node_missing=None)
    specs, _ = available_specs({"onnx": bundle}, host, Selection(backends=("onnxruntime-genai", "transformers-js")))
    assert sorted(spec.name for spec in specs) == [
        "onnxruntime-genai fp32 cpu", "onnxruntime-genai int4 cpu", "pytorch fp32 cpu", "transformers-js fp32 node",
        "transformers-js int4 node"]


def test_setup_without_npm_says_why_and_validation_skips_the_runner(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("GEMMA_EXPORT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(app_runtimes.shutil, "which", lambda name: "/usr/bin/node" if name == "node" else None)
    assert app_runtimes.main(["install"]) == 0  # `make setup` goes on
    assert "transformers.js not installed: npm is not installed" in capsys.readouterr().out
    assert app_runtimes.transformers_js_unavailable_reason().startswith(
        f"@huggingface/transformers is not installed in {tmp_path / 'cache'}")
    assert not (tmp_path / "cache").exists()  # nothing half-installed


# ---- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edited", ["genai_config.json", "onnx/model_q4.onnx"])
def test_an_edited_file_fails_validate_by_its_name(tiny_bundle, tmp_path, edited):
    out = tmp_path / "artifacts"
    shutil.copytree(tiny_bundle, out / "random-tiny" / "onnx")
    path = out / "random-tiny" / "onnx" / edited
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # one bit: same size, another sha256
    path.write_bytes(bytes(data))
    result = gemma_export("validate", "--model", "random:tiny", "--out", str(out), "--formats", "onnx",
                          "--max-new-tokens", "2", "--perplexity-tokens", "4", "--threads", "1")
    assert result.returncode != 0
    assert f"{edited} was modified after export (sha256 mismatch)" in result.stderr
    assert "Traceback" not in result.stderr


# ---- push -----------------------------------------------------------------------------------------------------

class StandInHub(BaseHTTPRequestHandler):
    """The hub's upload API as huggingface_hub uses it: create a repo, check the model card's YAML, ask each
    file's upload mode (all "regular": the content travels in the commit), then one NDJSON commit. Records what
    it received."""

    received: dict[str, bytes] = {}
    validated_cards: list[str] = []
    authorizations: list[str] = []

    def reply(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.authorizations.append(self.headers.get("Authorization", ""))
        if self.headers.get("Authorization") != "Bearer hf_stand_in_token":
            self.reply({"error": "Invalid credentials"}, 401)
        elif self.path == "/api/repos/create":
            request = json.loads(body)
            repo_id = f"{request['organization']}/{request['name']}"
            self.reply({"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
        elif self.path == "/api/validate-yaml":
            self.validated_cards.append(json.loads(body)["content"])
            self.reply({"errors": [], "warnings": []})
        elif "/preupload/" in self.path:
            files = json.loads(body)["files"]
            self.reply({"files": [{"path": item["path"], "uploadMode": "regular", "shouldIgnore": False}
                                  for item in files]})
        elif "/commit/" in self.path:
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.received[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            repo_id = self.path.split("/api/models/")[1].split("/commit/")[0]
            self.reply({"commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{'1' * 40}",
                        "commitOid": "1" * 40})
        else:
            self.reply({"error": "not found"}, 404)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stand_in_hub():
    StandInHub.received, StandInHub.authorizations, StandInHub.validated_cards = {}, [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandInHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def hub_env(hub: str, tmp_path: Path, token: str | None) -> dict[str, str]:
    import os
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_DISABLE_XET": "1"}
    env.pop("HF_TOKEN", None)
    return env if token is None else {**env, "HF_TOKEN": token}


def test_push_uploads_every_file_of_the_bundle_as_it_is(tiny_bundle, stand_in_hub, tmp_path):
    result = gemma_export("push", "--repo-id", "me/tiny-gemma-onnx", "--bundle", str(tiny_bundle),
                          env=hub_env(stand_in_hub, tmp_path, "hf_stand_in_token"))
    assert result.returncode == 0, result.stderr[-2000:]
    on_disk = {path.relative_to(tiny_bundle).as_posix(): path.read_bytes()
               for path in tiny_bundle.rglob("*") if path.is_file()}
    assert {path: hashlib.sha256(data).hexdigest() for path, data in StandInHub.received.items()} == \
        {path: hashlib.sha256(data).hexdigest() for path, data in on_disk.items()}
    assert "pushed" in result.stdout and "me/tiny-gemma-onnx" in result.stdout
    assert set(StandInHub.validated_cards) == {(tiny_bundle / "README.md").read_text()}


def test_push_errors_are_one_clear_line(tiny_bundle, stand_in_hub, tmp_path):
    no_token = gemma_export("push", "--repo-id", "me/x", "--bundle", str(tiny_bundle),
                            env=hub_env(stand_in_hub, tmp_path, None))
    assert no_token.returncode != 0 and "pushing to the hub needs a token" in no_token.stderr
    refused = gemma_export("push", "--repo-id", "me/x", "--bundle", str(tiny_bundle),
                           env=hub_env(stand_in_hub, tmp_path, "hf_wrong"))
    assert refused.returncode != 0 and "the hub refused the upload to me/x (HTTP 401)" in refused.stderr
    for result in (no_token, refused):
        assert "Traceback" not in result.stderr and StandInHub.received == {}


# ---- real model -----------------------------------------------------------------------------------------------

@pytest.mark.real
def test_real_app_runtimes_greedy_tokens_equal_pytorch(real_bundles, real):
    """The real fp32 file through onnxruntime-genai's and transformers.js' own greedy loops: PyTorch's tokens."""
    folder = real_bundle_path(real_bundles, "onnx")
    prompts = [real.tokenizer.encode(text) for text in ("The capital of France is",
                                                        "def fibonacci(n):\n    ")]
    expected = [reference_tokens(real, ids, stop=True) for ids in prompts]
    measured = {}
    if app_runtimes.genai_unavailable_reason() is None:
        genai = app_runtimes.GenaiDecoder(folder, "onnx/model.onnx")
        measured["onnxruntime-genai"] = [genai.generate(ids, NEW_TOKENS) for ids in prompts]
        del genai
    if app_runtimes.transformers_js_unavailable_reason() is None:
        node = app_runtimes.TransformersJsDecoder(folder, "fp32")
        try:
            # generate() makes exactly NEW_TOKENS: compare up to the reference's stop
            measured["transformers-js"] = [node.generate(ids, NEW_TOKENS)[:len(tokens)]
                                           for ids, tokens in zip(prompts, expected)]
        finally:
            node.close()
    print("real app runtimes:", {name: [len(tokens) for tokens in runs] for name, runs in measured.items()})
    assert measured, "neither runtime is installed"
    for name, runs in measured.items():
        assert runs == expected, name
