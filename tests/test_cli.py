"""The command line: a real run writes its metrics; every user mistake is one line, exit 2, no traceback."""

import json
import subprocess
import sys

import numpy as np
import pytest


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "torchsal", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_train_writes_metrics(tmp_path):
    rows = "\n".join(f"{i % 7},{(i * 3) % 5},{'ab'[i % 7 > 3]}" for i in range(120))
    (tmp_path / "d.csv").write_text("f1,f2,label\n" + rows)
    res = run("train", "--rule", "sal", "--dataset", f"csv:{tmp_path / 'd.csv'}", "--epochs", "3", "--areas", "4",
              "--out", str(tmp_path / "out"), "--quiet")
    assert res.returncode == 0, res.stderr
    assert "test accuracy" in res.stdout
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key in ("rule", "dataset", "test_accuracy", "val_accuracy", "history", "train_seconds", "params_total",
                "params_active_per_sample", "area_shares", "environment", "config"):
        assert key in m
    assert 0 <= m["test_accuracy"] <= 1 and len(m["area_shares"]) == 4 and m["config"]["areas"] == 4
    assert m["test_accuracy"] > 0.6                              # label = (f1 > 3): learnable, so above chance


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "nolabel.csv").write_text("only\n1\n2\n3\n")
    (d / "nan.csv").write_text("a,b,label\n1,2,0\nNaN,3,1\n4,5,0\n")
    np.savez(d / "mismatch.npz", x=np.zeros((5, 2)), y=np.zeros(4))
    return d


@pytest.mark.parametrize("args,message", [
    (["--rule", "xyz"], "argument --rule: invalid choice: 'xyz'"),
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--dataset", "csv:{d}/nolabel.csv"], "expected feature columns and a label column"),
    (["--dataset", "csv:{d}/nan.csv"], "missing value ('NaN') in column 'a', line 3"),
    (["--dataset", "npz:{d}/mismatch.npz"], "x has 5 samples but y has 4"),
    (["--dataset", "csv:{d}/absent.csv"], "no such file"),
    (["--areas", "0"], "--areas must be >= 1, got 0"),
    (["--depth", "0"], "--depth must be >= 1, got 0"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--optimizer", "adam", "--momentum", "0.9"], "--momentum applies to --optimizer sgd only"),
    (["--device", "cuda:0"], "CUDA is not available"),
])
def test_user_mistakes_are_one_line(bad_files, tmp_path, args, message):
    if args == ["--device", "cuda:0"]:
        import torch
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    res = run("train", *[a.format(d=bad_files) for a in args], "--out", str(tmp_path / "out"), "--quiet")
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert message in lines[0] and lines[0].startswith("torchsal")
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()                        # nothing half-written


def test_debug_shows_the_traceback():
    res = run("--debug", "train", "--dataset", "nope")
    assert res.returncode != 0 and "Traceback" in res.stderr
