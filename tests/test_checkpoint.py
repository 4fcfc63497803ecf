"""Runs survive SIGKILL, at any step and in the middle of writing a checkpoint, with bit-identical results."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

ARGS = ["train", "--rule", "sal", "--dataset", "digits", "--epochs", "6", "--areas", "4", "--quiet",
        "--checkpoint-every", "7", "--batch-size", "32"]


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "torchsal", *args], capture_output=True, text=True, timeout=600,
                          **kw)


def weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)["model"]


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run, never interrupted."""
    d = tmp_path_factory.mktemp("reference")
    res = cli(*ARGS, "--out", str(d))
    assert res.returncode == 0, res.stderr
    return d


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path, reference):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "torchsal", *ARGS, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (run / "checkpoint.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model.pt").exists()                      # it really died mid-run
    res = cli("train", "--resume", str(run), "--checkpoint-every", "7", "--quiet")
    assert res.returncode == 0, res.stderr
    assert_identical(weights(run), weights(reference))


CRASH_IN_THIRD_CHECKPOINT_WRITE = textwrap.dedent("""
    import os, sys
    import torchsal.storage as storage
    from torchsal.cli import main
    real_fsync, writes = os.fsync, []

    def fsync(fd):
        if "checkpoint.pt" in os.readlink(f"/proc/self/fd/{fd}"):
            writes.append(fd)
            if len(writes) == 3:                 # half-written temp file, not yet renamed: die
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                os._exit(137)
        real_fsync(fd)

    storage.os.fsync = fsync
    sys.exit(main(sys.argv[1:]))
""")


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, reference):
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-c", CRASH_IN_THIRD_CHECKPOINT_WRITE, *ARGS, "--out", str(run)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 137, res.stderr
    assert list(run.glob(".checkpoint.pt.*.tmp")), "the crash left a partial temp file"
    state = torch.load(run / "checkpoint.pt", weights_only=True)  # the previous checkpoint, intact
    assert state["step"] == 14
    res = cli("train", "--resume", str(run), "--checkpoint-every", "7", "--quiet")
    assert res.returncode == 0, res.stderr
    assert not list(run.glob(".checkpoint.pt.*.tmp"))
    assert_identical(weights(run), weights(reference))


def test_metrics_of_a_resumed_run_match(tmp_path, monkeypatch):
    """Not only the weights: the per-epoch history of a resumed run equals the uninterrupted one."""
    import json

    from torchsal.config import make_config
    from torchsal.train import Trainer

    class Crash(Exception):
        pass

    step = Trainer.train_step

    def crash_at_step_60(self, batch):
        if self.steps_done == 60:
            raise Crash
        step(self, batch)

    run = tmp_path / "run"
    monkeypatch.setattr(Trainer, "train_step", crash_at_step_60)
    with pytest.raises(Crash):
        Trainer(make_config("sal", areas=4, epochs=3, batch_size=32, out=str(run))).fit(False, checkpoint_every=25)
    monkeypatch.setattr(Trainer, "train_step", step)
    resumed = Trainer.resume(run).fit(progress=False, checkpoint_every=25)
    straight = Trainer(make_config("sal", areas=4, epochs=3, batch_size=32)).fit(progress=False)
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in straight.metrics["history"]]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in resumed.metrics["history"]] == strip
    assert json.loads((run / "config.json").read_text())["epochs"] == 3
