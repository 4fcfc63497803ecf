"""Learned local objectives (pred, sim, predsim and their bpf variants): each block's update is its own objective's
gradient, written out by hand; nothing crosses a block; heads are trained, saved and resumed with the run."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchsal.optim
from torchsal.blocks import BlockNet
from torchsal.cli import main
from torchsal.config import RoutingConfig, RuleConfig, check_applicable, make_config
from torchsal.errors import ConfigError
from torchsal.layers import AreaConv2d, AreaLinear
from torchsal.models import build_model
from torchsal.objectives import similarity
from torchsal.rules import build_rule
from torchsal.train import Trainer

VARIANTS = [("readout", "weights"), *itertools.product(("pred", "sim", "predsim"), ("weights", "fixed"))]


def mlp(areas: int = 1) -> BlockNet:
    torch.manual_seed(0)
    modules = [nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 3)]
    return BlockNet.from_modules(modules, (4,), areas=areas)


def cnn(areas: int = 1, conv_areas: bool = True, routing: RoutingConfig | None = None) -> BlockNet:
    torch.manual_seed(0)
    modules = [nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
               nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(36, 5), nn.ReLU(), nn.Linear(5, 3)]
    return BlockNet.from_modules(modules, (2, 6, 6), areas=areas, conv_areas=conv_areas, routing=routing)


def sal(model: BlockNet, objective: str, feedback: str = "weights", **kw) -> torch.nn.Module:
    return build_rule(model, RuleConfig(rule="sal", objective=objective, head_feedback=feedback, **kw), seed=3)


def data(n: int = 8, shape: tuple[int, ...] = (4,)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, *shape, generator=g), torch.arange(n) % 3


@pytest.mark.parametrize("feedback", ["weights", "fixed"])
def test_pred_updates_a_block_by_its_heads_error_through_the_head_or_a_fixed_matrix(feedback):
    """grad W_1 = ((softmax(V h + c) - y) M * relu'(a)) ^T x / B, with M the head's weight V (pred) or its fixed
    feedback (bpf); the head learns its own cross-entropy: grad V = (softmax - y)^T h / B."""
    model, (x, y) = mlp(), data()
    rule = sal(model, "pred", feedback)
    layer, head = model.blocks[0][0], rule.objective.heads[0].out
    if feedback == "fixed":     # bpf: the head starts at its fixed feedback; move it, as learning does
        assert torch.equal(head.weight.detach(), head.feedback)
        with torch.no_grad():
            head.weight.add_(torch.randn_like(head.weight))
    rule(model, x, y).loss.backward()
    a = x @ layer.weight[0].T + layer.bias[0]
    h = a.relu()
    e = torch.softmax(h @ head.weight.T + head.bias, 1) - F.one_hot(y, 3)
    back = head.weight if feedback == "weights" else head.feedback
    delta = (e @ back) * (a > 0)
    torch.testing.assert_close(layer.weight.grad[0], delta.T @ x / len(x))
    torch.testing.assert_close(layer.bias.grad[0], delta.mean(0))
    torch.testing.assert_close(head.weight.grad, e.T @ h / len(x))


@pytest.mark.parametrize("feedback", ["weights", "fixed"])
def test_sim_updates_a_block_by_the_gradient_of_its_similarity_loss(feedback):
    """L = mean (S(P h + p) - S(Y))^2, S the centred cosine similarity within the batch; the block's update is
    dL/dh through P (sim) or through the fixed feedback of P (bpf)."""
    model, (x, y) = mlp(), data()
    rule = sal(model, "sim", feedback)
    layer, project = model.blocks[0][0], rule.objective.sim_heads[0].project
    with torch.no_grad():
        project.weight.add_(torch.randn_like(project.weight))      # (bpf: away from its fixed feedback)
    rule(model, x, y).loss.backward()
    a = x @ layer.weight[0].T + layer.bias[0]
    z = (a.relu() @ project.weight.T + project.bias).detach().requires_grad_()
    onehot = F.one_hot(y, 3).float()
    rows = lambda t: (t - t.mean(1, keepdim=True)) / ((t - t.mean(1, keepdim=True)).norm(dim=1, keepdim=True))  # noqa: E731
    ((rows(z) @ rows(z).T - rows(onehot) @ rows(onehot).T) ** 2).mean().backward()
    back = project.weight if feedback == "weights" else project.feedback
    delta = (z.grad @ back) * (a > 0)
    torch.testing.assert_close(layer.weight.grad[0], delta.T @ x)
    torch.testing.assert_close(project.weight.grad, z.grad.T @ a.relu())


def test_predsim_is_the_weighted_sum_of_pred_and_sim():
    x, y = data()
    models = {objective: mlp() for objective in ("pred", "sim", "predsim")}
    rules = {objective: sal(model, objective, sim_weight=0.75) for objective, model in models.items()}
    rules["pred"].objective.heads.load_state_dict(rules["predsim"].objective.heads.state_dict())
    rules["sim"].objective.sim_heads.load_state_dict(rules["predsim"].objective.sim_heads.state_dict())
    for objective, model in models.items():
        rules[objective](model, x, y).loss.backward()
    pred, sim, predsim = (models[o].blocks[0][0].weight.grad[0] for o in ("pred", "sim", "predsim"))
    torch.testing.assert_close(predsim, 0.25 * pred + 0.75 * sim)


def test_a_map_is_pooled_for_its_head_and_reduced_to_channel_deviations_for_its_similarity():
    model, (x, _) = cnn(), data(shape=(2, 6, 6))
    rule = sal(model, "predsim", readout_pool=2)
    h = model.trace(x).hidden[0]                                             # (8, 3, 3, 3)
    head, sim = rule.objective.heads[0], rule.objective.sim_heads[0]
    assert head.out.weight.shape == (3, 3 * 2 * 2)
    torch.testing.assert_close(head(h), F.adaptive_avg_pool2d(h, 2).flatten(1) @ head.out.weight.T + head.out.bias)
    z = F.conv2d(h, sim.project.weight, sim.project.bias, padding=1)
    torch.testing.assert_close(sim(h), z.flatten(2).std(2))
    assert similarity(sim(h)).shape == (8, 8)


@pytest.mark.parametrize(("objective", "feedback"), VARIANTS)
def test_a_later_blocks_weights_never_change_an_earlier_blocks_update(objective, feedback):
    model, (x, y) = cnn(areas=4), data(shape=(2, 6, 6))
    rule = sal(model, objective, feedback, head_layers=1 if objective == "pred" else 0)

    def first_block_update() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        rule(model, x, y).loss.backward()
        return [p.grad.clone() for p in model.blocks[0].parameters()]

    before = first_block_update()
    with torch.no_grad():
        for block in model.blocks[1:]:
            for p in block.parameters():
                p.add_(torch.randn_like(p))
    after = first_block_update()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    later = [p.grad for block in model.blocks[1:] for p in block.parameters()]
    assert all(g is not None for g in later)         # the later blocks did learn (from their own objectives)


@pytest.mark.parametrize(("objective", "feedback"), VARIANTS)
def test_untouched_areas_and_their_optimizer_state_stay_bit_identical(objective, feedback):
    model, (x, y) = cnn(areas=8), data(n=3, shape=(2, 6, 6))
    rule = sal(model, objective, feedback)
    params = [*model.parameters(), *rule.parameters()]
    optimizer = torchsal.optim.AdamW(params, lr=0.1, weight_decay=0.1)
    layers = model.area_layers()
    before = [layer.weight.detach().clone() for layer in layers]
    heads = [p.detach().clone() for p in rule.parameters()]
    used: set[int] = set()
    for _ in range(2):
        used |= set(model.trace(x).areas[0].tolist())
        optimizer.zero_grad()
        rule(model, x, y).loss.backward()
        optimizer.step()
    assert len(used) < 8
    for layer, old in zip(layers, before, strict=True):
        moments = optimizer.state[layer.weight]["exp_avg"]
        for k in range(8):
            assert torch.equal(layer.weight[k], old[k]) == (k not in used), k
            assert bool(moments[k].abs().sum() == 0) == (k not in used), k
    assert all(not torch.equal(p, old) for p, old in zip(rule.parameters(), heads, strict=True))   # heads learn


def test_heads_and_their_optimizer_state_are_saved_counted_and_resumed_bit_identically(tmp_path):
    base = ["train", "--dataset", "digits", "--width", "32", "--areas", "4", "--objective", "predsim",
            "--head-feedback", "fixed", "--lr", "0.003", "--quiet"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main([*base, "--epochs", "2", "--out", str(whole), "--checkpoint-every", "10"]) == 0
    assert main([*base, "--epochs", "1", "--out", str(split), "--checkpoint-every", "10"]) == 0
    assert main([*base, "--epochs", "2", "--out", str(split), "--resume", str(split)]) == 0
    states = [torch.load(d / "checkpoint.pt", weights_only=True) for d in (whole, split)]
    rule_state = states[0]["rule"]
    assert any(k.startswith("objective.heads.0.out.") for k in rule_state)
    for key in ("model", "rule"):
        assert states[0][key].keys() == states[1][key].keys()
        assert all(torch.equal(states[0][key][k], states[1][key][k]) for k in states[0][key]), key
    heads = sum(v.numel() for k, v in rule_state.items() if k.endswith(("weight", "bias")))
    trainer = Trainer.resume(whole)
    in_optimizer = {id(p) for p in trainer.optimizer.param_groups[0]["params"]}
    assert all(id(p) in in_optimizer and p in trainer.optimizer.state for p in trainer.rule.parameters())
    metrics = json.loads((whole / "metrics.json").read_text())
    assert metrics["params_local_heads"] == heads > 0
    assert metrics["params_total"] == trainer.model.parameter_counts()["params_total"] + heads


def test_objectives_are_refused_where_they_do_nothing():
    with pytest.raises(ConfigError, match="--head-layers .*--objective sim has no learned head"):
        check_applicable(make_config("sal", objective="sim", head_layers=1), {"head_layers", "objective"})
    with pytest.raises(ConfigError, match="--objective .*exist only with --rule sal"):
        check_applicable(make_config("dfa", objective="pred"), {"objective"})
    with pytest.raises(ConfigError, match="--sim-weight weighs predsim"):
        check_applicable(make_config("sal", objective="pred", sim_weight=0.5), {"sim_weight"})
    with pytest.raises(ConfigError, match="--feedback per-area .*use --feedback per-layer"):
        build_rule(mlp(areas=2), RuleConfig(rule="sal", objective="pred", feedback="per-area"))
    with pytest.raises(ConfigError, match="unknown objective 'predict'"):
        RuleConfig(objective="predict")
    with pytest.raises(ConfigError, match="--sim-weight must lie in"):
        RuleConfig(sim_weight=1.5)


def test_conv_nets_default_to_predsim_and_dense_convolutions_for_sal_only():
    sal_cnn = make_config("sal", model="cnn")
    assert (sal_cnn.rule.objective, sal_cnn.model.conv_areas, sal_cnn.model.routing_config.areas,
            sal_cnn.rule.sim_weight, sal_cnn.rule.readout_pool) == ("predsim", False, 4, 0.7, 4)
    assert make_config("sal").rule.sim_weight == 0.99                   # the dataclass's, predsim's published
    assert make_config("sal", model="cnn", areas=16).model.routing_config.areas == 16     # a flag still wins
    assert make_config("sal").rule.objective == "readout"              # the MLP keeps its measured default
    assert make_config("dfa", model="cnn").model.conv_areas is True     # (dense anyway: one area)
    model = build_model(0, 10, make_config("sal", model="cnn", areas=4).model, in_shape=(3, 32, 32))
    kinds = {(type(layer).__name__, layer.areas) for layer in model.area_layers()}
    assert kinds == {("AreaConv2d", 1), ("AreaLinear", 4)}


def test_dense_convolutions_in_a_routed_net_compute_what_the_dense_layers_do():
    model, (x, y) = cnn(areas=4, conv_areas=False), data(shape=(2, 6, 6))
    convs = [m for m in model.area_layers() if isinstance(m, AreaConv2d)]
    assert all(c.areas == 1 for c in convs) and all(m.areas == 4 for m in model.area_layers()
                                                    if isinstance(m, AreaLinear))
    trace = model.trace(x)
    first = F.max_pool2d(F.conv2d(x, convs[0].weight[0], convs[0].bias[0], padding=1).relu(), 2)
    torch.testing.assert_close(trace.in_batch_order(trace.hidden[0]), first)
    layer = cnn(areas=4, conv_areas=False, routing=RoutingConfig(areas=4, routing="layer"))
    assert layer.router_blocks == [2, 3]       # layer routing: a router before each block holding areas only
    out = sal(layer, "predsim")(layer, x, y)
    out.loss.backward()
    assert all(p.grad is not None for p in layer.parameters())


def test_lean_memory_takes_the_same_update_block_by_block():
    x, y = data()
    updates = []
    for memory in ("standard", "lean"):
        model = mlp(areas=2)
        sal(model, "predsim", memory=memory)(model, x, y).loss.backward()
        updates.append([p.grad for p in model.parameters()])
    for standard, lean in zip(*updates, strict=True):
        torch.testing.assert_close(lean, standard)


def test_a_rule_whose_heads_no_optimizer_steps_says_so():
    model, (x, y) = mlp(), data()
    rule = sal(model, "pred")
    optimizer = torchsal.optim.Adam(model.parameters(), lr=1e-3)       # the heads forgotten
    for step in range(2):
        optimizer.zero_grad()
        if step == 1:
            with pytest.raises(ConfigError, match=r"give the optimizer rule.parameters\(\) beside model.parameters"):
                rule.step(model, x, y)
        else:
            rule.step(model, x, y)
