"""torchsal.compat: each private torch API's public fallback computes what the private API does (forced by
setting its entry in ``compat.PRIVATE`` to None, as on a torch without it)."""

import pytest
import torch
import torch.nn.functional as F

from torchsal import build_model, build_rule, compat, make_config, train
from torchsal.config import ModelConfig, RoutingConfig, RuleConfig


def g(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def without(monkeypatch):
    """Call ``without(name, ...)`` to run the rest of a test on the fallbacks of those private APIs."""
    def force(*names):
        for name in names:
            monkeypatch.setitem(compat.PRIVATE, name, None)
    return force


def adam_state(seed):
    p, grad, m, v, v_max = (torch.randn(3, 5, generator=g(seed + i)) for i in range(5))
    return p, grad, m, v.abs(), v.abs() + v_max.abs(), torch.tensor(3.0)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_fallback_steps_as_the_fused_kernel(without, decoupled, amsgrad):
    hyper = {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1, "eps": 1e-8, "amsgrad": amsgrad,
             "maximize": False, "decoupled": decoupled}
    fused, fallback = adam_state(0), adam_state(0)

    def step(p, grad, m, v, v_max, count):
        compat.adam_step([p], [grad], [m], [v], [v_max] if amsgrad else [], [count], **hyper)

    step(*fused)
    without("fused_adam", "fused_adamw")
    step(*fallback)
    for a, b in zip(fused, fallback, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(fused[0], adam_state(0)[0])            # (the step moved the parameter)


def test_grouped_mm_fallback_is_none_so_the_caller_loops_over_groups(without):
    a, b = torch.randn(5, 4, generator=g()), torch.randn(2, 4, 3, generator=g(1))
    ends = torch.tensor([2, 5], dtype=torch.int32)
    out = compat.grouped_mm(a, b, ends)
    if out is not None:                                             # where this torch's CPU build has the kernel
        torch.testing.assert_close(out, torch.cat([a[:2] @ b[0], a[2:] @ b[1]]))
    without("grouped_mm")
    assert compat.grouped_mm(a, b, ends) is None


@pytest.mark.parametrize("into_output", [False, True])
def test_relu_backward_fallback(without, into_output):
    grad, output = torch.randn(4, 6, generator=g()), torch.randn(4, 6, generator=g(1)).relu()
    expected = grad * (output > 0)
    torch.testing.assert_close(compat.relu_backward(grad, output.clone(), into_output=into_output), expected)
    without("threshold_backward")
    kept = output.clone()
    result = compat.relu_backward(grad, kept, into_output=into_output)
    assert torch.equal(result, expected)
    assert (result.data_ptr() == kept.data_ptr()) == into_output


def test_adaptive_avg_pool2d_backward_fallback(without):
    h, grad = torch.randn(2, 3, 7, 7, generator=g()), torch.randn(2, 3, 4, 4, generator=g(1))
    x = h.clone().requires_grad_()
    (F.adaptive_avg_pool2d(x, 4) * grad).sum().backward()
    torch.testing.assert_close(compat.adaptive_avg_pool2d_backward(grad, h), x.grad)
    without("adaptive_avg_pool2d_backward")
    torch.testing.assert_close(compat.adaptive_avg_pool2d_backward(grad, h), x.grad)


def test_is_view():
    buffer = torch.zeros(10)
    assert compat.is_view(buffer[2:5]) and not compat.is_view(buffer)
    assert compat.is_view(object())                                 # cannot tell: the safe answer


def test_a_run_on_every_fallback_trains_as_on_the_private_apis(without):
    """SAL's default MLP run (fused Adam by area, the closed form's ReLU backward, recycled gradients) ends with
    the same weights either way."""
    config = make_config("sal", dataset="digits", areas=4, max_steps=3, seed=0, batch_size=16)
    private = train(config, progress=False).model
    without(*compat.PRIVATE)
    public = train(config, progress=False).model
    for a, b in zip(private.parameters(), public.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_conv_readout_step_on_the_fallbacks(without):
    """The fixed readout of a pooled conv map sends its signal back through the pooling's adjoint."""
    def step():
        model = build_model(0, 10, ModelConfig(model="lenet", routing_config=RoutingConfig(areas=2)), seed=0,
                            in_shape=(1, 28, 28))
        rule = build_rule(model, RuleConfig(rule="sal", objective="readout", readout_pool=2))
        x, y = torch.randn(8, 28 * 28, generator=g()), torch.arange(8) % 10
        rule.step(model, x, y)
        return [p.grad for p in model.parameters()]

    private = step()
    without(*compat.PRIVATE)
    for a, b in zip(private, step(), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)
