"""CUDA backend of the selective scan: our extension ``defmamba_scan_cuda`` (kernels/selective_scan/csrc/cuda).

Backend contract (see ``selective_scan.py``): ``is_available()``, ``unavailable_reason()`` and
``scan(u, delta, A, B, C, D, delta_bias, delta_softplus)`` on canonical inputs::

    u, delta      (batch, G * D, L)   float32, float64, float16 or bfloat16 (half inputs are read natively)
    A             (G * D, N)          N <= 32
    B, C          (batch, G, N, L)    channel c uses group c // D
    D, delta_bias (G * D) or None
    returns y     (batch, G * D, L)   float64 for float64 inputs, float32 otherwise

The state is float32 (float64 for float64 inputs). The backward's dB/dC sums over the channels of a group use float
atomics, or, when ``torch.are_deterministic_algorithms_enabled()``, per-block partials reduced in a fixed order
(bitwise reproducible, slightly more memory traffic).
"""
import functools
import importlib
import logging

import torch

from .selective_scan import refuse_double_backward, residuals_needed

logger = logging.getLogger(__name__)

EXTENSION = "defmamba_scan_cuda"
ACCEPTS_HALF_INPUTS = True
MAKE_TARGET = "make kernels"  # builds for TORCH_CUDA_ARCH_LIST, else kernels/selective_scan/setup.py's default
_HALF_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _extension():
    """The compiled extension module, or None when it is not built (or cannot load)."""
    try:
        return importlib.import_module(EXTENSION)
    except ImportError as error:
        logger.debug("%s not importable: %s", EXTENSION, error)
        return None


def is_available() -> bool:
    """True when the compiled extension imports (whether a GPU is present is the caller's concern)."""
    return _extension() is not None


def build_command(arch_list: str) -> str:
    """The command that builds the extension for the compute capabilities ``arch_list`` (``"9.0"``, ``"8.0;9.0"``)."""
    return (f"CUDA_HOME=/usr/local/cuda TORCH_CUDA_ARCH_LIST='{arch_list}' SELECTIVE_SCAN_CUDA=1 "
            ".venv/bin/pip install --no-build-isolation ./kernels/selective_scan")


def unavailable_reason() -> str:
    """One line saying why the backend is unavailable and how to build it (for this GPU when one is visible)."""
    if torch.cuda.is_available():
        how = f"`{build_command('%d.%d' % torch.cuda.get_device_capability())}` (this GPU's architecture)"
    else:
        how = (f"`{MAKE_TARGET}`, or `{build_command('X.Y')}` with X.Y your GPU's compute capability (8.0 for A100, "
               "9.0 for H100)")
    return f"the CUDA extension {EXTENSION} is not built; build it with {how}"


def _input_dtype(u: torch.Tensor, delta: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.dtype:
    """The one dtype the kernel reads u, delta, B, C in: shared half dtypes stay, float64 wins, otherwise float32."""
    dtypes = {u.dtype, delta.dtype, B.dtype, C.dtype}
    if torch.float64 in dtypes:
        return torch.float64
    if len(dtypes) == 1 and dtypes <= set(_HALF_DTYPES):
        return u.dtype
    return torch.float32


class _CudaScanFn(torch.autograd.Function):
    """Selective scan with the CUDA forward and backward kernels (inputs already cast and contiguous)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus: bool, save_states: bool):
        y, states = _extension().fwd(u, delta, A, B, C, D, delta_bias, delta_softplus, save_states)
        ctx.delta_softplus = delta_softplus
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, states)
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward("cuda")
        u, delta, A, B, C, D, delta_bias, states = ctx.saved_tensors
        deterministic = torch.are_deterministic_algorithms_enabled()
        grads = _extension().bwd(
            u, delta, A, B, C, D, delta_bias, dy.to(A.dtype).contiguous(), states, ctx.delta_softplus, deterministic
        )
        return (*grads, None, None)  # the two flags


def scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
) -> torch.Tensor:
    """Grouped selective scan with the CUDA kernels.

    Args:
        u: (batch, G * D, L) input on a CUDA device.
        delta: (batch, G * D, L) step sizes before delta_bias and softplus.
        A: (G * D, N) state matrix (diagonal per channel), N <= 32.
        B: (batch, G, N, L) input projection shared by the D channels of a group.
        C: (batch, G, N, L) output projection shared likewise.
        D: (G * D) skip weight, or None.
        delta_bias: (G * D) added to delta, or None.
        delta_softplus: apply softplus to delta + delta_bias.

    Returns:
        y of shape (batch, G * D, L): float64 for float64 inputs, float32 otherwise. Gradients come back in each
        input's dtype.

    Raises:
        RuntimeError: the extension is not built (the message says how to build it), or the extension rejects the
            inputs (the message names the tensor).
    """
    if not is_available():
        raise RuntimeError(f"selective scan backend 'cuda' is unavailable: {unavailable_reason()}")
    input_dtype = _input_dtype(u, delta, B, C)
    weight_dtype = torch.float64 if input_dtype == torch.float64 else torch.float32
    u, delta, B, C = (t.to(input_dtype).contiguous() for t in (u, delta, B, C))
    A, D, delta_bias = (t.to(weight_dtype).contiguous() if t is not None else None for t in (A, D, delta_bias))
    save_states = residuals_needed(u, delta, A, B, C, D, delta_bias)
    return _CudaScanFn.apply(u, delta, A, B, C, D, delta_bias, delta_softplus, save_states)
