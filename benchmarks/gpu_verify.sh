#!/usr/bin/env bash
# One-shot GPU verification on a GPU machine, from the repository root, within one device call (600 s at most):
#   1. checks that the Python packages the tests and the benchmark import are there (before spending time building),
#   2. builds the selective-scan extensions (CPU + CUDA) for this GPU's architecture, unless a build of the same
#      kernel sources already imports (a second call on the same machine; FORCE_BUILD=1 rebuilds),
#   3. runs the kernel tests against the float64 reference: the CUDA and Triton test files, and the backend tests of
#      tests/test_selective_scan.py for cuda and triton (several chunks, NaN past the inputs' ends, on the GPU),
#   4. runs benchmarks/bench_gpu.py, which writes its tables into docs/benchmarks.md (also when a test failed, and
#      what it measured so far when its time runs out).
# Every phase runs under `timeout` within BUDGET seconds from the start (default 570): the build gets what is left
# but BUILD_RESERVE (default 150), the tests at most TESTS_TIMEOUT (default 240) and half of what is left, the
# benchmark the rest; a phase left under MIN_PHASE seconds (default 20) is skipped, failing the run. Logs go to $OUT
# (or ./output/gpu_verify) as build.log, tests.log, bench.log, with a copy of docs/benchmarks.md. Exit status: the
# tests', else the benchmark's (124: cut by its timeout).
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
MIN_PHASE="${MIN_PHASE:-20}"
# phase_limit WANTED: seconds a phase may take: WANTED, at most what is left of BUDGET; 0 (skip the phase) when
# under MIN_PHASE seconds of BUDGET are left.
phase_limit() {
  local left=$(( BUDGET - $(elapsed) )) limit="$1"
  (( limit > left )) && limit=$left
  (( left < MIN_PHASE )) && limit=0
  echo "$limit"
}
# A process that ignores SIGTERM gets SIGKILL this many seconds later.
KILL_AFTER=10

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
IMPORT_KERNELS="import torch, defmamba_scan_cpu, defmamba_scan_cuda; print('built:', defmamba_scan_cuda.__file__)"
# The fingerprint of the kernel sources, target architectures and torch version, kept beside the build (build/ is
# git-ignored and stays on a warm machine).
SOURCES_STAMP=kernels/selective_scan/build/gpu_verify.sources
sources=$( (find kernels/selective_scan -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' \
  -o -name setup.py \) -not -path '*/build/*' | sort | xargs sha256sum; echo "$TORCH_CUDA_ARCH_LIST";
  "$PYTHON" -c "import torch; print(torch.__version__)") | sha256sum | cut -d' ' -f1)
if [[ "${FORCE_BUILD:-0}" != 1 && "$(cat "$SOURCES_STAMP" 2>/dev/null)" == "$sources" ]] \
    && "$PYTHON" -c "$IMPORT_KERNELS" 2>/dev/null; then
  echo "== extensions already built from these sources (FORCE_BUILD=1 rebuilds)"
else
  build_timeout=$(phase_limit $(( BUDGET - $(elapsed) - ${BUILD_RESERVE:-150} )))
  (( build_timeout >= MIN_PHASE )) || { echo "no time left to build"; exit 124; }
  rm -f "$SOURCES_STAMP"
  echo "== building the extensions for sm ${TORCH_CUDA_ARCH_LIST}, at most ${build_timeout} s (log: $LOGS/build.log)"
  SELECTIVE_SCAN_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}" timeout -k "$KILL_AFTER" "$build_timeout" \
    "$PYTHON" -m pip install -v --no-deps --no-build-isolation ./kernels/selective_scan \
    > "$LOGS/build.log" 2>&1 || { status=$?; tail -40 "$LOGS/build.log"; exit "$status"; }
  mkdir -p "$(dirname "$SOURCES_STAMP")" && echo "$sources" > "$SOURCES_STAMP"
  echo "built in $(elapsed) s"
fi
"$PYTHON" -c "$IMPORT_KERNELS"

left=$(( BUDGET - $(elapsed) ))
tests_timeout=$(phase_limit $(( ${TESTS_TIMEOUT:-240} < left / 2 ? ${TESTS_TIMEOUT:-240} : left / 2 )))
echo "== kernel tests, at most ${tests_timeout} s (log: $LOGS/tests.log)"
tests_status=124  # unless they run
(( tests_timeout > 0 )) || echo "skipped: under $MIN_PHASE s of BUDGET left"
if (( tests_timeout > 0 )); then
  tests_status=0
  timeout -k "$KILL_AFTER" "$tests_timeout" "$PYTHON" -m pytest -q -rs --durations=10 \
    tests/test_selective_scan_cuda.py tests/test_selective_scan_triton.py \
    "tests/test_selective_scan.py::test_backend_matches_reference" \
    "tests/test_selective_scan.py::test_nothing_past_the_inputs_is_read" -k "cuda or triton" \
    2>&1 | tee "$LOGS/tests.log" || tests_status=$?
fi

bench_timeout=$(phase_limit "$BUDGET")
echo "== benchmark, at most ${bench_timeout} s (log: $LOGS/bench.log)"
bench_status=124  # unless it runs
(( bench_timeout > 0 )) || echo "skipped: under $MIN_PHASE s of BUDGET left"
if (( bench_timeout > 0 )); then
  bench_status=0
  timeout -k "$KILL_AFTER" "$bench_timeout" "$PYTHON" benchmarks/bench_gpu.py --docs docs/benchmarks.md 2>&1 \
    | tee "$LOGS/bench.log" || bench_status=$?
fi
cp docs/benchmarks.md "$LOGS/benchmarks.md"
echo "== done in $(elapsed) s: tests status $tests_status, benchmark status $bench_status"
exit $(( tests_status ? tests_status : bench_status ))
