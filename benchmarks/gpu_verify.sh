#!/usr/bin/env bash
# One-shot GPU verification on a fresh GPU machine, from the repository root:
#   1. builds the selective-scan extensions (CPU + CUDA) for this GPU's architecture,
#   2. runs the CUDA and Triton kernel tests against the float64 reference,
#   3. runs benchmarks/bench_gpu.py and writes its tables into docs/benchmarks.md (also when a test failed; the
#      script's exit status is then the tests').
# Logs go to $OUT (or ./output/gpu_verify) as build.log, tests.log, bench.log.
#
#   bash benchmarks/gpu_verify.sh            # PYTHON defaults to .venv/bin/python, else python3; TESTS_TIMEOUT=300
#
# On a machine that cannot reach PyPI, pure-Python requirements it lacks (yacs) can be brought as wheels in .whl/:
#   .venv/bin/pip download --no-deps -d .whl yacs==0.1.8     (here, then carry .whl)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
LOGS="${OUT:-output/gpu_verify}"
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package need not be installed there

if [[ -d .whl ]] && ! "$PYTHON" -c "import yacs" 2>/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps .whl/*.whl
fi
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'"

# Target architecture: this GPU's compute capability unless TORCH_CUDA_ARCH_LIST is given.
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
fi
export TORCH_CUDA_ARCH_LIST
if [[ -z "${CUDA_HOME:-}" && -d /usr/local/cuda ]]; then export CUDA_HOME=/usr/local/cuda; fi

echo "== building the extensions for sm ${TORCH_CUDA_ARCH_LIST} (log: $LOGS/build.log)"
start=$(date +%s)
SELECTIVE_SCAN_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}" \
  "$PYTHON" -m pip install -v --no-build-isolation ./kernels/selective_scan \
  > "$LOGS/build.log" 2>&1 || { tail -40 "$LOGS/build.log"; exit 1; }
echo "built in $(( $(date +%s) - start )) s"
"$PYTHON" -c "import defmamba_scan_cuda; print('defmamba_scan_cuda:', defmamba_scan_cuda.__file__)"

# The device lease is short: the tests get at most TESTS_TIMEOUT seconds (status 124 if cut) so that the benchmark
# always runs after them.
echo "== kernel tests, at most ${TESTS_TIMEOUT:=300} s (log: $LOGS/tests.log)"
tests_status=0
timeout "$TESTS_TIMEOUT" "$PYTHON" -m pytest -q -rs --durations=10 tests/test_selective_scan_cuda.py \
  tests/test_selective_scan_triton.py 2>&1 | tee "$LOGS/tests.log" || tests_status=$?

echo "== benchmark (log: $LOGS/bench.log)"
"$PYTHON" benchmarks/bench_gpu.py --docs docs/benchmarks.md 2>&1 | tee "$LOGS/bench.log"
cp docs/benchmarks.md "$LOGS/benchmarks.md"
exit "$tests_status"
