"""benchmarks/emulated_cpu.py (`make check-avx2`): a runner judged inside qemu's AVX2-only CPU against a reference
computed natively. Runs where Debian's qemu-user is installed (it is not part of `make setup`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exporters.registry import export_bundle

ROOT = Path(__file__).resolve().parent.parent

needs_qemu = pytest.mark.skipif(shutil.which("qemu-x86_64") is None,
                                reason="qemu-x86_64 not installed (Debian's qemu-user: apt-get install qemu-user)")


@needs_qemu
@pytest.mark.slow
def test_a_runner_is_judged_inside_the_emulated_avx2_cpu(tiny, tmp_path):
    export_bundle(tiny, "onnx", ["int4"], tmp_path / "artifacts")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "emulated_cpu.py"), "--model", "random:tiny",
                             "--artifacts", str(tmp_path / "artifacts"), "--work", str(tmp_path / "work"),
                             "--runner", "onnxruntime int4 cpu", "--threads", "1"],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    [row] = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert row["cpu"] == "Haswell-v4" and row["cpu_capability"] == "AVX2"  # torch saw no AVX-512 there
    assert row["runner"] == "onnxruntime int4 cpu" and row["verdict"] == "PASS", row["failures"]
    assert row["teacher_forced_steps"] > 0 and 0 <= row["mean_kl_divergence"] <= row["thresholds"]["max_mean_kl_divergence"]
    assert (tmp_path / "work" / "random-tiny-reference.npz").is_file()
