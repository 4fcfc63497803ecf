"""The local rules' closed-form step (torchsal.rules.closed_form): the autograd step's update without a graph."""

import functools
import shutil

import pytest
import torch

from torchsal import execution
from torchsal.config import ModelConfig, RoutingConfig, RuleConfig
from torchsal.models import build_model
from torchsal.optim import updates_in_backward
from torchsal.rules import build_rule, closed_form


def model_and_rule(rule="sal", signal="local", areas=4, shared=False, depth=2, block="plain", norm="none",
                   routing="input", memory="standard", feedback="per-layer", readout="per-layer"):
    cfg = ModelConfig(depth=depth, width=8, shared=shared, block=block, norm=norm,
                      routing_config=RoutingConfig(areas=areas, routing_dim=4, routing=routing))
    model = build_model(6, 3, cfg, seed=0)
    with torch.no_grad():                          # areas that differ (with a shared path they start at zero)
        for i, block_ in enumerate(model.blocks):
            block_.linear.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(i))
    return model, build_rule(model, RuleConfig(rule=rule, signal=signal, memory=memory, feedback=feedback,
                                               readout=readout), seed=0)


def data(batch=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 6, generator=g), torch.randint(3, (batch,), generator=g)


def saved_tensors(fn):
    """How many tensors autograd saves for a backward while ``fn`` runs (0: no graph is recorded)."""
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return count


def assert_same_runs(run, reference):
    """Two runs ``(state_dict, step outputs)`` agree: parameters, losses, logits, diagnostics; no output needs a
    graph."""
    (state, outs), (ref_state, ref_outs) = run, reference
    for name in ref_state:
        torch.testing.assert_close(state[name], ref_state[name], rtol=1e-5, atol=1e-6, msg=name)
    for out, ref in zip(outs, ref_outs, strict=True):
        assert not out.loss.requires_grad and not ref.loss.requires_grad
        for field in ("loss", "logits", "task_loss", "activation_rms", "signal_rms"):
            torch.testing.assert_close(getattr(out, field), getattr(ref, field), msg=field)


@pytest.mark.parametrize("rule_name,signal", [("sal", "local"), ("sal", "direct"), ("sal", "both"), ("dfa", "direct")])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("areas", [1, 4])
@pytest.mark.parametrize("block", ["plain", "residual"])
@pytest.mark.parametrize("optimizer", ["sgd-in-place", "adamw"])
def test_the_closed_form_step_follows_the_autograd_step(rule_name, signal, shared, areas, block, optimizer, layout):
    """Three steps in closed form and three through autograd (the base class's step) from the same start: the same
    parameters, losses, logits and diagnostics, under an optimizer that reads .grad and under plain SGD taken in
    place."""
    runs = []
    for closed in (True, False):
        model, rule = model_and_rule(rule_name, signal, areas, shared, block=block)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.3) if optimizer == "sgd-in-place" else \
            torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
        outs = []
        for i in range(3):
            x, y = data(seed=i)
            assert closed_form.covers(rule, model)
            opt.zero_grad()
            with updates_in_backward(opt):
                outs.append(closed_form.step(rule, model, x, y) if closed else rule.step(model, x, y))
            opt.step()
        runs.append((model.state_dict(), outs))
    assert_same_runs(*runs)


@pytest.mark.parametrize("feedback,readout", [("per-area", "per-layer"), ("per-layer", "single")])
def test_per_area_feedback_and_a_single_readout_in_closed_form(feedback, readout):
    """Each row's own area's feedback matrix, and one readout for every layer, as the autograd step has them."""
    runs = []
    for closed in (True, False):
        model, rule = model_and_rule(signal="both", shared=True, feedback=feedback, readout=readout)
        for i in range(2):
            x, y = data(seed=i)
            (functools.partial(closed_form.step, rule) if closed else rule.step)(model, x, y)
        runs.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in runs[1].items():
        torch.testing.assert_close(runs[0][name], grad, msg=name)


def test_a_frozen_learned_router_reports_its_loss_and_does_not_learn():
    model, rule = model_and_rule()
    model.routers[0].projection.requires_grad_(False)
    x, y = data()
    ref = rule.step(model, x, y)
    model.zero_grad()
    out = closed_form.step(rule, model, x, y)
    torch.testing.assert_close(out.loss, ref.loss)
    assert model.routers[0].projection.weight.grad is None


def test_the_closed_form_records_no_graph_and_the_autograd_step_does():
    model, rule = model_and_rule(shared=True)
    x, y = data()
    assert saved_tensors(lambda: closed_form.step(rule, model, x, y)) == 0
    assert saved_tensors(lambda: rule.step(model, x, y)) > 0


@pytest.mark.parametrize("why,settings", [
    ("layer routing groups every block apart", {"routing": "layer"}),
    ("a norm's parameters learn through the block", {"block": "residual", "norm": "layer"}),
    ("runs of alike blocks go as layer stacks", {"depth": 4}),
    ("lean memory updates layer by layer", {"memory": "lean"}),
])
def test_models_without_a_closed_form_take_the_autograd_step(why, settings):
    model, rule = model_and_rule(**settings)
    x, y = data()
    assert not closed_form.covers(rule, model), why
    assert not execution.choose(rule, model).closed_form, why


def test_no_closed_form_under_mixed_precision_with_an_output_term_or_for_bp():
    model, rule = model_and_rule()
    assert execution.choose(rule, model).closed_form
    assert not execution.choose(rule, model, mixed_precision=True).closed_form
    assert not execution.choose(rule, model, output_term=True).closed_form
    assert not execution.choose(rule, model, reference=True).closed_form
    bp_model, bp = model_and_rule("bp")
    assert not closed_form.covers(bp, bp_model)


@pytest.mark.parametrize("closed", [True, False])
def test_before_update_sees_the_output_first_and_can_stop_the_update(closed):
    """The trainer's check of the loss runs between the forward pass and the update: raising there leaves every
    parameter as it was, with no gradient."""
    model, rule = model_and_rule()
    x, y = data()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def stop(out):
        assert torch.isfinite(out.loss) and out.logits.shape == (len(y), 3)
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        (functools.partial(closed_form.step, rule) if closed else rule.step)(model, x, y, before_update=stop)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


def test_gradients_accumulate_across_closed_form_steps_as_across_backward_calls():
    """Without releasing the gradients, two closed-form steps leave the sum of their updates, as two backward
    calls do (areas touched by either marked)."""
    grads = []
    for closed in (True, False):
        model, rule = model_and_rule(shared=True)
        step = functools.partial(closed_form.step, rule) if closed else rule.step
        for seed in (0, 1):
            x, y = data(batch=6, seed=seed)
            step(model, x, y)
        grads.append({n: (p.grad.clone(), getattr(p, "touched_areas", None)) for n, p in model.named_parameters()})
    for name, (grad, touched) in grads[1].items():
        torch.testing.assert_close(grads[0][name][0], grad, msg=name)
        assert (touched is None) == (grads[0][name][1] is None) and (touched is None or torch.equal(
            touched, grads[0][name][1])), name


@pytest.mark.parametrize("optimizer", ["sgd-in-place", "adamw"])
def test_the_closed_form_with_device_side_groupings(optimizer, monkeypatch):
    """Groupings whose counts stay on the device (as on a GPU: grouped kernels over device offsets, no padded
    layout) give the closed form the autograd step's updates."""
    import dataclasses

    import torchsal
    from torchsal.config import TrainConfig
    from torchsal.train import make_optimizer

    def on_device(area, areas):
        return dataclasses.replace(torchsal.dispatch.group_by_area(area, areas), on_host=False)

    states, empty = [], False
    for closed in (True, False):
        model, rule = model_and_rule(shared=True)
        config = TrainConfig(optimizer="sgd", lr=0.3) if optimizer == "sgd-in-place" else \
            TrainConfig(optimizer="adamw", lr=0.01, weight_decay=0.1)
        opt = make_optimizer([p for p in model.parameters() if p.requires_grad], config)
        if closed:
            monkeypatch.setattr(closed_form, "group_by_area", on_device)
        for i in range(3):
            x, y = data(batch=5, seed=i)                   # 5 rows over 4 areas
            empty |= bool((torch.bincount(model.routers[0](x)[0], minlength=4) == 0).any())
            opt.zero_grad()
            with updates_in_backward(opt):
                (functools.partial(closed_form.step, rule) if closed else rule.step)(model, x, y)
            opt.step()
        monkeypatch.undo()
        states.append(model.state_dict())
    for name, value in states[1].items():
        torch.testing.assert_close(states[0][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert empty, "some step must leave an area without rows"


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="torch.compile needs a C++ compiler")
@pytest.mark.parametrize("optimizer", ["sgd-in-place", "adamw"])
@pytest.mark.parametrize("shared", [False, True])
def test_the_compiled_step_follows_the_autograd_step(optimizer, shared, monkeypatch):
    """Under ``--compile`` the step up to its updates runs as torch.compile builds it (it ran: counted), and three
    steps leave the autograd step's parameters and outputs; areas without rows stay bit-identical."""
    from conftest import count_compiled_kernel

    from torchsal import dispatch
    from torchsal.config import TrainConfig
    from torchsal.dispatch import compiled_kernels
    from torchsal.train import make_optimizer

    calls = count_compiled_kernel(monkeypatch, torch.compile)
    runs, untouched = [], 0
    for compiled in (True, False):
        model, rule = model_and_rule(shared=shared)
        config = TrainConfig(optimizer="sgd", lr=0.3) if optimizer == "sgd-in-place" else \
            TrainConfig(optimizer="adamw", lr=0.01, weight_decay=0.1)
        opt = make_optimizer([p for p in model.parameters() if p.requires_grad], config)
        outs = []
        for i in range(3):
            x, y = data(batch=5, seed=i)                   # 5 rows over 4 areas
            used = torch.bincount(model.routers[0](x)[0], minlength=4) > 0
            before = [block.linear.weight.detach().clone() for block in model.blocks]
            opt.zero_grad()
            with updates_in_backward(opt), compiled_kernels(compiled):
                outs.append(closed_form.step(rule, model, x, y) if compiled else rule.step(model, x, y))
            opt.step()
            for block, old in zip(model.blocks, before):
                assert torch.equal(block.linear.weight[~used], old[~used])
            untouched += int((~used).sum())
        runs.append((model.state_dict(), outs))
    assert calls.count("forward_phase") == 3 and not dispatch.compile._COMPILE_FAILURE and untouched > 0
    assert_same_runs(*runs)


@pytest.mark.parametrize("areas", [1, 4])
def test_closed_form_and_autograd_steps_mix_on_one_model(areas):
    """The closed form runs in inference mode; nothing it leaves behind (gradients, recycled memory, outputs) may
    stop autograd from adding to it or the optimizer from stepping it later. Steps alternate between the two,
    gradients sometimes accumulated over two steps, against the same sequence through autograd alone."""
    from torchsal.dispatch import release_gradients
    from torchsal.optim import AdamW

    states = []
    for mixed in (True, False):
        model, rule = model_and_rule(areas=areas, shared=True)
        opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01, weight_decay=0.1, fused=True)
        for i in range(6):
            x, y = data(seed=i)
            if i % 3 != 1:                                 # steps 1 and 4 add to the gradients of 0 and 3
                release_gradients(model.parameters())
            out = closed_form.step(rule, model, x, y) if mixed and i % 2 == 0 else rule.step(model, x, y)
            out.logits.add_(1)                             # the outputs are ordinary tensors
            if i % 3 != 0:
                opt.step()
        states.append(model.state_dict())
    for name, value in states[1].items():
        torch.testing.assert_close(states[0][name], value, rtol=1e-5, atol=1e-6, msg=name)
