"""The real Core ML runtime (`CoreMLRuntimeDecoder`, macOS only) against the PyTorch reference, with the same
bars as the MIL runner in test_coreml_export.py: fp32 → same greedy tokens and max |Δlogit| ≤ 1e-3 (tiny) /
5e-3 (real); fp16 → finite, top-1 agreement ≥ 99 % (real), first 16 greedy tokens equal; on every compute
unit a user can pick."""

from __future__ import annotations

import platform

import pytest

if platform.system() != "Darwin":
    pytest.skip(f"Core ML prediction needs macOS (this is {platform.system()} {platform.machine()})",
                allow_module_level=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from exporters import coreml  # noqa: E402
from model.generate import generate  # noqa: E402
from validation.coreml_runtime import COMPUTE_UNITS, CoreMLRuntimeDecoder  # noqa: E402

STEPS = 64
TINY_OPTIONS = {"max_context": 128, "query_lengths": (1, 4, 16)}


def run_against(decoder: CoreMLRuntimeDecoder, prompt: list[int], reference) -> dict[str, float]:
    logits = [decoder.prefill(prompt)]
    tokens = [int(logits[-1].argmax())]
    while len(tokens) < STEPS:
        logits.append(decoder.decode(tokens[-1]))
        tokens.append(int(logits[-1].argmax()))
    forced = [decoder.prefill(prompt)] + [decoder.decode(int(t)) for t in reference.tokens[0, :-1]]
    expected = reference.step_logits
    reference_tokens = reference.tokens[0].tolist()
    return {"max_dlogit": max(float((a - e).abs().max()) for a, e in zip(forced, expected)),
            "agreement": float(np.mean([int(a.argmax()) == int(e.argmax()) for a, e in zip(forced, expected)])),
            "matching_prefix": next((i for i, (a, b) in enumerate(zip(tokens, reference_tokens)) if a != b), STEPS),
            "finite": all(bool(torch.isfinite(a).all()) for a in forced)}


@pytest.fixture(scope="module")
def tiny_packages(tiny, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("coreml_macos_tiny")
    return {p: out_dir / coreml.export(tiny.model, out_dir, p, **TINY_OPTIONS).files[0] for p in ("fp32", "fp16")}


@pytest.fixture(scope="module")
def tiny_case(tiny):
    prompt = torch.randint(3, 512, (23,), generator=torch.Generator().manual_seed(7)).tolist()
    return prompt, generate(tiny.model, prompt, STEPS, stop_token_ids=[], return_logits=True)


@pytest.mark.parametrize("compute_units", COMPUTE_UNITS)
def test_tiny_runtime(compute_units, tiny_packages, tiny_case):
    prompt, reference = tiny_case
    fp32 = run_against(CoreMLRuntimeDecoder(tiny_packages["fp32"], "CPU_ONLY"), prompt, reference)
    print(f"\n[tiny fp32 CPU_ONLY] {fp32}")
    assert fp32["matching_prefix"] == STEPS and fp32["max_dlogit"] <= 1e-3
    fp16 = run_against(CoreMLRuntimeDecoder(tiny_packages["fp16"], compute_units), prompt, reference)
    print(f"\n[tiny fp16 {compute_units}] {fp16}")
    assert fp16["finite"] and fp16["agreement"] >= 0.95


@pytest.fixture(scope="module")
def real_packages(real, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("coreml_macos_real")
    return {p: out_dir / coreml.export(real.model, out_dir, p).files[0] for p in ("fp32", "fp16")}


@pytest.mark.real
@pytest.mark.parametrize("compute_units", COMPUTE_UNITS)
def test_real_runtime(compute_units, real, real_packages, real_long_prompt_ids):
    reference = generate(real.model, real_long_prompt_ids, STEPS, stop_token_ids=[], return_logits=True)
    fp16 = run_against(CoreMLRuntimeDecoder(real_packages["fp16"], compute_units), real_long_prompt_ids,
                       reference)
    print(f"\n[real fp16 {compute_units}] {fp16}")
    assert fp16["finite"] and fp16["agreement"] >= 0.99 and fp16["matching_prefix"] >= 16
    if compute_units == "CPU_ONLY":
        fp32 = run_against(CoreMLRuntimeDecoder(real_packages["fp32"], compute_units), real_long_prompt_ids,
                           reference)
        print(f"\n[real fp32 CPU_ONLY] {fp32}")
        assert fp32["matching_prefix"] == STEPS and fp32["max_dlogit"] <= 5e-3
