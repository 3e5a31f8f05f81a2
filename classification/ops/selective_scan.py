"""The Mamba selective scan in the layout DefMamba uses, with a plain-PyTorch reference and switchable backends.

Layouts (``G`` groups of ``D`` channels, ``G·D`` channels in all, ``N`` state size, ``L`` sequence length):

- ``u``, ``delta``: (batch, G·D, L)
- ``A``: (G·D, N)
- ``B``, ``C``: (batch, G, N, L); each group of ``D`` consecutive channels shares its B and C. (batch, N, L) is
  accepted for G = 1.
- ``D``, ``delta_bias``: (G·D,) or None
- returns ``y``: (batch, G·D, L)

For channel ``c`` in group ``g = c // D``::

    dt_t = delta_t + delta_bias[c]                      (when delta_bias is given)
    dt_t = softplus(dt_t)                               (when delta_softplus; x for x > 20, as F.softplus)
    h_t  = exp(dt_t · A[c]) ⊙ h_{t-1} + dt_t · B[b, g, :, t] · u_t          h_{-1} = 0
    y_t  = <C[b, g, :, t], h_t> + D[c] · u_t

Backends (``backend=`` of :func:`selective_scan_fn`):

- ``ref``: :func:`selective_scan_ref`, the definition as a sequential loop; exact in float64, slow.
- ``torch``: pure PyTorch with a hand-written backward; the time axis is processed in cache-sized chunks and only
  the state at each chunk start is kept for the backward, which recomputes the chunk.
- ``cpu``, ``cuda``, ``triton``: compiled kernels, each in its own module ``selective_scan_<name>.py`` (imported
  lazily) with ``is_available()``, ``unavailable_reason()`` and ``scan(u, delta, A, B, C, D, delta_bias,
  delta_softplus)``.
- ``auto``: on CPU tensors ``cpu`` if built, else ``torch``; on CUDA tensors ``cuda``, then ``triton``, then
  ``torch``; on any other device ``torch``.

Dtypes: inputs are promoted to one floating dtype; float16/bfloat16 are computed in float32 and ``y`` is float32.
A kernel module that sets ``ACCEPTS_HALF_INPUTS = True`` reads half ``u``, ``delta``, ``B``, ``C`` as given (also
next to float32 ``A``, ``D``, ``delta_bias``, as under autocast), the weights in float32; ``y`` is float32 all the
same. The state, ``exp(dt·A)`` and the softplus are computed in float32 (float64 for float64 inputs), with autocast
switched off around the backend, so they stay float32 under ``torch.autocast``.

``auto`` on CUDA tensors that cannot run ``cuda`` logs one warning (per process) naming the reason and the build
command. Under ``torch.compile`` / ``torch.export`` the scan is one custom op, ``torch.ops.defmamba.selective_scan``
(``custom_ops.py``).
"""
import contextlib
import functools
import importlib
import logging
import math
import os
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

KERNEL_BACKENDS = ("cpu", "cuda", "triton")
BACKENDS = ("ref", "torch") + KERNEL_BACKENDS
NUM_TENSOR_INPUTS = 7  # of selective_scan_fn and the kernels: u, delta, A, B, C, D, delta_bias
# Device types each compiled backend runs on; Triton's interpreter (TRITON_INTERPRET=1) also runs it on CPU tensors.
KERNEL_DEVICE_TYPES = {"cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda",)}
TRITON_INTERPRETER_DEVICE_TYPES = ("cuda", "cpu")
# What `auto` tries, in order, per device type; any device type not listed gets `torch`.
AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "triton", "torch")}
HALF_DTYPES = (torch.float16, torch.bfloat16)
LOG2_E = math.log2(math.e)

# The `torch` backend processes CHUNK_ELEMENTS[device type] state elements (time steps x batch x channels x N) at a
# time. On the CPU, 2^18 to 2^19 (1 to 2 MiB in float32, cache-resident) were fastest of 2^16..2^21 at the
# DefMamba-T stage-1 shape; other devices (GPUs: untimed here) get larger chunks, fewer launches.
CHUNK_ELEMENTS = {"cpu": 1 << 18}
CHUNK_ELEMENTS_DEFAULT = 1 << 23
# Below this many state elements per time step, one op per step costs more in dispatch than in work: a chunk of at
# least BLOCKED_SCAN_MIN_STEPS steps is then scanned as blocks side by side, joined afterwards (`_linear_scan_`);
# 1.5-2x faster at DAMamba's N = 1 (640 elements per step at batch 8, stage 1).
BLOCKED_SCAN_MAX_WIDTH = 4096
BLOCKED_SCAN_MIN_STEPS = 64


# --------------------------------------------------------------------------------------------------- validation


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _canonical_inputs(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    delta_bias: Tensor | None,
    upcast_half: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Validates the layouts, gives B and C their 4-D layout and casts to one floating dtype, but see upcast_half.

    Without ``upcast_half`` (backends with ``ACCEPTS_HALF_INPUTS``), half u, delta, B, C (one half dtype, or mixed
    with float32 weights as under autocast) stay in their promoted half dtype and A, D, delta_bias become float32.

    Raises:
        ValueError: on a wrong rank, mismatched sizes, a group count that does not divide the channels, an empty
            sequence, a non-floating dtype or tensors on different devices; the message names the tensor, the shape
            it got and the shape it needs.
    """
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "delta_bias": delta_bias}
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating dtype, got {t.dtype}")
        if t.device != u.device:
            raise ValueError(f"{name}: on device {t.device}, but u is on {u.device}; all inputs need one device")

    if u.dim() != 3:
        raise ValueError(f"u: got shape {_shape(u)}, need (batch, channels, length)")
    batch, channels, length = u.shape
    if length == 0:
        raise ValueError(f"u: got shape {_shape(u)}, need a sequence length L >= 1")
    if _shape(delta) != _shape(u):
        raise ValueError(f"delta: got shape {_shape(delta)}, need {_shape(u)} (the shape of u)")
    if A.dim() != 2 or A.shape[0] != channels or A.shape[1] == 0:
        raise ValueError(f"A: got shape {_shape(A)}, need ({channels}, N) with N >= 1")
    state_size = A.shape[1]

    grouped = {}
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            t = t.unsqueeze(1)
        expected = f"(batch={batch}, groups, N={state_size}, L={length}), or ({batch}, {state_size}, {length})"
        if t.dim() != 4 or (t.shape[0], t.shape[2], t.shape[3]) != (batch, state_size, length):
            raise ValueError(f"{name}: got shape {_shape(named[name])}, need {expected} for one group")
        groups = t.shape[1]
        if groups == 0 or channels % groups:
            raise ValueError(
                f"{name}: got shape {_shape(named[name])} with {groups} groups, which do not divide the "
                f"{channels} channels of u; need ({batch}, G, {state_size}, {length}) with G dividing {channels}"
            )
        grouped[name] = t
    if grouped["B"].shape[1] != grouped["C"].shape[1]:
        raise ValueError(
            f"C: got shape {_shape(C)}, need {_shape(grouped['B'])} (the groups of B, {grouped['B'].shape[1]})"
        )
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and _shape(t) != (channels,):
            raise ValueError(f"{name}: got shape {_shape(t)}, need ({channels},) (one value per channel of u)")

    present = [t for t in named.values() if t is not None]
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in present])
    sequence_dtype = functools.reduce(torch.promote_types, [t.dtype for t in (u, delta, B, C)])
    if not upcast_half and sequence_dtype in HALF_DTYPES and dtype in HALF_DTYPES + (torch.float32,):
        # Half sequences (autocast's projections) stay half, the per-channel weights A, D, delta_bias float32.
        weight_dtype = torch.float32
    else:
        sequence_dtype = weight_dtype = torch.float32 if upcast_half and dtype in HALF_DTYPES else dtype

    def cast(t: Tensor | None, to: torch.dtype) -> Tensor | None:
        return None if t is None else t.to(to)

    return (cast(u, sequence_dtype), cast(delta, sequence_dtype), cast(A, weight_dtype),
            cast(grouped["B"], sequence_dtype), cast(grouped["C"], sequence_dtype), cast(D, weight_dtype),
            cast(delta_bias, weight_dtype))


def _check_softplus_flag(delta_softplus: bool) -> None:
    """Refuses a ``delta_softplus`` that is not a bool (a truthy string such as "False" would turn softplus on)."""
    if not isinstance(delta_softplus, bool):
        raise ValueError(f"delta_softplus: expected True or False, got {delta_softplus!r}")


def _effective_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    """dt = softplus(delta + delta_bias) with the optional parts left out; softplus is F.softplus (x above 20)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    return F.softplus(delta) if delta_softplus else delta


# --------------------------------------------------------------------------------------------------- reference


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "ref",
) -> Tensor:
    """The selective scan by its definition: a sequential loop over time, differentiable by autograd.

    Same signature as :func:`selective_scan_fn`. Exact in float64; float16/bfloat16 inputs are computed in float32
    and the result is float32. The loop walks ``unbind(-1)`` views, so autograd's memory and time grow linearly
    with L (indexing ``x[..., t]`` would make every step's backward build a full-size gradient).

    Args:
        u: Input sequence, (batch, G·D, L).
        delta: Time steps before bias and softplus, (batch, G·D, L).
        A: State matrix (diagonal per channel), (G·D, N).
        B: Input projection, (batch, G, N, L), or (batch, N, L) for one group.
        C: Output projection, same layout as B.
        D: Skip weight, (G·D,), or None for no skip.
        delta_bias: Bias added to delta, (G·D,), or None.
        delta_softplus: Whether dt = softplus(delta + delta_bias).
        backend: Must be ``"ref"``; present so both functions share one signature.

    Returns:
        y, (batch, G·D, L), in the promoted input dtype (float32 for float16/bfloat16 inputs).

    Raises:
        ValueError: on malformed inputs (the message names the tensor and the shape it needs), or on any other
            ``backend``.
    """
    if backend != "ref":
        raise ValueError(f"selective_scan_ref only computes backend 'ref', got {backend!r}; use selective_scan_fn")
    _check_softplus_flag(delta_softplus)
    u, delta, A, B, C, D, delta_bias = _canonical_inputs(u, delta, A, B, C, D, delta_bias, upcast_half=True)
    dt = _effective_delta(delta, delta_bias, delta_softplus)
    batch, channels, length = u.shape
    groups, state_size = B.shape[1], B.shape[2]
    per_group = channels // groups
    A_grouped = A.view(groups, per_group, state_size)
    per_channel = (batch, groups, per_group, 1, length)
    per_group_state = (batch, groups, 1, state_size, length)
    steps = zip(
        dt.view(per_channel).unbind(-1),
        (dt * u).view(per_channel).unbind(-1),
        B.view(per_group_state).unbind(-1),
        C.view(per_group_state).unbind(-1),
    )
    h = u.new_zeros(batch, groups, per_group, state_size)
    ys = []
    for dt_t, dtu_t, B_t, C_t in steps:
        h = torch.exp(dt_t * A_grouped) * h + dtu_t * B_t
        ys.append((h * C_t).sum(-1))  # (batch, groups, per_group)
    y = torch.stack(ys, dim=-1).view(batch, channels, length)
    if D is not None:
        y = y + D[:, None] * u
    return y


# --------------------------------------------------------------------------------------------------- torch backend


def _linear_scan_(decay: Tensor, x: Tensor, boundary: Tensor | None, block_len: int, reverse: bool) -> None:
    """In place: ``x[t] = decay[t] * x[t - 1] + x[t]`` (``x[t + 1]`` when reverse), the outside value ``boundary``.

    Args:
        decay: (T, W) factors.
        x: (T, W) inputs, overwritten with the scan.
        boundary: W values (any shape) of the state before the first step (after the last when reverse), or None
            for zero.
        block_len: T or more (one block), or a divisor of T: then the T steps are scanned as T / block_len blocks
            side by side, each from a zero state while the running product of its decays is kept, and each block is
            then completed with its predecessor's last state times that product (products of decays, never
            exp(cumsum), so strong decay underflows to 0 instead of overflowing).
        reverse: Scan from the last step to the first.
    """
    steps, width = x.shape
    block_len = min(block_len, steps)
    if boundary is not None:
        boundary = boundary.view(width)
    num_blocks = steps // block_len
    xb = x.view(num_blocks, block_len, width)
    db = decay.view(num_blocks, block_len, width)
    order = range(block_len - 2, -1, -1) if reverse else range(1, block_len)
    step = 1 if reverse else -1  # offset of the neighbour a step depends on
    edge = block_len - 1 if reverse else 0  # a block's first step in scan order
    # Views of every step made at once: indexing inside the loop costs more than the step's work at small widths.
    if num_blocks == 1:
        x_steps, d_steps = xb[0].unbind(0), db[0].unbind(0)
        if boundary is not None:
            x_steps[edge].addcmul_(d_steps[edge], boundary)
        for t in order:
            x_steps[t].addcmul_(d_steps[t], x_steps[t + step])
        return
    products = torch.empty_like(db)
    products[:, edge] = db[:, edge]
    x_steps, d_steps, p_steps = xb.unbind(1), db.unbind(1), products.unbind(1)
    for t in order:
        x_steps[t].addcmul_(d_steps[t], x_steps[t + step])
        torch.mul(p_steps[t + step], d_steps[t], out=p_steps[t])
    carry = boundary
    for block in reversed(range(num_blocks)) if reverse else range(num_blocks):
        if carry is not None:
            xb[block].addcmul_(products[block], carry)
        carry = xb[block, block_len - 1 - edge]


def _chunk_plan(length: int, width: int, device: torch.device) -> tuple[int, int]:
    """Chunk length (a multiple of the block length) and block length for the torch backend's scans."""
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS_DEFAULT)
    chunk = min(length, max(1, budget // width))
    if width >= BLOCKED_SCAN_MAX_WIDTH or chunk < BLOCKED_SCAN_MIN_STEPS:
        return chunk, chunk
    block_len = math.isqrt(chunk)
    return chunk - chunk % block_len, block_len


def _padded_len(steps: int, block_len: int) -> int:
    """Rows a chunk of `steps` time steps occupies: one block, or whole blocks."""
    return steps if steps <= block_len else -(-steps // block_len) * block_len


def _time_major(t: Tensor) -> Tensor:
    """(batch, ..., L) -> (L, batch, ...), contiguous (as one 2-D transpose, which copies faster than a permute)."""
    return t.reshape(-1, t.shape[-1]).t().contiguous().view(t.shape[-1], *t.shape[:-1])


def _batch_major(t: Tensor) -> Tensor:
    """(L, batch, ...) -> (batch, ..., L), contiguous."""
    return t.reshape(t.shape[0], -1).t().contiguous().view(*t.shape[1:], t.shape[0])


def _contract_state(left: Tensor, right: Tensor, out: Tensor) -> None:
    """out[k, 0, d] = sum_n left[k, 0, n] * right[k, d, n]; left (K, 1, N), right (K, D, N), out (K, 1, D).

    A batched matrix product, except for N = 1 (DAMamba), where it is an outer product and a broadcast multiply is
    several times faster than bmm.
    """
    if left.shape[-1] == 1:
        torch.mul(right, left, out=out.view(right.shape))
    else:
        torch.bmm(left, right.transpose(1, 2), out=out)


def residuals_needed(*tensors: Tensor | None) -> bool:
    """Whether a backend's forward must keep what its backward needs (the CPU and CUDA kernels' chunk states): grad
    mode is on and some input requires a gradient. Decided before ``autograd.Function.apply``: inside ``forward``,
    ``ctx.needs_input_grad`` follows ``requires_grad`` even under ``torch.no_grad()`` and ``torch.inference_mode()``,
    so evaluation would write the states for nothing."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def refuse_double_backward(backend: str) -> None:
    """Called first in a backend's backward. Only ``ref`` is differentiable twice: the other backends' backward passes
    are not differentiable, so with ``create_graph=True`` (grad mode on inside backward) their gradients would carry
    no graph, and second derivatives would silently be zero or missing. Raises instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"selective scan backend {backend!r} has first-order gradients only (create_graph=True "
                           "asked for more); use backend='ref' for higher-order gradients")


class _ChunkedScan(torch.autograd.Function):
    """The scan given dt (bias and softplus already applied): (u, dt, A, B, C, D or None) -> y.

    Forward runs over chunks of time steps and keeps only each chunk's start state; backward recomputes a chunk's
    states from it and runs the adjoint recurrence backwards in time (g_t = C_t dy_t + exp(dt_{t+1} A) g_{t+1}).
    Everything is time-major: (L, batch, G·D) sequences, (steps, batch, G·D, N) chunk tensors, so one time step is
    one contiguous row. The sums over a group's channels or over N are batched matrix products over
    (step, batch, group) triples, which beat broadcast-multiply-then-sum on the CPU.
    """

    @staticmethod
    def forward(ctx, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None) -> Tensor:
        batch, channels, length = u.shape
        groups, state_size = B.shape[1], B.shape[2]
        per_group = channels // groups
        triples = length * batch * groups
        chunk, block_len = _chunk_plan(length, batch * channels * state_size, u.device)
        A_log2 = A * LOG2_E  # exp(dt A) = exp2(dt A log2(e)); exp2 costs half of exp on the CPU
        u_tm, dt_tm = _time_major(u), _time_major(dt)  # (L, batch, G·D)
        dtu_tm = dt_tm * u_tm
        B_tm = _time_major(B).view(triples, 1, state_size)
        C_tm = _time_major(C).view(triples, 1, state_size)
        state_shape = (batch, channels, state_size)
        decay = u.new_empty(_padded_len(chunk, block_len), *state_shape)
        states = u.new_empty(decay.shape)
        y_tm = u.new_empty(triples, 1, per_group)
        starts = u.new_empty(-(-length // chunk), *state_shape)  # the state before each chunk
        starts[0].zero_()
        for index, t0 in enumerate(range(0, length, chunk)):
            t1 = min(t0 + chunk, length)
            steps, rows = t1 - t0, _padded_len(t1 - t0, block_len)
            pairs = slice(t0 * batch * groups, t1 * batch * groups)  # the chunk's (step, batch, group) triples
            torch.mul(dt_tm[t0:t1, :, :, None], A_log2, out=decay[:steps]).exp2_()
            h = states[:steps].view(-1, per_group, state_size)
            torch.mul(dtu_tm[t0:t1].view(-1, per_group, 1), B_tm[pairs], out=h)
            decay[steps:rows].zero_()
            states[steps:rows].zero_()
            start = starts[index] if index else None
            _linear_scan_(decay[:rows].view(rows, -1), states[:rows].view(rows, -1), start, block_len, reverse=False)
            _contract_state(C_tm[pairs], h, out=y_tm[pairs])
            if t1 < length:
                starts[index + 1] = states[steps - 1]
        y_tm = y_tm.view(length, batch, channels)
        if D is not None:
            y_tm.addcmul_(u_tm, D)
        ctx.save_for_backward(u_tm, dt_tm, dtu_tm, A, B_tm, C_tm, D, starts)
        ctx.plan = (chunk, block_len, groups)
        return _batch_major(y_tm)

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        refuse_double_backward("torch")
        u_tm, dt_tm, dtu_tm, A, B_tm, C_tm, D, starts = ctx.saved_tensors
        chunk, block_len, groups = ctx.plan
        length, batch, channels = u_tm.shape
        state_size = A.shape[1]
        per_group = channels // groups
        triples = length * batch * groups
        A_log2 = A * LOG2_E
        dy_tm = _time_major(grad_y)  # (L, batch, G·D)
        dtu_triples = dtu_tm.view(triples, 1, per_group)
        dy_triples = dy_tm.view(triples, 1, per_group)

        rows_max = _padded_len(chunk, block_len)
        state_shape = (batch, channels, state_size)
        decay = u_tm.new_empty(rows_max + 1, *state_shape)  # row t: exp(dt_t A), t in [t0, t1]: one past the chunk
        states = u_tm.new_empty(rows_max + 1, *state_shape)  # row 0: the state before the chunk, row t + 1: h_t
        # Two adjoint buffers, used in turns, so that the carry (row 0 of the later chunk) survives without a copy.
        adjoints = u_tm.new_empty(2, rows_max, *state_shape)
        scratch = u_tm.new_empty(2, rows_max, *state_shape)
        grad_A = torch.zeros_like(A)
        grad_dt_tm = torch.empty_like(dt_tm)
        grad_dtu_tm = u_tm.new_empty(triples, 1, per_group)
        grad_B_tm = u_tm.new_empty(triples, 1, state_size)
        grad_C_tm = u_tm.new_empty(triples, 1, state_size)
        carry = None  # adjoint of the first step of the following chunk
        for index in reversed(range(starts.shape[0])):
            adjoint = adjoints[index % 2]
            t0 = index * chunk
            t1 = min(t0 + chunk, length)
            steps, rows = t1 - t0, _padded_len(t1 - t0, block_len)
            t_end = min(t1 + 1, length)
            pairs = slice(t0 * batch * groups, t1 * batch * groups)
            torch.mul(dt_tm[t0:t_end, :, :, None], A_log2, out=decay[: t_end - t0]).exp2_()
            decay[t_end - t0 : rows + 1].zero_()
            states[0] = starts[index]
            h = states[1 : steps + 1].view(-1, per_group, state_size)
            torch.mul(dtu_triples[pairs].transpose(1, 2), B_tm[pairs], out=h)
            states[steps + 1 : rows + 1].zero_()
            start = states[0] if index else None
            _linear_scan_(decay[:rows].view(rows, -1), states[1 : rows + 1].view(rows, -1), start, block_len, False)

            g = adjoint[:steps].view(-1, per_group, state_size)
            torch.mul(dy_triples[pairs].transpose(1, 2), C_tm[pairs], out=g)
            adjoint[steps:rows].zero_()
            _linear_scan_(decay[1 : rows + 1].view(rows, -1), adjoint[:rows].view(rows, -1), carry, block_len, True)
            carry = adjoint[0]

            torch.bmm(dy_triples[pairs], h, out=grad_C_tm[pairs])
            _contract_state(B_tm[pairs], g, out=grad_dtu_tm[pairs])
            torch.bmm(dtu_triples[pairs], g, out=grad_B_tm[pairs])
            # Through the decay: the gradient of dt_t A is g_t * h_{t-1} * exp(dt_t A).
            g_decay = torch.mul(adjoint[:steps], states[:steps], out=scratch[0, :steps]).mul_(decay[:steps])
            torch.sum(torch.mul(g_decay, A, out=scratch[1, :steps]), dim=-1, out=grad_dt_tm[t0:t1])
            grad_A += g_decay.mul_(dt_tm[t0:t1, :, :, None]).sum((0, 1))
        grad_dtu_tm = grad_dtu_tm.view(length, batch, channels)
        grad_dt_tm.addcmul_(grad_dtu_tm, u_tm)
        grad_u_tm = grad_dtu_tm.mul_(dt_tm)
        grad_D = None
        if D is not None:
            grad_u_tm.addcmul_(dy_tm, D)
            grad_D = (dy_tm * u_tm).sum((0, 1))
        grad_B = _batch_major(grad_B_tm.view(length, batch, groups, state_size))
        grad_C = _batch_major(grad_C_tm.view(length, batch, groups, state_size))
        return _batch_major(grad_u_tm), _batch_major(grad_dt_tm), grad_A, grad_B, grad_C, grad_D


def _selective_scan_torch(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
) -> Tensor:
    """The `torch` backend on canonical inputs (B, C 4-D, one floating dtype)."""
    return _ChunkedScan.apply(u, _effective_delta(delta, delta_bias, delta_softplus), A, B, C, D)


# --------------------------------------------------------------------------------------------------- dispatch


@functools.cache
def kernel_module(name: str) -> ModuleType | None:
    """The module of a compiled backend, imported on first use; None when the module does not exist."""
    module_name = f"{__package__}.selective_scan_{name}"
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        logger.debug("selective-scan backend %r: no module %s", name, module_name)
        return None


def backend_unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend `name` cannot run on `device`, or None when it can."""
    if name not in KERNEL_BACKENDS:
        return None
    device_types = KERNEL_DEVICE_TYPES[name]
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        device_types = TRITON_INTERPRETER_DEVICE_TYPES
    if device.type not in device_types:
        return f"backend {name!r} runs on {' or '.join(device_types)} tensors, not {device.type}"
    module = kernel_module(name)
    if module is None:
        return f"backend {name!r} is not installed (no module {__package__}.selective_scan_{name})"
    if not module.is_available():
        return f"backend {name!r} is unavailable: {module.unavailable_reason()}"
    return None


@functools.cache
def _warn_slower_backend(chosen: str, reason: str) -> None:
    """Warns, once per process (per choice and reason), that ``auto`` on CUDA runs a slower backend than ``cuda``."""
    logger.warning("selective scan: backend='auto' on cuda tensors runs %r, slower than %r: %s", chosen,
                   AUTO_ORDER["cuda"][0], reason)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on `device`: what `auto` would try, in its order, then the rest."""
    device = torch.device(device)
    preferred = AUTO_ORDER.get(device.type, ("torch",))
    ordered = list(preferred) + [name for name in BACKENDS if name not in preferred]
    return [name for name in ordered if backend_unavailable_reason(name, device) is None]


def resolve_backend(name: str, device: torch.device | str = "cpu") -> str:
    """The backend that ``backend=name`` runs on `device` (``auto`` resolved).

    Raises:
        ValueError: `name` is not a backend.
        RuntimeError: the requested backend cannot run on `device`; the message says why and how to build it.
    """
    device = torch.device(device)
    if name == "auto":
        order = AUTO_ORDER.get(device.type, ("torch",))
        chosen = next(c for c in order if backend_unavailable_reason(c, device) is None)
        # On the CPU the compiled kernel is optional and the fallback expected (the backend report says so).
        if device.type == "cuda" and chosen != order[0]:
            _warn_slower_backend(chosen, backend_unavailable_reason(order[0], device))
        return chosen
    if name not in BACKENDS:
        raise ValueError(f"backend: got {name!r}, need one of {('auto',) + BACKENDS}")
    reason = backend_unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(reason)
    return name


def selective_scan_fn(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> Tensor:
    """The selective scan (module docstring for the recurrence), differentiable in every input.

    float16/bfloat16 inputs are computed in float32 and the result is float32.

    Args:
        u: Input sequence, (batch, G·D, L).
        delta: Time steps before bias and softplus, (batch, G·D, L).
        A: State matrix (diagonal per channel), (G·D, N).
        B: Input projection, (batch, G, N, L), or (batch, N, L) for one group.
        C: Output projection, same layout as B.
        D: Skip weight, (G·D,), or None for no skip.
        delta_bias: Bias added to delta, (G·D,), or None.
        delta_softplus: Whether dt = softplus(delta + delta_bias).
        backend: ``auto``, ``ref``, ``torch``, ``cpu``, ``cuda`` or ``triton`` (module docstring).

    Returns:
        y, (batch, G·D, L), in the promoted input dtype (float32 for float16/bfloat16 inputs).

    Raises:
        ValueError: on malformed inputs (the message names the tensor, its shape and the shape it needs) or an
            unknown backend.
        RuntimeError: the requested backend cannot run here (the message says how to build it).
    """
    _check_softplus_flag(delta_softplus)
    if torch.compiler.is_compiling():
        from . import custom_ops  # imported here: custom_ops imports this module (the package imports both)

        return custom_ops.selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus, backend)
    return eager_selective_scan(u, delta, A, B, C, D, delta_bias, delta_softplus, backend)


def eager_selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    backend: str,
) -> Tensor:
    """:func:`selective_scan_fn` without the compiler route: resolves the backend and runs it, autocast disabled.

    Autocast is switched off around the backend so that its matmuls, exp and softplus run in the dtype the
    dispatcher chose (float32 for half inputs), never in autocast's lower precision.
    """
    device = u.device if isinstance(u, Tensor) else torch.device("cpu")
    name = resolve_backend(backend, device)
    no_autocast = torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) else (
        contextlib.nullcontext())
    with no_autocast:
        if name == "ref":
            return selective_scan_ref(u, delta, A, B, C, D, delta_bias, delta_softplus)
        module = None if name == "torch" else kernel_module(name)
        upcast_half = module is None or not getattr(module, "ACCEPTS_HALF_INPUTS", False)
        inputs = _canonical_inputs(u, delta, A, B, C, D, delta_bias, upcast_half=upcast_half)
        if inputs[0].numel() == 0:  # batch or channels 0: no sequence to scan; ref gives the empty y and gradients
            y = selective_scan_ref(*inputs, delta_softplus)
        elif module is None:
            y = _selective_scan_torch(*inputs, delta_softplus)
        else:
            y = module.scan(*inputs, delta_softplus)
    return y.float() if y.dtype in HALF_DTYPES else y
