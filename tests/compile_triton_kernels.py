"""Compiles the Triton selective-scan kernels for an NVIDIA architecture ahead of time, without a GPU.

Triton's interpreter, which runs the kernels in the CPU tests, checks neither types nor layouts nor register use; its
compiler does (loop-carried values keep one type, every ``tl.*`` call lowers, ptxas accepts the result). This script
compiles the forward and backward kernels through Triton's own compiler and bundled ptxas at the tiles the backend
picks on a GPU, in float32 with every optional input on and off, and in float64 (which only the tests use) at
DefMamba's tiles. Scalars equal to 1 (one group, N = 1) are compiled as constants, as Triton specialises them at
launch; its divisibility-by-16 hints are not given, so the compiled code may vectorise less than the launched one.

    python tests/compile_triton_kernels.py [--arch 90]

``TRITON_INTERPRET`` must be unset (the kernels are compiled, not interpreted). Prints one line per kernel with its
tiles and ptxas's register and stack use (``REG:n STACK:m``; a stack means spilled registers), also for the
alternative tilings benchmarks/bench_gpu.py times; exits non-zero with the compiler's message on the first failure.
tests/test_selective_scan_triton_compile.py runs it.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's package, run as a script

import triton  # noqa: E402
import triton.backends.nvidia  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from classification.ops import selective_scan_triton  # noqa: E402

WARP_SIZE = 32
DTYPES = {"float32": "fp32", "float64": "fp64"}  # Triton's pointer element names
# (groups, channels per group, N, L): DefMamba's stage 1 (G = 3, N = 16), a one-group scan with N = 1 (DAMamba's
# state size), a wide state (N = 32).
SHAPES = ((3, 48, 16, 3136), (1, 16, 1, 3136), (2, 8, 32, 45))
OPTIONAL_FLAGS = ("HAS_D", "HAS_BIAS", "SOFTPLUS")
SAVE_STATES_FLAG = "SAVE_STATES"


def compile_kernel(kernel: triton.JITFunction, dtype: str, constants: dict[str, object], scalars: dict[str, int],
                   target: GPUTarget) -> bytes:
    """Compiles ``kernel`` with pointer arguments of ``dtype``, int32 scalars and the given constexpr values; returns
    the cubin.

    A scalar equal to 1 is compiled as the constant 1, as Triton specialises it when the kernel is launched.
    """
    constants = {**constants, **{name: 1 for name, value in scalars.items() if value == 1}}
    signature = {}
    for param in kernel.params:
        if param.is_constexpr or param.name in constants:
            signature[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            signature[param.name] = f"*{DTYPES[dtype]}"
        else:
            signature[param.name] = "i32"
    names = list(signature)
    missing = [name for name, kind in signature.items() if kind == "constexpr" and name not in constants]
    if missing:
        raise ValueError(f"{kernel.__name__}: no value for the constexpr parameters {missing}")
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(name),): value for name, value in constants.items()})
    return triton.compile(source, target=target).asm["cubin"]


def resource_usage(cubin: bytes) -> str:
    """ptxas's register and stack (spill) use of a compiled kernel, as ``REG:n STACK:m``, read by the cuobjdump that
    Triton bundles."""
    tool = Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"
    if not tool.is_file():
        return f"resource use unknown: no {tool}"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as kernel:
        kernel.write(cubin)
        kernel.flush()
        listing = subprocess.run([str(tool), "-res-usage", kernel.name], capture_output=True, text=True,
                                 check=True).stdout
    found = re.search(r"REG:\d+ STACK:\d+", listing)
    return found.group(0) if found else f"resource use unknown: cuobjdump printed {listing!r}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as one number (90: H100/H200)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the kernels must be compiled, not interpreted")
    target = GPUTarget("cuda", args.arch, WARP_SIZE)
    # float32 at every shape with the optional inputs on and off; float64 (only the tests use it) at DefMamba's.
    # The alternative tilings the GPU benchmark times, at DefMamba's shape in float32.
    default_caps = selective_scan_triton.TileCaps()
    runs = [(shape, "float32", optional, default_caps) for shape in SHAPES for optional in (True, False)]
    runs.append((SHAPES[0], "float64", True, default_caps))
    runs += [(SHAPES[0], "float32", True, caps) for caps in selective_scan_triton.ALTERNATIVE_TILE_CAPS]
    for (groups, channels_per_group, state_size, length), dtype, optional, caps in runs:
        with selective_scan_triton.tile_caps(caps):
            block_c, block_n, chunk = selective_scan_triton._tiles(channels_per_group, state_size, length)
        scalars = dict(channels=groups * channels_per_group, channels_per_group=channels_per_group, groups=groups,
                       dstate=state_size, L=length, n_chunks=-(-length // chunk),
                       blocks_per_group=-(-channels_per_group // block_c))
        constants = dict(BLOCK_C=block_c, BLOCK_N=block_n, CHUNK=chunk, **dict.fromkeys(OPTIONAL_FLAGS, optional))
        variants = (("forward", selective_scan_triton._scan_fwd_kernel, {SAVE_STATES_FLAG: optional}),
                    ("backward", selective_scan_triton._scan_bwd_kernel, {}))
        for name, kernel, extra in variants:
            cubin = compile_kernel(kernel, dtype, {**constants, **extra}, scalars, target)
            print(f"sm_{args.arch} {name} {dtype} tiles {block_c}x{block_n}x{chunk} optional inputs "
                  f"{'on' if optional else 'off'}: compiled, {resource_usage(cubin)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
