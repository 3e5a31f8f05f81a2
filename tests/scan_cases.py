"""Selective-scan test cases shared by the backend test files: shapes, random inputs, and the comparison helpers.

A backend test builds inputs with :func:`make_inputs`, runs the backend and ``selective_scan_ref`` through
:func:`run_scan`, and compares every output with :func:`relative_error` (max |a - b| / max |b|). A model test that
runs ``backend="auto"`` on the CPU calls :func:`require_auto_cpu_kernel` so that it covers the C++ kernel.
"""
import math
import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import Tensor

from classification.ops.selective_scan import resolve_backend

INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")
# Tolerances of the issue: float64 against ref in float64, float32 against ref in float64 (relative errors).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
# Set to 1 on a machine that cannot build the C++ CPU kernel (`make test` builds it) to accept its absence.
ALLOW_NO_CPU_KERNEL_ENV = "DEFMAMBA_ALLOW_NO_CPU_KERNEL"


@dataclass(frozen=True)
class ScanCase:
    """One input configuration of the selective scan.

    Attributes:
        batch: Batch size.
        channels: G·D channels.
        length: Sequence length L.
        state_size: N.
        groups: G (B and C shared by each group of channels // groups channels).
        with_D: Pass a skip weight D.
        with_bias: Pass delta_bias.
        softplus: delta_softplus.
        flat_bc: Pass B and C as (batch, N, L) (needs groups == 1).
        noncontiguous: Pass every tensor as a non-contiguous view.
    """

    batch: int
    channels: int
    length: int
    state_size: int
    groups: int
    with_D: bool = True
    with_bias: bool = True
    softplus: bool = True
    flat_bc: bool = False
    noncontiguous: bool = False

    @property
    def id(self) -> str:
        flags = [
            name
            for name, on in (
                ("D", self.with_D),
                ("bias", self.with_bias),
                ("softplus", self.softplus),
                ("flatBC", self.flat_bc),
                ("noncontig", self.noncontiguous),
            )
            if on
        ]
        shape = f"b{self.batch}-c{self.channels}-L{self.length}-N{self.state_size}-G{self.groups}"
        return "-".join([shape] + flags)


CASES = (
    ScanCase(batch=2, channels=6, length=97, state_size=4, groups=3),
    ScanCase(batch=1, channels=4, length=1, state_size=3, groups=1),
    ScanCase(batch=1, channels=3, length=197, state_size=1, groups=1, flat_bc=True),
    ScanCase(batch=2, channels=6, length=16, state_size=5, groups=3, with_D=False, with_bias=False, softplus=False),
    ScanCase(batch=2, channels=4, length=33, state_size=2, groups=2, with_bias=False, noncontiguous=True),
    ScanCase(batch=3, channels=2, length=97, state_size=1, groups=1, with_D=False, softplus=False),
    ScanCase(batch=1, channels=6, length=40, state_size=16, groups=3, noncontiguous=True, with_D=False),
)


def _noncontiguous(t: Tensor) -> Tensor:
    """The same values as a non-contiguous view (every other element of a tensor twice as wide)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def make_inputs(
    case: ScanCase, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu", seed: int = 0
) -> dict[str, Tensor | None]:
    """Random inputs for `case`, leaf tensors that require grad (D, delta_bias None when the case leaves them out).

    Values are drawn in float64 on the CPU and then cast, so every dtype and device sees the same numbers. A lies
    in [-e^1, -e^-1]; delta is positive without softplus (so the state decays), standard normal with it.
    """
    gen = torch.Generator().manual_seed(seed)
    batch, channels, length, state_size, groups = (
        case.batch, case.channels, case.length, case.state_size, case.groups
    )

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    bc_shape = (batch, state_size, length) if case.flat_bc else (batch, groups, state_size, length)
    values = {
        "u": randn(batch, channels, length),
        "delta": randn(batch, channels, length) if case.softplus else 0.05 + 0.5 * rand(batch, channels, length),
        "A": -torch.exp(2 * rand(channels, state_size) - 1),
        "B": randn(*bc_shape),
        "C": randn(*bc_shape),
        "D": randn(channels) if case.with_D else None,
        "delta_bias": 0.5 * rand(channels) if case.with_bias else None,
    }
    inputs = {}
    for name, value in values.items():
        if value is None:
            inputs[name] = None
            continue
        value = value.to(device=device, dtype=dtype)
        if case.noncontiguous:
            value = _noncontiguous(value)
        inputs[name] = value.requires_grad_() if value.is_leaf else value.detach().requires_grad_()
    return inputs


def followed_by_nan(inputs: dict[str, Tensor | None], extra: int = 64) -> dict[str, Tensor | None]:
    """Copies of ``inputs`` (contiguous leaves that require grad), each stored at the start of a buffer whose
    following ``extra`` elements are NaN: a kernel that reads past an input's end (even under a mask, then multiplied
    by zero) gets NaN into its results."""
    out = {}
    for name, value in inputs.items():
        if value is None:
            out[name] = None
            continue
        buffer = torch.full((value.numel() + extra,), math.nan, dtype=value.dtype, device=value.device)
        out[name] = buffer[: value.numel()].view(value.shape).copy_(value.detach()).requires_grad_()
    return out


def cast_inputs(inputs: dict[str, Tensor | None], dtype: torch.dtype) -> dict[str, Tensor | None]:
    """Detached copies of `inputs` in `dtype` (same layout), as new leaves that require grad."""
    return {k: None if v is None else v.detach().to(dtype).requires_grad_() for k, v in inputs.items()}


def run_scan(
    fn: Callable[..., Tensor],
    inputs: dict[str, Tensor | None],
    delta_softplus: bool,
    grad_y: Tensor,
) -> tuple[Tensor, dict[str, Tensor]]:
    """y = fn(**inputs, delta_softplus=delta_softplus) and the gradient of <y, grad_y> for every input given.

    Pass e.g. ``functools.partial(selective_scan_fn, backend="torch")`` as `fn` to pick a backend.
    """
    y = fn(**inputs, delta_softplus=delta_softplus)
    leaves = {k: v for k, v in inputs.items() if v is not None}
    grads = torch.autograd.grad(y, list(leaves.values()), grad_y.to(device=y.device, dtype=y.dtype))
    return y, dict(zip(leaves, grads))


# The grad modes of run_in_grad_modes, and whether a backend's forward must keep residuals for a backward in each.
GRAD_MODES = ("no_grad", "inference_mode", "no_input_requires_grad", "grad")
KEEPS_RESIDUALS = (False, False, False, True)


def run_in_grad_modes(fn: Callable[..., Tensor], inputs: dict[str, Tensor | None],
                      delta_softplus: bool) -> list[Tensor]:
    """``fn(**inputs, delta_softplus=...)`` in each of GRAD_MODES, in that order (``inputs`` require grad). The
    ``grad`` run's output is the one still attached to the inputs."""
    detached = {k: None if v is None else v.detach() for k, v in inputs.items()}
    with torch.no_grad():
        outputs = [fn(**inputs, delta_softplus=delta_softplus)]
    with torch.inference_mode():
        outputs.append(fn(**inputs, delta_softplus=delta_softplus).clone())
    outputs.append(fn(**detached, delta_softplus=delta_softplus))
    outputs.append(fn(**inputs, delta_softplus=delta_softplus))
    return outputs


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected| in float64 (absolute error when expected is all zeros)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().item()
    return (actual - expected).abs().max().item() / (scale if scale > 0 else 1.0)


def require_auto_cpu_kernel() -> None:
    """Fails the calling test unless ``auto`` on CPU tensors picks the C++ ``cpu`` kernel, as it does after
    ``make test`` (which builds it); with DEFMAMBA_ALLOW_NO_CPU_KERNEL=1 it lets ``auto`` run its fallback."""
    chosen = resolve_backend("auto", "cpu")
    if chosen != "cpu" and os.environ.get(ALLOW_NO_CPU_KERNEL_ENV) != "1":
        pytest.fail(f"backend 'auto' on the CPU runs {chosen!r}, not the C++ kernel 'cpu' (`make test` builds it; set "
                    f"{ALLOW_NO_CPU_KERNEL_ENV}=1 to accept the fallback)", pytrace=False)


# ------------------------------------------------------------------------------- elementwise precision probes
# Scans whose outputs are exactly a kernel's own softplus, its derivative and exp (B = C = u = 1, the state starting at
# 0): y = softplus(delta) and d<y, 1>/d delta = sigmoid(delta) after one step; with dt = 1 and u = (1, 0), y at the
# second step is exp(A). Points on both sides of the softplus threshold (20), tiny softplus values, strong decay.
SOFTPLUS_PROBE_POINTS = (-30.0, -20.0, -5.0, -1e-3, 0.0, 0.5, 3.0, 8.5, 12.0, 15.0, 17.5, 19.9, 20.5, 30.0)
EXP_PROBE_POINTS = (-80.0, -30.0, -10.0, -1.0, -0.1, -1e-4, 0.0)
FLOAT32_MANTISSA_BITS = 24
# A GPU's fast float32 exp (CUDA's __expf, Triton's tl.exp: ex2.approx of x * log2(e) rounded to float) is within
# 2 + 1.173 |x| ulp of exp(x) (CUDA's documented bound); the kernels use it for the decays exp(dt * A) only.
FAST_EXP_ULPS_PER_UNIT = 1.173
ScanRun = Callable[[dict, bool, Tensor], tuple[Tensor, dict[str, Tensor]]]  # (inputs, softplus, grad_y) -> y, grads


def _probe_inputs(delta: Tensor, A: Tensor, u: Tensor, dtype: torch.dtype, device: str | torch.device) -> dict:
    ones = torch.ones(1, 1, 1, u.shape[-1], dtype=torch.float64)  # B and C: (batch, groups = 1, N = 1, L)
    values = {"u": u, "delta": delta, "A": A, "B": ones, "C": ones.clone(), "D": None, "delta_bias": None}
    return {name: None if v is None else v.to(device=device, dtype=dtype).requires_grad_() for name, v in
            values.items()}


def float32_ulps(actual: Tensor, exact: Tensor) -> Tensor:
    """|actual - exact| in units of float32's last place at ``exact`` (float64, nonzero, normal float32 range)."""
    exact = exact.double().cpu()
    _, exponent = torch.frexp(exact)
    return (actual.detach().double().cpu() - exact).abs() / torch.ldexp(torch.ones_like(exact),
                                                                         exponent - FLOAT32_MANTISSA_BITS)


def elementwise_errors(scan: ScanRun, dtype: torch.dtype, device: str | torch.device = "cpu",
                       fast_exp: bool = False) -> dict[str, float]:
    """The largest error of the scan's softplus, softplus derivative and exp over the probe points: in float32 ULPs
    for float32, relative for float64 (each point against its own exact value, not the largest). With ``fast_exp``
    (a GPU kernel's float32 decays), the exp's ULPs are counted beyond the fast exp's :data:`FAST_EXP_ULPS_PER_UNIT`
    x |x|."""
    points = torch.tensor(SOFTPLUS_PROBE_POINTS, dtype=torch.float64)
    channels = len(points)
    inputs = _probe_inputs(points.view(1, channels, 1), -torch.ones(channels, 1), torch.ones(1, channels, 1), dtype,
                           device)
    y, grads = scan(inputs, True, torch.ones(1, channels, 1, dtype=torch.float64))
    exact = points.clone().requires_grad_()
    softplus = torch.nn.functional.softplus(exact)  # x itself above its threshold, so its derivative is 1 there
    outputs = {"softplus": (y.flatten(), softplus.detach()),
               "sigmoid": (grads["delta"].flatten(), torch.autograd.grad(softplus.sum(), exact)[0])}
    exponents = torch.tensor(EXP_PROBE_POINTS, dtype=torch.float64)
    channels = len(exponents)
    u = torch.tensor([1.0, 0.0], dtype=torch.float64).expand(1, channels, 2)
    inputs = _probe_inputs(torch.ones(1, channels, 2), exponents.view(channels, 1), u, dtype, device)
    y, _ = scan(inputs, False, torch.ones(1, channels, 2, dtype=torch.float64))
    outputs["exp"] = (y[0, :, 1], exponents.exp())
    if dtype == torch.float32:
        ulps = {name: float32_ulps(actual, exact) for name, (actual, exact) in outputs.items()}
        if fast_exp:
            ulps["exp"] = ulps["exp"] - FAST_EXP_ULPS_PER_UNIT * exponents.abs()
        return {name: errors.max().item() for name, errors in ulps.items()}
    return {name: ((actual.detach().double().cpu() - exact) / exact).abs().max().item()
            for name, (actual, exact) in outputs.items()}
