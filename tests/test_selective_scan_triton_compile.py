"""The Triton kernels compile for sm_90 (H100/H200) on any machine with triton installed: no GPU needed.

The interpreter-based tests (test_selective_scan_triton.py) check the kernels' arithmetic; only the compiler checks
that they lower at all (types of loop-carried values, layouts, ptxas). tests/compile_triton_kernels.py does the
compiling, in a child process because this test session runs the kernels in the interpreter.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from classification.ops import selective_scan_triton

SCRIPT = Path(__file__).resolve().parent / "compile_triton_kernels.py"
# Forward and backward: float32 at three shapes with optional inputs on and off, float64, two alternative tilings.
KERNEL_COMPILES = 18
# A compiled-kernel line: "sm_90 backward float32 tiles 4x16x32 optional inputs on: compiled, REG:244 STACK:0".
KERNEL_LINE = re.compile(r"(?P<dtype>float\d+) tiles \d+x(?P<state>\d+)x\d+ .*: compiled, REG:(?P<regs>\d+) "
                         r"STACK:(?P<stack>\d+)")

pytestmark = pytest.mark.skipif(selective_scan_triton.triton is None,
                                reason="triton is not installed (requirements.txt pins it on Linux)")


def test_kernels_compile_for_sm90(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier run's cache
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count(": compiled") == KERNEL_COMPILES, result.stdout
    # ptxas's resource use: no float32 kernel with a state tile of at most 16 (DefMamba's N = 16, DAMamba's 1) spills
    # registers to local memory, at every tiling the backend or the benchmark launches.
    kernels = [match.groupdict() for match in KERNEL_LINE.finditer(result.stdout)]
    assert len(kernels) == KERNEL_COMPILES, result.stdout
    spilling = [kernel for kernel in kernels if kernel["dtype"] == "float32" and int(kernel["state"]) <= 16
                and kernel["stack"] != "0"]
    assert not spilling, result.stdout
