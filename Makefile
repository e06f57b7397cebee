# Two entry points for a fresh machine (see README.md):
#   make demo   set up the virtualenv, build the extension, run the main job
#   make test   set up the virtualenv, build the extension, run the test suite
#   make deploy build deploy/build/dabnet_run, which runs a `dabnet export` .pt2 without Python
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.14.1
# The nvcc on PATH may be a wrapper outside the toolkit; CUDA's standard folder is the better guess.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
# What the tests, the demo and the benchmarks import, besides torch (and triton, which it brings).
TEST_DEPS := ninja numpy pytest expecttest pillow tqdm onnx onnxruntime onnxscript matplotlib pytest-benchmark
# nvcc jobs in parallel: 2 fit a 2-core, 24 GiB machine.
export MAX_JOBS ?= 2

.PHONY: setup build demo test emu-mutants emu-asan bench bench-quick bench-report sass-model deploy \
	check-device-stack clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(TEST_DEPS)
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

# The C++ runner of exported packages (docs/deploy.md), built against the venv's libtorch.
TORCH_DIR = $(shell $(PY) -c "import os, torch; print(os.path.dirname(torch.__file__))")

deploy/build/dabnet_run: deploy/dabnet_run.cpp
	mkdir -p deploy/build
	$(CXX) -std=c++20 -O2 -I$(TORCH_DIR)/include -I$(TORCH_DIR)/include/torch/csrc/api/include \
		$< -o $@ -L$(TORCH_DIR)/lib -ltorch -ltorch_cpu -lc10 -Wl,-rpath,$(TORCH_DIR)/lib -ldl

deploy: setup deploy/build/dabnet_run

bench-report: setup
	$(PY) -m bench.report --write README.md bench/README.md

# The static performance MODEL of sm_90 (docs/sass-model.md): builds the kernels for sm_90, reads
# their SASS, writes bench/results/<date>-sm90-static.json and re-renders the tables. Needs nvcc.
sass-model: setup
	$(PY) -m bench.sass
	$(PY) -m bench.report --write README.md bench/README.md

# ------------------------------------------------------------------------ the GPU machine's stack
# make check-device-stack: the software of the GPU machine that bench/gpu_suite.sh runs on (Python
# 3.12, torch 2.11 with CUDA 13.0, triton 3.6, no network) in a virtualenv of its own, DEVICE_VENV:
# the extension built against it (CUDA kernels for sm_90 when nvcc is found) in a copy of the
# working tree, then the CPU tests and the Triton compile check. Downloads torch; not run in CI.
DEVICE_VENV   ?= .venv-device
DEVICE_PKGS   ?= torch==2.11.0 triton==3.6.0
DEVICE_ARCH   ?= 9.0
# The first Python 3.12 that runs (on PATH, or pyenv's), else $(PYTHON): the target says which.
DEVICE_PYTHON ?= $(firstword $(shell for p in python3.12 $(HOME)/.pyenv/versions/3.12*/bin/python3.12; \
                   do $$p -c "" 2>/dev/null && command -v $$p; done) $(PYTHON))
DPY  := $(abspath $(DEVICE_VENV))/bin/python
DSRC := $(DEVICE_VENV)/src
# `since T0 WHAT`: prints how long WHAT took since the epoch second T0.
since = echo "check-device-stack: $(2) in $$(( $$(date +%s) - $(1) )) s"

$(DEVICE_VENV)/.deps:
	@$(DEVICE_PYTHON) -c 'import sys; v = "%d.%d" % sys.version_info[:2]; print("check-device-stack: Python", v, "" if v == "3.12" else "(the GPU machine has 3.12; none found here)")'
	$(DEVICE_PYTHON) -m venv $(DEVICE_VENV)
	$(DPY) -m pip install -q --upgrade pip
	$(DPY) -m pip install -q $(DEVICE_PKGS) $(TEST_DEPS)
	touch $@

check-device-stack: $(DEVICE_VENV)/.deps
	@$(DPY) -c 'import sys, torch, triton, numpy; print("check-device-stack: Python", sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda, "triton", triton.__version__, "numpy", numpy.__version__)'
	mkdir -p $(DSRC)
	git ls-files -coz --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(DSRC)
	@t0=$$(date +%s); cd $(DSRC) && TORCH_CUDA_ARCH_LIST=$(DEVICE_ARCH) $(DPY) setup.py -q build_ext --inplace \
	  && $(DPY) -c 'import dabnet_kernels as d; print("check-device-stack: CUDA kernels built:", d.has_cuda_kernels())' \
	  && $(call since,$$t0,build)
	@t0=$$(date +%s); cd $(DSRC) && $(DPY) -m pytest -q -p no:cacheprovider tests; rc=$$?; \
	  $(call since,$$t0,CPU tests (pytest exit status $$rc)); \
	  t0=$$(date +%s); $(DPY) -m dabnet_kernels.triton.compile_check -q; rc2=$$?; \
	  $(call since,$$t0,compile_check (exit status $$rc2)); \
	  exit $$(( rc || rc2 ))

clean:
	rm -rf build deploy/build dabnet_kernels/*.so *.egg-info $(VENV)/.built
