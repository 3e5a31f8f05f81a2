"""The deformable scan order: sort with the release's straight-through gradient, and its inverse."""
import pytest
import torch

from classification.ops.deformable import (
    sort_tokens_straight_through,
    sort_tokens_straight_through_ref,
    unsort_tokens,
    unsort_tokens_ref,
)

SORTS = [sort_tokens_straight_through, sort_tokens_straight_through_ref]
UNSORTS = [unsort_tokens, unsort_tokens_ref]


@pytest.mark.parametrize("sort", SORTS)
def test_hand_computed_case(sort):
    features = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]], dtype=torch.float64, requires_grad=True)
    positions = torch.tensor([[0.5, -1.0, 0.2]], dtype=torch.float64, requires_grad=True)
    sorted_features, order = sort(features, positions)
    assert order.tolist() == [[1, 2, 0]]
    assert sorted_features.tolist() == [[[2.0, 3.0, 1.0], [5.0, 6.0, 4.0]]]
    grad_sorted = torch.tensor([[[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]]], dtype=torch.float64)
    sorted_features.backward(grad_sorted)
    # g_o[:, order[j]] = g_s[:, j]; positions get mean_c(g_s[:, l] - g_o[:, l]).
    assert features.grad.tolist() == [[[3.0, 1.0, 2.0], [30.0, 10.0, 20.0]]]
    assert positions.grad.tolist() == [[-11.0, 5.5, 5.5]]


def test_fn_matches_ref_forward_and_gradients():
    generator = torch.Generator().manual_seed(0)
    batch, channels, length = 3, 5, 17
    features = torch.randn(batch, channels, length, dtype=torch.float64, generator=generator)
    positions = torch.randn(batch, length, dtype=torch.float64, generator=generator)
    grad_sorted = torch.randn(batch, channels, length, dtype=torch.float64, generator=generator)
    results = []
    for sort in SORTS:
        f = features.clone().requires_grad_()
        p = positions.clone().requires_grad_()
        sorted_features, order = sort(f, p)
        sorted_features.backward(grad_sorted)
        results.append((sorted_features.detach(), order, f.grad, p.grad))
    for fn_value, ref_value in zip(*results):
        torch.testing.assert_close(fn_value, ref_value, rtol=1e-14, atol=1e-14)
    sorted_features, order, _, _ = results[0]
    assert torch.equal(order, torch.argsort(positions, dim=-1))
    assert torch.all(torch.diff(torch.gather(positions, 1, order), dim=-1) >= 0)


def test_features_only_gradient_when_positions_are_constant():
    features = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    positions = torch.randn(2, 6, dtype=torch.float64)
    sorted_features, order = sort_tokens_straight_through(features, positions)
    sorted_features.sum().backward()
    torch.testing.assert_close(features.grad, torch.ones_like(features))


@pytest.mark.parametrize("unsort", UNSORTS)
def test_unsort_inverts_the_sort_and_routes_gradients(unsort):
    features = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    positions = torch.randn(2, 9, dtype=torch.float64)
    sorted_features, order = sort_tokens_straight_through(features, positions)
    restored = unsort(sorted_features, order)
    torch.testing.assert_close(restored, features, rtol=0, atol=0)
    grad = torch.randn_like(restored)
    restored.backward(grad)
    torch.testing.assert_close(features.grad, grad, rtol=0, atol=0)


def test_single_token():
    features = torch.randn(2, 3, 1, requires_grad=True)
    positions = torch.zeros(2, 1, requires_grad=True)
    sorted_features, order = sort_tokens_straight_through(features, positions)
    sorted_features.sum().backward()
    assert torch.equal(sorted_features, features) and order.tolist() == [[0], [0]]
    assert torch.equal(positions.grad, torch.zeros(2, 1))


@pytest.mark.parametrize("sort", SORTS)
def test_rejects_bad_shapes(sort):
    with pytest.raises(ValueError, match="positions"):
        sort(torch.zeros(2, 3, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"positions: expected \(batch, length\) = \(2, 5\), got \(1, 5\)"):
        sort(torch.zeros(2, 3, 5), torch.zeros(1, 5))  # one row of positions would be broadcast over the batch
    with pytest.raises(ValueError, match="features"):
        sort(torch.zeros(2, 5), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="positions: expected a floating dtype, got torch.bool"):
        sort(torch.zeros(2, 3, 5), torch.zeros(2, 5, dtype=torch.bool))


@pytest.mark.parametrize("sort", SORTS)
def test_tied_positions_keep_their_raster_order(sort):
    """Equal positions are scanned in raster order (a stable sort); long rows, where an unstable sort reorders ties."""
    length = 200
    positions = torch.randint(0, 4, (2, length), generator=torch.Generator().manual_seed(0)).double()
    features = torch.arange(length, dtype=torch.float64).expand(2, 1, length).contiguous()
    sorted_features, order = sort(features, positions)
    expected = [sorted(range(length), key=lambda index: (row[index], index)) for row in positions.tolist()]
    assert order.tolist() == expected
    assert sorted_features[:, 0].tolist() == expected
