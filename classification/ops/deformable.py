"""Deformable-scan ops shared by the model families.

Grouped bilinear point sampling with zero padding: the deformable sampling op of both families.

DefMamba samples its features at deformed points (one group, ``grid_sample`` with ``align_corners=True`` in the
release) and its offset-bias table at displacements; DAMamba's 1x1 DCNv3 samples each group of 16 channels at its own
offsets (``align_corners=False``). Both are the same operation once the points are given in pixel-index coordinates,
which is the convention here: pixel ``(i, j)`` of a map sits at ``(x, y) = (j, i)``, independent of the map size, so
no side length ever divides anything (a 1-pixel side is fine).

``bilinear_sample`` runs on ``torch.nn.functional.grid_sample``; ``bilinear_sample_ref`` is its plain-gather twin
(same signature), written from the definition.
"""
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

NUM_COORDS = 2  # (x, y)


def _check_inputs(features: Tensor, points: Tensor) -> tuple[int, int]:
    """Validates the layouts and returns (groups, channels per group)."""
    if features.dim() != 4:
        raise ValueError(f"features: expected (batch, channels, height, width), got shape {tuple(features.shape)}")
    if points.dim() != 5 or points.shape[-1] != NUM_COORDS:
        raise ValueError(
            f"points: expected (batch, groups, out_height, out_width, 2), got shape {tuple(points.shape)}"
        )
    batch, channels, height, width = features.shape
    if height == 0 or width == 0:
        raise ValueError(f"features: got shape {tuple(features.shape)}, need a map of at least 1 x 1 pixel")
    groups = points.shape[1]
    if points.shape[0] != batch:
        raise ValueError(f"points: batch {points.shape[0]} does not match the features' batch {batch}")
    if groups == 0 or channels % groups:
        raise ValueError(f"points: {groups} groups do not divide the {channels} feature channels")
    if points.dtype != features.dtype:
        raise ValueError(f"points: dtype {points.dtype} differs from the features' dtype {features.dtype}")
    return groups, channels // groups


def pixel_grid(height: int, width: int, like: Tensor) -> Tensor:
    """(height, width, 2): the point ``(x, y) = (j, i)`` of every pixel ``(i, j)``, in ``like``'s dtype and device."""
    rows = torch.arange(height, dtype=like.dtype, device=like.device)
    cols = torch.arange(width, dtype=like.dtype, device=like.device)
    return torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=-1)


def bilinear_sample(features: Tensor, points: Tensor) -> Tensor:
    """Samples each channel group of ``features`` at its own points, bilinearly, with zero padding.

    A point contributes the bilinear mix of its four neighbouring pixels ``floor`` and ``floor + 1`` along x and y;
    neighbours outside the map contribute zero, so a point outside ``(-1, W) x (-1, H)`` samples zero.

    Args:
        features: (batch, groups * group_channels, height, width). Group ``g`` is channels
            ``g * group_channels ... (g + 1) * group_channels - 1``.
        points: (batch, groups, out_height, out_width, 2), ``(x, y)`` in pixel-index coordinates.

    Returns:
        (batch, groups * group_channels, out_height, out_width), differentiable in ``features`` and ``points``.

    Precision: ``grid_sample`` takes normalised coordinates, and the round trip costs about ``width`` float32
    roundings: relative errors of 1e-6 on a 14-pixel map, 2e-5 at 1024 pixels (``bilinear_sample_ref`` stays at
    float32's 1e-7). Sample in float64 where that matters.
    """
    groups, _ = _check_inputs(features, points)
    height, width = features.shape[-2:]
    grouped = rearrange(features, "b (g c) h w -> (b g) c h w", g=groups)
    # Pixel-index coordinates -> grid_sample's align_corners=False normalisation (pixel k spans [k - 0.5, k + 0.5]).
    # Each coordinate scaled on its own (not by a tensor of the two scales): the sizes stay symbolic under export.
    x, y = (points + 0.5).unbind(-1)
    grid = rearrange(torch.stack((x * (2.0 / width) - 1.0, y * (2.0 / height) - 1.0), dim=-1),
                     "b g h w xy -> (b g) h w xy")
    sampled = F.grid_sample(grouped, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return rearrange(sampled, "(b g) c h w -> b (g c) h w", g=groups)


def bilinear_sample_ref(features: Tensor, points: Tensor) -> Tensor:
    """Reference twin of :func:`bilinear_sample` (same signature): explicit four-neighbour gathers.

    At a point exactly on a pixel's row or column the bilinear map has a kink; the derivative taken there is the
    right-hand one (the ``floor`` neighbours), while ``grid_sample``'s coordinate normalisation may round such a
    point to either side. Model points are never exactly there (offsets start random, DefMamba's grid is shifted half
    a pixel), and the tests compare the two away from kinks.
    """
    groups, group_channels = _check_inputs(features, points)
    height, width = features.shape[-2:]
    out_height, out_width = points.shape[2:4]
    flat = rearrange(features, "b (g c) h w -> b g c (h w)", g=groups)
    x, y = points.unbind(-1)  # (batch, groups, out_height, out_width) each
    x0, y0 = x.floor(), y.floor()
    out = features.new_zeros(features.shape[0], groups, group_channels, out_height * out_width)
    for corner_x, weight_x in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
        for corner_y, weight_y in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
            inside = (corner_x >= 0) & (corner_x <= width - 1) & (corner_y >= 0) & (corner_y <= height - 1)
            # A NaN point gathers pixel 0 (a valid index) and keeps its NaN through the weight, as grid_sample does.
            index = (corner_y.clamp(0, height - 1) * width + corner_x.clamp(0, width - 1)).nan_to_num(0.0).long()
            index = rearrange(index, "b g h w -> b g 1 (h w)").expand(-1, -1, group_channels, -1)
            weight = rearrange(weight_x * weight_y * inside, "b g h w -> b g 1 (h w)")
            out = out + weight * torch.gather(flat, 3, index)
    return rearrange(out, "b g c (h w) -> b (g c) h w", h=out_height)


def _check_sort_inputs(features: Tensor, positions: Tensor) -> None:
    if features.dim() != 3:
        raise ValueError(f"features: expected (batch, channels, length), got shape {tuple(features.shape)}")
    if positions.shape != (features.shape[0], features.shape[2]):
        raise ValueError(
            f"positions: expected (batch, length) = {(features.shape[0], features.shape[2])}, "
            f"got {tuple(positions.shape)}"
        )
    if not positions.is_floating_point():
        raise ValueError(f"positions: expected a floating dtype, got {positions.dtype}")


def scan_order(positions: Tensor) -> Tensor:
    """The permutation that sorts ``positions`` (batch, length) ascending: ``order[b, j]`` is the j-th token."""
    return torch.argsort(positions, dim=-1, stable=True)


class _SortTokensStraightThrough(torch.autograd.Function):
    """Gather in sorted order, straight-through gradient for the positions: see :func:`sort_tokens_straight_through`."""

    @staticmethod
    def forward(ctx, features: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        order = scan_order(positions)
        ctx.save_for_backward(order)
        ctx.mark_non_differentiable(order)
        index = order.unsqueeze(1).expand_as(features)
        return torch.gather(features, 2, index), order

    @staticmethod
    def backward(ctx, grad_sorted: Tensor, grad_order: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        (order,) = ctx.saved_tensors
        grad_raster = torch.zeros_like(grad_sorted).scatter_(2, order.unsqueeze(1).expand_as(grad_sorted), grad_sorted)
        grad_features = grad_raster if ctx.needs_input_grad[0] else None
        grad_positions = (grad_sorted - grad_raster).mean(dim=1) if ctx.needs_input_grad[1] else None
        return grad_features, grad_positions


def sort_tokens_straight_through(features: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Reorders tokens by ascending position, with DefMamba's straight-through gradient for the positions.

    Forward: ``sorted[b, :, j] = features[b, :, order[b, j]]`` with ``order`` sorting ``positions[b]`` ascending.
    Sorting has no gradient; the released DefMamba defines one, reproduced here exactly: with ``g_s`` the gradient
    reaching ``sorted`` and ``g_o`` the same moved back to raster order (``g_o[:, :, order[j]] = g_s[:, :, j]``),
    the features receive ``g_o`` and the positions receive ``mean over channels of (g_s - g_o)`` taken at the same
    index ``l`` in both (one in sorted, one in raster order).

    Args:
        features: (batch, channels, length), tokens in raster order.
        positions: (batch, length), each token's position on the scan line.

    Returns:
        ``sorted`` (batch, channels, length) and ``order`` (batch, length, int64, no gradient).
    """
    _check_sort_inputs(features, positions)
    return _SortTokensStraightThrough.apply(features, positions)


def sort_tokens_straight_through_ref(features: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Reference twin of :func:`sort_tokens_straight_through` (same signature), from plain differentiable ops.

    The straight-through rule comes from two terms whose value is exactly zero: ``(p - p.detach()) / C`` placed at
    sorted index ``l`` contributes ``mean_c g_s[:, :, l]`` to the gradient of ``p[l]``; the same term gathered in sorted
    order (raster index ``order[j]`` at sorted index ``j``) and subtracted contributes ``-mean_c g_o[:, :, l]``. A NaN
    position makes those terms NaN, and with them the tokens they are added to, where the op's output stays the
    gathered features (NaN positions only come from a network that has already diverged).
    """
    _check_sort_inputs(features, positions)
    order = scan_order(positions.detach())
    sorted_features = torch.gather(features, 2, order.unsqueeze(1).expand_as(features))
    zero = (positions - positions.detach()) / features.shape[1]  # (batch, length), value 0
    straight_through = zero - torch.gather(zero, 1, order)
    return sorted_features + straight_through.unsqueeze(1), order


def unsort_tokens(sorted_features: Tensor, order: Tensor) -> Tensor:
    """Inverse of the scan order: ``out[b, :, order[b, j]] = sorted_features[b, :, j]`` (gather with the inverse).

    ``order`` (batch, length) must be a permutation of ``0 .. length - 1`` in each row, as :func:`scan_order` gives;
    that is not checked (it would cost a sort).
    """
    inverse = torch.argsort(order, dim=-1)
    return torch.gather(sorted_features, 2, inverse.unsqueeze(1).expand_as(sorted_features))


def unsort_tokens_ref(sorted_features: Tensor, order: Tensor) -> Tensor:
    """Reference twin of :func:`unsort_tokens` (same signature): a scatter to the raster positions."""
    index = order.unsqueeze(1).expand_as(sorted_features)
    return torch.zeros_like(sorted_features).scatter(2, index, sorted_features)
