"""--precision bf16-mixed: bfloat16 compute under autocast, float32 weights, gradients and optimizer state."""

import pytest
import torch
from conftest import tiny

from torchsal import optim
from torchsal.rules import RULES


@pytest.mark.parametrize("rule_name", sorted(RULES))
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("batch", [64, 160])
def test_mixed_precision_updates_follow_the_float32_ones(rule_name, shared, batch):
    """Each parameter gets a float32 gradient close to the float32 step's, for every rule (160 rows over 4 areas:
    the kernels for many rows per area, the shared path folded in)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 8, generator=g), torch.randint(3, (batch,), generator=g)
    grads = []
    for mixed in (False, True):
        model, rule = tiny(rule_name, areas=4, shared=shared, in_features=8, width=16, signal="both")
        with torch.autocast("cpu", torch.bfloat16, enabled=mixed):
            out = rule(model, x, y)
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, full in grads[0].items():
        half = grads[1][name]
        assert half.dtype == torch.float32, name
        # bfloat16 keeps 8 bits of mantissa; a few ReLUs near zero may flip, so compare whole updates
        assert (half - full).norm() <= 0.1 * full.norm().clamp_min(1e-6), name


def test_mixed_precision_keeps_untouched_areas_untouched():
    model, rule = tiny("sal", areas=8, shared=True, in_features=8, width=16)
    optimizer = optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    x, y = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1])
    for _ in range(2):
        area, _ = model.routers[0](x)
        before = model.layers[0].weight.detach().clone()
        optimizer.zero_grad()
        with torch.autocast("cpu", torch.bfloat16):
            out = rule(model, x, y)
        out.loss.backward()
        optimizer.step()
    untouched = sorted(set(range(8)) - set(area.tolist()))
    assert untouched and model.layers[0].weight.dtype == torch.float32
    assert torch.equal(model.layers[0].weight[untouched], before[untouched])
    assert not torch.equal(model.layers[0].weight, before)


def test_cli_precision_flag_trains(tmp_path):
    from torchsal import make_config, train

    result = train(make_config("sal", dataset="digits", epochs=5, precision="bf16-mixed"), progress=False)
    assert result.metrics["config"]["precision"] == "bf16-mixed" and result.metrics["test_accuracy"] > 0.85
    assert all(p.dtype == torch.float32 for p in result.model.parameters())



@pytest.mark.parametrize("rows", [40, 200])
def test_mixed_precision_weight_gradient_is_the_float32_product_of_the_bfloat16_operands(rows):
    """Under bf16-mixed an area's weight gradient is ``g_k.T @ x_k`` summed in float32 over the bfloat16 rows and
    output gradients (40 rows over 3 areas: the padded kernel; 200: one product per area)."""
    from torchsal.dispatch import area_linear

    g = torch.Generator().manual_seed(0)
    x, area = torch.randn(rows, 6, generator=g), torch.randint(3, (rows,), generator=g)
    weight = torch.nn.Parameter(torch.randn(3, 5, 6, generator=g))
    upstream = torch.randn(rows, 5, generator=g).to(torch.bfloat16)
    with torch.autocast("cpu", torch.bfloat16):
        out = area_linear(x, area, weight)
    assert out.dtype == torch.bfloat16
    out.backward(upstream)
    assert weight.grad.dtype == torch.float32
    x16, up = x.to(torch.bfloat16).float(), upstream.float()
    expected = torch.stack([up[area == k].T @ x16[area == k] for k in range(3)])
    torch.testing.assert_close(weight.grad, expected)
