"""Each rule's update against its closed form, on a tiny network whose feedback differs from W^T."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny

from torchsal.errors import ConfigError
from torchsal.rules import RULES, get_rule


def grads(model, rule, x, y):
    model.zero_grad(set_to_none=True)
    rule(model, x, y).loss.backward()
    return [layer.weight.grad[0].clone() for layer in model.layers]


def forward_by_hand(model, x):
    """Pre-activations a_l, post-activations h_l (h_0 = x) and logits of the dense tiny model."""
    hs, pre = [x], []
    for i, layer in enumerate(model.layers):
        a = hs[-1] @ layer.weight[0].T + layer.bias[0]
        pre.append(a)
        if i < len(model.layers) - 1:
            hs.append(torch.relu(a))
    return pre, hs, pre[-1]


def output_error(logits, y):
    return torch.softmax(logits, 1) - F.one_hot(y, logits.shape[1]).float()


def test_bp_equals_plain_autograd(batch):
    x, y = batch
    model, rule = tiny("bp")
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), y).backward()
    for got, layer in zip(grads(model, rule, x, y), reference.layers):
        torch.testing.assert_close(got, layer.weight.grad[0], rtol=0, atol=0)


def test_dense_model_is_an_ordinary_mlp(batch):
    x, y = batch
    model, _ = tiny("bp")
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4), torch.nn.ReLU(),
                              torch.nn.Linear(4, 3))
    with torch.no_grad():
        for lin, layer in zip(mlp[::2], model.layers):
            lin.weight.copy_(layer.weight[0])
            lin.bias.copy_(layer.bias[0])
    assert torch.equal(mlp(x), model(x))
    assert len(list(model.parameters())) == 6 and len(model.routers) == 0


def test_fa_closed_form(batch):
    x, y = batch
    model, rule = tiny("fa")
    fb = rule._matrices("feedback")                           # fb[i] stands in for W_{i+1}
    ws = [layer.weight[0] for layer in model.layers]
    assert all(not torch.allclose(b, w) for b, w in zip(fb, ws[1:]))
    pre, hs, logits = forward_by_hand(model, x)
    delta = output_error(logits, y) / len(y)
    expected = [None, None, delta.T @ hs[2]]
    for i in (1, 0):
        delta = (delta @ fb[i]) * (pre[i] > 0)
        expected[i] = delta.T @ hs[i]
    for got, want in zip(grads(model, rule, x, y), expected):
        torch.testing.assert_close(got, want.detach())


@pytest.mark.parametrize("rule_name,signal", [("dfa", "direct"), ("sal", "direct"), ("sal", "local"),
                                              ("sal", "both")])
def test_local_rules_closed_form(batch, rule_name, signal):
    x, y = batch
    model, rule = tiny(rule_name, signal=signal)
    pre, hs, logits = forward_by_hand(model, x)
    e = output_error(logits, y)
    onehot = F.one_hot(y, 3).float()
    expected = []
    for i in range(2):
        g = torch.zeros_like(hs[i + 1])
        if signal in ("direct", "both"):
            g += e @ rule._matrices("direct")[i]
        if signal in ("local", "both"):
            readout = rule._matrices("local")[i]
            g += (torch.softmax(hs[i + 1] @ readout.T, 1) - onehot) @ readout
        expected.append(((g * (pre[i] > 0)) / len(y)).T @ hs[i])
    expected.append((e / len(y)).T @ hs[2])
    for got, want in zip(grads(model, rule, x, y), expected):
        torch.testing.assert_close(got, want.detach())


def test_sal_area_update_uses_only_its_samples(batch):
    """grad W_l[k] = (1/B) sum over samples routed to k of delta_l h_{l-1}^T; the shared path sees all."""
    x, y = batch
    model, rule = tiny("sal", areas=3, shared=True, depth=1)
    layer = model.layers[0]
    with torch.no_grad():
        layer.weight.normal_()                                # make areas differ (they start at zero)
    area, _ = model.routers[0](x)
    a = torch.stack([x[i] @ (layer.weight[k] + layer.shared).T + layer.bias[k]
                     for i, k in enumerate(area.tolist())])
    h = torch.relu(a)
    readout = rule._matrices("local")[0]
    g = (torch.softmax(h @ readout.T, 1) - F.one_hot(y, 3).float()) @ readout
    delta = g * (a > 0) / len(y)
    model.zero_grad(set_to_none=True)
    rule(model, x, y).loss.backward()
    for k in range(3):
        mask = area == k
        torch.testing.assert_close(layer.weight.grad[k], delta[mask].T @ x[mask])    # zeros for an empty area
        touched = layer.weight.touched_areas                    # None: every area was touched
        assert (touched is None and len(area.unique()) == 3) or bool(touched[k]) == bool(mask.any())
    torch.testing.assert_close(layer.shared.grad, delta.T @ x)


@pytest.mark.parametrize("rule_name,signal", [("dfa", "direct"), ("sal", "local"), ("sal", "both")])
def test_no_weight_transport(rule_name, signal):
    """A hidden layer's update ignores other layers' forward weights when its input and the output error are
    held fixed. The same change moves BP's update, so this test can fail."""
    x, y = torch.randn(1, 5, generator=torch.Generator().manual_seed(0)), torch.tensor([1])

    def first_layer_update(name, perturb):
        model, rule = tiny(name, signal=signal, seed=3)
        if perturb:
            with torch.no_grad():
                logits = model(x)
                model.layers[1].weight[0].add_(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))
                model.layers[2].weight[0].mul_(-2.0)
                model.layers[2].bias[0].add_(logits[0] - model(x)[0])   # same logits, same error
                torch.testing.assert_close(model(x), logits)
        return grads(model, rule, x, y)[0]

    update = first_layer_update(rule_name, False)
    assert update.abs().sum() > 0
    torch.testing.assert_close(update, first_layer_update(rule_name, True))
    bp = first_layer_update("bp", False)
    assert bp.abs().sum() > 0 and not torch.allclose(bp, first_layer_update("bp", True))


def test_sal_direct_on_the_dense_model_is_dfa(batch):
    x, y = batch
    dfa = grads(*tiny("dfa"), x, y)
    sal = grads(*tiny("sal", signal="direct"), x, y)
    for a, b in zip(dfa, sal):
        assert torch.equal(a, b)


def test_unknown_rule_lists_the_valid_names():
    with pytest.raises(ConfigError, match="unknown rule 'xyz'; choose one of: bp, dfa, fa, sal"):
        get_rule("xyz")
    assert set(RULES) == {"bp", "fa", "dfa", "sal"}


@pytest.mark.parametrize("signal", ["direct", "local"])
def test_per_area_feedback_uses_each_samples_own_matrix(batch, signal):
    """With --feedback per-area, sample i of area k gets its signal through layer l's k-th fixed matrix."""
    from torchsal.config import ModelConfig, RoutingConfig, RuleConfig
    from torchsal.models import build_model
    from torchsal.rules import build_rule

    x, y = batch
    cfg = ModelConfig(depth=1, width=4, shared=True, routing_config=RoutingConfig(areas=3, routing_dim=4))
    model = build_model(5, 3, cfg, seed=0)
    rule = build_rule(model, RuleConfig(rule="sal", signal=signal, feedback="per-area"), 0)
    mats = rule._matrices(signal)
    assert len(mats) == 3 and not torch.allclose(mats[0], mats[1])
    trace = model.trace(x, detach=True)
    h, area = trace.in_batch_order(trace.hidden[0].detach()), trace.areas[0]
    onehot = F.one_hot(y, 3).float()
    error = output_error(trace.in_batch_order(trace.logits.detach()), y)
    if signal == "direct":
        expected = torch.stack([error[i] @ mats[k] for i, k in enumerate(area.tolist())])
    else:
        expected = torch.stack([(torch.softmax(mats[k] @ h[i], 0) - onehot[i]) @ mats[k]
                                for i, k in enumerate(area.tolist())])
    torch.testing.assert_close(rule.signal(0, h, error, onehot, trace.groups[0], grouped=False), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layers", [1, 8])
def test_softmax_error_equals_torch_softmax_minus_labels(dtype, layers):
    """The written-out softmax of the signals (faster on CPU for few classes and many rows; 8 x 32 rows take it)
    is torch's, also for logits far from zero (stability) and in bfloat16 (computed in float32, returned in the
    labels' type)."""
    from torchsal.rules.local import softmax_error

    logits = (torch.randn(layers, 32, 10, generator=torch.Generator().manual_seed(0)) * 30 + 500).to(dtype)
    onehot = F.one_hot(torch.arange(32) % 10, 10).to(dtype)
    want = torch.softmax(logits.float(), -1).to(dtype) - onehot
    got = softmax_error(logits, onehot)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want)
