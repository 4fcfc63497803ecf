import dataclasses
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import count_compiled_kernel, tiny

import torchsal.layers
from torchsal import dispatch
from torchsal.dispatch import area_linear, group_by_area, grouped_linear, release_gradients
from torchsal.rules import RULES


def naive(x, area, weight, bias):
    """Reference: a Python loop over samples, each with its own area's weights (autograd through indexing)."""
    return torch.stack([weight[k] @ x[i] + (0 if bias is None else bias[k]) for i, k in enumerate(area.tolist())])


# Shapes that take the grouped kernel (sizes multiple of 4) and shapes that fall back to the per-area loop.
SHAPES = [(1, 3, 2, 4), (17, 5, 7, 3), (64, 8, 8, 16), (9, 4, 6, 1), (33, 12, 10, 5), (40, 16, 8, 4)]


@pytest.mark.parametrize("batch,n_in,n_out,areas", SHAPES)
def test_area_linear_matches_per_sample_reference(batch, n_in, n_out, areas, layout):
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, n_in, generator=g)
    weight, bias = torch.randn(areas, n_out, n_in, generator=g), torch.randn(areas, n_out, generator=g)
    area = torch.randint(areas, (batch,), generator=g)
    torch.testing.assert_close(area_linear(x, area, weight, bias), naive(x, area, weight, bias))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("host_counts", [True, False])
@pytest.mark.parametrize("n_in,n_out", [(5, 4), (8, 12)])
@pytest.mark.parametrize("rows", [23, 200])
def test_grouped_gradients_match_per_sample_reference(with_bias, host_counts, n_in, n_out, rows, layout):
    """The grouped backward (weight gradient into one buffer, zeros for empty areas; input gradient) equals
    autograd through the per-sample loop: padded batched matmuls (few rows per area), per-area matmuls (many),
    and, without host counts, the device-side grouped kernels a GPU uses."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, n_in, generator=g)
    weight, bias = torch.randn(6, n_out, n_in, generator=g), torch.randn(6, n_out, generator=g)
    area = torch.randint(5, (rows,), generator=g)                      # area 5 stays empty
    target = torch.randn(rows, n_out, generator=g)
    grads = []
    for reference in (False, True):
        xs, w = x.clone().requires_grad_(), torch.nn.Parameter(weight.clone())
        b = torch.nn.Parameter(bias.clone()) if with_bias else None
        if reference:
            out = naive(xs, area, w, b)
        else:
            groups = group_by_area(area, 6)
            if not host_counts:
                groups = dataclasses.replace(groups, on_host=False)
            out = grouped_linear(xs[groups.order], groups, w, b)[groups.inverse]
        ((out - target) ** 2).sum().backward()
        grads.append([xs.grad, w.grad, None if b is None else b.grad])
        if not reference:
            assert w.touched_areas.tolist() == [True] * 5 + [False]    # the empty area is marked untouched
    for got, want in zip(*grads, strict=True):
        if want is not None:    # sums of 40 products in another order: a few ulps apart on some CPUs (Xeon)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(grads[0][1][5], torch.zeros(n_out, n_in))       # the empty area's gradient is zero


def test_released_gradient_buffers_are_reused():
    weight = torch.nn.Parameter(torch.randn(3, 4, 8))
    x = torch.randn(4, 8)
    area_linear(x, torch.tensor([0, 0, 1, 1]), weight).sum().backward()
    first, expected = weight.grad.data_ptr(), weight.grad.clone()
    release_gradients([weight])
    assert weight.grad is None
    area_linear(x, torch.tensor([0, 0, 1, 1]), weight).sum().backward()
    assert weight.grad.data_ptr() == first                            # the same memory, no new allocation
    torch.testing.assert_close(weight.grad, expected)


def test_touched_areas_follow_the_gradient_lifecycle():
    """Marks accumulate while gradients accumulate, and start afresh once the gradient is released."""
    weight = torch.nn.Parameter(torch.randn(4, 2, 3))
    x = torch.randn(2, 3)
    area_linear(x, torch.tensor([0, 0]), weight).sum().backward()
    area_linear(x, torch.tensor([2, 2]), weight).sum().backward()      # accumulated: areas 0 and 2
    assert weight.touched_areas.tolist() == [True, False, True, False]
    weight.grad = None
    area_linear(x, torch.tensor([1, 1]), weight).sum().backward()
    assert weight.touched_areas.tolist() == [False, True, False, False]
    weight.grad = None
    area_linear(torch.randn(4, 3), torch.tensor([3, 1, 0, 2]), weight).sum().backward()
    assert weight.touched_areas is None                                # every area: the whole tensor


def test_one_area_is_exactly_linear():
    x, w, b = torch.randn(5, 3), torch.randn(1, 4, 3), torch.randn(1, 4)
    assert torch.equal(area_linear(x, torch.zeros(5, dtype=torch.long), w, b), F.linear(x, w[0], b[0]))


def test_group_by_area_orders_and_inverts():
    area = torch.tensor([3, 0, 3, 1, 0])
    groups = group_by_area(area, 4)
    assert area[groups.order].tolist() == [0, 0, 1, 3, 3] == groups.row_area.tolist()
    assert groups.counts == [2, 1, 0, 2] and groups.ends.tolist() == [2, 3, 3, 5]
    assert groups.touched.tolist() == [True, True, False, True]
    assert torch.equal(area[groups.order][groups.inverse], area)


def test_padded_layout_round_trip_and_its_gradient():
    area = torch.tensor([3, 0, 3, 1, 0, 3])
    groups = group_by_area(area, 4)
    rows = torch.randn(6, 5)
    padded = dispatch.to_padded(rows, groups)
    assert padded.shape == (4 * groups.capacity, 5)
    assert torch.equal(padded.view(4, groups.capacity, 5)[2], torch.zeros(groups.capacity, 5))   # empty area
    assert torch.equal(dispatch.from_padded(padded, groups), rows)
    # leading dimensions (a stack of layers): the gradient lands in each row's slot, zeros in the padding
    stacked = torch.randn(2, 4 * groups.capacity, 5, requires_grad=True)
    grad = torch.randn(2, 6, 5)
    dispatch.from_padded(stacked, groups).backward(grad)
    expected = torch.zeros(2, 4 * groups.capacity, 5).index_add_(1, groups.slot, grad)
    assert torch.equal(stacked.grad, expected)


def _naive_grouped_linear(rows, groups, weight, bias=None, shared=None):
    out = naive(rows, groups.row_area, weight, bias)
    return out if shared is None else out + torch.stack([shared @ r for r in rows])


@pytest.mark.parametrize("rule_name", sorted(RULES))
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("routing", ["input", "layer"])
@pytest.mark.parametrize("batch", [40, 160])
@pytest.mark.parametrize("call", ["backward", "step"])
def test_every_rule_through_the_dispatch_equals_the_per_sample_reference(rule_name, shared, routing, batch, call,
                                                                         monkeypatch, layout):
    """A whole step (outputs and every parameter's update) with the grouped dispatch equals the same step with
    each sample's area applied one sample at a time, for every rule, with and without the shared path, for input
    and per-layer routing; 160 rows over 4 areas take the kernels of many rows per area (shared path folded in).
    ``step``: the rule's one-call step (for dfa and sal under input routing, the closed form without autograd)
    against the autograd step of the reference."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 8, generator=g), torch.randint(3, (batch,), generator=g)
    results = []
    for reference in (False, True):
        if reference:
            monkeypatch.setattr(torchsal.layers, "grouped_linear", _naive_grouped_linear)
        model, rule = tiny(rule_name, areas=4, shared=shared, in_features=8, width=8, routing=routing,
                           signal="both")
        with torch.no_grad():
            for i, layer in enumerate(model.layers):     # areas differ (with a shared path they start at zero)
                layer.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(i))
        if call == "step" and not reference:
            out = rule.step(model, x, y)
        else:
            out = rule(model, x, y)
            out.loss.backward()
        results.append((out.logits, out.loss.detach(),
                        {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (logits, loss, grads), (ref_logits, ref_loss, ref_grads) = results
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


def _few_rows_over_many_areas():
    """12 rows over 16 areas, 10 or more of them empty: neither padded nor gathered, so the products of a few rows
    per area (``_grouped_mm``) serve the forward and the input gradient."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(12, 40, generator=g)
    weight, bias = torch.randn(16, 24, 40, generator=g), torch.randn(16, 24, generator=g)
    return x, torch.randint(6, (12,), generator=g), weight, bias


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="torch.compile needs a C++ compiler")
def test_compiled_products_equal_the_per_sample_reference(monkeypatch):
    """Under ``compiled_kernels`` the generated kernel computes the forward and the input gradient (it ran: both
    calls counted), and both equal the per-sample reference, as does the weight gradient."""
    x, area, weight, bias = _few_rows_over_many_areas()
    calls = count_compiled_kernel(monkeypatch, dispatch.compile._compiled.__wrapped__)
    grads = []
    for compiled in (True, False):
        xs, w, b = x.clone().requires_grad_(), torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())
        with dispatch.compiled_kernels(compiled):
            out = area_linear(xs, area, w, b) if compiled else naive(xs, area, w, b)
            (out * torch.arange(24.0)).sum().backward()
        grads.append((out.detach(), xs.grad, w.grad, b.grad))
    assert len(calls) == 2
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_products_that_fail_to_build_fall_back_with_one_warning(monkeypatch, caplog):
    """Where torch.compile cannot build the kernel (no C++ compiler), the products run eagerly, with one warning
    that names the cause and the fix, and it is not tried again."""
    x, area, weight, bias = _few_rows_over_many_areas()

    def broken(*args):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\n(details)")

    calls = count_compiled_kernel(monkeypatch, lambda fn: broken)
    with dispatch.compiled_kernels(), caplog.at_level("WARNING", logger="torchsal.dispatch"):
        first, second = area_linear(x, area, weight, bias), area_linear(x, area, weight, bias)
    torch.testing.assert_close(first, naive(x, area, weight, bias))
    torch.testing.assert_close(second, first)
    assert len(calls) == 1
    (warning,) = caplog.records
    assert "No working C++ compiler found" in warning.getMessage() and "drop --compile" in warning.getMessage()
