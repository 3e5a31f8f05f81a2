"""The C++ CPU selective scan (backend ``cpu``, extension ``defmamba_scan_cpu``) against ``selective_scan_ref``.

`make test` builds the extension first, so these tests fail (not skip) when it is missing; set
DEFMAMBA_ALLOW_NO_CPU_KERNEL=1 to skip them on a machine that cannot build it.
"""
import functools
import math
import os
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from classification.ops import selective_scan_cpu
from classification.ops.selective_scan import selective_scan_fn, selective_scan_ref
from scan_cases import CASES, KEEPS_RESIDUALS, TOLERANCE, ScanCase, cast_inputs, elementwise_errors, make_inputs
from scan_cases import relative_error, run_in_grad_modes, run_scan

ALLOW_MISSING_ENV = "DEFMAMBA_ALLOW_NO_CPU_KERNEL"
DTYPES = (torch.float64, torch.float32)
# Cases beyond the shared ones: N = 16 (the vectorised path) over several checkpoint chunks with a ragged last chunk
# and G = 3, N = 24 (a multiple of the vector width without its own instantiation: the runtime-size path), and the
# backward's channel blocks when a group's channels outnumber them: batch x groups >= 64 tasks gives one block of 6
# channels per group (dB, dC summed over the block's channels); 100 channels over 64 blocks, an uneven split.
CPU_CASES = CASES + (
    ScanCase(batch=2, channels=6, length=197, state_size=16, groups=3),
    ScanCase(batch=1, channels=4, length=131, state_size=24, groups=2, with_D=False, noncontiguous=True),
    ScanCase(batch=70, channels=6, length=9, state_size=4, groups=1),
    ScanCase(batch=1, channels=100, length=9, state_size=4, groups=1),
)
# The kernel's own float32 functions, at most this many ULPs off (README: exp 1, softplus 3.1, its derivative 2.2).
FLOAT32_ULPS = {"exp": 1.0, "softplus": 3.1, "sigmoid": 2.2}
ISAS = ("avx2", "generic")
MIN_SCAN_SECONDS = 0.3  # how long the GIL test keeps scanning


@pytest.fixture(autouse=True)
def _require_kernel() -> None:
    if selective_scan_cpu.is_available():
        return
    if os.environ.get(ALLOW_MISSING_ENV) == "1":
        pytest.skip(selective_scan_cpu.unavailable_reason())
    pytest.fail(
        f"{selective_scan_cpu.unavailable_reason()}. `make test` builds it; set {ALLOW_MISSING_ENV}=1 to skip.",
        pytrace=False,
    )


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest):
    """Runs the test with the AVX2 kernels and with the generic ones (same code, baseline instruction set)."""
    from defmamba_scan_cpu import isa as current_isa, set_isa

    if request.param == "avx2" and not _has_avx2():
        pytest.skip("this CPU has no AVX2 + FMA")
    before = current_isa()
    set_isa(request.param)
    yield request.param
    set_isa(before)


def _has_avx2() -> bool:
    from defmamba_scan_cpu import isa as current_isa, set_isa

    before = current_isa()
    try:
        set_isa("avx2")
    except RuntimeError:
        return False
    set_isa(before)
    return True


@pytest.fixture
def threads():
    """Restores torch's intra-op thread count after the test."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _compare_with_ref(inputs: dict, softplus: bool, dtype: torch.dtype, seed: int = 1) -> None:
    grad_y = torch.randn(inputs["u"].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y_ref, grads_ref = run_scan(selective_scan_ref, inputs, softplus, grad_y)
    cpu_scan = functools.partial(selective_scan_fn, backend="cpu")
    y, grads = run_scan(cpu_scan, cast_inputs(inputs, dtype), softplus, grad_y)
    assert y.dtype == dtype
    errors = {"y": relative_error(y, y_ref)} | {k: relative_error(grads[k], grads_ref[k]) for k in grads_ref}
    assert max(errors.values()) < TOLERANCE[dtype], errors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_matches_reference(case: ScanCase, dtype: torch.dtype, isa: str) -> None:
    _compare_with_ref(make_inputs(case), case.softplus, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exp_softplus_and_its_derivative_point_by_point(dtype: torch.dtype, isa: str) -> None:
    errors = elementwise_errors(functools.partial(run_scan, functools.partial(selective_scan_fn, backend="cpu")),
                                dtype)
    bounds = FLOAT32_ULPS if dtype == torch.float32 else dict.fromkeys(FLOAT32_ULPS, 1e-14)
    assert all(errors[name] <= bound for name, bound in bounds.items()), errors


@pytest.mark.parametrize("state_size", [16, 1, 5])
def test_softplus_threshold_underflow_and_strong_decay(state_size: int, isa: str) -> None:
    """float32 exp and softplus are the kernel's own: check them where they are hardest.

    delta spans [-100, 40] (softplus of tiny values, both sides of the threshold 20, dt * A far below the float32
    exp range) and |A| reaches e^4, so states decay by e^-2000 in one step, and L = 150 crosses checkpoint chunks.
    """
    case = ScanCase(batch=2, channels=4, length=150, state_size=state_size, groups=2)
    inputs = make_inputs(case)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        inputs["delta"].copy_(torch.rand(inputs["delta"].shape, generator=gen, dtype=torch.float64) * 140 - 100)
        inputs["delta"][..., :4] = torch.tensor([20.0, 20.5, -20.0, 0.0], dtype=torch.float64)
        inputs["A"].copy_(-torch.exp(torch.rand(inputs["A"].shape, generator=gen, dtype=torch.float64) * 5 - 1))
    for dtype in DTYPES:
        _compare_with_ref(inputs, True, dtype)


@pytest.mark.parametrize("state_size", [16, 1, 5])
@pytest.mark.parametrize("poisoned", ["delta", "delta_bias", "A", "u"])
def test_nan_propagates_like_the_reference(poisoned: str, state_size: int, isa: str) -> None:
    """A NaN input gives NaN exactly where ref's does, in y and in every gradient (float32: the kernel's own exp and
    softplus must not turn it into a finite value, which would hide a diverging run from the loss check)."""
    case = ScanCase(batch=1, channels=2, length=70, state_size=state_size, groups=1)
    inputs = cast_inputs(make_inputs(case), torch.float32)
    with torch.no_grad():
        target = inputs[poisoned]
        target.view(-1)[target.numel() // 2] = math.nan  # a middle step (delta, u), channel (bias) or state (A)
    grad_y = torch.randn(case.batch, case.channels, case.length)
    got = run_scan(functools.partial(selective_scan_fn, backend="cpu"), inputs, True, grad_y)
    expected = run_scan(selective_scan_ref, inputs, True, grad_y)
    assert got[0].isnan().any()
    assert torch.equal(got[0].isnan(), expected[0].isnan())
    for name, grad in got[1].items():
        assert torch.equal(grad.isnan(), expected[1][name].isnan()), name

@pytest.mark.parametrize(
    "case, fast_mode",
    [
        (ScanCase(batch=1, channels=2, length=67, state_size=2, groups=1, noncontiguous=True), False),
        (ScanCase(batch=2, channels=6, length=70, state_size=16, groups=3), True),
    ],
    ids=lambda v: v.id if isinstance(v, ScanCase) else f"fast_mode={v}",
)
def test_gradcheck_float64(case: ScanCase, fast_mode: bool) -> None:
    """torch.autograd.gradcheck in float64 across a checkpoint boundary (L > 64), every input; the full Jacobian on
    a small case, random projections of it (fast_mode) on the vectorised N = 16 path."""
    inputs = make_inputs(case)
    names = [k for k, v in inputs.items() if v is not None]

    def fn(*tensors: torch.Tensor) -> torch.Tensor:  # the backend itself: canonical inputs, no dispatcher
        return selective_scan_cpu.scan(**(inputs | dict(zip(names, tensors))), delta_softplus=case.softplus)

    assert torch.autograd.gradcheck(fn, [inputs[k] for k in names], eps=1e-6, atol=1e-8, rtol=1e-6,
                                    fast_mode=fast_mode)


def _outputs(inputs: dict, softplus: bool) -> list[torch.Tensor]:
    leaves = [v for v in inputs.values() if v is not None]
    y = selective_scan_fn(**inputs, delta_softplus=softplus, backend="cpu")
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    return [y.detach()] + list(torch.autograd.grad(y, leaves, grad_y))


def test_bitwise_independent_of_thread_count_and_deterministic(threads) -> None:
    """1 vs 2 threads and two runs: y and every gradient bitwise equal (backward over several channel blocks)."""
    case = ScanCase(batch=2, channels=12, length=300, state_size=16, groups=3)
    inputs = cast_inputs(make_inputs(case), torch.float32)
    threads(1)
    one = _outputs(inputs, case.softplus)
    threads(2)
    two = _outputs(inputs, case.softplus)
    again = _outputs(inputs, case.softplus)
    with torch.no_grad():
        inference = selective_scan_fn(**inputs, delta_softplus=case.softplus, backend="cpu")
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b) and torch.equal(b, c)
    assert torch.equal(inference, one[0])


def test_only_needed_gradients_are_returned() -> None:
    inputs = cast_inputs(make_inputs(CASES[0]), torch.float32)
    inputs["A"].requires_grad_(False)
    y = selective_scan_fn(**inputs, delta_softplus=True, backend="cpu")
    y.sum().backward()
    assert inputs["A"].grad is None and inputs["B"].grad is not None


def test_checkpoints_are_kept_only_when_a_backward_can_follow(monkeypatch: pytest.MonkeyPatch) -> None:
    """Evaluation (no_grad, inference_mode, inputs without grad) writes no checkpoint states; training does."""
    real, saved = selective_scan_cpu._extension, []

    def forward(*args):
        saved.append(args[-1])  # save_checkpoints
        return real.forward(*args)

    monkeypatch.setattr(selective_scan_cpu, "_extension", SimpleNamespace(forward=forward, backward=real.backward))
    inputs = make_inputs(CASES[0])
    outputs = run_in_grad_modes(functools.partial(selective_scan_fn, backend="cpu"), inputs, delta_softplus=True)
    assert saved == list(KEEPS_RESIDUALS)
    assert all(torch.equal(y, outputs[-1].detach()) for y in outputs[:-1])
    outputs[-1].sum().backward()
    assert all(t.grad is not None for t in inputs.values() if t is not None)


def _canonical(case: ScanCase) -> dict:
    return {k: None if v is None else v.detach() for k, v in make_inputs(case).items()}


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("B", torch.zeros(2, 3, 4, 96, dtype=torch.float64), r"B must have shape \(batch, G, N, L\)"),
        ("C", torch.zeros(2, 3, 4, 97), "C must have dtype Double like u"),
        ("A", torch.zeros(6, 4, 1, dtype=torch.float64), r"A must have shape \(G\*D, N\)"),
        ("B", torch.zeros(2, 4, 4, 97, dtype=torch.float64), "the G = 4 groups of B must divide the G\\*D = 6"),
        ("D", torch.zeros(5, dtype=torch.float64), r"D must have shape \(G\*D\) = \[6\], got \[5\]"),
        ("u", torch.zeros(2, 6, 97, dtype=torch.int64), "u must be float32 or float64"),
    ],
)
def test_extension_checks_its_inputs(name: str, value: torch.Tensor, message: str) -> None:
    """The C++ checks (reached by calling the backend directly, past the dispatcher's own validation)."""
    inputs = _canonical(CASES[0]) | {name: value}
    with pytest.raises(RuntimeError, match=message):
        selective_scan_cpu.scan(**inputs, delta_softplus=True)


def test_backward_needs_the_checkpoints() -> None:
    from defmamba_scan_cpu import backward

    inputs = _canonical(CASES[0])
    empty = torch.empty(0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="checkpoints must have shape .*save_checkpoints=True"):
        backward(torch.zeros_like(inputs["u"]), *inputs.values(), True, empty)


def test_set_isa_switches_the_kernels_that_run() -> None:
    """The AVX2 build fuses multiply-adds (FMA) and the generic one cannot, so their float32 results differ in the
    last bits: proof that set_isa changes the code that runs (each is checked against ref by the other tests)."""
    if not _has_avx2():
        pytest.skip("this CPU has no AVX2 + FMA")
    from defmamba_scan_cpu import isa as current_isa, set_isa

    inputs = cast_inputs(make_inputs(CASES[0]), torch.float32)
    inputs = {name: None if value is None else value.detach() for name, value in inputs.items()}
    before, outputs = current_isa(), {}
    try:
        for name in ISAS:
            set_isa(name)
            outputs[name] = selective_scan_fn(**inputs, delta_softplus=True, backend="cpu")
    finally:
        set_isa(before)
    assert not torch.equal(*outputs.values())


def test_unavailable_reason_names_the_build_command() -> None:
    assert "make kernels-cpu" in selective_scan_cpu.unavailable_reason()
    assert selective_scan_cpu.instruction_set() in ISAS


def test_the_scans_let_other_python_threads_run() -> None:
    """The kernel releases the GIL while it scans: a thread ticking every millisecond keeps ticking. Holding it, the
    thread would tick only between calls, about once per call."""
    case = ScanCase(batch=4, channels=48, length=3136, state_size=16, groups=3)
    inputs = make_inputs(case, dtype=torch.float32)
    leaves = [value for value in inputs.values() if value is not None]
    stop, ticks = threading.Event(), []

    def tick() -> None:
        while not stop.is_set():
            time.sleep(0.001)
            ticks.append(None)

    ticker = threading.Thread(target=tick)
    ticker.start()
    calls, start = 0, time.perf_counter()
    try:
        while time.perf_counter() - start < MIN_SCAN_SECONDS or calls < 2:
            y = selective_scan_fn(**inputs, delta_softplus=True, backend="cpu")
            torch.autograd.grad(y.sum(), leaves)  # the forward and the backward kernel
            calls += 1
    finally:
        stop.set()
        ticker.join()
    assert len(ticks) > 4 * calls + 20, (len(ticks), calls)
