"""Triton backend of the selective scan (forward and backward), for CUDA devices without our CUDA extension.

Backend contract (see ``selective_scan.py``): ``is_available()``, ``unavailable_reason()`` and
``scan(u, delta, A, B, C, D, delta_bias, delta_softplus)`` on canonical inputs::

    u, delta     (batch, G * D, L)      float32 or float64 (half inputs are upcast by the dispatcher)
    A            (G * D, N)
    B, C         (batch, G, N, L)       channel c uses group c // D
    D, delta_bias (G * D) or None
    returns y    (batch, G * D, L)      in the input dtype

Algorithm: one program per (channel block, group, batch element) holds a (channels, N) state tile and walks the
sequence in chunks of ``chunk`` steps. Inside a chunk the linear recurrence ``h_t = a_t h_{t-1} + b_t`` is an
associative scan over pairs (a, b); the state entering each chunk is carried from the previous chunk and saved for
the backward. The backward visits the chunks in reverse, recomputes ``h_{t-1}`` inside the chunk from the saved state
(a scan over the inputs shifted by one step, so no division by a decay that may underflow), and gets the state
gradient ``g_t = C_t dy_t + a_{t+1} g_{t+1}`` by a reverse scan. dB and dC are summed over the block's channels in
the kernel and over the blocks of a group on the host (per-block partials, fixed order: deterministic), like dA, dD
and ddelta_bias over the batch.

``TRITON_INTERPRET=1`` must be set before this module is imported to run the kernels on the CPU (the tests do).
"""
import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator

import torch

from .selective_scan import refuse_double_backward, residuals_needed

try:
    import triton
    import triton.language as tl

    _IMPORT_ERROR = None
except Exception as error:
    # Not installed, or installed but failing at import (e.g. a triton built for another torch): the backend reports
    # itself unavailable with the reason, rather than `import classification.ops` failing where it may not be used.
    triton = None
    _IMPORT_ERROR = error

logger = logging.getLogger(__name__)

ACCEPTS_HALF_INPUTS = False
INTERPRETER_MAX_CHUNK = 8  # the interpreter runs associative scans element by element in Python: short chunks
MIN_TILE = 2  # smallest tile side used for the channel, state and time axes
CAPPED_STATE_TILE = 16  # the state tile (N rounded up to a power of two) the chunk cap is given for
NOT_INSTALLED = "not installed"


@dataclasses.dataclass(frozen=True)
class TileCaps:
    """Largest tiles a program takes (powers of two): it holds (channels, N, chunk) tiles.

    4 x 16 x 32 keeps the backward's live tiles in registers on a GPU (244 registers a thread in the sm_90 build, no
    spill); a wider state (N > 16) gets proportionally shorter chunks. More channels per program means fewer dB / dC
    partial copies to write and sum (one per program of a group). benchmarks/bench_gpu.py times alternatives.
    """

    block_channels: int = 4
    chunk: int = 32

    @property
    def tile_elements(self) -> int:
        return self.block_channels * CAPPED_STATE_TILE * self.chunk


_tile_caps = TileCaps()
# Tilings of as many elements with more channels per program (fewer dB / dC partials, shorter chunks), which
# benchmarks/bench_gpu.py times against the default: 182 and 254 registers a thread in the sm_90 build, no spill.
ALTERNATIVE_TILE_CAPS = (TileCaps(block_channels=8, chunk=16), TileCaps(block_channels=16, chunk=8))


@contextlib.contextmanager
def tile_caps(caps: TileCaps) -> Iterator[None]:
    """Scans launched inside the block use ``caps`` (benchmarks and tests compare tilings; the results agree)."""
    global _tile_caps
    if any(side < MIN_TILE or side & (side - 1) for side in (caps.block_channels, caps.chunk)):
        raise ValueError(f"tile caps must be powers of two >= {MIN_TILE}, got {caps}")
    saved, _tile_caps = _tile_caps, caps
    try:
        yield
    finally:
        _tile_caps = saved


def is_available() -> bool:
    """True when triton imports and can run: a CUDA device, or the interpreter (``TRITON_INTERPRET=1``)."""
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def installed_version() -> str:
    """triton's version, else :data:`NOT_INSTALLED` or ``fails to import (the error)``."""
    if triton is not None:
        return triton.__version__
    if isinstance(_IMPORT_ERROR, ModuleNotFoundError) and _IMPORT_ERROR.name == "triton":
        return NOT_INSTALLED
    return f"fails to import ({type(_IMPORT_ERROR).__name__}: {_IMPORT_ERROR})"


def unavailable_reason() -> str:
    """One line saying why the backend is unavailable and what to do about it."""
    if triton is None:
        state = installed_version()
        problem = "triton is not installed" if state == NOT_INSTALLED else f"triton {state}"
        return (f"{problem}: `.venv/bin/pip install -r requirements.txt` (it pins the triton that goes with our torch, "
                "on Linux)")
    return "triton needs a CUDA device, or TRITON_INTERPRET=1 set before import to run it (slowly) on the CPU"


if triton is not None:
    # Above this pre-activation softplus(x) is taken as x, like torch.nn.functional.softplus.
    _SOFTPLUS_THRESHOLD = tl.constexpr(20.0)
    # _exp_accurate: 1 / ln 2; ln 2 split into a part with 16 significant bits (n * _LN2_HIGH is exact for the n of
    # float32's range) and the rest; the x where n stays in float32's normal exponents (-126..127 after rounding).
    _INV_LN2 = tl.constexpr(1.4426950408889634)
    _LN2_HIGH = tl.constexpr(0.693145751953125)
    _LN2_LOW = tl.constexpr(1.428606765330187e-06)
    _EXP_REDUCED_RANGE = tl.constexpr(87.0)
    _FLOAT32_EXPONENT_BIAS = tl.constexpr(127)
    _FLOAT32_MANTISSA_BITS = tl.constexpr(23)

    @triton.jit
    def _exp_accurate(x):
        """exp(x) to a few ulp, for softplus and its derivative (once per step and channel). On a GPU a float32 tl.exp
        is ex2.approx of x * log2(e) rounded to float32, off by up to |x| ulp (17 at x = -30; the decays exp(dt * A)
        keep it: the size of the rounding already in dt * A). In float32, x = n ln 2 + r with n an integer and
        |r| <= ln 2 / 2 taken exactly (Cody and Waite), so only tl.exp(r)'s ~2 ulp remain, times 2^n built from its
        bits; past |x| = 87 (0 or inf ahead, and NaN) tl.exp(x) as it is. float64 takes tl.exp (libdevice's exp)."""
        if x.dtype == tl.float32:
            n = tl.floor(x * _INV_LN2 + 0.5)
            r = (x - n * _LN2_HIGH) - n * _LN2_LOW
            power = ((n.to(tl.int32) + _FLOAT32_EXPONENT_BIAS) << _FLOAT32_MANTISSA_BITS).to(tl.float32, bitcast=True)
            result = tl.where(tl.abs(x) <= _EXP_REDUCED_RANGE, power * tl.exp(r), tl.exp(x))
        else:
            result = tl.exp(x)
        return result

    @triton.jit
    def _divide(numerator, denominator):
        """numerator / denominator correctly rounded: a float32 `/` is an approximate division on a GPU (float64's is
        exact)."""
        if numerator.dtype == tl.float32:
            quotient = tl.math.div_rn(numerator, denominator)
        else:
            quotient = numerator / denominator
        return quotient

    @triton.jit
    def _compose(a_first, b_first, a_second, b_second):
        """Composes the affine maps x -> a_first x + b_first, then x -> a_second x + b_second."""
        return a_first * a_second, a_second * b_first + b_second

    @triton.jit
    def _load_dt(delta_ptr, bias, row_offsets, t, L, row_mask, SOFTPLUS: tl.constexpr):
        """dt = softplus(delta + bias) (or delta + bias) at times t for the block's channels, (channels, time), with
        its derivative d dt / d delta and the mask of valid entries; dt and the derivative are 0 outside the mask."""
        mask = row_mask[:, None] & (t[None, :] >= 0) & (t[None, :] < L)
        x = tl.load(delta_ptr + row_offsets[:, None] + t[None, :], mask=mask, other=0.0) + bias[:, None]
        if SOFTPLUS:
            e = _exp_accurate(x)
            w = 1.0 + e
            # log1p(e) without cancellation: log(w) * e / (w - 1) corrects the rounding of w = 1 + e.
            log1p_e = tl.where(w == 1.0, e, _divide(tl.log(w) * e, w - 1.0))
            dt = tl.where(x > _SOFTPLUS_THRESHOLD, x, log1p_e)
            dt_grad = tl.where(x > _SOFTPLUS_THRESHOLD, 1.0, _divide(e, w))
        else:
            dt = x
            dt_grad = tl.full(x.shape, 1.0, x.dtype)
        return tl.where(mask, dt, 0.0), tl.where(mask, dt_grad, 0.0), mask

    @triton.jit
    def _scan_fwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, states_ptr,
        channels, channels_per_group, groups, dstate, L, n_chunks,
        BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, SAVE_STATES: tl.constexpr,
    ):
        block = tl.program_id(0)
        group = tl.program_id(1)
        batch = tl.program_id(2).to(tl.int64)  # offsets in int64: batch * channels * L can pass 2^31
        local = block * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = local < channels_per_group
        channel = group * channels_per_group + local
        n = tl.arange(0, BLOCK_N)
        n_mask = n < dstate
        steps = tl.arange(0, CHUNK)
        cn_mask = c_mask[:, None] & n_mask[None, :]

        A = tl.load(A_ptr + channel[:, None] * dstate + n[None, :], mask=cn_mask, other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + channel, mask=c_mask, other=0.0)
        else:
            bias = tl.zeros([BLOCK_C], dtype=A.dtype)
        if HAS_D:
            D = tl.load(D_ptr + channel, mask=c_mask, other=0.0)
        rows = (batch * channels + channel) * L
        bc_rows = ((batch * groups + group) * dstate + n) * L
        state_offsets = ((batch * channels + channel[:, None]) * n_chunks) * dstate + n[None, :]
        h = tl.zeros([BLOCK_C, BLOCK_N], dtype=A.dtype)
        for chunk in range(n_chunks):
            if SAVE_STATES:
                tl.store(states_ptr + state_offsets + chunk * dstate, h, mask=cn_mask)
            t = chunk * CHUNK + steps
            dt, _, mask = _load_dt(delta_ptr, bias, rows, t, L, c_mask, SOFTPLUS)
            u = tl.load(u_ptr + rows[:, None] + t[None, :], mask=mask, other=0.0)
            nt_mask = n_mask[:, None] & (t[None, :] < L)
            Bm = tl.load(B_ptr + bc_rows[:, None] + t[None, :], mask=nt_mask, other=0.0)
            Cm = tl.load(C_ptr + bc_rows[:, None] + t[None, :], mask=nt_mask, other=0.0)
            decay = tl.exp(dt[:, None, :] * A[:, :, None])  # (channels, states, time)
            drive = (dt * u)[:, None, :] * Bm[None, :, :]
            decay_prod, drive_sum = tl.associative_scan((decay, drive), 2, _compose)
            hs = decay_prod * h[:, :, None] + drive_sum
            y = tl.sum(hs * Cm[None, :, :], axis=1)
            if HAS_D:
                y += D[:, None] * u
            tl.store(y_ptr + rows[:, None] + t[None, :], y, mask=mask)
            # Padded steps are identities, so the last column is the state after the chunk's last valid step.
            h = tl.sum(tl.where(steps[None, None, :] == CHUNK - 1, hs, 0.0), axis=2)

    @triton.jit
    def _scan_bwd_kernel(
        u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, dy_ptr, states_ptr,
        du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
        channels, channels_per_group, groups, dstate, L, n_chunks, blocks_per_group,
        BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
        HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ):
        block = tl.program_id(0)
        group = tl.program_id(1)
        batch = tl.program_id(2).to(tl.int64)  # offsets in int64: batch * channels * L can pass 2^31
        local = block * BLOCK_C + tl.arange(0, BLOCK_C)
        c_mask = local < channels_per_group
        channel = group * channels_per_group + local
        n = tl.arange(0, BLOCK_N)
        n_mask = n < dstate
        steps = tl.arange(0, CHUNK)
        cn_mask = c_mask[:, None] & n_mask[None, :]

        A = tl.load(A_ptr + channel[:, None] * dstate + n[None, :], mask=cn_mask, other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + channel, mask=c_mask, other=0.0)
        else:
            bias = tl.zeros([BLOCK_C], dtype=A.dtype)
        if HAS_D:
            D = tl.load(D_ptr + channel, mask=c_mask, other=0.0)
        rows = (batch * channels + channel) * L
        bc_rows = ((batch * groups + group) * dstate + n) * L
        partial_rows = (((batch * groups + group) * blocks_per_group + block) * dstate + n) * L
        state_offsets = ((batch * channels + channel[:, None]) * n_chunks) * dstate + n[None, :]

        g_next = tl.zeros([BLOCK_C, BLOCK_N], dtype=A.dtype)  # g at the first step of the following chunk
        dA = tl.zeros([BLOCK_C, BLOCK_N], dtype=A.dtype)
        dD = tl.zeros([BLOCK_C], dtype=A.dtype)
        dbias = tl.zeros([BLOCK_C], dtype=A.dtype)
        for chunk_from_end in range(n_chunks):
            chunk = n_chunks - 1 - chunk_from_end
            t0 = chunk * CHUNK
            t = t0 + steps
            nt_mask = n_mask[:, None] & (t[None, :] < L)
            dt, dt_grad, mask = _load_dt(delta_ptr, bias, rows, t, L, c_mask, SOFTPLUS)
            u = tl.load(u_ptr + rows[:, None] + t[None, :], mask=mask, other=0.0)
            dy = tl.load(dy_ptr + rows[:, None] + t[None, :], mask=mask, other=0.0)
            Bm = tl.load(B_ptr + bc_rows[:, None] + t[None, :], mask=nt_mask, other=0.0)
            Cm = tl.load(C_ptr + bc_rows[:, None] + t[None, :], mask=nt_mask, other=0.0)
            decay = tl.exp(dt[:, None, :] * A[:, :, None])

            # h_{t-1}: the forward scan over the inputs of step t - 1 (identity at the chunk's first step).
            t_prev = t - 1
            prev_ok = t_prev >= t0
            dt_prev, _, mask_prev = _load_dt(delta_ptr, bias, rows, t_prev, L, c_mask, SOFTPLUS)
            mask_prev = mask_prev & prev_ok[None, :]
            dt_prev = tl.where(mask_prev, dt_prev, 0.0)
            u_prev = tl.load(u_ptr + rows[:, None] + t_prev[None, :], mask=mask_prev, other=0.0)
            nt_prev = n_mask[:, None] & prev_ok[None, :] & (t_prev[None, :] < L)
            B_prev = tl.load(B_ptr + bc_rows[:, None] + t_prev[None, :], mask=nt_prev, other=0.0)
            h_start = tl.load(states_ptr + state_offsets + chunk * dstate, mask=cn_mask, other=0.0)
            decay_prev = tl.exp(dt_prev[:, None, :] * A[:, :, None])
            drive_prev = (dt_prev * u_prev)[:, None, :] * B_prev[None, :, :]
            prod_prev, sum_prev = tl.associative_scan((decay_prev, drive_prev), 2, _compose)
            h_prev = prod_prev * h_start[:, :, None] + sum_prev
            hs = decay * h_prev + (dt * u)[:, None, :] * Bm[None, :, :]

            # g_t = C_t dy_t + a_{t+1} g_{t+1}: a scan backwards in time; a_{t+1} of the chunk's last step is the next
            # chunk's. Written as flip, forward scan, flip: the order of a non-commutative combine in
            # associative_scan(reverse=True) has differed between Triton's compiler and its interpreter.
            dt_next, _, _ = _load_dt(delta_ptr, bias, rows, t + 1, L, c_mask, SOFTPLUS)
            decay_next = tl.exp(dt_next[:, None, :] * A[:, :, None])
            source = dy[:, None, :] * Cm[None, :, :]
            prod_flipped, sum_flipped = tl.associative_scan((tl.flip(decay_next, 2), tl.flip(source, 2)), 2, _compose)
            prod_next, sum_next = tl.flip(prod_flipped, 2), tl.flip(sum_flipped, 2)
            g = prod_next * g_next[:, :, None] + sum_next
            g_next = tl.sum(tl.where(steps[None, None, :] == 0, g, 0.0), axis=2)

            decay_grad = g * decay * h_prev  # d loss / d (dt A) through the decay
            dA += tl.sum(decay_grad * dt[:, None, :], axis=2)
            du = tl.sum(g * Bm[None, :, :], axis=1) * dt
            ddt = tl.sum(g * Bm[None, :, :] * u[:, None, :] + decay_grad * A[:, :, None], axis=1)
            ddelta = ddt * dt_grad
            if HAS_D:
                du += D[:, None] * dy
                dD += tl.sum(dy * u, axis=1)
            dbias += tl.sum(ddelta, axis=1)
            tl.store(du_ptr + rows[:, None] + t[None, :], du, mask=mask)
            tl.store(ddelta_ptr + rows[:, None] + t[None, :], ddelta, mask=mask)
            dB = tl.sum(g * (dt * u)[:, None, :], axis=0)
            dC = tl.sum(hs * dy[:, None, :], axis=0)
            tl.store(dB_ptr + partial_rows[:, None] + t[None, :], dB, mask=nt_mask)
            tl.store(dC_ptr + partial_rows[:, None] + t[None, :], dC, mask=nt_mask)

        part_offsets = batch * channels + channel
        tl.store(dA_ptr + part_offsets[:, None] * dstate + n[None, :], dA, mask=cn_mask)
        tl.store(dD_ptr + part_offsets, dD, mask=c_mask)
        tl.store(dbias_ptr + part_offsets, dbias, mask=c_mask)


def _on_device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it ``t``'s (a no-op for the interpreter's CPU tensors)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _tiles(channels_per_group: int, dstate: int, seqlen: int) -> tuple[int, int, int]:
    """(channels per program, state tile, chunk length), all powers of two, within the current :class:`TileCaps`."""
    caps = _tile_caps
    block_c = max(MIN_TILE, min(caps.block_channels, triton.next_power_of_2(channels_per_group)))
    block_n = max(MIN_TILE, triton.next_power_of_2(dstate))
    max_chunk = min(INTERPRETER_MAX_CHUNK, caps.chunk) if os.environ.get("TRITON_INTERPRET") == "1" else caps.chunk
    chunk = max(MIN_TILE, min(max_chunk, caps.tile_elements // (block_c * block_n), triton.next_power_of_2(seqlen)))
    return block_c, block_n, chunk


class _TritonScanFn(torch.autograd.Function):
    """Selective scan with Triton forward and backward kernels (inputs canonical, contiguous, one float dtype)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, delta_bias, delta_softplus: bool, save_states: bool):
        batch, channels, seqlen = u.shape
        groups, dstate = B.shape[1], B.shape[2]
        channels_per_group = channels // groups
        block_c, block_n, chunk = _tiles(channels_per_group, dstate, seqlen)
        n_chunks = triton.cdiv(seqlen, chunk)
        y = torch.empty_like(u)
        states = u.new_empty((batch, channels, n_chunks, dstate) if save_states else (0,))
        grid = (triton.cdiv(channels_per_group, block_c), groups, batch)
        with _on_device_of(u):
            _scan_fwd_kernel[grid](
                u, delta, A, B, C, D if D is not None else A, delta_bias if delta_bias is not None else A, y, states,
                channels, channels_per_group, groups, dstate, seqlen, n_chunks,
                BLOCK_C=block_c, BLOCK_N=block_n, CHUNK=chunk, HAS_D=D is not None, HAS_BIAS=delta_bias is not None,
                SOFTPLUS=delta_softplus, SAVE_STATES=save_states,
            )
        ctx.delta_softplus = delta_softplus
        ctx.tiles = (block_c, block_n, chunk)
        ctx.save_for_backward(u, delta, A, B, C, D, delta_bias, states)
        return y

    @staticmethod
    def backward(ctx, dy):
        refuse_double_backward("triton")
        u, delta, A, B, C, D, delta_bias, states = ctx.saved_tensors
        batch, channels, seqlen = u.shape
        groups, dstate = B.shape[1], B.shape[2]
        channels_per_group = channels // groups
        block_c, block_n, chunk = ctx.tiles
        n_chunks = triton.cdiv(seqlen, chunk)
        blocks_per_group = triton.cdiv(channels_per_group, block_c)
        dy = dy.to(u.dtype).contiguous()
        du = torch.empty_like(u)
        ddelta = torch.empty_like(delta)
        dA_part = u.new_empty((batch, channels, dstate))
        dB_part = u.new_empty((batch, groups, blocks_per_group, dstate, seqlen))
        dC_part = torch.empty_like(dB_part)
        dD_part = u.new_empty((batch, channels))
        dbias_part = u.new_empty((batch, channels))
        with _on_device_of(u):
            _scan_bwd_kernel[(blocks_per_group, groups, batch)](
                u, delta, A, B, C, D if D is not None else A, delta_bias if delta_bias is not None else A, dy, states,
                du, ddelta, dA_part, dB_part, dC_part, dD_part, dbias_part,
                channels, channels_per_group, groups, dstate, seqlen, n_chunks, blocks_per_group,
                BLOCK_C=block_c, BLOCK_N=block_n, CHUNK=chunk,
                HAS_D=D is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=ctx.delta_softplus,
            )
        batch_dim, block_dim = 0, 2
        dD = dD_part.sum(batch_dim) if D is not None else None
        dbias = dbias_part.sum(batch_dim) if delta_bias is not None else None
        return (du, ddelta, dA_part.sum(batch_dim), dB_part.sum(block_dim), dC_part.sum(block_dim), dD, dbias, None,
                None)  # the two flags


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
    """Grouped selective scan with the Triton kernels.

    Args:
        u: (batch, G * D, L) input, float32 or float64.
        delta: (batch, G * D, L) step sizes before delta_bias and softplus.
        A: (G * D, N) state matrix (diagonal per channel).
        B: (batch, G, N, L) input projection shared by the D channels of a group.
        C: (batch, G, N, L) output projection shared likewise.
        D: (G * D) skip weight, or None.
        delta_bias: (G * D) added to delta, or None.
        delta_softplus: apply softplus to delta + delta_bias.

    Returns:
        y of shape (batch, G * D, L) in u's dtype; gradients flow to every input that requires them.

    Raises:
        RuntimeError: triton is unavailable (the message says how to get it).
    """
    if not is_available():
        raise RuntimeError(f"selective scan backend 'triton' is unavailable: {unavailable_reason()}")
    dtype = torch.float64 if torch.float64 in (u.dtype, delta.dtype, B.dtype, C.dtype) else torch.float32
    args = [t.to(dtype).contiguous() if t is not None else None for t in (u, delta, A, B, C, D, delta_bias)]
    return _TritonScanFn.apply(*args, delta_softplus, residuals_needed(*args))
