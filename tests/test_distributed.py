"""Data parallel on torch.distributed (gloo, loopback): 2 processes equal 1 process with the same global batch."""

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

ARGS = ["train", "--dataset", "digits", "--epochs", "1", "--max-steps", "12", "--batch-size", "64", "--quiet",
        "--threads", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, script=None, timeout=300):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(free_port())]
    target = [script] if script else ["-m", "torchsal"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*launcher, *target, *args], capture_output=True, text=True, timeout=timeout, env=env)


def single(*args):
    return subprocess.run([sys.executable, "-m", "torchsal", *args], capture_output=True, text=True, timeout=300)


def weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)["model"]


def assert_close_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("rule", ["sal", "bp"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, rule):
    res = torchrun(*ARGS, "--rule", rule, "--areas", "16", "--shared", "--out", str(tmp_path / "dp"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("test accuracy") == 1                 # only rank 0 reports and writes
    res = single(*ARGS, "--rule", rule, "--areas", "16", "--shared", "--out", str(tmp_path / "one"))
    assert res.returncode == 0, res.stderr
    assert_close_weights(weights(tmp_path / "dp"), weights(tmp_path / "one"))


RANK_1_DIES_AT_STEP_9 = textwrap.dedent("""
    import os, sys
    from torchsal.cli import main
    from torchsal.train import Trainer
    step = Trainer.train_step

    def dying(self, batch):
        if self.steps_done == 9 and self.ctx.rank == 1:
            os._exit(1)
        step(self, batch)

    Trainer.train_step = dying
    sys.exit(main(sys.argv[1:]))
""")


def test_a_dead_rank_stops_the_job_and_the_run_resumes_on_one_process(tmp_path):
    script = tmp_path / "dying.py"
    script.write_text(RANK_1_DIES_AT_STEP_9)
    run = tmp_path / "run"
    started = time.time()
    res = torchrun(*ARGS, "--rule", "sal", "--areas", "16", "--checkpoint-every", "4", "--dist-timeout", "30",
                   "--out", str(run), script=str(script), timeout=240)
    assert res.returncode != 0 and time.time() - started < 200          # stops, within a bounded time
    assert not (run / "model.pt").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 8
    res = single("train", "--resume", str(run), "--checkpoint-every", "4", "--quiet", "--threads", "1")
    assert res.returncode == 0, res.stderr
    res = single(*ARGS, "--rule", "sal", "--areas", "16", "--out", str(tmp_path / "one"))
    assert res.returncode == 0, res.stderr
    assert_close_weights(weights(run), weights(tmp_path / "one"))


@pytest.mark.parametrize("rule, extra", [("sal", []), ("bp", ["--depth", "2", "--optimizer", "sgd", "--lr", "0.05"])])
def test_area_parallel_matches_one_process(tmp_path, rule, extra):
    """Each rank holds half of every layer's areas; samples travel to their area's rank and back. The final
    (gathered) weights equal single-process training. BP also checks input gradients on the way back."""
    args = [*ARGS, "--rule", rule, "--areas", "16", "--shared", *extra]
    res = torchrun(*args, "--parallel", "area", "--out", str(tmp_path / "ap"))
    assert res.returncode == 0, res.stderr[-2000:]
    res = single(*args, "--out", str(tmp_path / "one"))
    assert res.returncode == 0, res.stderr
    assert_close_weights(weights(tmp_path / "ap"), weights(tmp_path / "one"))


AREA_PARALLEL_STEP = textwrap.dedent("""
    import pathlib, sys
    import torch
    from torchsal import build_model, build_rule, distributed, make_config
    from torchsal.train import make_optimizer

    ctx = distributed.init_from_env()
    areas, batch, width, classes, n_in = 8, 48, 16, 3, 20
    config = make_config("sal", areas=areas, shared=True, depth=2, width=width, routing="layer")
    owned = distributed.owned_areas(areas, ctx)
    model = build_model(n_in, classes, config.model, 0, owned)
    config_k = make_config("sal", areas=areas, shared=False, depth=2, width=width, routing="layer")
    for layer, whole in zip(build_model(n_in, classes, config_k.model, 0, owned).layers,
                            build_model(n_in, classes, config_k.model, 0).layers):   # shards start as the full model
        assert torch.equal(layer.weight, whole.weight[owned.start: owned.stop])
    rule = build_rule(model, config.rule)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config.train)
    g = torch.Generator().manual_seed(0)
    x_all, y_all = torch.randn(batch, n_in, generator=g), torch.randint(classes, (batch,), generator=g)
    mine = torch.arange(batch).tensor_split(ctx.world)[ctx.rank]
    with torch.no_grad():                        # every row's area in every layer (routing is per row)
        layer_areas = model.trace(x_all).areas
    owner = lambda a: a // (areas // ctx.world)
    expected = 0
    for layer, a in zip(model.layers, layer_areas):
        leaving = int((owner(a[mine]) != ctx.rank).sum())               # my rows served elsewhere
        arriving = int((owner(a) == ctx.rank).sum()) - (len(mine) - leaving)   # others' rows served here
        # rows out (inputs), outputs back to their senders, output gradients out; SAL needs no input gradients
        expected += 4 * (leaving * (layer.in_features + layer.out_features) + arriving * layer.out_features)
    distributed.TRAFFIC.clear()
    optimizer.zero_grad(set_to_none=True)
    rule(model, x_all[mine], y_all[mine]).loss.backward()
    distributed.sync_gradients(model, len(mine), batch)
    optimizer.step()
    assert distributed.TRAFFIC["all_to_all"] == expected, (distributed.TRAFFIC, expected)
    # besides the rows: per-area row counts (8 bytes per area and layer) and the routers' scores (B x K floats)
    routers = len(model.routers)
    assert distributed.TRAFFIC["all_gather"] <= 8 * areas * len(model.layers) + 4 * routers * len(mine) * areas
    for layer in model.layers:
        assert layer.weight.shape[0] == layer.bias.shape[0] == len(owned)
    area_params = {id(p) for layer in model.layers for p in (layer.weight, layer.bias)}
    held = [p for group in optimizer.param_groups for p in group["params"] if id(p) in area_params]
    assert len(held) == 2 * len(model.layers)                           # the optimizer knows only these areas
    assert sum(id(p) in area_params for p in optimizer.state) > 0
    pathlib.Path(sys.argv[1], f"rank{ctx.rank}.ok").write_text(str(expected))   # ranks share stdout: files
""")


def test_area_parallel_holds_only_own_areas_and_sends_only_routed_rows(tmp_path):
    script = tmp_path / "step.py"
    script.write_text(AREA_PARALLEL_STEP)
    res = torchrun(str(tmp_path), script=str(script))
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.ok")) == ["rank0.ok", "rank1.ok"]


LEAVES_CLEANLY = textwrap.dedent("""
    import os, pathlib, sys
    import torch
    import torch.distributed as dist
    from torchsal import distributed

    ctx = distributed.init_from_env()
    torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)    # loads torch._dynamo, as training does
    dist.destroy_process_group()
    threads = [pathlib.Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    pathlib.Path(sys.argv[1], f"rank{ctx.rank}.threads").write_text(" ".join(threads))
""")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names are read from Linux's /proc")
def test_leaving_the_group_stops_gloos_threads(tmp_path):
    """Gloo threads left running at exit abort the process now and then (SIGABRT, "terminate called without an
    active exception"); leaving the group must join them, also once an optimizer has been built."""
    script = tmp_path / "leave.py"
    script.write_text(LEAVES_CLEANLY)
    res = torchrun(str(tmp_path), script=str(script))
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in (0, 1):
        assert "gloo" not in (tmp_path / f"rank{rank}.threads").read_text()


def test_area_parallel_needs_areas_divisible_by_processes(tmp_path):
    res = torchrun(*ARGS, "--rule", "sal", "--areas", "3", "--parallel", "area", "--out", str(tmp_path / "x"))
    assert res.returncode != 0
    assert "--areas (3) must be > 1 and divisible by the number of processes (2)" in res.stderr
