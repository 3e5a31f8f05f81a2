"""The selective scan as a ``torch.library`` custom op, so ``torch.compile`` and ``torch.export`` see one node.

``selective_scan_fn`` routes through ``torch.ops.defmamba.selective_scan`` while ``torch.compiler.is_compiling()``
(dynamo and export tracing); eager calls never touch this module, so eager speed is unchanged. Importing
:mod:`classification.ops` registers the op, which a ``torch.export`` program saved with it needs when loaded.

- ``defmamba::selective_scan(u, delta, A, B, C, D?, delta_bias?, delta_softplus, backend) -> y`` runs the eager
  dispatcher (backend resolution, validation, the chosen backend) without building an autograd graph. Its fake
  (meta) implementation validates the layouts on fake tensors and returns ``y``'s shape and dtype.
- Its registered autograd calls ``defmamba::selective_scan_backward``, which the compiler treats as opaque: it
  re-runs the backend's differentiable forward on detached inputs and takes ``torch.autograd.grad``. The backward of
  a compiled graph therefore costs one extra scan forward (the eager path saves the backend's own residuals
  instead). Double backward is not supported.

The deformable ops (``deformable.py``) stay compositions of aten ops on purpose: ``grid_sample``, ``argsort``,
``gather`` and ``scatter`` already have fake kernels and autograd formulas, dynamo traces the straight-through sort's
``autograd.Function`` (forward and backward) without a graph break (``tests/test_compile.py``, ``fullgraph=True``),
and left visible they can be fused with their neighbours by inductor, which an opaque custom op would prevent.
"""
import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from .selective_scan import HALF_DTYPES, NUM_TENSOR_INPUTS, _canonical_inputs, eager_selective_scan

LIBRARY = "defmamba"


def _output_dtype(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                  delta_bias: Tensor | None) -> torch.dtype:
    """The dtype of ``y``: the promoted input dtype, float32 for float16/bfloat16."""
    dtype = u.dtype
    for t in (delta, A, B, C, D, delta_bias):
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype in HALF_DTYPES else dtype


@torch.library.custom_op(f"{LIBRARY}::selective_scan", mutates_args=())
def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                   delta_bias: Tensor | None, delta_softplus: bool, backend: str) -> Tensor:
    """``selective_scan_fn`` as one opaque op (same arguments); ``y`` (batch, G·D, L), contiguous."""
    with torch.no_grad():
        return eager_selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus, backend).contiguous()


@selective_scan.register_fake
def _selective_scan_fake(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None,
                         delta_bias: Tensor | None, delta_softplus: bool, backend: str) -> Tensor:
    _canonical_inputs(u, delta, A, B, C, D, delta_bias, upcast_half=True)  # the same ValueErrors at trace time
    return u.new_empty(u.shape, dtype=_output_dtype(u, delta, A, B, C, D, delta_bias))


@contextlib.contextmanager
def _recording_autograd() -> Iterator[None]:
    """Lets the ops run inside a custom op record an autograd graph.

    While a custom op's implementation runs, the dispatcher excludes the autograd dispatch keys, so plain tensor ops
    (the softplus of delta, the casts and reshapes of the inputs, the whole ``ref`` backend) record nothing even under
    ``torch.enable_grad()``; only Python ``autograd.Function`` nodes would, and the gradients of everything outside
    them would silently be lost. There is no public switch for this (PyTorch 2.14): the dispatcher's thread-local
    exclude flag is cleared for the recompute and restored after.
    """
    key = torch._C.DispatchKey.AutogradFunctionality
    was_excluded = torch._C._dispatch_tls_is_dispatch_key_excluded(key)
    torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
    try:
        with torch.enable_grad():
            yield
    finally:
        torch._C._dispatch_tls_set_dispatch_key_excluded(key, was_excluded)


@torch.library.custom_op(f"{LIBRARY}::selective_scan_backward", mutates_args=())
def selective_scan_backward(grad_y: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                            D: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool, backend: str,
                            needs_grad: list[bool]) -> list[Tensor]:
    """Gradients of every tensor input (each in its input's shape and dtype) by recomputing the forward.

    Args:
        grad_y: Gradient of ``y``.
        u, delta, A, B, C, D, delta_bias, delta_softplus, backend: The forward's arguments.
        needs_grad: Per tensor input (u, delta, A, B, C, D, delta_bias), whether its gradient is wanted.

    Returns:
        Seven tensors; an input that is None or needs no gradient gets zeros of its shape (an empty tensor for None).
    """
    inputs = (u, delta, A, B, C, D, delta_bias)
    leaves = [t.detach().requires_grad_(needed) if t is not None else None for t, needed in zip(inputs, needs_grad)]
    wanted = [t for t, needed in zip(leaves, needs_grad) if t is not None and needed]
    with _recording_autograd():
        y = eager_selective_scan(*leaves, delta_softplus, backend)
        grads = iter(torch.autograd.grad(y, wanted, grad_y, allow_unused=True) if wanted else ())
    out = []
    for t, needed in zip(inputs, needs_grad):
        if t is None:
            out.append(u.new_empty(0))
            continue
        grad = next(grads) if needed else None
        # A fresh tensor per output (a custom op may not return an input, a view of one, or one tensor twice), laid
        # out exactly as the fake implementation's empty_like(t): inductor checks the strides it was promised.
        out.append(torch.zeros_like(t) if grad is None else torch.empty_like(t).copy_(grad))
    return out


@selective_scan_backward.register_fake
def _selective_scan_backward_fake(grad_y: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                  D: Tensor | None, delta_bias: Tensor | None, delta_softplus: bool, backend: str,
                                  needs_grad: list[bool]) -> list[Tensor]:
    return [u.new_empty(0) if t is None else torch.empty_like(t) for t in (u, delta, A, B, C, D, delta_bias)]


def _setup_context(ctx, inputs: tuple, output: Tensor) -> None:
    *tensors, delta_softplus, backend = inputs
    ctx.present = [t is not None for t in tensors]
    ctx.save_for_backward(*(t for t in tensors if t is not None))
    ctx.delta_softplus, ctx.backend = delta_softplus, backend


def _backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
    saved = iter(ctx.saved_tensors)
    tensors = [next(saved) if present else None for present in ctx.present]
    needs_grad = [bool(needed) for needed in ctx.needs_input_grad[:NUM_TENSOR_INPUTS]]
    grads = selective_scan_backward(grad_y, *tensors, ctx.delta_softplus, ctx.backend, needs_grad)
    return tuple(g if needed and t is not None else None for g, t, needed in zip(grads, tensors, needs_grad)) + (
        None, None)


selective_scan.register_autograd(_backward, setup_context=_setup_context)
