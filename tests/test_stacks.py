"""Layer stacks (torchsal.stacks, MLPBlock.run_stack): runs of alike blocks trained as one under local rules give
the block-by-block step's updates, touched areas and accumulation, on the same parameters and state_dict."""

import pytest
import torch

from torchsal.cli import main
from torchsal.config import ModelConfig, RoutingConfig, RuleConfig
from torchsal.models import MLPBlock, build_model
from torchsal.optim import Adam
from torchsal.rules import build_rule


def deep(areas=4, shared=False, norm="layer", block="residual", routing="input", depth=5, seed=0):
    cfg = ModelConfig(depth=depth, width=8, shared=shared, block=block, norm=norm,
                      routing_config=RoutingConfig(areas=areas, routing_dim=4, routing=routing))
    model = build_model(5, 3, cfg, seed=seed)
    with torch.no_grad():                 # norms and biases away from their initial 1 and 0, areas apart
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    model.stack_alike_blocks = True       # as the fast path runs it (torchsal.execution)
    return model


def data(n=6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 5, generator=g), torch.arange(n) % 3


def step(model, rule, stack, x, y, release=True):
    model.stack_alike_blocks = stack
    if release:
        for p in model.parameters():
            p.grad = None
    out = rule(model, x, y)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, \
        {n: getattr(p, "touched_areas", "unset") for n, p in model.named_parameters()}


def assert_same(a, b):
    (loss_a, grads_a, touched_a), (loss_b, grads_b, touched_b) = a, b
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in touched_a:
        ta, tb = touched_a[name], touched_b[name]
        assert (ta.tolist() if torch.is_tensor(ta) else ta) == (tb.tolist() if torch.is_tensor(tb) else tb), name


@pytest.fixture
def spy(monkeypatch):
    calls = []
    run = MLPBlock.run_stack

    def counted(blocks, h, groups):
        calls.append(len(blocks))
        return run(blocks, h, groups)
    monkeypatch.setattr(MLPBlock, "run_stack", staticmethod(counted))
    return calls


@pytest.mark.parametrize("norm", ["layer", "rms", "none"])
@pytest.mark.parametrize("block", ["residual", "plain"])
@pytest.mark.parametrize("areas,shared", [(4, False), (4, True), (1, False)])
def test_a_stack_gives_the_block_by_block_updates(norm, block, areas, shared, spy):
    model = deep(areas, shared, norm, block)
    rule = build_rule(model, RuleConfig(rule="sal", signal="local"), 0)
    x, y = data()
    stacked = step(model, rule, True, x, y)
    assert spy == [4]                          # hidden blocks 1-4 of 5 (the first takes the routed input)
    assert_same(stacked, step(model, rule, False, x, y))


@pytest.mark.parametrize("rule_name,signal", [("dfa", "local"), ("sal", "both"), ("sal", "direct")])
def test_every_local_signal_goes_through_a_stack(rule_name, signal, spy):
    model = deep(shared=True)
    rule = build_rule(model, RuleConfig(rule=rule_name, signal=signal), 0)
    x, y = data()
    stacked = step(model, rule, True, x, y)
    assert spy == [4]
    assert_same(stacked, step(model, rule, False, x, y))


def test_the_trace_keeps_each_stack_whole_and_the_rule_reports_the_same_diagnostics(spy):
    model = deep()
    rule = build_rule(model, RuleConfig(rule="sal", signal="both"), 0)
    x, y = data()
    trace = model.trace(x, detach=True)
    (first, alone), (run, stacked) = trace.segments()
    assert (first, alone, run) == (range(0, 1), None, range(1, 5))
    assert torch.equal(stacked, torch.stack(trace.hidden[1:5]))
    outs = []
    for stack in (True, False):
        model.stack_alike_blocks = stack
        outs.append(rule(model, x, y))
    for key in ("signal_rms", "activation_rms"):
        torch.testing.assert_close(getattr(outs[0], key), getattr(outs[1], key), msg=key)
    assert spy == [4, 4]


def test_untouched_areas_get_no_gradient_and_stay_unmarked():
    model = deep(areas=4)
    rule = build_rule(model, RuleConfig(rule="sal", signal="local"), 0)
    x, y = data(2)                              # two samples: at most two of four areas touched
    _, grads, touched = step(model, rule, True, x, y)
    mask = touched["blocks.2.linear.weight"]
    assert torch.is_tensor(mask) and 1 <= int(mask.sum()) <= 2
    for name in ("blocks.2.linear.weight", "blocks.2.linear.bias"):
        assert (grads[name][~mask] == 0).all() and (grads[name][mask] != 0).any()


@pytest.mark.parametrize("routing,rule_name", [("layer", "sal"), ("input", "bp"), ("input", "fa")])
def test_no_stack_where_gradients_cross_blocks_or_groupings_differ(routing, rule_name, spy):
    model = deep(routing=routing)
    rule = build_rule(model, RuleConfig(rule=rule_name), 0)
    step(model, rule, True, *data())
    assert spy == []


def test_gradients_accumulate_as_block_by_block_when_not_released():
    x, y = data()
    results = []
    for stack in (True, False):
        model = deep(shared=True)
        rule = build_rule(model, RuleConfig(rule="sal", signal="local"), 0)
        step(model, rule, stack, x, y)
        results.append(step(model, rule, stack, x.flip(0), y.flip(0), release=False))
    assert_same(*results)


def test_parameters_share_one_block_keep_their_state_dict_and_recover_from_a_move():
    model = deep()
    keys = list(model.state_dict())
    rule = build_rule(model, RuleConfig(rule="sal", signal="local"), 0)
    x, y = data()
    step(model, rule, True, x, y)
    weights = [model.blocks[i].linear.weight for i in range(1, 5)]
    size = weights[0].numel() * weights[0].element_size()
    assert [w.data_ptr() - weights[0].data_ptr() for w in weights] == [i * size for i in range(4)]
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model.state_dict()["blocks.3.linear.weight"], weights[2])
    for p in model.parameters():               # what .to() does: every parameter on memory of its own
        p.data = p.data.clone()
    assert_same(step(model, rule, True, x, y), step(model, rule, False, x, y))


def test_training_with_adam_follows_the_block_by_block_run():
    x, y = data(12)
    finals = []
    for stack in (True, False):
        model = deep(shared=True)
        model.stack_alike_blocks = stack
        rule = build_rule(model, RuleConfig(rule="sal", signal="local"), 0)
        optimizer = Adam(model.parameters(), lr=1e-2, fused=True)
        for i in range(5):
            optimizer.zero_grad()
            rule(model, x[i % 2::2], y[i % 2::2]).loss.backward()
            optimizer.step()
        finals.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in finals[0]:
        torch.testing.assert_close(finals[0][name], finals[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_resumed_run_of_a_deep_model_is_bit_identical(tmp_path, spy):
    """Stacks move parameters into one block of memory on first use; a run resumed from its checkpoint (fresh
    parameters, moved again) must still continue bit-identically."""
    base = ["train", "--dataset", "digits", "--lr", "0.002", "--width", "16", "--depth", "5", "--block", "residual",
            "--norm", "layer", "--optimizer", "adam", "--quiet"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main([*base, "--epochs", "2", "--out", str(whole)]) == 0
    assert spy and set(spy) == {4}                # hidden blocks 1-4 (block 0 takes the routed input)
    assert main([*base, "--epochs", "1", "--out", str(split), "--checkpoint-every", "10"]) == 0
    assert main([*base, "--epochs", "2", "--out", str(split), "--resume", str(split)]) == 0
    weights = [torch.load(run / "model.pt", weights_only=True)["model"] for run in (whole, split)]
    assert all(torch.equal(a, b) for a, b in zip(*(w.values() for w in weights), strict=True))
