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
    return torch.load(run_dir / "model.pt", weights_only=False)["model"]


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
    step = Trainer._train_step

    def dying(self, batch):
        if self.step == 9 and self.ctx.rank == 1:
            os._exit(1)
        step(self, batch)

    Trainer._train_step = dying
    sys.exit(main(sys.argv[1:]))
""")


def test_a_dead_rank_stops_the_job_and_the_run_resumes_on_one_process(tmp_path):
    script = tmp_path / "dying.py"
    script.write_text(RANK_1_DIES_AT_STEP_9)
    run = tmp_path / "run"
    started = time.time()
    res = torchrun(*ARGS, "--rule", "sal", "--checkpoint-every", "4", "--dist-timeout", "30", "--out", str(run),
                   script=str(script), timeout=240)
    assert res.returncode != 0 and time.time() - started < 200          # stops, within a bounded time
    assert not (run / "model.pt").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 8
    res = single("train", "--resume", str(run), "--checkpoint-every", "4", "--quiet", "--threads", "1")
    assert res.returncode == 0, res.stderr
    res = single(*ARGS, "--rule", "sal", "--out", str(tmp_path / "one"))
    assert res.returncode == 0, res.stderr
    assert_close_weights(weights(run), weights(tmp_path / "one"))
