"""Long runs: re-running the same command with --resume DIR appended, budget extensions, refused changes, a
finished run left alone, and Ctrl-C / SIGTERM leaving a checkpoint and the command that continues the run."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from torchsal.cli import main
from torchsal.train import Trainer

BASE = ["train", "--dataset", "digits", "--lr", "0.002", "--width", "32", "--quiet"]


def weights(run):
    return torch.load(run / "model.pt", weights_only=True)["model"]


def test_the_same_command_with_resume_appended_extends_the_budget_exactly(tmp_path, capsys):
    """Two epochs, one and then one more by re-running the command with --resume: bit-identical to two at once."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main([*BASE, "--epochs", "2", "--out", str(whole)]) == 0
    assert main([*BASE, "--epochs", "1", "--out", str(split), "--checkpoint-every", "10"]) == 0
    assert main([*BASE, "--epochs", "2", "--out", str(split), "--resume", str(split)]) == 0
    assert all(torch.equal(a, b) for a, b in zip(weights(whole).values(), weights(split).values(), strict=True))
    assert json.loads((split / "metrics.json").read_text())["epochs"] == 2
    state = torch.load(split / "checkpoint.pt", weights_only=True)
    assert state["checkpoint_every"] == 10                  # saved with the run, used again without the flag


def test_a_run_may_be_resumed_with_compile(tmp_path, monkeypatch):
    """--compile says how fast a run goes, not what it is: a run started without it resumes with it (and it
    reaches the step)."""
    from conftest import count_compiled_kernel

    calls = count_compiled_kernel(monkeypatch, lambda fn: fn)
    run = tmp_path / "run"
    command = [*BASE, "--areas", "16", "--batch-size", "16", "--out", str(run), "--checkpoint-every", "10"]
    assert main([*command, "--max-steps", "10"]) == 0 and not calls
    assert main([*command, "--max-steps", "20", "--compile", "--resume", str(run)]) == 0
    assert calls.count("forward_phase") == 10


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    command = [*BASE, "--epochs", "1", "--out", str(run), "--checkpoint-every", "10"]
    assert main(command) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    assert main([*command, "--resume", str(run)]) == 0
    assert "is finished" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_a_change_to_the_run_is_refused_naming_every_flag(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*BASE, "--epochs", "1", "--out", str(run), "--checkpoint-every", "10"]) == 0
    capsys.readouterr()
    code = main([*BASE, "--epochs", "1", "--lr", "0.01", "--width", "64", "--resume", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "--lr 0.01 (saved: 0.002)" in err[0] and "--width 64 (saved: 32)" in err[0]
    code = main([*BASE, "--max-steps", "3", "--resume", str(run)])          # a budget may grow, not shrink
    assert code == 2 and "--max-steps 3" in capsys.readouterr().err


def test_paths_are_stored_resolved(tmp_path, monkeypatch):
    from torchsal import make_config

    monkeypatch.chdir(tmp_path)
    cfg = make_config("sal", data_dir="data", out="runs/a").train
    assert cfg.data_dir == str(tmp_path / "data") and cfg.out == str(tmp_path / "runs" / "a")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(tmp_path, sig):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "torchsal", *BASE, "--epochs", "1000", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.csv").exists() and time.time() < deadline:   # training is under way
        time.sleep(0.2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = out.strip().splitlines()
    assert lines[-1].startswith("resume with: torchsal train") and lines[-1].endswith(f"--resume {run}")
    trainer = Trainer.resume(run)                           # loadable, mid-run
    assert 0 < trainer.steps_done < trainer.total_steps
