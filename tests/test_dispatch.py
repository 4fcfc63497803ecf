import pytest
import torch
import torch.nn.functional as F

from torchsal.dispatch import area_linear, group_by_area, release_gradients


def naive(x, area, weights, biases):
    """Reference: a Python loop over samples, each with its own area's weights."""
    return torch.stack([weights[k] @ x[i] + biases[k] for i, k in enumerate(area.tolist())])


@pytest.mark.parametrize("batch,n_in,n_out,areas", [(1, 3, 2, 4), (17, 5, 7, 3), (64, 8, 8, 16), (9, 4, 6, 1)])
def test_area_linear_matches_per_sample_reference(batch, n_in, n_out, areas):
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, n_in, generator=g)
    weights = [torch.randn(n_out, n_in, generator=g) for _ in range(areas)]
    biases = [torch.randn(n_out, generator=g) for _ in range(areas)]
    area = torch.randint(areas, (batch,), generator=g)
    torch.testing.assert_close(area_linear(x, area, weights, biases), naive(x, area, weights, biases))


@pytest.mark.parametrize("with_bias", [True, False])
def test_area_linear_gradients_match_per_sample_reference(with_bias):
    """The grouped backward (weight gradients into recycled buffers, input gradients per area) equals autograd
    through the per-sample loop, for inputs, weights and biases."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(23, 5, generator=g)
    weights = [torch.randn(4, 5, generator=g) for _ in range(6)]
    biases = [torch.randn(4, generator=g) for _ in range(6)]
    area = torch.randint(5, (23,), generator=g)                        # area 5 stays empty
    target = torch.randn(23, 4, generator=g)
    grads = []
    for fn in (area_linear, naive):
        xs = x.clone().requires_grad_()
        ws = [w.clone().requires_grad_() for w in weights]
        bs = [b.clone().requires_grad_() for b in biases]
        out = fn(xs, area, ws, bs if with_bias else None) if fn is area_linear else fn(
            xs, area, ws, bs if with_bias else [torch.zeros(4)] * 6)
        ((out - target) ** 2).sum().backward()
        grads.append([xs.grad, *(w.grad for w in ws), *(b.grad for b in bs)])
    for got, want in zip(*grads, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want)
    assert grads[0][6] is None and grads[0][12] is None              # the empty area: no gradient at all


def test_released_gradient_buffers_are_reused_and_untouched_areas_stay_none():
    weights = [torch.nn.Parameter(torch.randn(3, 2)) for _ in range(3)]
    x = torch.randn(4, 2)
    area_linear(x, torch.tensor([0, 0, 1, 1]), weights).sum().backward()
    first = weights[0].grad.data_ptr()
    expected = weights[0].grad.clone()
    release_gradients(weights)
    assert all(w.grad is None for w in weights)
    area_linear(x, torch.tensor([0, 0, 2, 2]), weights).sum().backward()
    assert weights[0].grad.data_ptr() == first                       # the same memory, no new allocation
    torch.testing.assert_close(weights[0].grad, expected)
    assert weights[1].grad is None                                   # untouched this step: still None


def test_empty_areas_get_no_gradient():
    x = torch.randn(6, 3)
    weights = [torch.randn(2, 3, requires_grad=True) for _ in range(4)]
    area = torch.tensor([0, 2, 2, 0, 2, 0])
    area_linear(x, area, weights).sum().backward()
    assert weights[1].grad is None and weights[3].grad is None
    torch.testing.assert_close(weights[0].grad, torch.ones(2, 1) * x[area == 0].sum(0))


def test_one_area_is_exactly_linear():
    x, w, b = torch.randn(5, 3), torch.randn(4, 3), torch.randn(4)
    assert torch.equal(area_linear(x, torch.zeros(5, dtype=torch.long), [w], [b]), F.linear(x, w, b))


def test_group_by_area_orders_and_inverts():
    area = torch.tensor([3, 0, 3, 1, 0])
    order, inverse, counts = group_by_area(area, 4)
    assert area[order].tolist() == [0, 0, 1, 3, 3]
    assert counts == [2, 1, 0, 2]
    assert torch.equal(area[order][inverse], area)
