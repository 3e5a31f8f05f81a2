"""DefMamba ("DefMamba: Deformable Visual State Space Model", CVPR 2025), exact to the released model.

Architecture: conv stem -> four stages of pre-norm blocks (a DSSM token mixer and an MLP)
with a stride-2 conv + LN downsampling at the start of stages 2-4 -> LN, global average pool, Linear. Activations
between blocks are channels-last (batch, height, width, channels).

The DSSM scans three sequences of the depthwise-conv features with one selective scan: raster order, reversed raster
order, and the deformable sequence (features sampled at learned offsets plus a learned offset bias, in a learned
order with the release's straight-through gradient). Their outputs are averaged back in raster order.

Ablation switches (paper Tables 4 and 5; the defaults are the released model): ``scan_branches`` picks any non-empty
set of scan sequences from :data:`SCAN_BRANCHES` (the SSM parameters are sized by their number K), and
``deform_points`` / ``deform_order`` / ``offset_bias`` / ``offset_channel_attention`` turn off the deformable scan's
point offset (DP), token-index offset (DT), offset bias (OB) and the offset network's channel attention (CA); each
switch removes the parameters it no longer needs. :meth:`DeformableScan.scan_geometry` returns the reference and
deformed points and the scan order the deformable branch computes for a given input (for figures).

Coordinates: the release samples with ``grid_sample(align_corners=True)`` on normalised grids; here every point is in
pixel-index coordinates (``p = (g + 1) * (size - 1) / 2``), which simplifies to closed forms that never divide by
``size - 1``. Side of length 1 (the release divides by zero there and returns NaN): the deformed point sits on the
single pixel (no offset along that side), and the scan position of a single token is 0.

Released checkpoints convert with :func:`checkpoint_filter_fn` (registered with :func:`load_checkpoint`).
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import Tensor, nn

from ..ops.deformable import bilinear_sample, pixel_grid, scan_order, sort_tokens_straight_through, unsort_tokens
from ..ops.selective_scan import selective_scan_fn
from .checkpoint import key_rules, register_checkpoint_filter, rename_key
from .layers import (
    DOWNSAMPLE_STRIDE,
    POOL_ADAPTIVE_AVG,
    Backbone,
    PooledLinearHead,
    branch_ssm,
    channels_first_to_last,
    channels_last_to_first,
    create_backbone,
    default_dt_rank,
    imagenet_default_cfgs,
    init_ssm_projections_,
    linear_drop_path_rates,
    run_blocks,
    stage_feature_info,
    tag_no_weight_decay,
    trunc_normal_init,
)
from .registry import register_model

__all__ = ["DefMamba", "SCAN_BRANCHES", "ScanOptions", "checkpoint_filter_fn", "scan_branch_order"]

# Scan branches: raster, reversed raster, the deformable sequence, the boustrophedon ("snake") raster of PlainMamba's
# continuous scan, and raster order inside non-overlapping windows (LocalMamba). The released model uses the first 3.
FORWARD, BACKWARD, DEFORMABLE, CONTINUOUS, LOCAL = "forward", "backward", "deformable", "continuous", "local"
SCAN_BRANCHES = (FORWARD, BACKWARD, DEFORMABLE, CONTINUOUS, LOCAL)
RELEASED_SCAN_BRANCHES = (FORWARD, BACKWARD, DEFORMABLE)
DEFAULT_LOCAL_WINDOW = 7  # side of LocalMamba-style windows (divides the 56/28/14/7 maps of a 224 input)
NUM_POINT_OFFSET_CHANNELS = 2  # (y, x) point offset; the scan-index offset adds 1 channel
POINT_OFFSET_Y, POINT_OFFSET_X = range(NUM_POINT_OFFSET_CHANNELS)
NUM_STAGES = 4  # each at half the resolution of the one before
CHANNEL_ATTENTION_REDUCTION = 16
OFFSET_BIAS_TABLE_SIZE = 7
OFFSET_BIAS_TABLE_STD = 0.01
LAYER_NORM_EPS = 1e-5
MIN_EMBED_DIM = 2  # the stem's first conv has embed_dim // 2 channels


class Stem(nn.Module):
    """Conv 3x3/2 -> LN -> GELU -> Conv 3x3/2 -> LN: image (B, C_in, H, W) -> (B, H/4, W/4, dim)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, dim // 2, kernel_size=3, stride=DOWNSAMPLE_STRIDE, padding=1)
        self.norm1 = nn.LayerNorm(dim // 2, eps=LAYER_NORM_EPS)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(dim // 2, dim, kernel_size=3, stride=DOWNSAMPLE_STRIDE, padding=1)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        x = channels_first_to_last(self.conv1(x))
        x = channels_last_to_first(self.act(self.norm1(x)))
        return self.norm2(channels_first_to_last(self.conv2(x)))


class Downsample(nn.Module):
    """Conv 3x3/2 (channels-first) -> LN: (B, H, W, in_dim) -> (B, ceil(H/2), ceil(W/2), out_dim)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size=3, stride=DOWNSAMPLE_STRIDE, padding=1)
        self.norm = nn.LayerNorm(out_dim, eps=LAYER_NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(channels_first_to_last(self.conv(channels_last_to_first(x))))


class ChannelAttention(nn.Module):
    """Squeeze-excitation gate: mean over H, W -> Linear -> GELU -> Linear -> Sigmoid, (B, D, H, W) -> (B, D)."""

    def __init__(self, dim: int):
        super().__init__()
        hidden = max(1, dim // CHANNEL_ATTENTION_REDUCTION)  # the release has dim // 16; widths < 16 need >= 1
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        # adaptive_avg_pool2d, as the release: its FLOP counter (fvcore) counts this op and not `mean`.
        squeezed = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return torch.sigmoid(self.fc2(self.act(self.fc1(squeezed))))


class OffsetNetwork(nn.Module):
    """Predicts the raw offsets (B, out_channels, H, W) from features (B, D, H, W).

    Depthwise conv k x k, gated by channel attention computed from the input (unless turned off), then LN -> GELU (LN
    first, as in the release) and a bias-free 1x1 conv to the offset channels (released: y, x, index).

    Args:
        dim: Feature channels D.
        kernel_size: Kernel of the depthwise conv.
        out_channels: Offset channels predicted.
        channel_attention: Gate the depthwise conv's output with :class:`ChannelAttention` (CA of Table 5).
    """

    def __init__(self, dim: int, kernel_size: int, out_channels: int, channel_attention: bool):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.channel_attention = ChannelAttention(dim) if channel_attention else None
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.act = nn.GELU()
        self.proj = nn.Conv2d(dim, out_channels, kernel_size=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gated = self.dwconv(x)
        if self.channel_attention is not None:
            gated = gated * rearrange(self.channel_attention(x), "b d -> b d 1 1")
        gated = channels_last_to_first(self.act(self.norm(channels_first_to_last(gated))))
        return self.proj(gated)


def deformed_coordinate(offset: Tensor, index: Tensor, size: int) -> Tensor:
    """Pixel coordinate of the deformed points along one axis.

    The release's normalised reference ``2 (i + 0.5) / (size - 1) - 1`` plus ``tanh(o) / (size - 1)`` is, in pixels,
    ``i + 0.5 + tanh(o) / 2``. A side of length 1 has no offset: the point sits on its single pixel (coordinate 0).

    Args:
        offset: tanh of the raw offset, (batch, height, width).
        index: Pixel index ``i`` along the axis, broadcastable to ``offset``.
        size: Side length along the axis.

    Returns:
        (batch, height, width).
    """
    if size == 1:
        return torch.zeros_like(offset)
    return index + 0.5 + offset / 2


class ScanGeometry(NamedTuple):
    """Where the deformable branch reads its tokens and in which order (:meth:`DeformableScan.scan_geometry`).

    Attributes:
        reference_points: (H, W, 2) pixel (x, y): where each token reads with a zero point offset (the release's
            half-cell-shifted grid ``i + 0.5``; the pixel itself when the point offset is off).
        points: (B, H, W, 2) pixel (x, y): where each token reads (the deformed points).
        order: (B, L) int64: ``order[b, j]`` is the raster index of the j-th token scanned.
    """

    reference_points: Tensor
    points: Tensor
    order: Tensor


class DeformableScan(nn.Module):
    """The deformable sequence of the DSSM: sampled features with an offset bias, in the learned scan order.

    Args:
        dim: Feature channels D.
        kernel_size: Kernel of the offset network's depthwise conv.
        deform_points: Sample the features at learned point offsets (DP); off: each token is its own pixel's feature.
        deform_order: Scan in the learned order (DT); off: raster order.
        offset_bias: Add the offset-bias table sampled at each point's displacement (OB); with DP off the points are
            the pixels themselves, so the bias is a learned, input-independent map.
        offset_channel_attention: Channel attention in the offset network (CA). The offset network exists only when
            DP or DT is on and predicts only their channels.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        deform_points: bool = True,
        deform_order: bool = True,
        offset_bias: bool = True,
        offset_channel_attention: bool = True,
    ):
        super().__init__()
        self.deform_points = deform_points
        self.deform_order = deform_order
        num_offsets = NUM_POINT_OFFSET_CHANNELS * deform_points + deform_order
        self.index_offset_channel = NUM_POINT_OFFSET_CHANNELS if deform_points else 0
        self.offset_net = (
            OffsetNetwork(dim, kernel_size, out_channels=num_offsets, channel_attention=offset_channel_attention)
            if num_offsets else None
        )
        self.offset_bias_table = None
        if offset_bias:
            self.offset_bias_table = tag_no_weight_decay(
                nn.Parameter(torch.empty(dim, OFFSET_BIAS_TABLE_SIZE, OFFSET_BIAS_TABLE_SIZE))
            )
            trunc_normal_(self.offset_bias_table, std=OFFSET_BIAS_TABLE_STD)

    def deformed_points(self, point_offset: Tensor) -> Tensor:
        """tanh'ed point offsets (B, 2, H, W) in (y, x) order -> deformed points (B, H, W, 2), pixel (x, y)."""
        height, width = point_offset.shape[-2:]
        rows = torch.arange(height, dtype=point_offset.dtype, device=point_offset.device)
        cols = torch.arange(width, dtype=point_offset.dtype, device=point_offset.device)
        y = deformed_coordinate(point_offset[:, POINT_OFFSET_Y], rows[:, None], height)
        x = deformed_coordinate(point_offset[:, POINT_OFFSET_X], cols[None, :], width)
        return torch.stack([x, y], dim=-1)

    def reference_points(self, height: int, width: int, like: Tensor) -> Tensor:
        """(H, W, 2) pixel (x, y): the points at zero point offset (the pixels themselves when DP is off)."""
        if self.deform_points:
            return self.deformed_points(like.new_zeros(1, NUM_POINT_OFFSET_CHANNELS, height, width))[0]
        return pixel_grid(height, width, like)

    def offset_bias(self, points: Tensor, height: int, width: int) -> Tensor:
        """The offset-bias table resized to (height, width), sampled at the displacement of each deformed point.

        Args:
            points: Deformed points (B, H, W, 2), pixel (x, y).

        Returns:
            (B, D, H, W).
        """
        table = F.interpolate(self.offset_bias_table.unsqueeze(0).to(points.dtype), size=(height, width),
                              mode="bilinear", align_corners=False)
        # Key grid linspace(0, size, size) in pixels; the release's displacement (key - p) / 2 in normalised units is
        # (key - p) / 2 + (size - 1) / 2 in pixels of the resized table.
        key_y = torch.linspace(0, height, height, dtype=points.dtype, device=points.device)
        key_x = torch.linspace(0, width, width, dtype=points.dtype, device=points.device)
        displacement_x = (key_x[None, None, :] - points[..., 0]) / 2 + (width - 1) / 2
        displacement_y = (key_y[None, :, None] - points[..., 1]) / 2 + (height - 1) / 2
        displacement = torch.stack([displacement_x, displacement_y], dim=-1)
        return bilinear_sample(table.expand(points.shape[0], -1, -1, -1), displacement.unsqueeze(1))

    def _points_and_positions(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Deformed points (B, H, W, 2) and scan positions (B, L) (None when DT is off) of features (B, D, H, W)."""
        batch, _, height, width = x.shape
        # Points and positions in float32 at least: in bfloat16 (autocast) a pixel index above 256 is rounded.
        geometry_like = x.new_empty(0, dtype=torch.promote_types(x.dtype, torch.float32))
        offsets = None
        if self.offset_net is not None:
            offsets = torch.tanh(self.offset_net(x).to(geometry_like.dtype))  # (B, DP*2 + DT, H, W)
        if self.deform_points:
            points = self.deformed_points(offsets[:, :NUM_POINT_OFFSET_CHANNELS])
        else:
            points = self.reference_points(height, width, geometry_like).expand(batch, -1, -1, -1)
        if not self.deform_order:
            return points, None
        num_tokens = height * width
        tokens = torch.arange(num_tokens, dtype=geometry_like.dtype, device=x.device)
        # Reference scan positions 2 (l + 0.5) / (L - 1) - 1 (the release's half-cell shift); 0 for a single token.
        reference = 2 * (tokens + 0.5) / (num_tokens - 1) - 1 if num_tokens > 1 else torch.zeros_like(tokens)
        return points, reference + offsets[:, self.index_offset_channel].flatten(1)

    @torch.no_grad()
    def scan_geometry(self, x: Tensor) -> ScanGeometry:
        """The points and scan order :meth:`forward` uses for features ``x`` (B, D, H, W), without gradients."""
        height, width = x.shape[-2:]
        points, positions = self._points_and_positions(x)
        if positions is None:
            order = torch.arange(height * width, device=x.device).expand(x.shape[0], -1)
        else:
            order = scan_order(positions)
        return ScanGeometry(self.reference_points(height, width, x), points, order)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Features (B, D, H, W) -> the deformable sequence (B, D, H*W) in scan order and the order (B, H*W).

        The order is None when DT is off (the sequence is in raster order).
        """
        height, width = x.shape[-2:]
        points, positions = self._points_and_positions(x)
        sampled = bilinear_sample(x.to(points.dtype), points.unsqueeze(1)) if self.deform_points else x
        if self.offset_bias_table is not None:
            sampled = sampled + self.offset_bias(points, height, width)
        if positions is None:
            return sampled.flatten(2), None
        return sort_tokens_straight_through(sampled.flatten(2), positions)


def scan_branch_order(branch: str, height: int, width: int, window: int, device: torch.device | None = None) -> Tensor:
    """Raster indices of a fixed-order scan branch: ``order[j]`` is the j-th token scanned, (H*W,) int64.

    ``forward``: raster (row-major); ``backward``: reversed raster; ``continuous``: boustrophedon, rows alternately
    left-to-right (even rows) and right-to-left (odd rows), so consecutive tokens are always neighbours;
    ``local``: non-overlapping ``window`` x ``window`` windows taken in raster order of windows, raster inside each;
    when a side is not a multiple of ``window`` the last windows along it are cut short (no padding).
    """
    grid = torch.arange(height * width, device=device).view(height, width)
    if branch == FORWARD:
        return grid.flatten()
    if branch == BACKWARD:
        return grid.flatten().flip(0)
    if branch == CONTINUOUS:
        snake = grid.clone()
        snake[1::2] = snake[1::2].flip(-1)
        return snake.flatten()
    if branch == LOCAL:
        windows_per_row = -(-width // window)
        rows = torch.arange(height, device=device)[:, None] // window
        cols = torch.arange(width, device=device)[None, :] // window
        window_index = (rows * windows_per_row + cols).flatten()
        return torch.argsort(window_index, stable=True)
    raise ValueError(f"{branch!r} is not a fixed-order scan branch; choose from {FORWARD, BACKWARD, CONTINUOUS, LOCAL}")


@dataclass(frozen=True)
class ScanOptions:
    """The DSSM's scan ablation switches (paper Tables 4 and 5); the defaults are the released model.

    Attributes:
        branches: Scan sequences, a non-empty set of distinct names from :data:`SCAN_BRANCHES`, stacked in this
            order (K = their number sizes x_proj, dt_proj, A_log, D); the outputs are averaged in raster order.
        local_window: Window side of the ``local`` branch.
        deform_points: DP: sample at learned point offsets (off: each token is its own pixel's feature).
        deform_order: DT: scan the deformable sequence in the learned order (off: raster order).
        offset_bias: OB: add the offset-bias table (off: no table).
        offset_channel_attention: CA: channel attention in the offset network (off: no CA parameters).

    The last four apply only to a ``deformable`` branch; turning one off without it raises.
    """

    branches: tuple[str, ...] = RELEASED_SCAN_BRANCHES
    local_window: int = DEFAULT_LOCAL_WINDOW
    deform_points: bool = True
    deform_order: bool = True
    offset_bias: bool = True
    offset_channel_attention: bool = True

    def __post_init__(self):
        branches = tuple(self.branches)
        unknown = [branch for branch in branches if branch not in SCAN_BRANCHES]
        if not branches or unknown or len(set(branches)) != len(branches):
            raise ValueError(
                f"scan_branches must be a non-empty set of distinct names from {SCAN_BRANCHES}, got {branches}"
            )
        if self.local_window < 1:
            raise ValueError(f"local_window must be >= 1, got {self.local_window}")
        switches_off = [name for name in ("deform_points", "deform_order", "offset_bias", "offset_channel_attention")
                        if not getattr(self, name)]
        if switches_off and DEFORMABLE not in branches:
            raise ValueError(f"{', '.join(switches_off)} False only applies to the {DEFORMABLE!r} scan branch, which "
                             f"scan_branches {branches} lacks: add it or leave the switches True")
        object.__setattr__(self, "branches", branches)


class DSSM(nn.Module):
    """Deformable state-space token mixer: (B, H, W, dim) -> (B, H, W, dim).

    Args:
        dim: Block width.
        d_state: SSM state size N.
        ssm_ratio: Inner width / block width.
        offset_kernel_size: Kernel of the offset network's depthwise conv.
        scan_backend: ``backend`` of :func:`classification.ops.selective_scan.selective_scan_fn`.
        scan_options: Scan branches and deformable components (:class:`ScanOptions`).
    """

    def __init__(
        self,
        dim: int,
        d_state: int,
        ssm_ratio: float,
        offset_kernel_size: int,
        scan_backend: str,
        scan_options: ScanOptions = ScanOptions(),
    ):
        super().__init__()
        self.scan_branches = scan_options.branches
        self.local_window = scan_options.local_window
        num_branches = len(self.scan_branches)
        inner = int(ssm_ratio * dim)
        self.inner = inner
        self.d_state = d_state
        self.dt_rank = default_dt_rank(inner)
        self.scan_backend = scan_backend
        self.scan_fn = selective_scan_fn  # replaceable (utils/flops.py swaps in a shape-only stand-in)
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv = nn.Conv2d(inner, inner, kernel_size=3, padding=1, groups=inner)
        self.act = nn.SiLU()
        self.deformable = (
            DeformableScan(inner, offset_kernel_size, deform_points=scan_options.deform_points,
                           deform_order=scan_options.deform_order, offset_bias=scan_options.offset_bias,
                           offset_channel_attention=scan_options.offset_channel_attention)
            if DEFORMABLE in self.scan_branches else None
        )
        self.x_proj_weight = nn.Parameter(torch.empty(num_branches, self.dt_rank + 2 * d_state, inner))
        self.dt_proj_weight = nn.Parameter(torch.empty(num_branches, inner, self.dt_rank))
        self.dt_bias = tag_no_weight_decay(nn.Parameter(torch.empty(num_branches, inner)))
        self.A_log = tag_no_weight_decay(nn.Parameter(torch.empty(num_branches * inner, d_state)))
        self.D = tag_no_weight_decay(nn.Parameter(torch.empty(num_branches * inner)))
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """The release's SSM initialisation (x_proj, dt projection, A_log, D)."""
        init_ssm_projections_(self.x_proj_weight, self.dt_proj_weight, self.dt_bias, self.D)
        state_index = torch.arange(1, self.d_state + 1, dtype=self.A_log.dtype, device=self.A_log.device)
        self.A_log.copy_(torch.log(state_index).expand_as(self.A_log))  # A = -(1, 2, ..., d_state) in every channel

    def scan_shape(self, x: Tensor) -> tuple[int, int, int, int]:
        """(batch, channels, length, d_state) of the selective scan run on input ``x`` (for FLOP counting)."""
        batch, height, width = x.shape[:3]
        return batch, len(self.scan_branches) * self.inner, height * width, self.d_state

    def _branch_sequences(self, x: Tensor) -> tuple[list[Tensor], list[Tensor | None]]:
        """Features (B, inner, H, W) -> per branch the sequence (B, inner, L) and its order ((L,) or (B, L) or None)."""
        height, width = x.shape[-2:]
        raster = x.flatten(2)
        sequences, orders = [], []
        for branch in self.scan_branches:
            if branch == DEFORMABLE:
                sequence, order = self.deformable(x)
            elif branch == FORWARD:
                sequence, order = raster, None
            elif branch == BACKWARD:
                sequence, order = raster.flip(-1), None
            else:
                order = scan_branch_order(branch, height, width, self.local_window, x.device)
                sequence = raster[..., order]
            sequences.append(sequence)
            orders.append(order)
        return sequences, orders

    def _to_raster(self, branch: str, y: Tensor, order: Tensor | None) -> Tensor:
        """A branch's scan output (B, inner, L) back in raster order."""
        if branch == BACKWARD:
            return y.flip(-1)
        if order is None:
            return y
        if order.dim() == 1:
            return y[..., torch.argsort(order)]
        return unsort_tokens(y, order)

    def scan_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Input (B, H, W, dim) -> the features every branch scans (B, inner, H, W) and the gate's input z.

        The first is what :meth:`DeformableScan.scan_geometry` takes; z (B, H, W, inner) is the gate before its SiLU.
        """
        x, z = self.in_proj(x).chunk(2, dim=-1)  # (B, H, W, inner) each
        return self.act(self.conv(channels_last_to_first(x))), z

    def _raster_outputs(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """Input (B, H, W, dim) -> per branch its scan output back in raster order (B, inner, L), and z."""
        x, z = self.scan_features(x)
        sequences, orders = self._branch_sequences(x)
        # (B, K, inner, L); the deformable sequence is float32 at least, the rest follows the weights (a half model)
        xs = torch.stack(sequences, dim=1).to(self.x_proj_weight.dtype)
        y = branch_ssm(xs, self.x_proj_weight, self.dt_proj_weight, self.A_log, self.D, self.dt_bias, self.scan_fn,
                       self.scan_backend)
        return [self._to_raster(branch, y[:, k], orders[k]) for k, branch in enumerate(self.scan_branches)], z

    def branch_outputs(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Each scan branch's output back in raster order, before averaging, and the gate's input (for figures).

        :meth:`forward` is ``out_proj(mean over K of ys * SiLU(z))``, the mean summed in branch order.

        Args:
            x: (B, H, W, dim).

        Returns:
            ``ys`` (B, K, H, W, inner), branch k of :attr:`scan_branches` at index k, and ``z`` (B, H, W, inner), the
            gate before its SiLU.
        """
        height, width = x.shape[1:3]
        ys, z = self._raster_outputs(x)
        return rearrange(torch.stack(ys, dim=1), "b k d (h w) -> b k h w d", h=height, w=width), z

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[1:3]
        ys, z = self._raster_outputs(x)
        total = ys[0]
        for y in ys[1:]:  # summed in branch order, as the release's (y0 + y1 + y2) / 3
            total = total + y
        y = rearrange(total / len(ys), "b d (h w) -> b h w d", h=height, w=width)
        return self.out_proj(y * self.act(z))


class DefMambaBlock(nn.Module):
    """x + DropPath(DSSM(LN(x))), then x + DropPath(MLP(LN(x))), on (B, H, W, dim)."""

    def __init__(
        self,
        dim: int,
        d_state: int,
        ssm_ratio: float,
        mlp_ratio: float,
        offset_kernel_size: int,
        drop_rate: float,
        drop_path_rate: float,
        scan_backend: str,
        scan_options: ScanOptions,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mixer = DSSM(dim, d_state=d_state, ssm_ratio=ssm_ratio, offset_kernel_size=offset_kernel_size,
                          scan_backend=scan_backend, scan_options=scan_options)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop_rate)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DefMambaStage(nn.Module):
    """Optional downsampling from the previous stage, then the blocks; (B, H, W, in_dim) -> (B, H', W', dim)."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        downsample: bool,
        drop_path_rates: list[float],
        d_state: int,
        ssm_ratio: float,
        mlp_ratio: float,
        offset_kernel_size: int,
        drop_rate: float,
        scan_backend: str,
        scan_options: ScanOptions,
    ):
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[
            DefMambaBlock(dim, d_state=d_state, ssm_ratio=ssm_ratio, mlp_ratio=mlp_ratio,
                          offset_kernel_size=offset_kernel_size, drop_rate=drop_rate, drop_path_rate=rate,
                          scan_backend=scan_backend, scan_options=scan_options)
            for rate in drop_path_rates
        ])
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        return run_blocks(self.blocks, self.downsample(x), self.grad_checkpointing)


class DefMamba(Backbone):
    """DefMamba classifier / backbone.

    Args:
        num_classes: Classifier outputs; 0 for none (pooled features out).
        in_chans: Input image channels.
        embed_dim: Stage-1 width C; stages have C, 2C, 4C, 8C.
        depths: Blocks per stage.
        d_state: SSM state size N.
        ssm_ratio: DSSM inner width / block width.
        mlp_ratio: MLP hidden width / block width.
        drop_rate: Dropout inside the MLPs.
        drop_path_rate: Stochastic depth, rising linearly to this over all blocks.
        offset_kernel_sizes: Offset-network depthwise kernel per stage.
        scan_backend: Selective-scan backend (``auto``, ``ref``, ``torch``, ``cpu``, ``cuda``, ``triton``).
        scan_branches: Scan sequences of every DSSM, distinct names from :data:`SCAN_BRANCHES` (Table 4).
        local_window: Window side of the ``local`` branch; edge windows are cut short when a side is not a multiple.
        deform_points: Point offset DP of the deformable branch (Table 5).
        deform_order: Token-index offset DT (off: the deformable branch scans in raster order).
        offset_bias: Offset bias OB (off: no offset-bias tables).
        offset_channel_attention: Channel attention CA in the offset network.
    """

    # The released DefMamba FLOP counter counts the selective scan and the bilinear sampling (see utils/flops.py).
    flops_include_scan = True
    flops_include_sampling = True

    def __init__(
        self,
        num_classes: int = 1000,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 9, 2),
        d_state: int = 16,
        ssm_ratio: float = 1.0,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        offset_kernel_sizes: tuple[int, ...] = (9, 7, 5, 3),
        scan_backend: str = "auto",
        scan_branches: tuple[str, ...] = RELEASED_SCAN_BRANCHES,
        local_window: int = DEFAULT_LOCAL_WINDOW,
        deform_points: bool = True,
        deform_order: bool = True,
        offset_bias: bool = True,
        offset_channel_attention: bool = True,
    ):
        super().__init__()
        scan_options = ScanOptions(scan_branches, local_window=local_window, deform_points=deform_points,
                                   deform_order=deform_order, offset_bias=offset_bias,
                                   offset_channel_attention=offset_channel_attention)
        if len(depths) != NUM_STAGES or len(offset_kernel_sizes) != NUM_STAGES:
            raise ValueError(f"depths {depths} and offset_kernel_sizes {offset_kernel_sizes} need {NUM_STAGES} entries")
        if embed_dim < MIN_EMBED_DIM:
            raise ValueError(f"embed_dim must be >= {MIN_EMBED_DIM} (the stem's first conv has embed_dim // 2 "
                             f"channels), got {embed_dim}")
        if int(ssm_ratio * embed_dim) < 1:
            raise ValueError(f"ssm_ratio {ssm_ratio} leaves no SSM channel at width {embed_dim} (int(ssm_ratio x "
                             "width) must be >= 1)")
        dims = [embed_dim * DOWNSAMPLE_STRIDE ** stage for stage in range(NUM_STAGES)]
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = dims[-1]
        self.stem = Stem(in_chans, embed_dim)
        rates = linear_drop_path_rates(drop_path_rate, tuple(depths))
        self.stages = nn.ModuleList([
            DefMambaStage(
                dims[max(stage - 1, 0)], dims[stage], downsample=stage > 0, drop_path_rates=rates[stage],
                d_state=d_state, ssm_ratio=ssm_ratio, mlp_ratio=mlp_ratio,
                offset_kernel_size=offset_kernel_sizes[stage], drop_rate=drop_rate, scan_backend=scan_backend,
                scan_options=scan_options,
            )
            for stage in range(NUM_STAGES)
        ])
        self.feature_info = stage_feature_info(dims)
        # The release's pooling op, which its FLOP counter counts.
        self.head = PooledLinearHead(self.num_features, num_classes, norm_eps=LAYER_NORM_EPS,
                                     pool=POOL_ADAPTIVE_AVG)
        self.apply(trunc_normal_init)

    def to_nchw(self, x: Tensor) -> Tensor:
        return channels_last_to_first(x)


# Released key -> ours: the first rule whose pattern matches the whole key renames it. Block i of stage s keeps its
# indices; the released downsample after stage s is our downsample at the start of stage s + 1. ``(.*)`` is the rest
# of a key (a parameter or buffer name) that a rule keeps.
_BLOCK, _OUR_BLOCK = r"layers\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.blocks.\2."
_RELEASED_KEY_RULES = key_rules([
    (r"patch_embed\.0\.(.*)", r"stem.conv1.\1"),
    (r"patch_embed\.2\.(.*)", r"stem.norm1.\1"),
    (r"patch_embed\.5\.(.*)", r"stem.conv2.\1"),
    (r"patch_embed\.7\.(.*)", r"stem.norm2.\1"),
    (r"layers\.(\d+)\.downsample\.1\.(.*)", lambda m: f"stages.{int(m[1]) + 1}.downsample.conv.{m[2]}"),
    (r"layers\.(\d+)\.downsample\.3\.(.*)", lambda m: f"stages.{int(m[1]) + 1}.downsample.norm.{m[2]}"),
    (r"classifier\.norm\.(.*)", r"head.norm.\1"),
    (r"classifier\.head\.(.*)", r"head.fc.\1"),
    (_BLOCK + r"norm\.(.*)", _OUR_BLOCK + r"norm1.\3"),
    (_BLOCK + r"norm2\.(.*)", _OUR_BLOCK + r"norm2.\3"),
    (_BLOCK + r"mlp\.(.*)", _OUR_BLOCK + r"mlp.\3"),
    (_BLOCK + r"op\.in_proj\.(.*)", _OUR_BLOCK + r"mixer.in_proj.\3"),
    (_BLOCK + r"op\.out_proj\.(.*)", _OUR_BLOCK + r"mixer.out_proj.\3"),
    (_BLOCK + r"op\.conv2d\.(.*)", _OUR_BLOCK + r"mixer.conv.\3"),
    (_BLOCK + r"op\.x_proj_weight", _OUR_BLOCK + "mixer.x_proj_weight"),
    (_BLOCK + r"op\.dt_projs_weight", _OUR_BLOCK + "mixer.dt_proj_weight"),
    (_BLOCK + r"op\.dt_projs_bias", _OUR_BLOCK + "mixer.dt_bias"),
    (_BLOCK + r"op\.A_logs", _OUR_BLOCK + "mixer.A_log"),
    (_BLOCK + r"op\.Ds", _OUR_BLOCK + "mixer.D"),
    (_BLOCK + r"op\.DS\.rpe_table", _OUR_BLOCK + "mixer.deformable.offset_bias_table"),
    (_BLOCK + r"op\.DS\.conv_offset\.conv1\.(.*)", _OUR_BLOCK + r"mixer.deformable.offset_net.dwconv.\3"),
    (_BLOCK + r"op\.DS\.conv_offset\.ca\.0\.(.*)",
     _OUR_BLOCK + r"mixer.deformable.offset_net.channel_attention.fc1.\3"),
    (_BLOCK + r"op\.DS\.conv_offset\.ca\.2\.(.*)",
     _OUR_BLOCK + r"mixer.deformable.offset_net.channel_attention.fc2.\3"),
    (_BLOCK + r"op\.DS\.conv_offset\.ln\.(.*)", _OUR_BLOCK + r"mixer.deformable.offset_net.norm.\3"),
    (_BLOCK + r"op\.DS\.conv_offset\.conv2\.(.*)", _OUR_BLOCK + r"mixer.deformable.offset_net.proj.\3"),
])


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Released DefMamba state dict -> ours (timm's filter signature): a pure key renaming, key by key.

    Keys already in our naming pass through, so our own checkpoints, partial dicts and dicts of gradients keyed like
    the parameters convert as well. Tensors are not changed (our layouts equal the release's).

    Args:
        state_dict: Released or own keys -> tensors.
        model: Unused by the renaming; part of timm's filter signature.

    Returns:
        A new dict with our keys.
    """
    return {rename_key(key, _RELEASED_KEY_RULES): value for key, value in state_dict.items()}


register_checkpoint_filter(DefMamba, checkpoint_filter_fn)


# The release resizes bilinearly (its config's DATA.INTERPOLATION, which no DefMamba yaml overrides).
default_cfgs = imagenet_default_cfgs(("defmamba_tiny", "defmamba_small", "defmamba_base"), first_conv="stem.conv1",
                                     interpolation="bilinear")


# Each variant's architecture and stochastic-depth rate.
VARIANT_ARGS = {
    "defmamba_tiny": dict(embed_dim=48, depths=(2, 2, 5, 2), drop_path_rate=0.2),
    "defmamba_small": dict(embed_dim=96, depths=(2, 2, 6, 2), drop_path_rate=0.2),
    "defmamba_base": dict(embed_dim=96, depths=(2, 3, 16, 2), drop_path_rate=0.4),
}


def _create_defmamba(variant: str, pretrained: bool, overrides: dict) -> DefMamba:
    return create_backbone(DefMamba, variant, pretrained, checkpoint_filter_fn, {**VARIANT_ARGS[variant], **overrides})


@register_model
def defmamba_tiny(pretrained: bool = False, **kwargs) -> DefMamba:
    """DefMamba-T: C 48, depths 2-2-5-2, 7,547,878 parameters, 1.29 GFLOPs at 224."""
    return _create_defmamba("defmamba_tiny", pretrained, kwargs)


@register_model
def defmamba_small(pretrained: bool = False, **kwargs) -> DefMamba:
    """DefMamba-S: C 96, depths 2-2-6-2, 30,201,340 parameters, 5.01 GFLOPs at 224."""
    return _create_defmamba("defmamba_small", pretrained, kwargs)


@register_model
def defmamba_base(pretrained: bool = False, **kwargs) -> DefMamba:
    """DefMamba-B: C 96, depths 2-3-16-2, 48,595,576 parameters, 8.93 GFLOPs at 224."""
    return _create_defmamba("defmamba_base", pretrained, kwargs)
