"""Continual-learning methods: closed forms of EWC's penalty and SI's importance, the replay buffer's size and
balance, and every method with every rule."""

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny

from torchsal import make_config
from torchsal.continual import run_sequence, split_tasks
from torchsal.continual_methods import EWC, SI, LwF, Replay
from torchsal.data import load_dataset, make_splits
from torchsal.rules import RULES


def test_ewc_adds_the_gradient_of_its_quadratic_penalty():
    model, _ = tiny("bp")
    ewc = EWC(strength=3.0)
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        ewc.importance[name] = torch.rand(p.shape, generator=g)
        ewc.anchor[name] = p.detach() + torch.randn(p.shape, generator=g)
    # closed form: strength / 2 * sum F (theta - anchor) ** 2, and its gradient
    value = sum(3.0 / 2 * (ewc.importance[n] * (p - ewc.anchor[n]) ** 2).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(ewc.penalty(model), value)
    model.zero_grad()
    ewc.penalty(model).backward()
    autograd = {n: p.grad.clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    ewc.penalize(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, autograd[n])
        torch.testing.assert_close(p.grad, 3.0 * ewc.importance[n] * (p.detach() - ewc.anchor[n]))


def test_si_importance_on_a_quadratic_matches_its_closed_form():
    """Loss a/2 (theta - c)^2 under plain SGD: g_t = a (1 - lr a)^t (theta_0 - c) and the step is -lr g_t, so
    omega = lr a^2 (theta_0 - c)^2 sum_t (1 - lr a)^(2t) and Omega = omega / ((theta_n - theta_0)^2 + xi)."""
    a, c, lr, steps, xi = 2.0, 1.5, 0.1, 7, 0.1
    theta = torch.nn.Parameter(torch.tensor([0.25, -1.0]))
    model = torch.nn.Module()
    model.theta = theta
    si = SI(strength=1.0, xi=xi)
    optimizer = torch.optim.SGD([theta], lr=lr)
    start = theta.detach().clone()
    for _ in range(steps):
        optimizer.zero_grad()
        (a / 2 * ((theta - c) ** 2).sum()).backward()
        si.penalize(model)                     # no importance yet: the update is the task's own
        optimizer.step()
        si.after_step(model)
    si.after_task(SimpleNamespace(model=model), None)
    r = 1 - lr * a
    omega = lr * a ** 2 * (start - c) ** 2 * sum(r ** (2 * t) for t in range(steps))
    expected = omega / ((theta.detach() - start) ** 2 + xi)
    torch.testing.assert_close(si.importance["theta"], expected)
    assert torch.equal(si.anchor["theta"], theta.detach())
    # the penalty that follows: strength * sum Omega (theta - anchor)^2, gradient 2 strength Omega (theta - anchor)
    with torch.no_grad():
        theta.add_(0.5)
    theta.grad = torch.zeros_like(theta)
    si.penalize(model)
    torch.testing.assert_close(theta.grad, 2 * expected * 0.5)


@pytest.fixture(scope="module")
def digits_tasks():
    return split_tasks(make_splits(load_dataset("digits"), seed=0))[:2]


def test_replay_keeps_exactly_its_stated_size_and_class_balance(digits_tasks):
    replay = Replay(per_task=40, batch=8)
    for task, _ in digits_tasks:
        replay.after_task(None, task)
    assert len(replay.y) == 80
    assert torch.bincount(replay.y, minlength=4)[:4].tolist() == [20, 20, 20, 20]
    x, y = replay.batch(torch.zeros(5, 64), torch.zeros(5, dtype=torch.long))
    assert len(x) == len(y) == 13


@pytest.mark.parametrize("rule", sorted(RULES))
@pytest.mark.parametrize("method", ["ewc", "online-ewc", "si", "replay", "lwf"])
def test_every_method_runs_with_every_rule(digits_tasks, rule, method):
    methods = {"ewc": EWC(strength=10.0, batches=5), "online-ewc": EWC(strength=10.0, decay=0.9, batches=5),
               "si": SI(strength=1.0), "replay": Replay(per_task=50), "lwf": LwF(strength=1.0)}
    config = make_config(rule, epochs=2, width=32, areas=4, batch_size=16)
    result = run_sequence(config, digits_tasks, methods[method])
    average = result["task_incremental"]["average"]
    assert average > 0.8            # two-way tasks: chance is 0.5; every pair measured 0.85-0.97


@pytest.mark.parametrize("rule", ["bp", "sal"])
def test_the_trainer_applies_the_penalty_to_every_rules_update(rule):
    """With every parameter anchored where it starts, EWC's pull keeps the weights near the anchor; without it
    plain SGD carries them away. The same data and steps both times."""
    from torchsal.train import Trainer

    moved = {}
    for strength in (0.0, 10.0):
        trainer = Trainer(make_config(rule, epochs=1, max_steps=20, optimizer="sgd", lr=0.05, areas=4, width=32))
        ewc = EWC(strength=strength)
        ewc.importance = {n: torch.ones_like(p) for n, p in trainer.model.named_parameters()}
        ewc.anchor = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.method = ewc
        trainer.fit(progress=False)
        moved[strength] = sum(float((p.detach() - ewc.anchor[n]).norm()) for n, p in trainer.model.named_parameters())
    assert moved[10.0] < moved[0.0] / 3


def test_lwf_adds_the_distillation_from_the_previous_model_to_every_rules_loss():
    """strength * T^2 * KL(softmax(old / T) || softmax(new / T)) on the batch; zero while nothing has changed."""
    import copy

    import torch.nn.functional as F

    model, rule = tiny("sal", areas=4, shared=True)
    x, y = torch.randn(16, 5, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3
    lwf = LwF(strength=2.0, temperature=3.0)
    lwf.after_task(SimpleNamespace(model=model), None)
    plain = rule(model, x, y).loss
    same = rule(model, x, y, output_term=lwf.output_term(x)).loss
    torch.testing.assert_close(same, plain)                      # the previous model is this one: no term
    old = copy.deepcopy(model)
    with torch.no_grad():
        old.layers[-1].bias.add_(0.7)
    lwf.old = old
    distilled = rule(model, x, y, output_term=lwf.output_term(x)).loss
    expected = 2.0 * 9.0 * F.kl_div(F.log_softmax(model(x) / 3.0, 1), F.softmax(old(x) / 3.0, 1),
                                    reduction="batchmean")
    torch.testing.assert_close(distilled - plain, expected)


def test_domain_incremental_split_labels_each_pair_by_position():
    splits = make_splits(load_dataset("digits"), seed=0)
    tasks = split_tasks(splits, domain=True)
    assert len(tasks) == 5 and all(classes == [0, 1] for _, classes in tasks)
    task, _ = tasks[2]                                         # digits 4 and 5
    assert task.num_classes == 2 and set(task.y_train.tolist()) == {0, 1}
    original = splits.y_train[torch.isin(splits.y_train, torch.tensor([4, 5]))]
    assert torch.equal(task.y_train, original - 4)
