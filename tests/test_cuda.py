"""The CUDA path: same updates as on CPU, untouched areas untouched with fused optimizers. Skipped without CUDA."""

import subprocess
import sys

import pytest
import torch
from conftest import tiny

from torchsal.config import TrainConfig
from torchsal.train import make_optimizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("rule", ["bp", "fa", "dfa", "sal"])
def test_cuda_steps_match_cpu(rule):
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(0))
    y = torch.arange(64) % 3
    results = []
    for device in ("cpu", "cuda"):
        model, learning_rule = tiny(rule, areas=4, shared=True)
        model, learning_rule = model.to(device), learning_rule.to(device)
        optimizer = make_optimizer(list(model.parameters()), TrainConfig(optimizer="sgd", lr=0.05, momentum=0.9))
        for _ in range(5):
            optimizer.zero_grad()
            learning_rule(model, x.to(device), y.to(device)).loss.backward()
            optimizer.step()
        results.append({k: v.cpu() for k, v in model.state_dict().items()})
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("opt", ["sgd", "adam", "adamw"])
def test_untouched_areas_on_cuda(opt):
    model, rule = tiny("sal", areas=4, shared=True)
    model, rule = model.cuda(), rule.cuda()
    cfg = TrainConfig(optimizer=opt, lr=0.01, weight_decay=0.1, momentum=0.9 if opt == "sgd" else 0.0)
    optimizer = make_optimizer(list(model.parameters()), cfg)
    x, y = torch.randn(256, 5, device="cuda"), torch.randint(3, (256,), device="cuda")
    for _ in range(2):
        optimizer.zero_grad()
        rule(model, x, y).loss.backward()
        optimizer.step()
    area, _ = model.routers[0](x)
    skipped = int(area[0])
    params = [p for layer in model.layers for p in (layer.weight, layer.bias)]

    def snapshot():
        state = [v[skipped].clone() for p in params for v in optimizer.state[p].values()
                 if torch.is_tensor(v) and v.dim() > 0]
        return [p[skipped].detach().clone() for p in params] + state

    before = snapshot()
    keep = area != skipped
    optimizer.zero_grad()
    rule(model, x[keep], y[keep]).loss.backward()
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(), strict=True))


def test_cli_trains_on_cuda(tmp_path):
    res = subprocess.run([sys.executable, "-m", "torchsal", "train", "--device", "cuda", "--epochs", "5", "--quiet",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    import json
    assert json.loads((tmp_path / "metrics.json").read_text())["test_accuracy"] > 0.8


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("areas,shared", [(16, True), (16, False), (1, False)])
def test_a_training_step_never_waits_for_the_host(optimizer, areas, shared):
    """No per-step host round trip: routing, grouping, the grouped kernels, the touched-area bookkeeping, the
    optimizer and the running metrics all stay on the device (issue 16)."""
    from torchsal import make_config
    from torchsal.train import Trainer

    trainer = Trainer(make_config("sal", dataset="digits", device="cuda", optimizer=optimizer, areas=areas,
                                  shared=shared, batch_size=64))
    batch = torch.arange(64, device="cuda")
    trainer.train_step(batch)                  # warm-up: lazy state and allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.train_step(batch)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    trainer._end_epoch(0.0)                    # the epoch's metrics are read once, here
    assert trainer.history[-1]["train_loss"] > 0
