"""Selective scan: every backend against the reference (y and all seven gradients), the reference against a closed
form, gradchecks, dtype policy, backend dispatch, long-sequence stability and the input checks."""
import functools
import logging
import math
import types

import pytest
import torch
from torch import Tensor

from classification.ops import selective_scan as ss
from classification.ops import available_backends, resolve_backend, selective_scan_fn, selective_scan_ref
from scan_cases import CASES, INPUT_NAMES, TOLERANCE, ScanCase, cast_inputs, followed_by_nan, make_inputs
from scan_cases import relative_error, run_scan

ALWAYS_AVAILABLE = ("ref", "torch")


def closed_form_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """The scan unrolled: h_t = sum_{s<=t} exp(sum_{s<r<=t} dt_r A) dt_s B_s u_s, in float64 (small L only).

    Independent of both implementations: no recurrence, an (L, L) matrix of decays per channel and state.
    """
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    channels, length = u.shape[1], u.shape[2]
    per_group = channels // B.shape[1]
    B = B.repeat_interleave(per_group, dim=1)  # (batch, channels, N, L)
    C = C.repeat_interleave(per_group, dim=1)
    dt = delta + delta_bias[:, None] if delta_bias is not None else delta
    if delta_softplus:
        dt = torch.where(dt > 20, dt, torch.log1p(torch.exp(dt)))
    log_decay = torch.cumsum(dt[:, :, None, :] * A[None, :, :, None], dim=-1)  # (batch, channels, N, L)
    causal = torch.ones(length, length, dtype=torch.bool).tril()  # [t, s]: s <= t
    exponent = (log_decay[..., :, None] - log_decay[..., None, :]).masked_fill(~causal, -math.inf)
    h = torch.einsum("bcnts,bcns->bcnt", torch.exp(exponent), dt[:, :, None, :] * B * u[:, :, None, :])
    y = (h * C).sum(2)
    return y + D[:, None] * u if D is not None else y


def _device_for(backend: str) -> str:
    return "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"


def _require(backend: str, device: str) -> None:
    """Skips a compiled backend that cannot run here (with the reason); ref and torch must always run."""
    if backend in ALWAYS_AVAILABLE:
        return
    try:
        resolve_backend(backend, device)
    except RuntimeError as error:
        pytest.skip(str(error))


def _grad_y(case: ScanCase) -> Tensor:
    return torch.randn(case.batch, case.channels, case.length, generator=torch.Generator().manual_seed(1)).double()


def _assert_close(actual: tuple[Tensor, dict], expected: tuple[Tensor, dict], tolerance: float) -> None:
    y, grads = actual
    y_expected, grads_expected = expected
    assert relative_error(y, y_expected) < tolerance, "y"
    assert grads.keys() == grads_expected.keys()
    for name, grad in grads.items():
        assert grad.shape == grads_expected[name].shape, name
        assert relative_error(grad, grads_expected[name]) < tolerance, f"grad of {name}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_ref_matches_closed_form(case):
    inputs = make_inputs(case)
    expected = run_scan(closed_form_scan, cast_inputs(inputs, torch.float64), case.softplus, _grad_y(case))
    _assert_close(run_scan(selective_scan_ref, inputs, case.softplus, _grad_y(case)), expected, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@pytest.mark.parametrize("backend", ss.BACKENDS)
def test_backend_matches_reference(backend, case, dtype):
    """y and every gradient against ref in float64 (against the closed form when testing ref itself)."""
    device = _device_for(backend)
    _require(backend, device)
    if backend == "triton" and device == "cpu" and case.length > 1:
        pytest.skip("Triton interpreter without CUDA takes seconds per case: L = 1 only here, the rest in its own file")
    inputs = make_inputs(case, dtype, device)
    y, grads = run_scan(functools.partial(selective_scan_fn, backend=backend), inputs, case.softplus, _grad_y(case))
    assert y.dtype == dtype and y.device.type == device
    assert len(grads) == 5 + case.with_D + case.with_bias
    for name, grad in grads.items():
        assert grad.dtype == dtype, name
    reference = closed_form_scan if backend == "ref" else selective_scan_ref
    cpu64 = {k: None if v is None else v.detach().cpu().double().requires_grad_() for k, v in inputs.items()}
    expected = run_scan(reference, cpu64, case.softplus, _grad_y(case))
    _assert_close((y, grads), expected, TOLERANCE[dtype])


@pytest.mark.parametrize(
    "case",
    [
        ScanCase(batch=2, channels=4, length=23, state_size=2, groups=2),  # chunks of 9, 9 and 5 (padded to 6)
        ScanCase(batch=1, channels=3, length=50, state_size=1, groups=1, with_bias=False),
        ScanCase(batch=1, channels=2, length=30, state_size=3, groups=1, softplus=False, with_D=False),
    ],
    ids=lambda c: c.id,
)
@pytest.mark.parametrize("blocked", [True, False], ids=["blocked", "stepwise"])
def test_torch_backend_chunking(monkeypatch, case, blocked):
    """Small chunks force carries between chunks, the blocked scan, and a padded last chunk."""
    width = case.batch * case.channels * case.state_size
    monkeypatch.setitem(ss.CHUNK_ELEMENTS, "cpu", 9 * width)
    monkeypatch.setattr(ss, "BLOCKED_SCAN_MIN_STEPS", 4 if blocked else 10**9)
    assert ss._chunk_plan(case.length, width, torch.device("cpu")) == ((9, 3) if blocked else (9, 9))
    inputs = make_inputs(case)
    actual = run_scan(functools.partial(selective_scan_fn, backend="torch"), inputs, case.softplus, _grad_y(case))
    _assert_close(actual, run_scan(selective_scan_ref, inputs, case.softplus, _grad_y(case)), 1e-10)


def test_torch_backend_budget_of_no_whole_number_of_blocks(monkeypatch):
    """A budget of 10 steps with blocks of 3 steps: chunks of whole blocks, y and every gradient still ref's."""
    case = ScanCase(batch=2, channels=4, length=23, state_size=2, groups=2)
    monkeypatch.setitem(ss.CHUNK_ELEMENTS, "cpu", 10 * case.batch * case.channels * case.state_size)
    monkeypatch.setattr(ss, "BLOCKED_SCAN_MIN_STEPS", 4)
    inputs = make_inputs(case)
    actual = run_scan(functools.partial(selective_scan_fn, backend="torch"), inputs, case.softplus, _grad_y(case))
    _assert_close(actual, run_scan(selective_scan_ref, inputs, case.softplus, _grad_y(case)), 1e-10)


@pytest.mark.parametrize(
    "backend, chunk_elements",
    [("ref", None), ("torch", None), ("torch", 4 * 4 * 2)],
    ids=["ref", "torch", "torch-chunked"],
)
def test_gradcheck(monkeypatch, backend, chunk_elements):
    if chunk_elements is not None:  # chunks of 4 steps, blocks of 2, the last chunk padded from 3 to 4 steps
        monkeypatch.setitem(ss.CHUNK_ELEMENTS, "cpu", chunk_elements)
        monkeypatch.setattr(ss, "BLOCKED_SCAN_MIN_STEPS", 4)
    case = ScanCase(batch=1, channels=4, length=7, state_size=2, groups=2)
    inputs = make_inputs(case, seed=3)
    order = [inputs[name] for name in INPUT_NAMES]
    fn = functools.partial(selective_scan_fn, delta_softplus=True, backend=backend)
    assert torch.autograd.gradcheck(fn, order, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", ["auto", *ALWAYS_AVAILABLE])
def test_half_inputs_compute_in_float32(backend, half):
    case = CASES[0]
    inputs = make_inputs(case, half)
    y, grads = run_scan(functools.partial(selective_scan_fn, backend=backend), inputs, case.softplus, _grad_y(case))
    assert y.dtype == torch.float32
    assert all(grad.dtype == half for grad in grads.values())
    expected_y, expected_grads = run_scan(selective_scan_ref, cast_inputs(inputs, torch.float64), True, _grad_y(case))
    assert relative_error(y, expected_y) < TOLERANCE[torch.float32]
    grad_tolerance = 4 * torch.finfo(half).eps  # the float32 gradients are rounded to the input dtype
    for name, grad in grads.items():
        assert relative_error(grad, expected_grads[name]) < grad_tolerance, name


@pytest.mark.parametrize("empty", ["batch", "channels"])
@pytest.mark.parametrize("backend", ["auto", *available_backends("cpu")])
def test_no_sequences_give_an_empty_output_and_zero_gradients(backend, empty):
    batch, channels, length, state_size = (0, 4, 5, 2) if empty == "batch" else (2, 0, 5, 2)
    inputs = {
        "u": torch.randn(batch, channels, length), "delta": torch.randn(batch, channels, length),
        "A": -torch.rand(channels, state_size), "B": torch.randn(batch, 1, state_size, length),
        "C": torch.randn(batch, 1, state_size, length), "D": torch.randn(channels), "delta_bias": torch.randn(channels),
    }
    inputs = {name: t.requires_grad_() for name, t in inputs.items()}
    y = selective_scan_fn(**inputs, delta_softplus=True, backend=backend)
    assert y.shape == (batch, channels, length)
    grads = torch.autograd.grad(y.sum(), list(inputs.values()), allow_unused=True)
    for (name, t), grad in zip(inputs.items(), grads):
        assert grad is None or (grad.shape == t.shape and not grad.any()), name


@pytest.mark.parametrize("backend", ss.BACKENDS)
def test_nothing_past_the_inputs_is_read(backend):
    """NaN stored right after every input reaches neither y nor a gradient: the padded steps of a ragged last chunk
    (L = 13 is no multiple of any backend's chunk) and padded lanes read nothing beyond the inputs' ends."""
    device = _device_for(backend)
    _require(backend, device)
    case = ScanCase(batch=1, channels=6, length=13, state_size=2, groups=3)
    inputs = followed_by_nan(make_inputs(case, device=device))
    actual = run_scan(functools.partial(selective_scan_fn, backend=backend), inputs, case.softplus, _grad_y(case))
    expected = run_scan(selective_scan_ref, cast_inputs(inputs, torch.float64), case.softplus, _grad_y(case))
    _assert_close(actual, expected, TOLERANCE[torch.float64])


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_double_backward_is_refused_except_on_ref(backend):
    """Kernel backward passes are not differentiable: create_graph=True must fail loudly, never give a silent zero."""
    case = CASES[0]
    inputs = make_inputs(case)
    y = selective_scan_fn(**inputs, delta_softplus=True, backend=backend)
    leaves = [t for t in inputs.values() if t is not None]
    if backend == "ref":
        (grad_u,) = torch.autograd.grad(y.square().sum(), inputs["u"], create_graph=True)
        (second,) = torch.autograd.grad(grad_u.sum(), inputs["delta"])
        assert second.abs().max() > 0
        return
    with pytest.raises(RuntimeError, match=f"backend '{backend}' has first-order gradients only"):
        torch.autograd.grad(y.square().sum(), leaves, create_graph=True)

def test_long_sequence_strong_decay_is_stable():
    """L = 3000 with per-step decays from exp(-0.01) down to exp(-200): float32 torch agrees with float64 ref."""
    batch, channels, length, state_size = 1, 4, 3000, 4
    gen = torch.Generator().manual_seed(5)
    log_rates = torch.linspace(math.log(0.01), math.log(20.0), channels * state_size, dtype=torch.float64)
    inputs = {
        "u": torch.randn(batch, channels, length, generator=gen, dtype=torch.float64),
        "delta": torch.randn(batch, channels, length, generator=gen, dtype=torch.float64) + 1.0,
        "A": -torch.exp(log_rates).view(channels, state_size),
        "B": torch.randn(batch, 1, state_size, length, generator=gen, dtype=torch.float64),
        "C": torch.randn(batch, 1, state_size, length, generator=gen, dtype=torch.float64),
        "D": None,
        "delta_bias": None,
    }
    inputs = cast_inputs(inputs, torch.float64)
    grad_y = torch.randn(batch, channels, length, generator=gen, dtype=torch.float64)
    expected = run_scan(selective_scan_ref, inputs, True, grad_y)
    torch_fn = functools.partial(selective_scan_fn, backend="torch")
    actual32 = run_scan(torch_fn, cast_inputs(inputs, torch.float32), True, grad_y)
    assert torch.isfinite(actual32[0]).all()
    _assert_close(actual32, expected, TOLERANCE[torch.float32])
    _assert_close(run_scan(torch_fn, inputs, True, grad_y), expected, TOLERANCE[torch.float64])


# --------------------------------------------------------------------------------------------------- dispatch


def _fake_kernel(available: bool = True, accepts_half: bool = False) -> types.SimpleNamespace:
    """A stand-in compiled backend that records the dtypes it receives and computes with ref."""
    received = []

    def scan(u, delta, A, B, C, D, delta_bias, delta_softplus):
        received.append((u.dtype, A.dtype))
        assert B.dim() == 4 and C.dim() == 4
        return selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus).to(torch.float32)

    return types.SimpleNamespace(
        is_available=lambda: available,
        unavailable_reason=lambda: "not built; run `make kernels`",
        scan=scan,
        ACCEPTS_HALF_INPUTS=accepts_half,
        received=received,
    )


def test_auto_prefers_the_cpu_kernel_when_built():
    expected = "cpu" if "cpu" in available_backends("cpu") else "torch"
    assert resolve_backend("auto", "cpu") == expected
    backends = available_backends("cpu")
    assert backends[0] == expected and {"torch", "ref"} <= set(backends)


@pytest.mark.parametrize(
    "cuda, triton, expected",
    [(True, True, "cuda"), (False, True, "triton"), (False, False, "torch"), (None, None, "torch")],
)
def test_auto_order_on_cuda(monkeypatch, cuda, triton, expected):
    modules = {"cpu": None}
    for name, available in (("cuda", cuda), ("triton", triton)):
        modules[name] = None if available is None else _fake_kernel(available)
    monkeypatch.setattr(ss, "kernel_module", modules.get)
    assert resolve_backend("auto", "cuda") == expected
    assert available_backends("cuda") == [n for n in ("cuda", "triton") if modules[n] and modules[n].is_available()] + [
        "torch",
        "ref",
    ]


@pytest.mark.parametrize(
    "accepts_half, float32_weights, received",
    [
        (False, False, (torch.float32, torch.float32)),
        (False, True, (torch.float32, torch.float32)),
        (True, False, (torch.float16, torch.float32)),
        (True, True, (torch.float16, torch.float32)),  # autocast: half projections next to float32 parameters
    ],
)
def test_kernel_dispatch_and_half_policy(monkeypatch, accepts_half, float32_weights, received):
    kernel = _fake_kernel(accepts_half=accepts_half)
    monkeypatch.setattr(ss, "kernel_module", {"cpu": kernel}.get)
    case = ScanCase(batch=1, channels=2, length=5, state_size=3, groups=1, flat_bc=True)
    inputs = make_inputs(case, torch.float16)
    if float32_weights:
        inputs.update({name: inputs[name].float() for name in ("A", "D", "delta_bias")})
    y = selective_scan_fn(**inputs, delta_softplus=True, backend="auto")
    assert kernel.received == [received]  # (dtype of u, delta, B, C; dtype of A, D, delta_bias)
    assert y.dtype == torch.float32
    expected = selective_scan_ref(**cast_inputs(inputs, torch.float64), delta_softplus=True)
    assert relative_error(y, expected) < 1e-4


def test_auto_on_cuda_warns_once_with_the_reason_and_the_build_command(monkeypatch, caplog):
    ss._warn_slower_backend.cache_clear()
    reason = "the CUDA extension is not built; build it with `make kernels`"
    cuda = types.SimpleNamespace(is_available=lambda: False, unavailable_reason=lambda: reason)
    monkeypatch.setattr(ss, "kernel_module", {"cuda": cuda, "triton": _fake_kernel()}.get)
    with caplog.at_level(logging.WARNING, logger=ss.__name__):
        assert [resolve_backend("auto", "cuda") for _ in range(3)] == ["triton"] * 3
        assert resolve_backend("triton", "cuda") == "triton"  # forced: no warning
        assert resolve_backend("auto", "cpu") in ("cpu", "torch")  # the CPU fallback is expected: no warning
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == [f"selective scan: backend='auto' on cuda tensors runs 'triton', slower than 'cuda': "
                        f"backend 'cuda' is unavailable: {reason}"]
    ss._warn_slower_backend.cache_clear()


def test_unavailable_backends_raise_with_the_reason(monkeypatch):
    case = CASES[1]
    inputs = make_inputs(case)
    monkeypatch.setattr(ss, "kernel_module", {"cpu": _fake_kernel(available=False)}.get)
    with pytest.raises(RuntimeError, match=r"backend 'cpu' is unavailable: not built; run `make kernels`"):
        selective_scan_fn(**inputs, backend="cpu")
    assert resolve_backend("auto", "cpu") == "torch"
    monkeypatch.setattr(ss, "kernel_module", {}.get)
    with pytest.raises(RuntimeError, match=r"backend 'cpu' is not installed \(no module .*selective_scan_cpu\)"):
        selective_scan_fn(**inputs, backend="cpu")
    with pytest.raises(RuntimeError, match=r"backend 'cuda' runs on cuda tensors, not cpu"):
        selective_scan_fn(**inputs, backend="cuda")
    with pytest.raises(ValueError, match=r"backend: got 'fast', need one of \('auto', 'ref'"):
        selective_scan_fn(**inputs, backend="fast")
    with pytest.raises(ValueError, match=r"selective_scan_ref only computes backend 'ref', got 'torch'"):
        selective_scan_ref(**inputs, backend="torch")


def test_missing_kernel_module_reads_as_not_installed():
    assert ss.kernel_module("no_such_backend") is None


def test_auto_on_cuda_warns_only_when_it_falls_back(monkeypatch, caplog):
    """No warning when `cuda` runs; falling back to `torch` (no GPU kernel at all) warns with cuda's reason."""
    ss._warn_slower_backend.cache_clear()
    monkeypatch.setattr(ss, "kernel_module", {"cuda": _fake_kernel(), "triton": _fake_kernel()}.get)
    with caplog.at_level(logging.WARNING, logger=ss.__name__):
        assert resolve_backend("auto", "cuda") == "cuda"
    assert not [record for record in caplog.records if record.levelno == logging.WARNING]
    monkeypatch.setattr(ss, "kernel_module", {}.get)
    with caplog.at_level(logging.WARNING, logger=ss.__name__):
        assert resolve_backend("auto", "cuda") == "torch"
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warnings == ["selective scan: backend='auto' on cuda tensors runs 'torch', slower than 'cuda': backend "
                        "'cuda' is not installed (no module classification.ops.selective_scan_cuda)"]
    ss._warn_slower_backend.cache_clear()


def test_other_device_types_run_torch_first():
    """A device type without an auto order (here meta) gets `torch`, and lists it before `ref`."""
    assert resolve_backend("auto", "meta") == "torch"
    assert available_backends("meta") == ["torch", "ref"]


def test_a_kernel_returning_half_still_gives_a_float32_y(monkeypatch):
    kernel = _fake_kernel(accepts_half=True)
    float32_scan = kernel.scan
    kernel.scan = lambda *args: float32_scan(*args).half()
    monkeypatch.setattr(ss, "kernel_module", {"cpu": kernel}.get)
    case = ScanCase(batch=1, channels=2, length=5, state_size=3, groups=1)
    inputs = make_inputs(case, torch.float16)
    y = selective_scan_fn(**inputs, delta_softplus=True, backend="cpu")
    assert y.dtype == torch.float32
    expected = selective_scan_ref(**cast_inputs(inputs, torch.float64), delta_softplus=True)
    assert relative_error(y, expected) < 4 * torch.finfo(torch.float16).eps


def test_a_kernel_module_missing_a_dependency_raises(monkeypatch):
    """Only the kernel module itself being absent reads as "not installed"; a module it imports that is missing (here
    triton) is an error of the installation, raised as such."""
    def import_module(name):
        raise ModuleNotFoundError("No module named 'triton'", name="triton")

    monkeypatch.setattr(ss.importlib, "import_module", import_module)
    with pytest.raises(ModuleNotFoundError, match="No module named 'triton'"):
        ss.kernel_module.__wrapped__("triton")  # the uncached function


@pytest.mark.parametrize("width", [1, 7, 640, 4095, 4096, 5000])
@pytest.mark.parametrize("length", [1, 63, 64, 100, 3137, 10**6])
def test_chunk_plan_fills_the_budget_in_whole_blocks(width, length):
    """A chunk holds as many steps as the CPU budget allows (all of L when it fits), rounded down to whole blocks of
    about sqrt(chunk) steps; states of 4096 elements or more per step, and chunks under 64 steps, are one block."""
    budget = ss.CHUNK_ELEMENTS["cpu"]
    chunk, block_len = ss._chunk_plan(length, width, torch.device("cpu"))
    fitting = min(length, budget // width)  # steps the budget holds (all widths here fit one step)
    assert chunk % block_len == 0 and fitting - block_len < chunk <= fitting
    if width >= 4096 or fitting < 64:
        assert block_len == chunk == fitting
    else:
        assert block_len ** 2 <= fitting < (block_len + 1) ** 2


# --------------------------------------------------------------------------------------------------- input checks


def _good() -> dict[str, Tensor]:
    batch, channels, length, state_size, groups = 2, 6, 5, 4, 3
    return {
        "u": torch.randn(batch, channels, length),
        "delta": torch.rand(batch, channels, length),
        "A": -torch.rand(channels, state_size),
        "B": torch.randn(batch, groups, state_size, length),
        "C": torch.randn(batch, groups, state_size, length),
        "D": torch.randn(channels),
        "delta_bias": torch.randn(channels),
    }


BAD_INPUTS = [
    ("u", torch.randn(2, 6), r"u: got shape \(2, 6\), need \(batch, channels, length\)"),
    ("u", torch.randn(2, 6, 0), r"u: got shape \(2, 6, 0\), need a sequence length L >= 1"),
    ("delta", torch.randn(2, 6, 4), r"delta: got shape \(2, 6, 4\), need \(2, 6, 5\) \(the shape of u\)"),
    ("A", torch.randn(6, 4, 1), r"A: got shape \(6, 4, 1\), need \(6, N\) with N >= 1"),
    ("A", torch.randn(5, 4), r"A: got shape \(5, 4\), need \(6, N\)"),
    ("A", torch.randn(6, 0), r"A: got shape \(6, 0\), need \(6, N\) with N >= 1"),
    ("B", torch.randn(2, 3, 4, 7), r"B: got shape \(2, 3, 4, 7\), need \(batch=2, groups, N=4, L=5\)"),
    ("B", torch.randn(2, 3, 5), r"B: got shape \(2, 3, 5\), need .* or \(2, 4, 5\) for one group"),
    ("B", torch.randn(2, 4, 4, 5), r"B: got shape \(2, 4, 4, 5\) with 4 groups, which do not divide the 6 ch"),
    ("B", torch.randn(2, 0, 4, 5), r"B: got shape \(2, 0, 4, 5\) with 0 groups, which do not divide the 6 ch"),
    ("C", torch.randn(2, 1, 4, 5), r"C: got shape \(2, 1, 4, 5\), need \(2, 3, 4, 5\) \(the groups of B, 3\)"),
    ("D", torch.randn(3), r"D: got shape \(3,\), need \(6,\) \(one value per channel of u\)"),
    ("delta_bias", torch.randn(6, 1), r"delta_bias: got shape \(6, 1\), need \(6,\)"),
    ("u", torch.ones(2, 6, 5, dtype=torch.int64), r"u: expected a floating dtype, got torch.int64"),
    ("A", torch.randn(6, 4, device="meta"), r"A: on device meta, but u is on cpu; all inputs need one device"),
    ("delta_softplus", "False", r"delta_softplus: expected True or False, got 'False'"),  # a truthy string
    ("delta_softplus", None, r"delta_softplus: expected True or False, got None"),
]


@pytest.mark.parametrize("name, value, message", BAD_INPUTS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_INPUTS)])
@pytest.mark.parametrize("fn", [selective_scan_ref, selective_scan_fn], ids=["ref", "fn"])
def test_bad_inputs_raise_value_error(fn, name, value, message):
    inputs = _good()
    inputs[name] = value
    with pytest.raises(ValueError, match=message):
        fn(**inputs)
