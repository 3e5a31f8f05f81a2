"""CPU backend of the selective scan: the C++ extension ``defmamba_scan_cpu`` (``kernels/selective_scan/csrc/cpu``).

Backend contract (see ``selective_scan.py``): ``is_available()``, ``unavailable_reason()`` and
``scan(u, delta, A, B, C, D, delta_bias, delta_softplus)`` on canonical inputs::

    u, delta      (batch, G * D, L)     float32 or float64 (half inputs are upcast by the dispatcher)
    A             (G * D, N)
    B, C          (batch, G, N, L)      channel c uses group c // D
    D, delta_bias (G * D) or None
    returns y     (batch, G * D, L)     in the input dtype

The forward runs one task per (batch, channel) and keeps the N states in registers (float32 with N = 16: two
8-lane vectors, AVX2 + FMA when the CPU has them, chosen at run time). When a gradient is needed it also saves the
state every ``defmamba_scan_cpu.CHUNK`` (64) steps; the backward recomputes each chunk's states from them (no
(L, N) buffer per channel is ever stored) and sums dB, dC over a group's channels in a fixed order, so results are
bitwise independent of the thread count (``torch.set_num_threads``). float32 uses its own exp and softplus (a few
ulp); float64 uses the library's (the exact path, for tests).
"""
import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .selective_scan import NUM_TENSOR_INPUTS, refuse_double_backward, residuals_needed

try:
    import defmamba_scan_cpu as _extension

    _IMPORT_ERROR = ""
except ImportError as error:  # the backend reports itself unavailable
    _extension = None
    _IMPORT_ERROR = str(error)

ACCEPTS_HALF_INPUTS = False
BUILD_COMMAND = (
    "`make kernels-cpu` (SELECTIVE_SCAN_CUDA=0 .venv/bin/pip install --no-build-isolation ./kernels/selective_scan)"
)


def is_available() -> bool:
    """True when the extension ``defmamba_scan_cpu`` is importable."""
    return _extension is not None


def unavailable_reason() -> str:
    """One line saying why the backend is unavailable and how to build it."""
    return f"the C++ extension defmamba_scan_cpu is not built ({_IMPORT_ERROR}); build it with {BUILD_COMMAND}"


def instruction_set() -> str:
    """The instruction set the kernels run with on this CPU: ``avx2`` or ``generic``."""
    if _extension is None:
        raise RuntimeError(f"selective scan backend 'cpu' is unavailable: {unavailable_reason()}")
    return _extension.isa()


class _SelectiveScanCpu(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        delta_bias: Tensor | None,
        delta_softplus: bool,
        save_checkpoints: bool,
    ) -> Tensor:
        y, checkpoints = _extension.forward(u, delta, A, B, C, D, delta_bias, delta_softplus, save_checkpoints)
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, checkpoints)
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        refuse_double_backward("cpu")
        u, delta, A, B, C, D, delta_bias, checkpoints = ctx.saved_tensors
        grads = _extension.backward(grad_y, u, delta, A, B, C, D, delta_bias, ctx.delta_softplus, checkpoints)
        needed = ctx.needs_input_grad[:NUM_TENSOR_INPUTS]
        return tuple(g if need else None for g, need in zip(grads, needed)) + (None, None)  # the two flags


def scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> Tensor:
    """The selective scan on CPU tensors (layouts in the module docstring), differentiable in every tensor input.

    Raises:
        RuntimeError: the extension is not built (the message says how to build it), or the inputs are malformed
            (the extension's check names the tensor, the shape it got and the shape it needs).
    """
    if _extension is None:
        raise RuntimeError(f"selective scan backend 'cpu' is unavailable: {unavailable_reason()}")
    save_checkpoints = residuals_needed(u, delta, A, B, C, D, delta_bias)
    return _SelectiveScanCpu.apply(u, delta, A, B, C, D, delta_bias, delta_softplus, save_checkpoints)
