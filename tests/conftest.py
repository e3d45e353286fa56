"""Shared fixtures. Markers are registered in pyproject.toml: `real` = uses the real Gemma 3 270M weights."""

from __future__ import annotations

import os

import pytest
import torch

# Tests never reach the network: the hub code paths are exercised against local caches.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(os.cpu_count() or 1)

# A prompt longer than every sliding window we test (tiny: 8, 270m: 512 tokens).
LONG_TEXT = (
    "The history of computing is a story of abstraction layered upon abstraction. Early machines were wired "
    "by hand; programs were sequences of switches. Assemblers turned mnemonics into numbers, compilers turned "
    "formulas into instructions, and operating systems turned a single expensive machine into something many "
    "people could share. Each layer hid the one below it, and each made new kinds of programs possible. "
)


@pytest.fixture(scope="session")
def tiny():
    from model.loading import load
    return load("random:tiny")


@pytest.fixture(scope="session")
def real():
    from model.loading import load
    return load("gemma-3-270m")


@pytest.fixture(scope="session")
def real_long_prompt_ids(real):
    """A real-tokenizer prompt of more than 512 tokens: it crosses the sliding window."""
    ids = real.tokenizer.encode(LONG_TEXT * 12)
    assert len(ids) > real.model.config.sliding_window + 16
    return ids[:600]
