"""The CUDA selective-scan extension against the float64 reference: output and all seven gradients, every dtype.

The kernel tests on the GPU need a GPU and the built extension (`benchmarks/gpu_verify.sh` builds it and runs this
file); they skip otherwise. Everywhere else the kernels' own source runs on the CPU under a host emulation of the few
CUDA features it uses (tests/cuda_host_emulation: threads for the block, barriers, emulated warp shuffles), compiled
with the C++ compiler: that checks their arithmetic and indexing for every dtype, both dB/dC reduction modes, one and
several channel blocks per group, N <= 16 and N > 16. The tests of the "not built" error run everywhere.
"""
import ctypes
import functools
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from classification.ops import selective_scan_fn, selective_scan_ref
from classification.ops import selective_scan_cuda
from scan_cases import CASES, KEEPS_RESIDUALS, TOLERANCE, ScanCase, cast_inputs, elementwise_errors, followed_by_nan
from scan_cases import make_inputs, relative_error, run_in_grad_modes, run_scan

needs_gpu_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and selective_scan_cuda.is_available()),
    reason="needs a CUDA device and the built extension: " + selective_scan_cuda.unavailable_reason(),
)

# Half inputs are quantised before the reference sees them, so y (float32) keeps the float32 tolerance; the
# gradients come back in the half dtype and carry its rounding (2^-11, 2^-8 relative).
KERNEL_TOLERANCE = {**TOLERANCE, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# The kernels' exp, softplus and softplus derivative point by point: float32 ULPs (the decays' fast exp counted beyond
# its allowance, scan_cases.FAST_EXP_ULPS_PER_UNIT), and relative in float64.
ELEMENTWISE_BOUND = {torch.float32: 4.0, torch.float64: 1e-14}
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Several channel blocks per group (the dB/dC reduction across blocks) and many chunks with a long decay.
LONG_CASE = ScanCase(batch=2, channels=48, length=3136, state_size=16, groups=3)
WIDE_STATE_CASE = ScanCase(batch=2, channels=8, length=45, state_size=32, groups=2)


def _errors(case: ScanCase, dtype: torch.dtype) -> dict[str, float]:
    """Relative errors of y and every gradient of the cuda backend against ref in float64."""
    inputs = make_inputs(case, dtype=dtype, device="cuda")
    grad_y = torch.randn(case.batch, case.channels, case.length, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64).cuda()
    y, grads = run_scan(functools.partial(selective_scan_fn, backend="cuda"), inputs, case.softplus, grad_y)
    y_ref, grads_ref = run_scan(selective_scan_ref, cast_inputs(inputs, torch.float64), case.softplus, grad_y)
    assert y.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert set(grads) == set(grads_ref)
    for name, grad in grads.items():
        assert grad.dtype == inputs[name].dtype, f"grad of {name}: {grad.dtype}, input {inputs[name].dtype}"
    errors = {"y": relative_error(y, y_ref)}
    errors.update({name: relative_error(grads[name], grads_ref[name]) for name in grads_ref})
    return errors


@needs_gpu_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES + (LONG_CASE, WIDE_STATE_CASE), ids=lambda c: c.id)
def test_cuda_matches_ref(case: ScanCase, dtype: torch.dtype) -> None:
    errors = _errors(case, dtype)
    # y is float32 for half inputs; every gradient comes back in the input dtype.
    tolerance = {name: KERNEL_TOLERANCE[dtype] for name in errors}
    tolerance["y"] = KERNEL_TOLERANCE[torch.float64 if dtype == torch.float64 else torch.float32]
    bad = {name: err for name, err in errors.items() if not err < tolerance[name]}
    assert not bad, f"{case.id} {dtype}: relative errors above tolerance {tolerance}: {bad}"


@needs_gpu_kernel
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_cuda_deterministic_mode_is_bitwise_reproducible(dtype: torch.dtype) -> None:
    case = ScanCase(batch=2, channels=96, length=300, state_size=16, groups=3)
    grad_y = torch.randn(case.batch, case.channels, case.length, device="cuda", dtype=torch.float32)
    scan = functools.partial(selective_scan_fn, backend="cuda")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [run_scan(scan, make_inputs(case, dtype=dtype, device="cuda"), case.softplus, grad_y) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(previous)
    atomic_y, atomic_grads = run_scan(scan, make_inputs(case, dtype=dtype, device="cuda"), case.softplus, grad_y)
    (y0, grads0), rest = runs[0], runs[1:]
    for y, grads in rest:
        assert torch.equal(y, y0)
        for name, grad in grads.items():
            assert torch.equal(grad, grads0[name]), f"deterministic grad of {name} differs between runs"
    # The atomic path sums in another order: equal up to rounding.
    assert relative_error(atomic_y, y0) == 0.0
    for name, grad in atomic_grads.items():
        assert relative_error(grad, grads0[name]) < KERNEL_TOLERANCE[dtype], name


@needs_gpu_kernel
def test_cuda_input_checks_name_the_tensor() -> None:
    extension = selective_scan_cuda._extension()
    inputs = {k: None if v is None else v.detach().float().contiguous()
              for k, v in make_inputs(CASES[0], dtype=torch.float32, device="cuda").items()}
    args = dict(inputs, softplus=True, save_states=False)
    with pytest.raises(RuntimeError, match="B must have shape"):
        extension.fwd(**dict(args, B=inputs["B"][:, :, :, :-1].contiguous()))
    with pytest.raises(RuntimeError, match="A must have dtype"):
        extension.fwd(**dict(args, A=inputs["A"].double()))
    with pytest.raises(RuntimeError, match="delta must be contiguous"):
        extension.fwd(**dict(args, delta=inputs["delta"].transpose(1, 2).contiguous().transpose(1, 2)))
    with pytest.raises(RuntimeError, match="u must be a CUDA tensor"):
        extension.fwd(**dict(args, u=inputs["u"].cpu()))
    wide = make_inputs(ScanCase(batch=1, channels=2, length=5, state_size=33, groups=1), torch.float32, "cuda")
    with pytest.raises(RuntimeError, match="dstate must be in"):
        selective_scan_fn(**wide, backend="cuda")


def test_cuda_not_built_raises_with_build_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selective_scan_cuda, "_extension", lambda: None)
    assert not selective_scan_cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "make kernels" in selective_scan_cuda.unavailable_reason()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert "TORCH_CUDA_ARCH_LIST='8.0' " in selective_scan_cuda.unavailable_reason()
    inputs = make_inputs(CASES[1])
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation ./kernels/selective_scan"):
        selective_scan_cuda.scan(*inputs.values(), True)


def test_cuda_keeps_states_only_when_a_backward_can_follow(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wrapper asks the kernel for the chunk states only when a backward can follow (an extension stand-in
    records the request, on any machine)."""
    saved = []

    def fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, save_states):
        saved.append(save_states)
        return torch.zeros(u.shape, dtype=A.dtype), u.new_empty(0)

    monkeypatch.setattr(selective_scan_cuda, "_extension", lambda: SimpleNamespace(fwd=fwd))
    run_in_grad_modes(selective_scan_cuda.scan, make_inputs(CASES[0]), delta_softplus=True)
    assert saved == list(KEEPS_RESIDUALS)


# ---------------------------------------------------------------------------------------- host emulation of the kernels

EMULATION_DIR = Path(__file__).resolve().parent / "cuda_host_emulation"
KERNEL_DIR = Path(__file__).resolve().parents[1] / "kernels" / "selective_scan" / "csrc" / "cuda"
KERNEL_LAUNCH = re.compile(r"(\w+<input_t, lanes>)<<<grid, kThreads, 0, stream>>>\(params\);")
# As in scan_cuda_common.h / scan_api.cpp: input-type codes, threads per block, lanes per channel, chunk lengths.
EMULATED_INPUT_TYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
THREADS_PER_BLOCK = 128
CHUNK_LEN = {torch.float64: 16, torch.float32: 32, torch.float16: 32, torch.bfloat16: 32}
EMULATED_CASES = (
    ScanCase(batch=2, channels=6, length=45, state_size=4, groups=3),
    ScanCase(batch=1, channels=4, length=1, state_size=3, groups=1),
    ScanCase(batch=1, channels=20, length=70, state_size=16, groups=2, with_D=False, with_bias=False, softplus=False),
    ScanCase(batch=1, channels=6, length=37, state_size=20, groups=3, with_bias=False),
)
EMULATED_RUNS = (
    (EMULATED_CASES[0], torch.float64, False),
    (EMULATED_CASES[0], torch.float32, True),
    (EMULATED_CASES[0], torch.bfloat16, False),
    (EMULATED_CASES[0], torch.float16, True),
    (EMULATED_CASES[1], torch.float32, False),
    (EMULATED_CASES[2], torch.float64, True),
    (EMULATED_CASES[2], torch.float32, False),
    (EMULATED_CASES[3], torch.float64, False),
    (EMULATED_CASES[3], torch.float32, True),
)


@pytest.fixture(scope="module")
def emulated_kernels(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    """scan_fwd.cu and scan_bwd.cu compiled for the host emulation, with scan_api.cpp's C entry points."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the host emulation of the CUDA kernels")
    build = tmp_path_factory.mktemp("cuda_host_emulation")
    sources = []
    for name in ("scan_fwd.cu", "scan_bwd.cu"):
        source = (KERNEL_DIR / name).read_text()
        text, launches = KERNEL_LAUNCH.subn(r"emulated_launch(\1, grid, kThreads, params);", source)
        assert launches == 1, f"{name}: expected one kernel launch to emulate, found {launches}"
        sources.append(build / f"{Path(name).stem}.cpp")
        sources[-1].write_text(text)
    torch_dir = Path(torch.__file__).resolve().parent
    library = build / "libscan_emulated.so"
    command = [
        compiler, "-std=c++20", "-O1", "-fPIC", "-shared", f"-I{EMULATION_DIR}", f"-I{KERNEL_DIR}",
        f"-I{torch_dir / 'include'}", *map(str, sources), str(EMULATION_DIR / "scan_api.cpp"), "-o", str(library),
        f"-L{torch_dir / 'lib'}", f"-Wl,-rpath,{torch_dir / 'lib'}", "-lc10", "-pthread",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"host emulation build failed:\n{result.stderr[-4000:]}"
    return ctypes.CDLL(str(library))


def _pointers(*tensors: torch.Tensor | None) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[None if t is None else t.data_ptr() for t in tensors])


def _emulated_scan(kernels: ctypes.CDLL, inputs: dict, softplus: bool, grad_y: torch.Tensor,
                   deterministic: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """y and the gradients from the emulated kernels, with the host-side steps of scan_cuda_bindings.cpp."""
    u, delta, A, B, C, D, delta_bias = (None if v is None else v.detach().contiguous() for v in inputs.values())
    input_dtype = u.dtype
    acc = torch.float64 if input_dtype == torch.float64 else torch.float32
    A, D, delta_bias = (None if t is None else t.to(acc).contiguous() for t in (A, D, delta_bias))
    batch, channels, length = u.shape
    groups, state_size = B.shape[1], B.shape[2]
    n_chunks = -(-length // CHUNK_LEN[input_dtype])
    lanes = 16 if state_size <= 16 else 32
    blocks_per_group = -(-(channels // groups) // (THREADS_PER_BLOCK // lanes))
    sizes = (ctypes.c_int * 7)(batch, channels, groups, channels // groups, state_size, length, n_chunks)
    code = EMULATED_INPUT_TYPES[input_dtype]

    y = u.new_empty(u.shape, dtype=acc)
    states = u.new_empty((batch, channels, n_chunks, state_size), dtype=acc)
    kernels.emulated_scan_fwd(code, sizes, int(softplus), _pointers(u, delta, A, B, C, D, delta_bias, y, states))

    du, ddelta = torch.empty_like(u), torch.empty_like(delta)
    dA = u.new_empty((batch, channels, state_size), dtype=acc)
    projections = (batch, groups, blocks_per_group, state_size, length) if deterministic else B.shape
    dB = u.new_zeros(projections, dtype=acc)
    dC = u.new_zeros(projections, dtype=acc)
    dD, dbias = u.new_empty((batch, channels), dtype=acc), u.new_empty((batch, channels), dtype=acc)
    dy = grad_y.to(acc).contiguous()  # named: the kernels get raw pointers, so every tensor must outlive the call
    kernels.emulated_scan_bwd(
        code, sizes, int(softplus), int(deterministic), blocks_per_group,
        _pointers(u, delta, A, B, C, D, delta_bias, dy, states, du, ddelta, dA, dB, dC, dD, dbias),
    )
    if deterministic:
        dB, dC = dB.sum(2), dC.sum(2)
    grads = {"u": du, "delta": ddelta, "A": dA.sum(0), "B": dB, "C": dC}
    if D is not None:
        grads["D"] = dD.sum(0)
    if delta_bias is not None:
        grads["delta_bias"] = dbias.sum(0)
    return y, grads


@pytest.mark.parametrize(
    "case, dtype, deterministic", EMULATED_RUNS,
    ids=[f"{c.id}-{str(d)[6:]}-{'det' if det else 'atomic'}" for c, d, det in EMULATED_RUNS],
)
def test_cuda_kernels_emulated_on_cpu_match_ref(emulated_kernels: ctypes.CDLL, case: ScanCase, dtype: torch.dtype,
                                                deterministic: bool) -> None:
    inputs = followed_by_nan(make_inputs(case, dtype=dtype))  # reading past an input's end would give NaN
    grad_y = torch.randn(case.batch, case.channels, case.length, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    y, grads = _emulated_scan(emulated_kernels, inputs, case.softplus, grad_y, deterministic)
    y_ref, grads_ref = run_scan(selective_scan_ref, cast_inputs(inputs, torch.float64), case.softplus, grad_y)
    assert set(grads) == set(grads_ref)
    errors = {"y": relative_error(y, y_ref)}
    errors.update({name: relative_error(grads[name], grads_ref[name]) for name in grads_ref})
    # Half runs: du, ddelta come back in the half dtype; everything else is float32.
    tolerance = {name: KERNEL_TOLERANCE[torch.float64 if dtype == torch.float64 else torch.float32] for name in errors}
    for name in ("u", "delta"):
        tolerance[name] = KERNEL_TOLERANCE[dtype]
    bad = {name: err for name, err in errors.items() if not err < tolerance[name]}
    assert not bad, f"{case.id} {dtype}: relative errors above tolerance {tolerance}: {bad}"


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_cuda_kernels_emulated_exp_softplus_and_its_derivative_point_by_point(emulated_kernels: ctypes.CDLL,
                                                                             dtype: torch.dtype) -> None:
    """Past the softplus threshold and far below it, point by point (not relative to the largest value)."""
    errors = elementwise_errors(functools.partial(_emulated_scan, emulated_kernels, deterministic=False), dtype,
                                fast_exp=True)
    assert max(errors.values()) <= ELEMENTWISE_BOUND[dtype], errors


@needs_gpu_kernel
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_cuda_exp_softplus_and_its_derivative_point_by_point(dtype: torch.dtype) -> None:
    errors = elementwise_errors(functools.partial(run_scan, functools.partial(selective_scan_fn, backend="cuda")),
                                dtype, "cuda", fast_exp=True)
    assert max(errors.values()) <= ELEMENTWISE_BOUND[dtype], errors
