#!/usr/bin/env bash
# One-shot GPU verification on a GPU machine, from the repository root, within one device call (600 s at most):
#   1. checks that the Python packages the tests and the benchmark import are there (before spending time building),
#   2. builds the selective-scan extensions (CPU + CUDA) for this GPU's architecture, unless they already import
#      (a second call on the same machine; FORCE_BUILD=1 rebuilds),
#   3. runs the kernel tests against the float64 reference: the CUDA and Triton test files, and the backend tests of
#      tests/test_selective_scan.py for cuda and triton (several chunks, NaN past the inputs' ends, on the GPU),
#   4. runs benchmarks/bench_gpu.py, which writes its tables into docs/benchmarks.md (also when a test failed, and
#      what it measured so far when its time runs out).
# Every phase fits in BUDGET seconds from the start (default 570): the tests get at most TESTS_TIMEOUT (default 240)
# of what is left after the build, the benchmark the rest. Logs go to $OUT (or ./output/gpu_verify) as build.log,
# tests.log, bench.log, with a copy of docs/benchmarks.md. Exit status: the tests', else the benchmark's.
#
#   bash benchmarks/gpu_verify.sh            # PYTHON defaults to .venv/bin/python, else python3
#
# On a machine that cannot reach PyPI, pure-Python requirements it lacks (yacs) can be brought as wheels in .whl/:
#   .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl yacs==0.1.8  (then carry .whl)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
BUDGET="${BUDGET:-570}"
elapsed() { echo $(( $(date +%s) - start )); }

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
LOGS="${OUT:-output/gpu_verify}"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package need not be installed there
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1  # offline: pip must not wait on PyPI

if [[ -d .whl ]] && ! "$PYTHON" -c "import yacs" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-deps .whl/*.whl
fi
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'"
"$PYTHON" -c "import yacs, timm, einops, pytest, triton, classification.models, classification.engine" || {
  echo "missing Python packages (above); bring pure-Python ones as wheels in .whl/ (see the top of this script)"
  exit 1
}

# Target architecture: this GPU's compute capability unless TORCH_CUDA_ARCH_LIST is given.
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
fi
export TORCH_CUDA_ARCH_LIST
if [[ -z "${CUDA_HOME:-}" && -d /usr/local/cuda ]]; then export CUDA_HOME=/usr/local/cuda; fi

# The extensions link torch's libraries without an rpath to them: torch is imported first.
IMPORT_KERNELS="import torch, defmamba_scan_cpu, defmamba_scan_cuda; print('defmamba_scan_cuda:', defmamba_scan_cuda.__file__)"
if [[ "${FORCE_BUILD:-0}" != 1 ]] && "$PYTHON" -c "$IMPORT_KERNELS" 2>/dev/null; then
  echo "== extensions already built (FORCE_BUILD=1 rebuilds)"
else
  echo "== building the extensions for sm ${TORCH_CUDA_ARCH_LIST} (log: $LOGS/build.log)"
  SELECTIVE_SCAN_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}" \
    "$PYTHON" -m pip install -v --no-deps --no-build-isolation ./kernels/selective_scan \
    > "$LOGS/build.log" 2>&1 || { tail -40 "$LOGS/build.log"; exit 1; }
  echo "built in $(elapsed) s"
fi
"$PYTHON" -c "$IMPORT_KERNELS"

left=$(( BUDGET - $(elapsed) ))
tests_timeout=$(( ${TESTS_TIMEOUT:-240} < left / 2 ? ${TESTS_TIMEOUT:-240} : left / 2 ))
echo "== kernel tests, at most ${tests_timeout} s (log: $LOGS/tests.log)"
tests_status=0
timeout "$tests_timeout" "$PYTHON" -m pytest -q -rs --durations=10 tests/test_selective_scan_cuda.py \
  tests/test_selective_scan_triton.py "tests/test_selective_scan.py::test_backend_matches_reference" \
  "tests/test_selective_scan.py::test_nothing_past_the_inputs_is_read" -k "cuda or triton" \
  2>&1 | tee "$LOGS/tests.log" || tests_status=$?

bench_timeout=$(( BUDGET - $(elapsed) ))
echo "== benchmark, at most ${bench_timeout} s (log: $LOGS/bench.log)"
bench_status=0
timeout "$bench_timeout" "$PYTHON" benchmarks/bench_gpu.py --docs docs/benchmarks.md 2>&1 | tee "$LOGS/bench.log" \
  || bench_status=$?
cp docs/benchmarks.md "$LOGS/benchmarks.md"
echo "== done in $(elapsed) s: tests status $tests_status, benchmark status $bench_status"
exit $(( tests_status ? tests_status : bench_status ))
