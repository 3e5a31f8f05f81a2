"""bilinear_sample against its gather-based twin, analytic values, gradients, and errors."""
import pytest
import torch
import torch.nn.functional as F

from classification.ops import bilinear_sample, bilinear_sample_ref
from classification.ops.deformable import pixel_grid


def _random_case(batch=2, groups=3, group_channels=4, height=5, width=7, out_hw=(4, 6), spread=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, groups * group_channels, height, width, generator=gen, dtype=torch.float64)
    base_x = torch.rand(batch, groups, *out_hw, generator=gen, dtype=torch.float64) * (width - 1)
    base_y = torch.rand(batch, groups, *out_hw, generator=gen, dtype=torch.float64) * (height - 1)
    jitter = (torch.rand(batch, groups, *out_hw, 2, generator=gen, dtype=torch.float64) - 0.5) * 2 * spread
    points = torch.stack([base_x, base_y], dim=-1) + jitter  # some points fall outside the map
    return features, points


@pytest.mark.parametrize("groups,height,width", [(1, 5, 7), (3, 5, 7), (2, 1, 6), (2, 4, 1), (1, 1, 1)])
def test_matches_reference_forward_and_backward(groups, height, width):
    features, points = _random_case(groups=groups, height=height, width=width)
    features_ref, points_ref = features.clone().requires_grad_(), points.clone().requires_grad_()
    features.requires_grad_(), points.requires_grad_()
    out, out_ref = bilinear_sample(features, points), bilinear_sample_ref(features_ref, points_ref)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    (out_ref * grad_out).sum().backward()
    torch.testing.assert_close(features.grad, features_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(points.grad, points_ref.grad, rtol=1e-12, atol=1e-12)


def test_integer_points_copy_pixels_and_outside_points_give_zero():
    features, _ = _random_case(groups=2)
    height, width = features.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    identity = torch.stack([xs, ys], dim=-1).to(features).expand(2, 2, height, width, 2)
    assert torch.equal(bilinear_sample_ref(features, identity), features)
    torch.testing.assert_close(bilinear_sample(features, identity), features, rtol=1e-14, atol=1e-14)
    far = torch.full_like(identity, -1.25)  # beyond the one-pixel band where a neighbour still contributes
    for op in (bilinear_sample, bilinear_sample_ref):
        assert torch.equal(op(features, far), torch.zeros_like(features))


def test_a_nan_point_samples_nan_in_both_twins():
    features = torch.arange(2 * 4 * 5, dtype=torch.float64).reshape(1, 2, 4, 5)
    points = torch.tensor([[[[[1.0, 2.0], [float("nan"), 1.0], [0.5, float("nan")]]]]], dtype=torch.float64)
    for sample in (bilinear_sample, bilinear_sample_ref):
        out = sample(features, points)
        assert torch.equal(out.isnan(), torch.tensor([False, True, True]).expand(1, 2, 1, 3)), sample.__name__
        assert torch.equal(out[..., 0], features[:, :, 2, 1][..., None])

def test_half_pixel_point_is_the_mean_of_its_neighbours():
    features, _ = _random_case(groups=1, height=3, width=3)
    point = torch.tensor([0.5, 1.5], dtype=torch.float64).view(1, 1, 1, 1, 2).expand(2, 1, 1, 1, 2)
    expected = features[:, :, 1:3, 0:2].mean(dim=(-2, -1)).view(2, -1, 1, 1)
    torch.testing.assert_close(bilinear_sample(features, point), expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(bilinear_sample_ref(features, point), expected, rtol=1e-14, atol=1e-14)


def test_equals_grid_sample_align_corners_true_for_normalised_points():
    """DefMamba's convention: normalised (align_corners=True) points map to pixels by (g + 1) (size - 1) / 2."""
    features, _ = _random_case(groups=1, height=6, width=9)
    grid = torch.rand(2, 4, 5, 2, dtype=torch.float64) * 2.4 - 1.2
    expected = F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    sizes = torch.tensor([9 - 1, 6 - 1], dtype=torch.float64)
    points = ((grid + 1) * sizes / 2).unsqueeze(1)
    torch.testing.assert_close(bilinear_sample(features, points), expected, rtol=1e-12, atol=1e-12)


def test_gradcheck_reference():
    features, points = _random_case(batch=1, groups=2, group_channels=1, height=3, width=4, out_hw=(2, 2))
    points = points + 0.123  # keep away from the kinks at integer coordinates
    assert torch.autograd.gradcheck(bilinear_sample_ref, (features.requires_grad_(), points.requires_grad_()))


@pytest.mark.parametrize(
    "features_shape,points_shape,match",
    [
        ((2, 6, 4), (2, 1, 4, 4, 2), r"features: expected \(batch, channels, height, width\)"),
        ((2, 6, 4, 4), (2, 1, 4, 4, 3), r"points: expected \(batch, groups, out_height, out_width, 2\)"),
        ((2, 6, 4, 4), (3, 1, 4, 4, 2), "points: batch 3 does not match"),
        ((2, 6, 4, 4), (2, 4, 4, 4, 2), "4 groups do not divide the 6 feature channels"),
        ((2, 6, 0, 4), (2, 1, 4, 4, 2), r"features: got shape \(2, 6, 0, 4\), need a map of at least 1 x 1 pixel"),
        ((2, 6, 4, 0), (2, 1, 4, 4, 2), r"features: got shape \(2, 6, 4, 0\), need a map of at least 1 x 1 pixel"),
        ((2, 6, 4, 4), (1, 1, 4, 4, 2), "points: batch 1 does not match the features' batch 2"),  # would broadcast
        ((2, 6, 4, 4), (2, 0, 4, 4, 2), "points: 0 groups do not divide the 6 feature channels"),
    ],
)
@pytest.mark.parametrize("sample", [bilinear_sample, bilinear_sample_ref])
def test_errors_name_the_tensor_and_shape(sample, features_shape, points_shape, match):
    with pytest.raises(ValueError, match=match):
        sample(torch.zeros(features_shape), torch.zeros(points_shape))


def test_pixel_grid_puts_pixel_i_j_at_x_j_y_i():
    like = torch.empty(0, dtype=torch.float64)
    grid = pixel_grid(2, 3, like)
    assert grid.dtype == torch.float64 and grid.shape == (2, 3, 2)
    assert grid.tolist() == [[[0, 0], [1, 0], [2, 0]], [[0, 1], [1, 1], [2, 1]]]
    # Sampling a map at its own pixel grid gives the map back.
    features = torch.randn(1, 4, 2, 3, dtype=torch.float64)
    points = grid.expand(1, 2, 2, 3, 2)
    torch.testing.assert_close(bilinear_sample(features, points), features, rtol=0, atol=1e-15)


@pytest.mark.parametrize("sample", [bilinear_sample, bilinear_sample_ref])
def test_points_in_another_dtype_are_refused(sample):
    features = torch.zeros(1, 2, 3, 3, dtype=torch.float32)
    points = torch.zeros(1, 1, 2, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="points: dtype torch.float64 differs from the features' dtype torch.float32"):
        sample(features, points)
