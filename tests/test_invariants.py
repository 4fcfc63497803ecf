"""The invariants of docs/design.md: untouched areas (and their optimizer state) stay untouched, fixed feedback
tensors stay fixed, and a seed repeats a run exactly."""

import copy

import pytest
import torch
from conftest import tiny

from torchsal.config import TrainConfig
from torchsal.train import make_optimizer

OPTIMIZERS = {
    "sgd": TrainConfig(optimizer="sgd", lr=0.1, weight_decay=1e-2),
    "sgd-momentum": TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-2),
    "adam": TrainConfig(optimizer="adam", lr=0.01),
    "adamw": TrainConfig(optimizer="adamw", lr=0.01, weight_decay=0.1),
}


def area_tensors(model, optimizer, k):
    """Parameters of area k in every layer, with their optimizer state (slices of the stacked tensors)."""
    params = [p for layer in model.layers for p in (layer.weight, layer.bias)]
    state = [v[k].clone() for p in params for v in optimizer.state.get(p, {}).values()
             if torch.is_tensor(v) and v.dim() > 0]
    return [p[k].detach().clone() for p in params], state


@pytest.mark.parametrize("rule_name", ["bp", "sal", "sal-step"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_untouched_areas_are_bit_identical(rule_name, opt_name, layout):
    """``sal-step``: through the rule's one-call step, the closed form without autograd."""
    model, rule = tiny(rule_name.removesuffix("-step"), areas=4, shared=True, in_features=5)
    x, y = torch.randn(256, 5, generator=torch.Generator().manual_seed(0)), torch.randint(3, (256,))
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], OPTIMIZERS[opt_name])

    def step(xb, yb):
        optimizer.zero_grad()
        if rule_name.endswith("-step"):
            rule.step(model, xb, yb)
        else:
            rule(model, xb, yb).loss.backward()
        optimizer.step()

    for _ in range(3):                                   # every area gets samples and optimizer state
        step(x, y)
    area, _ = model.routers[0](x)
    assert torch.bincount(area, minlength=4).min() > 0
    skipped, touched = int(area[0]), int(area[0] + 1) % 4
    keep = area != skipped
    before = area_tensors(model, optimizer, skipped)
    before_touched = area_tensors(model, optimizer, touched)
    assert before[1] or opt_name == "sgd", "optimizer state exists, so the test can see it change"
    assert int((model.routers[0](x[keep])[0] == skipped).sum()) == 0
    step(x[keep], y[keep])
    after = area_tensors(model, optimizer, skipped)
    for b, a in zip(before[0] + before[1], after[0] + after[1]):
        assert torch.equal(a, b)
    moved = area_tensors(model, optimizer, touched)
    assert any(not torch.equal(a, b) for a, b in zip(before_touched[0], moved[0]))


@pytest.mark.parametrize("rule_name", ["fa", "dfa", "sal"])
def test_prototypes_and_feedback_never_change(rule_name):
    model, rule = tiny(rule_name, areas=4, shared=True, signal="both")
    fixed = {**{f"model.{k}": v.clone() for k, v in model.named_buffers()},
             **{f"rule.{k}": v.clone() for k, v in rule.named_buffers()}}
    assert any("prototypes" in k for k in fixed) and any(k.startswith("rule.") for k in fixed)
    # (torchsal's AdamW: a batch may leave an area unused, which the stock one refuses to step)
    optimizer = make_optimizer(list(model.parameters()), TrainConfig(optimizer="adamw", lr=0.1, weight_decay=0.1))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        optimizer.zero_grad()
        rule(model, torch.randn(32, 5, generator=g), torch.randint(3, (32,), generator=g)).loss.backward()
        optimizer.step()
    now = {**{f"model.{k}": v for k, v in model.named_buffers()}, **{f"rule.{k}": v for k, v in rule.named_buffers()}}
    assert fixed.keys() == now.keys()
    for k in fixed:
        assert torch.equal(fixed[k], now[k]), k
    assert not any(b.requires_grad for b in now.values())


def test_fixed_tensors_are_persistent_buffers():
    model, rule = tiny("sal", areas=4, signal="both")
    assert "routers.0.prototypes" in model.state_dict()
    assert {"direct_0", "direct_1", "local_0", "local_1"} <= set(rule.state_dict())
    clone = copy.deepcopy(rule)
    for v in clone.state_dict().values():
        v.zero_()
    clone.load_state_dict(rule.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(clone._matrices("local"), rule._matrices("local")))
