import json

import pytest
import torch
from conftest import count_compiled_kernel

from torchsal.config import make_config
from torchsal.data import load_dataset, make_splits
from torchsal.train import Trainer, train


@pytest.fixture(scope="module")
def digits():
    return make_splits(load_dataset("digits"), seed=0)


def strip_timing(metrics):
    drop = {"train_seconds", "seconds", "environment"}
    if isinstance(metrics, dict):
        return {k: strip_timing(v) for k, v in metrics.items() if k not in drop}
    return [strip_timing(v) for v in metrics] if isinstance(metrics, list) else metrics


@pytest.mark.parametrize("rule", ["bp", "fa", "dfa", "sal"])
def test_same_seed_gives_bit_identical_runs(digits, rule):
    config = make_config(rule, epochs=1, max_steps=8, areas=4)
    runs = [train(config, splits=digits, progress=False) for _ in range(2)]
    assert strip_timing(runs[0].metrics) == strip_timing(runs[1].metrics)
    for (k, a), b in zip(runs[0].model.state_dict().items(), runs[1].model.state_dict().values()):
        assert torch.equal(a, b), k
    other = train(make_config(rule, epochs=1, max_steps=8, areas=4, seed=1), splits=digits, progress=False)
    first = [r.model.layers[0].weight[0] for r in (runs[0], other)]
    assert not torch.equal(*first)                               # a different seed is a different run


def test_sal_defaults_on_digits_are_accurate_and_balanced():
    """The issue's acceptance run: SAL with defaults >= 0.95, every area used (auto: 8 for digits' 1293 training
    samples), none above 2/K."""
    result = train(make_config("sal"), progress=False)
    m = result.metrics
    assert m["test_accuracy"] >= 0.95
    assert len(m["area_shares"]) == 8 == m["config"]["areas"]
    assert min(m["area_shares"]) > 0 and max(m["area_shares"]) <= 2 / 8
    assert m["params_active_per_sample"] < m["params_total"] / 4


def test_max_steps_stops_early_and_history_is_per_epoch(digits):
    m = train(make_config("bp", epochs=5, max_steps=30), splits=digits, progress=False).metrics
    assert m["steps"] == 30 and m["epochs"] == 2 and [h["epoch"] for h in m["history"]] == [1, 2]
    assert 0 <= m["test_accuracy"] <= 1 and m["test_accuracy"] == m["history"][-1]["test_accuracy"]


def test_divergence_stops_with_a_clear_message(digits):
    from torchsal.errors import DivergenceError

    where = r"(loss became (nan|inf)|non-finite (weights in layers\.\d\.\w+|activations out of layer \d \(of 2\)))"
    with pytest.raises(DivergenceError, match=rf"rule bp: {where} at step \d+ \(epoch 1\); lower --lr \(now 1e\+30\)"):
        train(make_config("bp", optimizer="sgd", lr=1e30, epochs=2), splits=digits, progress=False)


def test_divergence_keeps_the_last_good_checkpoint(digits, tmp_path):
    from torchsal.errors import DivergenceError
    from torchsal.train import Trainer

    trainer = Trainer(make_config("sal", epochs=1, areas=4, out=str(tmp_path)), splits=digits)
    trainer.fit(progress=False, checkpoint_every=5)
    good = (tmp_path / "checkpoint.pt").read_bytes()
    with torch.no_grad():
        trainer.model.layers[1].shared.fill_(float("nan"))          # corrupt the weights, as a blow-up would
    trainer.total_steps += 10
    with pytest.raises(DivergenceError, match=r"non-finite weights in blocks\.1\.linear\.shared at step .*last good "
                                              r"checkpoint is kept in"):
        trainer.fit(progress=False, checkpoint_every=5)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good


def test_tensorboard_logs_every_epoch(digits, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(make_config("bp", epochs=2, out=str(tmp_path), tensorboard=True), splits=digits, progress=False)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val_accuracy")] == [1, 2]


@pytest.mark.parametrize("rule", ["bp", "sal"])
def test_bfloat16_models_hold_and_train_bfloat16_weights(digits, rule):
    """--dtype bfloat16: every weight, router and fixed feedback matrix is bfloat16 (half the bytes of float32),
    float32 data is accepted, and training reaches the float32 model's accuracy within a few points."""
    runs = {dtype: train(make_config(rule, epochs=3, dtype=dtype), splits=digits, progress=False)
            for dtype in ("float32", "bfloat16")}
    half = runs["bfloat16"]
    assert {t.dtype for t in [*half.model.parameters(), *half.model.buffers(), *half.rule.buffers()]} == {
        torch.bfloat16}
    nbytes = {d: sum(p.numel() * p.element_size() for p in r.model.parameters()) for d, r in runs.items()}
    assert nbytes["bfloat16"] * 2 == nbytes["float32"]
    assert half.metrics["test_accuracy"] >= runs["float32"].metrics["test_accuracy"] - 0.05
    assert half.metrics["test_accuracy"] > 0.8


def test_areas_auto_follow_the_training_set_and_are_stored_resolved(tmp_path):
    from torchsal.config import auto_areas
    from torchsal.train import Trainer

    assert [auto_areas(n) for n in (127, 409, 1293, 1600, 60_000)] == [2, 4, 8, 16, 16]
    trainer = Trainer(make_config("sal", dataset="wine", areas="auto", epochs=1, out=str(tmp_path)))
    assert trainer.config.model.routing_config.areas == 2 == len(trainer.model.layers[0].weight)
    trainer.fit(progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["areas"] == 2


def test_areas_take_a_number_or_auto():
    from torchsal.errors import ConfigError

    with pytest.raises(ConfigError, match="--areas takes a number or auto, got 'many'"):
        make_config("sal", areas="many")


@pytest.mark.parametrize("compile_", [True, False])
def test_compile_flag_compiles_the_step_up_to_its_updates(compile_, monkeypatch):
    """``--compile`` reaches the training step: with it, a SAL step over a few rows per area goes through what
    torch.compile builds (here its eager twin, counted), and without it nothing does."""
    calls = count_compiled_kernel(monkeypatch, lambda fn: fn)
    trainer = Trainer(make_config("sal", areas=16, width=32, batch_size=8, epochs=1, max_steps=3,
                                  compile=compile_))
    trainer.fit(progress=False)
    assert calls.count("forward_phase") == (3 if compile_ else 0)


def test_compile_leaves_a_last_smaller_batch_eager(monkeypatch):
    """Only full batches go through what torch.compile builds: a last, smaller batch would compile again, for
    seconds, for one step."""
    calls = count_compiled_kernel(monkeypatch, lambda fn: fn)
    trainer = Trainer(make_config("sal", areas=16, width=32, batch_size=100, epochs=1, compile=True))
    trainer.fit(progress=False)
    full, rest = divmod(len(trainer.y_train), 100)
    assert rest and trainer.steps_done == full + 1 and calls.count("forward_phase") == full


def test_a_compile_that_fails_trains_eagerly_with_one_warning(monkeypatch, caplog):
    """Where torch.compile cannot build the step (no C++ compiler), training goes on eagerly to the same result, and
    one warning names the cause and the fix."""
    def broken(fn):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return call

    states = []
    for compile_ in (True, False):
        count_compiled_kernel(monkeypatch, broken if compile_ else (lambda fn: fn))
        trainer = Trainer(make_config("sal", areas=16, width=32, batch_size=8, epochs=1, max_steps=3,
                                      compile=compile_))
        with caplog.at_level("WARNING", logger="torchsal.dispatch"):
            trainer.fit(progress=False)
        states.append(trainer.model.state_dict())
    (warning,) = caplog.records
    assert "No working C++ compiler found" in warning.getMessage() and "drop --compile" in warning.getMessage()
    for name, value in states[1].items():
        assert torch.equal(states[0][name], value), name



@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
def test_the_trainer_takes_fused_adams_step_inside_the_update(digits, optimizer, monkeypatch):
    """On one process the trainer takes fused Adam's step inside SAL's update from a parameter's second step on
    (optim.updates_in_backward): the first layer's areas stepped one by one from gradients formed in cache, no
    ``.grad`` left; the weights and the optimizer's state are those of the ``.grad`` route, to float32 rounding."""
    from torchsal import optim

    calls = []
    step_by_area = optim._AdamByArea.__call__
    monkeypatch.setattr(optim._AdamByArea, "__call__",
                        lambda self, p, gradients: calls.append(tuple(p.shape)) or step_by_area(self, p, gradients))
    runs = []
    for in_update in (True, False):
        if not in_update:
            monkeypatch.setattr(optim, "_steps_by_area", lambda opt, group: False)
        calls.clear()
        trainer = Trainer(make_config("sal", optimizer=optimizer, areas=16, width=256, batch_size=64, epochs=1,
                                      max_steps=4), digits)
        trainer.fit(progress=False)
        weight = trainer.model.blocks[0].linear.weight
        assert (weight.grad is None) == in_update
        assert calls.count(tuple(weight.shape)) == (3 if in_update else 0)      # steps 2-4; the first makes state
        assert int(trainer.optimizer.state[weight]["step"]) == 4
        runs.append((trainer.model.state_dict(), trainer.optimizer.state[weight]))
    (fast, fast_state), (slow, slow_state) = runs
    for name, value in slow.items():
        torch.testing.assert_close(fast[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(fast_state[key], slow_state[key], rtol=1e-5, atol=1e-8, msg=key)


@pytest.mark.parametrize("rule", ["bp", "sal"])
def test_the_public_step_is_the_loops_step(digits, rule):
    """``Trainer.step(x, y)`` on the loop's batches gives the loop's weights, bit for bit (and moves them)."""
    config = make_config(rule, epochs=1, max_steps=3, areas=4)
    looped = Trainer(config, digits)
    looped.fit(progress=False)
    manual = Trainer(config, digits)
    start = [p.detach().clone() for p in manual.model.parameters()]
    order = torch.randperm(len(manual.y_train), generator=manual.shuffle)
    for batch in order.split(config.train.batch_size)[:3]:
        out = manual.step(manual.x_train[batch], manual.y_train[batch])
    assert out.logits.shape == (config.train.batch_size, digits.num_classes)
    for a, b in zip(looped.model.parameters(), manual.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, s) for a, s in zip(manual.model.parameters(), start))
