# Everything runs inside .venv; `make setup` creates it (torch pinned to the 2.13.0 CPU wheel).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/gemma-export
MODEL ?= gemma-3-270m
PROMPT ?= The capital of France is
MAX_NEW_TOKENS ?= 64
PYTEST_ARGS ?=
OUT ?= artifacts
# PRECISION= one or more, space-separated (default: the format's own default)
PRECISION ?=
precision_flags = $(foreach p,$(PRECISION),--precision $(p))

.PHONY: setup baseline check-avx2 test test-fast fuzz stress generate all clean bench-generate export-torchscript export-onnx export-coreml export-executorch validate bench report

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[weights,export,executorch,test]"
	# transformers.js for the transformers-js validation runner (npm, into ~/.cache/gemma-export); without
	# Node.js or the npm registry it says so and the runner is skipped with that reason.
	$(PY) -m validation.app_runtimes install
	touch $@

# The llama.cpp baseline of `gemma-export bench --baseline llama.cpp` (optional): PyPI has only the source of
# llama-cpp-python, so this compiles llama.cpp for this CPU, without the multimodal library, tools, server and
# examples that bench does not use (~25 min on 2 busy cores instead of 40+).
LLAMA_CPP_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF
baseline: setup
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PY) -m pip install -e ".[baseline]"

# The validation gate as an AVX2-only CPU computes it: the reduced-precision runners of the bundles in $(OUT)
# judged inside qemu-user's Haswell (Debian's qemu-user 7.2+), against a reference computed natively. Numbers
# only: emulation is 100-200x slower.
AVX2_RUNNERS ?= --runner "onnxruntime int8 cpu" --runner "onnxruntime int4 cpu" --runner "torchscript bf16 cpu" \
	--runner "torchscript fp16 cpu"
check-avx2: setup
	$(PY) benchmarks/emulated_cpu.py --model "$(MODEL)" --artifacts "$(OUT)" $(AVX2_RUNNERS)

# --durations: every log (CI's too) ends with the 25 slowest tests, so where the time goes is always in view.
test: setup
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

# The everyday loop (< 5 min): the tiny-model tests but the slow ones (whole exports, signals, the tiny `all`
# run), which `make test` runs with the rest.
test-fast: setup
	$(PY) -m pytest -q -m "not real and not slow" --durations=10 $(PYTEST_ARGS)

# The property-based tests of every untrusted-input reader with the long budget (`make test` runs a short one).
fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_fuzz.py $(PYTEST_ARGS)

# The randomized-signal interrupt tests with many more signals per format than `make test` sends (6): SIGINT
# and SIGTERM at moments spread over a whole export of each format, and two SIGINTs 10 ms apart (~25 min at 40
# on 2 cores).
STRESS_SIGNALS ?= 40
stress: setup
	INTERRUPT_STRESS_DELAYS=$(STRESS_SIGNALS) $(PY) -m pytest -q -rP tests/test_interrupts.py \
		-k "any_moment or two_sigints" $(PYTEST_ARGS)

generate: setup
	$(CLI) generate --model "$(MODEL)" --prompt "$(PROMPT)" --max-new-tokens $(MAX_NEW_TOKENS)

# The main job: export every format and precision, validate each backend's own generate loop against
# PyTorch, benchmark, and write artifacts/<model>/report/report.{json,md,html}.
all: setup
	$(CLI) all --model "$(MODEL)" --out "$(OUT)"

validate: setup
	$(CLI) validate --model "$(MODEL)" --out "$(OUT)"

bench: setup
	$(CLI) bench --model "$(MODEL)" --out "$(OUT)"

report: setup
	$(CLI) report --model "$(MODEL)" --out "$(OUT)"

clean:
	rm -rf artifacts/*/ .pytest_cache

export-torchscript: setup
	$(CLI) export --format torchscript --model "$(MODEL)" $(precision_flags) --out "$(OUT)"

export-onnx: setup
	$(CLI) export --format onnx --model "$(MODEL)" $(precision_flags) --out "$(OUT)"

export-coreml: setup
	$(CLI) export --format coreml --model "$(MODEL)" $(precision_flags) --out "$(OUT)"

export-executorch: setup
	$(CLI) export --format executorch --model "$(MODEL)" $(precision_flags) --out "$(OUT)"

bench-generate: setup
	$(PY) benchmarks/bench_generate.py --model "$(MODEL)"
