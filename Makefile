# Two entry points for a fresh machine (see README.md):
#   make demo   set up the virtualenv, build the extension, run the main job
#   make test   set up the virtualenv, build the extension, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1
# The nvcc on PATH may be a wrapper outside the toolkit; CUDA's standard folder is the better guess.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
# nvcc jobs in parallel: 2 fit a 2-core, 24 GiB machine.
export MAX_JOBS ?= 2

.PHONY: setup build demo test emu-mutants emu-asan bench bench-quick bench-report clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" ninja numpy pytest expecttest pillow tqdm onnx onnxruntime matplotlib pytest-benchmark
	touch $@

$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.built
build: $(VENV)/.built

# The main job: each op against its reference on this machine (error, time), then DABNet trained
# for a few minutes on synthetic street scenes with the fused ops, evaluated and compared.
demo: setup
	$(PY) -m bench.quick
	$(PY) -m dabnet.demo

# The suite includes the CUDA kernels run on the CPU (tests/cuda_emu, docs/cuda-emulation.md):
# pytest builds the emulation on first use (about 30 s) under build/cuda_emu.
test: setup
	$(PY) -m pytest -q tests

# Planted bugs (a missing barrier, a reduction race, a halo one short, an early exit before a
# shuffle, too-small shared tiles, a missing shared-memory opt-in): the emulated tests must catch
# each. Builds the emulation once per bug; about 30 minutes on a 2-core machine.
emu-mutants: setup
	$(PY) tests/cuda_emu/mutants.py

# The emulated kernels under AddressSanitizer (global and shared memory), on a quick subset.
EMU_ASAN_TESTS ?= test_dab_neck or test_low_precision or test_empty_inputs
emu-asan: setup
	lib=$$($(PY) tests/cuda_emu/build.py --asan) && \
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so.6)" \
	ASAN_OPTIONS=detect_leaks=0 CUEMU_LIB=$$lib \
	$(PY) -m pytest -q -p no:cacheprovider -m cuda_emulated tests/test_cuda.py -k "$(EMU_ASAN_TESTS)"

bench: setup
	$(PY) -m bench.run

bench-quick: setup
	$(PY) -m bench.run --quick

bench-report: setup
	$(PY) -m bench.report --write README.md

clean:
	rm -rf build dabnet_kernels/*.so *.egg-info $(VENV)/.built
