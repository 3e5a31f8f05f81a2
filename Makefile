# Quick start: `make demo` and `make test`. Each sets up .venv first (created if missing, pinned requirements,
# the package in editable mode, the optional selective-scan kernel). No other set-up step.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.requirements-installed
KERNEL_STAMP := $(VENV)/.kernel-built
KERNEL_SOURCES := $(shell find kernels/selective_scan -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' \
  -o -name '*.cuh' -o -name 'setup.py' \) 2>/dev/null)
PYTEST_WORKERS ?= 2

.PHONY: setup kernels kernels-cpu test demo bench clean

setup: $(SETUP_STAMP) $(KERNEL_STAMP)

$(SETUP_STAMP): requirements.txt setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $@

# The CPU selective-scan kernel is optional: when its build fails, everything runs on the `torch` backend (an earlier
# build from older sources is uninstalled, so it cannot go on running). Set-up tries it once per change of its
# sources (the stamp records the attempt); `make kernels-cpu` always rebuilds it.
CPU_KERNEL_BUILD = SELECTIVE_SCAN_CUDA=0 $(PY) -m pip install --no-build-isolation ./kernels/selective_scan
KERNEL_PACKAGE = defmamba-selective-scan
$(KERNEL_STAMP): $(SETUP_STAMP) $(KERNEL_SOURCES)
	@$(CPU_KERNEL_BUILD) -q > $(VENV)/kernel-build.log 2>&1 \
		&& echo "selective-scan CPU kernel built" \
		|| { $(PY) -m pip uninstall -q -y $(KERNEL_PACKAGE) > /dev/null 2>&1; \
			echo "selective-scan CPU kernel NOT built (see $(VENV)/kernel-build.log; retry: make kernels-cpu);" \
			"the kernel package is uninstalled (a CUDA build too, if any): the CPU uses the 'torch' backend"; }
	@touch $@

kernels-cpu: $(SETUP_STAMP)
	$(CPU_KERNEL_BUILD)
	@touch $(KERNEL_STAMP)

# CPU and CUDA kernels; CUDA target architectures come from TORCH_CUDA_ARCH_LIST (default below), never from a GPU.
# CUDA_HOME defaults to /usr/local/cuda when it exists: torch would otherwise guess it from a wrapper script's folder.
kernels: $(SETUP_STAMP)
	CUDA_HOME="$${CUDA_HOME:-$$(test -d /usr/local/cuda && echo /usr/local/cuda)}" \
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-8.0;9.0}" SELECTIVE_SCAN_CUDA=1 \
		$(PY) -m pip install -v --no-build-isolation ./kernels/selective_scan

test: setup
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

# Digits demo: build the dataset (idempotent), train (resumes if interrupted), then evaluate the best checkpoint
# (top-1, params, GFLOPs) and time inference. DEMO_CFG=configs/demo/digits_damamba.yaml runs the DAMamba one.
# One compute thread plus one loader process fill the 2 cores; more threads oversubscribe a shared machine badly.
DEMO_CFG ?= configs/demo/digits.yaml
DEMO_THREADS ?= 1
DEMO_ARGS = --cfg $(DEMO_CFG) --data-path data/digits --output output/demo
DEMO_RUN_DIR = output/demo/$(shell sed -n 's/^  NAME: *//p' $(DEMO_CFG))/default
demo: setup
	$(PY) -m classification.data.digits --root data/digits
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) main.py $(DEMO_ARGS)
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) main.py $(DEMO_ARGS) --eval --resume $(DEMO_RUN_DIR)/checkpoint_best.pth
	OMP_NUM_THREADS=$(DEMO_THREADS) $(PY) main.py $(DEMO_ARGS) --throughput

bench: setup
	$(PY) benchmarks/bench_selective_scan.py

clean:
	rm -rf $(VENV) build output *.egg-info kernels/selective_scan/build kernels/selective_scan/*.egg-info
