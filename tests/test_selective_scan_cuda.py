"""The CUDA selective-scan extension against the float64 reference: output and all seven gradients, every dtype.

The kernel tests need a GPU and the built extension (`benchmarks/gpu_verify.sh` builds it and runs this file); they
skip otherwise. The tests of the "not built" error run everywhere.
"""
import functools

import pytest
import torch

from classification.ops import selective_scan_fn, selective_scan_ref
from classification.ops import selective_scan_cuda
from scan_cases import CASES, TOLERANCE, ScanCase, cast_inputs, make_inputs, relative_error, run_scan

needs_gpu_kernel = pytest.mark.skipif(
    not (torch.cuda.is_available() and selective_scan_cuda.is_available()),
    reason="needs a CUDA device and the built extension: " + selective_scan_cuda.unavailable_reason(),
)

# Half inputs are quantised before the reference sees them, so y (float32) keeps the float32 tolerance; the
# gradients come back in the half dtype and carry its rounding (2^-11, 2^-8 relative).
KERNEL_TOLERANCE = {**TOLERANCE, torch.float16: 2e-3, torch.bfloat16: 1e-2}
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
    assert selective_scan_cuda.BUILD_COMMAND in selective_scan_cuda.unavailable_reason()
    inputs = make_inputs(CASES[1])
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation ./kernels/selective_scan"):
        selective_scan_cuda.scan(*inputs.values(), True)
