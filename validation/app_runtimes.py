"""The runtimes apps embed, as validation decoders over the ONNX bundle folder exactly as it is shipped:

- onnxruntime-genai (ORT's generate() API; PyPI `onnxruntime-genai`): `og.Model` on the bundle folder, its
  `genai_config.json` pointed at the variant's file (`Config.overlay`), a `Generator` per sequence; per-step
  logits from `get_logits()` after `append_tokens` (genai keeps the cache, mask and positions).
- transformers.js (npm `@huggingface/transformers`, run by Node): `AutoModelForCausalLM.from_pretrained` on the
  folder with the variant's `dtype`, one forward per step with its own cache and 1-based position ids
  (validation/transformers_js_runner.mjs, a child process that answers one JSON line per request).

Both have `prefill`, `decode`, `reset` (`validation.runners.Runner` turns them into a runner) and `generate`,
the runtime's own greedy loop.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from exporters.hf_repo import GENAI_CONFIG, TRANSFORMERS_JS_DTYPES, genai_overlay
from model.errors import UserError

TRANSFORMERS_JS_PACKAGE = "@huggingface/transformers"
TRANSFORMERS_JS_VERSION = "4.3.2"
RUNNER_SCRIPT = Path(__file__).with_name("transformers_js_runner.mjs")
RESULT_MARK = "@@result "
NPM_INSTALL_TIMEOUT_S = 600


# ---------------------------------------------------------------------------------------- onnxruntime-genai

def genai_unavailable_reason() -> str | None:
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return "onnxruntime-genai is not installed (pip install onnxruntime-genai, or make setup)"
    return None


class GenaiDecoder:
    """One onnxruntime-genai `Generator` per sequence over the bundle folder; `model_file` is the variant's
    file relative to the folder (the root genai_config.json names the default one)."""

    def __init__(self, folder: Path, model_file: str, threads: int = 0) -> None:
        import onnxruntime_genai as og

        self.og = og
        if not (folder / GENAI_CONFIG).is_file():
            raise UserError(f"{folder} has no {GENAI_CONFIG}: it was exported before the Hugging Face layout",
                            "re-export it: gemma-export export --format onnx")
        config = og.Config(str(folder))
        overlay = json.loads(genai_overlay(model_file))
        if threads:
            overlay["model"]["decoder"]["session_options"] = {"intra_op_num_threads": threads}
        config.overlay(json.dumps(overlay))
        self.model = og.Model(config)
        self.context_length = json.loads((folder / GENAI_CONFIG).read_text())["model"]["context_length"]
        self.generator = None

    def _new_generator(self, max_length: int) -> Any:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return self.og.Generator(self.model, params)

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        self.generator = self._new_generator(self.context_length)
        self.generator.append_tokens(np.asarray(ids, dtype=np.int32))
        return self.generator.get_logits()[:, -1]

    def decode(self, token: np.ndarray) -> np.ndarray:
        self.generator.append_tokens(np.asarray(token, dtype=np.int32).reshape(1, 1))
        return self.generator.get_logits()[:, -1]

    def prefill_every_position(self, ids: np.ndarray) -> np.ndarray:
        """[positions, vocab]: the prefill's logits at every position, the model's `logits` output as genai's
        generator holds it after appending the prompt (validation's teacher forcing)."""
        self.prefill(ids)
        return self.generator.get_output("logits")[0]

    def reset(self) -> None:
        self.generator = None

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """genai's own greedy loop (stops at an end-of-sequence token or after max_new_tokens)."""
        generator = self._new_generator(len(ids) + max_new_tokens)
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        tokens: list[int] = []
        while not generator.is_done() and len(tokens) < max_new_tokens:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens


# --------------------------------------------------------------------------------------------- transformers.js

def node_cache_dir() -> Path:
    """Where transformers.js is installed (once, by npm): $GEMMA_EXPORT_CACHE or ~/.cache/gemma-export."""
    root = os.environ.get("GEMMA_EXPORT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                        "gemma-export")
    return Path(root) / f"transformers-js-{TRANSFORMERS_JS_VERSION}"


def transformers_js_installed(folder: Path) -> bool:
    return (folder / "node_modules" / TRANSFORMERS_JS_PACKAGE / "package.json").is_file()


def transformers_js_unavailable_reason() -> str | None:
    if shutil.which("node") is None:
        return "Node.js is not installed (transformers.js runs under node)"
    if not transformers_js_installed(node_cache_dir()):
        return (f"{TRANSFORMERS_JS_PACKAGE} is not installed in {node_cache_dir()} (make setup, or "
                "python -m validation.app_runtimes install)")
    return None


def install_transformers_js() -> Path:
    """`npm install --ignore-scripts @huggingface/transformers@<version>` into the cache folder (`make setup`),
    staged and renamed into place, so a cut-short install never looks complete → the folder holding
    node_modules. Validation never installs: without it the runner is skipped, with that reason."""
    folder = node_cache_dir()
    if transformers_js_installed(folder):
        return folder
    if shutil.which("npm") is None:
        raise UserError("npm is not installed", "install Node.js with npm to run transformers.js")
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        (staging / "package.json").write_text('{"private": true}\n', encoding="utf-8")
        try:
            result = subprocess.run(["npm", "install", "--ignore-scripts", "--no-audit", "--no-fund",
                                     f"{TRANSFORMERS_JS_PACKAGE}@{TRANSFORMERS_JS_VERSION}"], cwd=staging,
                                    capture_output=True, text=True, timeout=NPM_INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            result = subprocess.CompletedProcess([], 1, "", f"no answer in {NPM_INSTALL_TIMEOUT_S} s")
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"npm could not install {TRANSFORMERS_JS_PACKAGE}@{TRANSFORMERS_JS_VERSION} ({last})",
                            "check the network to the npm registry, or install it into " + str(folder))
        try:
            os.rename(staging, folder)
        except OSError:  # another process installed it meanwhile
            if not transformers_js_installed(folder):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


class TransformersJsDecoder:
    """transformers.js in a node child process over the bundle folder, at the variant's `dtype`."""

    def __init__(self, folder: Path, precision: str) -> None:
        packages = node_cache_dir()
        # node's own messages go to a file, not a pipe that nobody reads while it fills
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            ["node", str(RUNNER_SCRIPT), str(folder), TRANSFORMERS_JS_DTYPES[precision], str(packages)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1)
        self._answer()  # {"ready": true} once the model is loaded

    def _answer(self) -> dict[str, Any]:
        while line := self.process.stdout.readline():
            if line.startswith(RESULT_MARK):
                reply = json.loads(line[len(RESULT_MARK):])
                if "error" in reply:
                    raise RuntimeError(f"transformers.js: {reply['error']}")
                return reply
        self.process.wait(timeout=30)
        self.stderr.seek(0)
        stderr = self.stderr.read().strip().splitlines()
        raise RuntimeError(f"transformers.js (node) exited with {self.process.returncode}: "
                           f"{stderr[-1] if stderr else 'no output'}")

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def _logits(self, request: dict[str, Any]) -> np.ndarray:
        data = base64.b64decode(self._ask(request)["logits"])
        return np.frombuffer(data, dtype=np.float32)[None]

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        return self._logits({"op": "prefill", "ids": [int(token) for token in np.asarray(ids).reshape(-1)]})

    def decode(self, token: np.ndarray) -> np.ndarray:
        return self._logits({"op": "decode", "token": int(np.asarray(token).reshape(-1)[0])})

    def prefill_every_position(self, ids: np.ndarray) -> np.ndarray:
        """[positions, vocab]: the prefill's logits at every position (validation's teacher forcing); node writes
        them to a file, too large for one line of the pipe."""
        with tempfile.TemporaryDirectory(prefix="gemma-transformers-js-") as folder:
            path = Path(folder) / "logits.f32"
            tokens = [int(token) for token in np.asarray(ids).reshape(-1)]
            reply = self._ask({"op": "prefill_every_position", "ids": tokens, "path": str(path)})
            return np.fromfile(path, dtype=np.float32).reshape(reply["positions"], -1)

    def reset(self) -> None:
        """Nothing to drop: the next prefill starts a new sequence."""

    def generate(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """transformers.js' own greedy `generate()` (exactly max_new_tokens tokens)."""
        return self._ask({"op": "generate", "ids": list(ids), "max_new_tokens": max_new_tokens})["tokens"]

    def child_peak_rss_bytes(self) -> int:
        """node's peak resident set so far (VmHWM; 0 where there is no /proc)."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text(encoding="utf-8")
        except OSError:
            return 0
        peak = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), "0")
        return int(peak) * 1024

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the pipes may be gone already
            pass


def main(argv: list[str]) -> int:
    """`python -m validation.app_runtimes install`: transformers.js into the cache (what `make setup` runs).
    Without node or the npm registry it says why and succeeds: the runner is then skipped with that reason."""
    if argv != ["install"]:
        print("usage: python -m validation.app_runtimes install")
        return 2
    if shutil.which("node") is None:
        print("transformers.js not installed: Node.js is not installed (the transformers-js runner is skipped)")
        return 0
    try:
        print(f"transformers.js {TRANSFORMERS_JS_VERSION} in {install_transformers_js()}")
    except UserError as error:
        print(f"transformers.js not installed: {error.cause}; {error.fix} (the transformers-js runner is skipped)")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
