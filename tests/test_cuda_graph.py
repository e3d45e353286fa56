"""CUDA-graph decode (`Generator(cuda_graph=True)`, `gemma-export generate --cuda-graph`): on a CUDA machine the
replayed step gives eager's logits, also after a reset; anywhere, asking for it off CUDA is one clear error."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from model.config import PRESETS
from model.errors import UserError
from model.gemma3 import Gemma3Model
from model.generate import Generator

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device: CUDA graphs exist on GPUs only (BENCHMARKS.md, "
                                       "'CUDA', has the H200 run of these tests and of bench_cuda.py)")


def test_cuda_graph_off_cuda_is_a_user_error():
    model = Gemma3Model(PRESETS["tiny"])
    with pytest.raises(UserError, match="CUDA graphs need the model on a CUDA device, it is on cpu"):
        Generator(model, 1, 32, cuda_graph=True)


def test_cli_cuda_graph_without_cuda_device_is_one_line():
    completed = subprocess.run([sys.executable, "-m", "gemma_export", "generate", "--model", "random:tiny",
                                "--prompt", "hi", "--cuda-graph"], capture_output=True, text=True, timeout=300)
    assert completed.returncode != 0
    assert "--cuda-graph needs --device cuda, got --device cpu" in completed.stderr
    assert "Traceback" not in completed.stderr


@needs_cuda
@pytest.mark.parametrize("compile", [False, True], ids=["eager-step", "compiled-step"])
def test_cuda_graph_decode_equals_eager(compile):
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Gemma3Model(PRESETS["tiny"]).eval()
    ids = torch.randint(10, model.config.vocab_size, (2, 20), device="cuda")
    eager, graphed = Generator(model, 2, 64), Generator(model, 2, 64, compile=compile, cuda_graph=True)
    for _ in range(2):  # the second round after reset(): the recorded graph still reads the same cache
        eager.reset()
        graphed.reset()
        expected = eager.prefill(ids)
        torch.testing.assert_close(graphed.prefill(ids), expected, rtol=1e-4, atol=1e-4)
        for _ in range(30):  # 20 + 30 tokens: past tiny's sliding window (8) many times
            token = expected.argmax(-1)
            expected = eager.decode(token)
            # Relative: a captured cuBLAS call may pick another kernel (another summation order) than eager's.
            torch.testing.assert_close(graphed.decode(token), expected, rtol=1e-4, atol=1e-4)
    assert graphed.captured is not None and eager.captured is None
