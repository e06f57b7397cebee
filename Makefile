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
# nvcc jobs in parallel: 2 fit a 2-core, 24 GiB machine.
export MAX_JOBS ?= 2

.PHONY: setup build demo test bench bench-quick bench-report deploy clean

$(VENV)/.deps:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" ninja numpy pytest expecttest pillow tqdm onnx onnxruntime onnxscript matplotlib \
		pytest-benchmark
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

test: setup
	$(PY) -m pytest -q tests

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
	$(PY) -m bench.report --write README.md

clean:
	rm -rf build deploy/build dabnet_kernels/*.so *.egg-info $(VENV)/.built
