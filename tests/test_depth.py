"""Deep models: residual pre-norm builders, the lean memory mode's equality with the standard one, NaN guard."""

import pytest
import torch

from torchsal.config import ConfigError, ModelConfig, RoutingConfig, RuleConfig, make_config
from torchsal.models import build_model, count_parameters
from torchsal.rules import build_rule


def deep(depth=6, areas=3, norm="rms", block="residual", width=8):
    cfg = ModelConfig(depth=depth, width=width, shared=areas > 1, block=block, norm=norm,
                      routing_config=RoutingConfig(areas=areas, routing_dim=4))
    return build_model(5, 3, cfg, seed=0)


@pytest.mark.parametrize("norm", ["none", "layer", "rms"])
def test_residual_builder(norm):
    model = deep(norm=norm)
    assert model.residual == [False, True, True, True, True, True, False]   # first layer and head are not
    kinds = [type(n).__name__ for n in model.norms]
    expected = "Identity" if norm == "none" else {"layer": "LayerNorm", "rms": "RMSNorm"}[norm]
    assert kinds == ["Identity"] + [expected] * 6                           # 5 pre-norms + the final norm
    assert model.parameter_counts()["params_total"] == count_parameters(5, 3, model.config)
    x = torch.randn(16, 5)
    with torch.no_grad():
        trace = model.trace(x)
        first = model.norms[1](trace.hidden[0])
        branch = torch.relu(model.layers[1](first, trace.groups[1]))   # rows grouped by area
    torch.testing.assert_close(trace.hidden[1], trace.hidden[0] + branch)   # h = h + relu(W norm(h))


def test_branch_initialisation_shrinks_with_depth():
    shallow, deeper = deep(depth=4, areas=1), deep(depth=64, areas=1)
    ratio = deeper.layers[1].weight[0].abs().max() / shallow.layers[1].weight[0].abs().max()
    assert 0.2 < ratio < 0.3                                                # 1/sqrt(64) vs 1/sqrt(4): 0.25


def test_128_layers_forward_is_finite():
    model = deep(depth=128, areas=4, width=16)
    logits = model(torch.randn(32, 5))
    assert logits.shape == (32, 3) and torch.isfinite(logits).all()


@pytest.mark.parametrize("readout", ["per-layer", "single"])
@pytest.mark.parametrize("areas,routing", [(1, "input"), (3, "input"), (3, "layer")])
def test_lean_memory_gives_the_same_updates(readout, areas, routing):
    x, y = torch.randn(24, 5, generator=torch.Generator().manual_seed(0)), torch.arange(24) % 3
    grads = []
    for memory in ("standard", "lean"):
        cfg = ModelConfig(depth=5, width=8, shared=areas > 1, block="residual", norm="layer",
                          routing_config=RoutingConfig(areas=areas, routing_dim=4, routing=routing))
        model = build_model(5, 3, cfg, seed=0)
        model.stack_alike_blocks = False       # block by block, as lean memory runs (tests/test_stacks.py: stacks)
        rule = build_rule(model, RuleConfig(rule="sal", signal="local", readout=readout, memory=memory), 0)
        rule(model, x, y).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0, msg=name)


def test_shared_readout_is_one_matrix():
    model = deep(depth=6, areas=1)
    rule = build_rule(model, RuleConfig(rule="sal", signal="local", readout="single"), 0)
    assert len(rule._matrices("local")) == 1
    assert len(build_rule(model, RuleConfig(rule="sal", signal="local"), 0)._matrices("local")) == 6


@pytest.mark.parametrize("rule,signal", [("bp", "local"), ("dfa", "local"), ("sal", "direct"), ("sal", "both")])
def test_lean_memory_needs_local_signals(rule, signal):
    with pytest.raises(ConfigError, match="--memory lean needs layer-local signals"):
        make_config(rule, signal=signal, memory="lean")


def test_nan_guard_names_the_layer():
    from torchsal.data import load_dataset, make_splits
    from torchsal.errors import DivergenceError
    from torchsal.train import Trainer

    splits = make_splits(load_dataset("digits"), 0)
    trainer = Trainer(make_config("sal", depth=4, block="residual", norm="none", areas=1, shared=False, epochs=1),
                      splits=splits)
    with torch.no_grad():                      # finite weights whose activations overflow in layer 2
        trainer.model.layers[2].weight[0].fill_(3e38)
    with pytest.raises(DivergenceError, match=r"rule sal: non-finite activations out of layer 2 \(of 5\) at step 1"):
        trainer.fit(progress=False)


def test_activation_meter_counts_saved_tensors_once():
    from torchsal.diagnostics import ActivationMeter

    w = torch.nn.Parameter(torch.randn(100))
    meter = ActivationMeter(torch.nn.ParameterList([w]))
    x = torch.randn(100, requires_grad=True)
    with meter.measure():
        e = x.exp()                                   # saves its output e: 400 bytes
        (e * w).sum().backward()                      # saves e (again: counted once) and w (a parameter: excluded)
    assert meter.peak_bytes == 400 and meter.current_bytes == 0


def test_lean_activation_memory_does_not_grow_with_depth():
    from torchsal.diagnostics import ActivationMeter

    def peak(depth, **rule):
        config = make_config(depth=depth, width=16, block="residual", norm="layer", areas=4, **rule)
        model = build_model(20, 10, config.model)
        rule_ = build_rule(model, config.rule)
        meter = ActivationMeter(model)
        with meter.measure():
            rule_(model, torch.randn(32, 20), torch.arange(32) % 10).loss.backward()
        return meter.peak_bytes

    assert peak(128, rule="sal", signal="local", memory="lean") <= 1.5 * peak(8, rule="sal", signal="local",
                                                                             memory="lean")
    assert peak(128, rule="bp") > 8 * peak(8, rule="bp")


def test_depth_aware_defaults_choose_the_architecture_that_trains_at_depth(tmp_path, capsys):
    """From 8 hidden layers on, unset block, norm and readout default to residual pre-norm blocks with one shared
    readout; explicit flags, recipes and config files still win; the run summary says what was chosen."""
    from torchsal import make_config
    from torchsal.cli import main
    from torchsal.config import DEEP_FROM

    shallow, deep = make_config("sal", depth=DEEP_FROM - 1), make_config("sal", depth=DEEP_FROM)
    assert (shallow.model.block, shallow.model.norm, shallow.rule.readout) == ("plain", "none", "per-layer")
    assert (deep.model.block, deep.model.norm, deep.rule.readout) == ("residual", "layer", "single")
    mine = make_config("bp", depth=64, block="plain", norm="rms")
    assert (mine.model.block, mine.model.norm) == ("plain", "rms")
    (tmp_path / "deep.toml").write_text("depth = 16\nnorm = 'rms'\n")
    assert main(["train", "--config", str(tmp_path / "deep.toml"), "--width", "8", "--max-steps", "2",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "architecture: 16 hidden layers of 8, residual blocks, rms norm, single local readout" in out
