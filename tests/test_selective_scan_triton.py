"""The Triton selective-scan backend against the float64 reference: output and all seven gradients.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before they are
defined). The interpreter walks associative scans element by element in Python, so the shapes stay tiny; they still
cover L = 1, a prime L over several chunks, N = 1, G = 1 and 3, several channel blocks per group, softplus past its
threshold, non-contiguous inputs, and every combination of D / delta_bias / softplus that matters. Where the backend
is unavailable they skip; test_selective_scan_triton_availability.py checks that decision and its message everywhere.
"""
import functools

import pytest
import torch

from classification.ops import selective_scan_fn, selective_scan_ref
from classification.ops import selective_scan_triton
from scan_cases import KEEPS_RESIDUALS, TOLERANCE, ScanCase, cast_inputs, elementwise_errors, make_inputs
from scan_cases import relative_error
from scan_cases import run_in_grad_modes, run_scan

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(
    not selective_scan_triton.is_available(), reason=selective_scan_triton.unavailable_reason()
)

TRITON_CASES = (
    ScanCase(batch=1, channels=2, length=1, state_size=1, groups=1),
    ScanCase(batch=1, channels=6, length=13, state_size=2, groups=3),
    ScanCase(batch=1, channels=6, length=13, state_size=2, groups=3, with_D=False, with_bias=False, softplus=False),
    ScanCase(batch=2, channels=5, length=11, state_size=3, groups=1, with_bias=False, noncontiguous=True),
)


def _check_against_ref(case: ScanCase, dtype: torch.dtype, inputs: dict | None = None) -> None:
    inputs = make_inputs(case, dtype=dtype, device=DEVICE) if inputs is None else inputs
    grad_y = torch.randn(case.batch, case.channels, case.length, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64).to(DEVICE)
    y, grads = run_scan(functools.partial(selective_scan_fn, backend="triton"), inputs, case.softplus, grad_y)
    y_ref, grads_ref = run_scan(selective_scan_ref, cast_inputs(inputs, torch.float64), case.softplus, grad_y)
    assert y.dtype == dtype and y.shape == y_ref.shape
    errors = {"y": relative_error(y, y_ref)}
    errors.update({name: relative_error(grads[name], grads_ref[name]) for name in grads_ref})
    assert set(grads) == set(grads_ref)
    bad = {name: err for name, err in errors.items() if not err < TOLERANCE[dtype]}
    assert not bad, f"{case.id} {dtype}: relative errors above {TOLERANCE[dtype]}: {bad}"


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.id)
def test_triton_matches_ref_float64(case: ScanCase) -> None:
    _check_against_ref(case, torch.float64)


def test_triton_matches_ref_float32() -> None:
    _check_against_ref(TRITON_CASES[1], torch.float32)


# float32 ULPs allowed for the kernel's exp, softplus and softplus derivative (on a GPU, the decays' fast exp counted
# beyond its allowance, scan_cases.FAST_EXP_ULPS_PER_UNIT; a GPU's approximate exp2 may add a little); float64 to 1e-14
# relative.
TRITON_FLOAT32_ULPS = 4.0


# The interpreter evaluates both sides of tl.where: softplus's log1p(e) = log(w) e / (w - 1) divides 0 by 0 where w = 1.
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_triton_exp_softplus_and_its_derivative_point_by_point(dtype: torch.dtype) -> None:
    """Past the softplus threshold and far below it (log1p of a tiny exp), point by point, not relative to the
    largest value."""
    scan = functools.partial(run_scan, functools.partial(selective_scan_fn, backend="triton"))
    errors = elementwise_errors(scan, dtype, DEVICE, fast_exp=DEVICE == "cuda")
    assert max(errors.values()) <= (TRITON_FLOAT32_ULPS if dtype == torch.float32 else 1e-14), errors


@pytest.mark.parametrize("caps, tiles", [
    (selective_scan_triton.TileCaps(block_channels=2, chunk=4), (2, 4)),  # 3 channel blocks per group
    (selective_scan_triton.TileCaps(block_channels=8, chunk=2), (8, 2)),  # one block of 8 for the group's 6 channels
], ids=str)
def test_triton_other_tile_caps_match_ref(caps: selective_scan_triton.TileCaps, tiles: tuple[int, int]) -> None:
    """The tilings benchmarks/bench_gpu.py compares compute the same scan: more or fewer channel blocks per group
    (partial dB / dC copies), longer or shorter chunks; the launches use the caps' tiles (channels, chunk)."""
    case = ScanCase(batch=1, channels=12, length=13, state_size=2, groups=2)
    launched = []
    kernel = selective_scan_triton._scan_bwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append((kwargs["BLOCK_C"], kwargs["CHUNK"]))
                return kernel[grid](*args, **kwargs)
            return launch

    with selective_scan_triton.tile_caps(caps), pytest.MonkeyPatch.context() as patch:
        patch.setattr(selective_scan_triton, "_scan_bwd_kernel", Spy())
        _check_against_ref(case, torch.float64)
    assert launched == [tiles]


def test_tile_caps_are_powers_of_two() -> None:
    with pytest.raises(ValueError, match="powers of two"):
        with selective_scan_triton.tile_caps(selective_scan_triton.TileCaps(block_channels=3, chunk=8)):
            pass


def test_triton_softplus_threshold_and_strong_decay() -> None:
    """delta + bias above softplus's threshold (20) on one channel: dt is taken as is, the state decays to ~0."""
    case = ScanCase(batch=1, channels=4, length=7, state_size=2, groups=2)
    inputs = make_inputs(case, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        inputs["delta_bias"][0] = 25.0
    _check_against_ref(case, torch.float64, inputs)


def test_triton_half_inputs_upcast() -> None:
    """bfloat16 inputs go through the dispatcher's float32 upcast and give float32 y equal to the float32 run (the
    first run without grad, so the forward saves no states)."""
    case = TRITON_CASES[1]
    inputs = make_inputs(case, dtype=torch.bfloat16, device=DEVICE)
    with torch.no_grad():
        y = selective_scan_fn(**inputs, delta_softplus=case.softplus, backend="triton")
    y_float = selective_scan_fn(**cast_inputs(inputs, torch.float32), delta_softplus=case.softplus, backend="triton")
    assert y.dtype == torch.float32
    assert torch.equal(y, y_float)


def test_triton_keeps_states_only_when_a_backward_can_follow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation (no_grad, inference_mode, inputs without grad) writes no chunk states; training does."""
    kernel, saved = selective_scan_triton._scan_fwd_kernel, []

    class LaunchSpy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                saved.append(kwargs["SAVE_STATES"])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(selective_scan_triton, "_scan_fwd_kernel", LaunchSpy())
    inputs = make_inputs(TRITON_CASES[1], device=DEVICE)
    outputs = run_in_grad_modes(functools.partial(selective_scan_fn, backend="triton"), inputs, delta_softplus=True)
    assert saved == list(KEEPS_RESIDUALS)
    assert all(torch.equal(y, outputs[-1].detach()) for y in outputs[:-1])
    outputs[-1].sum().backward()
    assert all(t.grad is not None for t in inputs.values() if t is not None)
