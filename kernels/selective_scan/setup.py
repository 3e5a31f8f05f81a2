"""Builds our selective-scan kernels as two optional extensions.

* ``defmamba_scan_cpu``: C++ forward/backward with OpenMP (sources in ``csrc/cpu``), always built.
* ``defmamba_scan_cuda``: CUDA forward/backward (sources in ``csrc/cuda``), built when ``SELECTIVE_SCAN_CUDA=1``,
  or when the variable is unset and ``nvcc`` is found. ``SELECTIVE_SCAN_CUDA=0`` gives a CPU-only build.

CUDA target architectures come from ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"8.0;9.0"``), never from a GPU present at build
time, so the extension builds on a machine without one. Install with
``pip install --no-build-isolation ./kernels/selective_scan`` (``make kernels`` from the repository root).
"""
import logging
import os
import shutil
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

HERE = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0"


def _want_cuda() -> bool:
    flag = os.environ.get("SELECTIVE_SCAN_CUDA")
    if flag is None:
        return shutil.which("nvcc") is not None
    if flag not in ("0", "1"):
        raise ValueError(f"SELECTIVE_SCAN_CUDA must be 0 or 1, got {flag!r}")
    return flag == "1"


def _sources(folder: str, *suffixes: str) -> list[str]:
    files = sorted(str(p.relative_to(HERE)) for p in (HERE / "csrc" / folder).iterdir() if p.suffix in suffixes)
    if not files:
        raise FileNotFoundError(f"no {suffixes} sources in {HERE / 'csrc' / folder}")
    return files


def _extensions() -> list:
    extensions = [
        CppExtension(
            name="defmamba_scan_cpu",
            sources=_sources("cpu", ".cpp"),
            # C++20: torch's headers require it. No -march (scan_avx2.cpp is picked at run time) and no -ffast-math
            # (float64 must stay exact); -ffp-contract=fast lets the AVX2 kernels use FMA. -Wno-psabi: GCC's note that
            # AVX vectors are passed differently than before GCC 4.6 (all of it is compiled together: no ABI concern).
            extra_compile_args=["-O3", "-fopenmp", "-std=c++20", "-ffp-contract=fast", "-Wno-psabi"],
            extra_link_args=["-fopenmp"],
        )
    ]
    if _want_cuda():
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
            logging.warning("TORCH_CUDA_ARCH_LIST unset; building for %s", DEFAULT_CUDA_ARCH_LIST)
        extensions.append(
            CUDAExtension(
                name="defmamba_scan_cuda",
                sources=_sources("cuda", ".cpp", ".cu"),
                # --use_fast_math (as Mamba's build): hardware approximations in float32, for the N exponentials per
                # element; exp_acc corrects the rounding that makes its exp inexact (README, GPU selective scan).
                extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "-std=c++20", "--use_fast_math"]},
            )
        )
    return extensions


setup(
    name="defmamba-selective-scan",
    version="0.1.0",
    description="Selective-scan kernels (CPU and CUDA) for the defmamba framework",
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension},
)
