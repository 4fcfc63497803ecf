"""The reference path and the fast path (torchsal.execution) train to the same weights; the choice is made once per
run, from the run, and named in its metrics."""

import pytest
import torch

from torchsal import make_config
from torchsal.continual_methods import EWC, LwF
from torchsal.execution import REFERENCE, Execution, choose
from torchsal.train import Trainer


def trained(execution: str, rule: str = "sal", steps: int = 6, **settings) -> Trainer:
    config = make_config(rule, dataset="digits", epochs=1, max_steps=steps, execution=execution, **settings)
    trainer = Trainer(config)
    trainer.fit(progress=False)
    return trainer


@pytest.mark.parametrize("rule,settings,parts", [
    ("sal", {"areas": 4, "width": 32}, ["closed form", "updates in backward"]),
    ("sal", {"areas": 4, "width": 32, "optimizer": "sgd", "lr": 0.05}, ["closed form", "updates in backward"]),
    ("sal", {"areas": 4, "width": 16, "depth": 5}, ["layer stacks", "updates in backward"]),
    ("dfa", {"width": 32}, ["closed form", "updates in backward"]),
    ("bp", {"areas": 4, "width": 32}, ["updates in backward"]),
])
def test_the_fast_path_trains_to_the_reference_paths_weights(rule, settings, parts):
    """Whole runs from the same start: the same weights after every part of the fast path the run takes."""
    fast, reference = trained("fast", rule, **settings), trained("reference", rule, **settings)
    assert fast.execution.parts() == parts and reference.execution is REFERENCE
    assert fast.metrics()["execution"] == f"fast ({', '.join(parts)})"
    assert reference.metrics()["execution"] == "reference (autograd, .grad)"
    for (name, p), q in zip(fast.model.state_dict().items(), reference.model.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    moved = Trainer(make_config(rule, dataset="digits", epochs=1, **settings)).model.state_dict()
    assert any(not torch.equal(moved[n], p) for n, p in fast.model.state_dict().items()), "the runs must learn"


def test_a_reference_run_takes_no_part_of_the_fast_path(monkeypatch):
    """Under --execution reference no closed form, stack or in-place update runs: each would fail here."""
    from torchsal import optim
    from torchsal.models import MLPBlock
    from torchsal.rules import closed_form

    def refuse(*args, **kwargs):
        raise AssertionError("a fast-path part ran")

    monkeypatch.setattr(closed_form, "step", refuse)
    monkeypatch.setattr(optim, "updates_in_backward", refuse)
    monkeypatch.setattr(MLPBlock, "run_stack", refuse)
    trainer = trained("reference", "sal", areas=4, width=16, depth=5)
    assert trainer.steps_done == 6 and not trainer.model.stack_alike_blocks


@pytest.mark.parametrize("method,closed,in_backward", [(None, True, True), (EWC(strength=1.0), True, False),
                                                        (LwF(), False, False)])
def test_a_continual_method_keeps_the_parts_it_allows(method, closed, in_backward):
    """A method that reads .grad (EWC) turns off updates in backward; one that adds an output term (LwF) turns off
    the closed form too. Setting the method later chooses again."""
    config = make_config("sal", dataset="digits", epochs=1, areas=4, width=16)
    built = Trainer(config, method=method)
    later = Trainer(config)
    later.method = method
    for trainer in (built, later):
        assert (trainer.execution.closed_form, trainer.execution.in_backward) == (closed, in_backward)


def test_what_the_run_rules_out_is_never_chosen():
    trainer = Trainer(make_config("sal", dataset="digits", epochs=1, areas=4, width=16))
    rule, model = trainer.rule, trainer.model
    assert choose(rule, model) == Execution(closed_form=True, in_backward=True)
    assert not choose(rule, model, mixed_precision=True).closed_form
    assert not choose(rule, model, one_process=False).in_backward
    assert choose(rule, model, reference=True) == REFERENCE and REFERENCE.name == "reference"
    assert choose(rule, model, compile_=True).compiled


def test_a_users_own_conv_net_needs_only_the_reference_path():
    """A model of the user's own modules (no closed form, no stacks, predsim's learned heads) takes the same steps
    under the fast path's one part that fits it as under the reference path."""
    from torch import nn

    from torchsal import BlockNet, RuleConfig, build_rule, optim

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 16, 1, 8, 8, generator=g), torch.randint(4, (3, 16), generator=g)
    states = []
    for fast in (True, False):
        torch.manual_seed(0)
        cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 8), nn.ReLU(),
                            nn.Linear(8, 4))
        model = BlockNet.from_modules(cnn, (1, 8, 8), areas=2, shared=True, conv_areas=False)
        rule = build_rule(model, RuleConfig("sal", objective="predsim"))
        optimizer = optim.Adam([*model.parameters(), *rule.parameters()], lr=1e-2, fused=True)
        execution = choose(rule, model) if fast else REFERENCE
        assert execution.parts() == (["updates in backward"] if fast else [])
        for xb, yb in zip(x, y):
            optimizer.zero_grad()
            execution.step(rule, model, optimizer, xb, yb)
            optimizer.step()
        states.append([*model.state_dict().values(), *rule.state_dict().values()])
    for p, q in zip(*states, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
