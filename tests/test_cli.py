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
def bad(tmp_path_factory):
    """One folder per kind of bad input."""
    from test_datasets import image_tree, write_idx_set

    d = tmp_path_factory.mktemp("bad")
    (d / "nolabel.csv").write_text("only\n1\n2\n3\n")
    (d / "nan.csv").write_text("a,b,label\n1,2,0\nNaN,3,1\n4,5,0\n")
    (d / "empty.csv").write_text("a,b,label\n")
    (d / "folder.csv").mkdir()
    np.savez(d / "mismatch.npz", x=np.zeros((5, 2)), y=np.zeros(4))
    np.savez(d / "empty.npz", x=np.zeros((0, 2)), y=np.zeros(0))
    (d / "notnpz.npz").write_bytes(b"garbage")
    for name in ("magic", "trunc", "gz", "labels"):
        write_idx_set(d / name / "mnist", gz=name == "gz")
    images = d / "magic/mnist/train-images-idx3-ubyte"
    images.write_bytes(b"\x01\x02" + images.read_bytes()[2:])
    images = d / "trunc/mnist/train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    images = d / "gz/mnist/train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:100])
    labels = d / "labels/mnist/t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1] + bytes([12]))
    image_tree(d / "size", sizes={("train", "a", 1): (9, 8)})
    image_tree(d / "img")
    (d / "img/cifar10/test/b/0.png").write_bytes(b"not an image")
    (d / "tar").mkdir()
    image_tree(d / "tar" / "cifar10.tar.gz")
    (d / "tar/cifar10.tar.gz").write_bytes((d / "tar/cifar10.tar.gz").read_bytes()[:300])
    (d / "empty-dir").mkdir()
    (d / "unknown.toml").write_text('rule = "sal"\nlearning_rate = 0.1\n')
    (d / "type.yaml").write_text("epochs: ten\n")
    (d / "syntax.toml").write_text("epochs = = 3\n")
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "norun").mkdir()
    return d


MISTAKES = {
    # data
    "unknown dataset": (["--dataset", "nope"], "unknown dataset 'nope'"),
    "csv without label column": (["--dataset", "csv:{d}/nolabel.csv"], "expected feature columns and a label column"),
    "csv with NaN": (["--dataset", "csv:{d}/nan.csv"], "missing value ('NaN') in column 'a', line 3"),
    "empty csv": (["--dataset", "csv:{d}/empty.csv"], "no data rows after the header"),
    "folder as file": (["--dataset", "csv:{d}/folder.csv"], "it is a folder, not a file"),
    "missing file": (["--dataset", "csv:{d}/absent.csv"], "no such file"),
    "npz length mismatch": (["--dataset", "npz:{d}/mismatch.npz"], "x has 5 samples but y has 4"),
    "empty npz": (["--dataset", "npz:{d}/empty.npz"], "x is empty"),
    "corrupt npz": (["--dataset", "npz:{d}/notnpz.npz"], "unreadable"),
    "IDX bad magic": (["--dataset", "mnist", "--data-dir", "{d}/magic"], "not an IDX file (bad magic number)"),
    "IDX truncated": (["--dataset", "mnist", "--data-dir", "{d}/trunc"], "the file is truncated or corrupt"),
    "gzip truncated": (["--dataset", "mnist", "--data-dir", "{d}/gz"], "unreadable or truncated gzip"),
    "labels out of range": (["--dataset", "mnist", "--data-dir", "{d}/labels"], "labels must lie in [0, 10)"),
    "dataset not found": (["--dataset", "mnist", "--data-dir", "{d}/empty-dir"], "dataset 'mnist' not found"),
    "wrong image size": (["--dataset", "cifar10", "--data-dir", "{d}/size"], "is 9x8, the others are 8x8"),
    "corrupt image": (["--dataset", "cifar10", "--data-dir", "{d}/img"], "0.png: not a readable image"),
    "truncated archive": (["--dataset", "cifar10", "--data-dir", "{d}/tar"], "unreadable or truncated archive"),
    # flags out of range
    "areas 0": (["--areas", "0"], "--areas must be >= 1, got 0"),
    "depth 0": (["--depth", "0"], "--depth must be >= 1, got 0"),
    "width 0": (["--width", "0"], "--width must be >= 1, got 0"),
    "epochs 0": (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    "batch 0": (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    "routing dim 0": (["--routing-dim", "0"], "--routing-dim must be >= 1, got 0"),
    "negative lr": (["--lr", "-1"], "--lr must be > 0"),
    "non-numeric lr": (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    "negative momentum": (["--optimizer", "sgd", "--momentum", "-1"], "--momentum must be >= 0"),
    "negative weight decay": (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    "max steps 0": (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
    "threads 0": (["--threads", "0"], "--threads must be >= 1, got 0"),
    "checkpoint every 0": (["--checkpoint-every", "0"], "--checkpoint-every must be >= 1, got 0"),
    "unknown rule": (["--rule", "xyz"], "argument --rule: invalid choice: 'xyz'"),
    "unknown option": (["--learning-rate", "0.1"], "unrecognized arguments: --learning-rate"),
    "huge model": (["--width", "3000000", "--depth", "3"], "reduce --width, --depth or --areas"),
    "no cuda": (["--device", "cuda:0"], "CUDA is not available"),
    # contradictory flags
    "momentum with adam": (["--optimizer", "adam", "--momentum", "0.9"], "--momentum applies to --optimizer sgd"),
    # flags the chosen rule or model would ignore
    "signal with bp": (["--rule", "bp", "--signal", "local"], "--signal (--rule bp has no choice of signal"),
    "readout with fa": (["--rule", "fa", "--readout", "single"], "--readout (the local readouts exist only"),
    "feedback with bp": (["--rule", "bp", "--feedback", "per-area"],
                         "--feedback (--rule bp has no choice of feedback; dfa/sal have)"),
    "router with one area": (["--areas", "1", "--router", "frozen"], "--router (a model with --areas 1 has no"),
    "residual at depth 1": (["--depth", "1", "--block", "residual"], "--block (--block residual applies"),
    "two at once": (["--rule", "dfa", "--signal", "local", "--readout", "single"],
                    "these flags do not apply here: --signal"),
    "resume without checkpoint": (["--resume", "{d}/norun"], "no checkpoint.pt there"),
    # config files
    "config unknown key": (["--config", "{d}/unknown.toml"], "unknown key 'learning_rate'"),
    "config wrong type": (["--config", "{d}/type.yaml"], "setting 'epochs' must be an integer, got 'ten'"),
    "config bad syntax": (["--config", "{d}/syntax.toml"], "not valid TOML"),
    "config not a mapping": (["--config", "{d}/list.yaml"], "expected a mapping of settings"),
    "config missing": (["--config", "{d}/absent.toml"], "no such file"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_bad_input_is_one_clear_line(bad, tmp_path, capsys, case):
    """Each kind of bad input: exit status 2, one line naming the problem, no traceback, no outputs left."""
    from torchsal.cli import main

    args, message = MISTAKES[case]
    if case == "no cuda":
        import torch
        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    out = tmp_path / "out"
    try:
        code = main(["train", *[a.format(d=bad) for a in args], "--out", str(out), "--quiet", "--epochs", "1"]
                    if "--epochs" not in args and "--resume" not in args else
                    ["train", *[a.format(d=bad) for a in args], "--quiet"])
    except SystemExit as exc:                     # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert message in err[0] and err[0].startswith("torchsal")
    assert not out.exists()                                       # nothing half-written


def test_checkpoints_need_an_output_folder(capsys):
    from torchsal.cli import main

    assert main(["train", "--checkpoint-every", "5", "--quiet"]) == 2
    assert "--checkpoint-every needs --out DIR" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--rule", "xyz"], "argument --rule: invalid choice: 'xyz'"),
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
])
def test_user_mistakes_are_one_line_in_a_real_process(args, message):
    res = run("train", *args)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and message in res.stderr


def test_debug_shows_the_traceback():
    res = run("--debug", "train", "--dataset", "nope")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_without_a_terminal_progress_is_one_line_per_epoch():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "torchsal", "train", "--epochs", "3", "--width", "16"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if "epoch" in line]
    assert res.stderr.startswith("INFO: areas auto: 8 areas for 1293 training samples")
    assert [line.split(", step")[0] for line in lines] == [f"INFO: sal digits epoch {e}/3" for e in (1, 2, 3)]
    assert "\r" not in res.stderr and "val accuracy" in lines[-1]


def test_help_shows_every_default(capsys):
    from torchsal.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for piece in ("--lr LR learning rate (default: 0.003)", "--width WIDTH units per hidden "
                  "layer (mlp) (default: 256)", "(default: plain; residual from 8 hidden layers)", "--epochs EPOCHS "
                  "(default: bp/sal: 60; fa/dfa: 30)", "(default: bp/fa/dfa: False; sal: True)",
                  "(default: bp/fa/dfa: 1; sal: auto; sal on conv nets: 4)"):
        assert piece in text, piece


def test_old_spellings_still_work_with_a_warning(tmp_path, caplog):
    """"shared" named three things; the readout and feedback values are renamed, the old ones kept for a release."""
    import logging

    from torchsal.cli import main

    with caplog.at_level(logging.WARNING):
        assert main(["train", "--readout", "shared", "--feedback", "shared", "--max-steps", "2", "--quiet",
                     "--out", str(tmp_path)]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["readout"], config["feedback"]) == ("single", "per-layer")
    assert "readout 'shared' is deprecated, say 'single'" in caplog.text
    assert "feedback 'shared' is deprecated, say 'per-layer'" in caplog.text


def test_route_from_is_the_new_spelling_of_routing(tmp_path, caplog):
    import logging

    from torchsal.cli import main

    with caplog.at_level(logging.WARNING):
        assert main(["train", "--routing", "layer", "--max-steps", "2", "--quiet", "--out", str(tmp_path / "a")]) == 0
    assert "--routing is deprecated, say --route-from" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):      # the --flag=value form warns too
        assert main(["train", "--routing=layer", "--max-steps", "2", "--quiet", "--out", str(tmp_path / "c")]) == 0
    assert "--routing is deprecated, say --route-from" in caplog.text
    assert main(["train", "--route-from", "layer", "--max-steps", "2", "--quiet", "--out", str(tmp_path / "b")]) == 0
    for run in ("a", "b"):
        assert json.loads((tmp_path / run / "config.json").read_text())["routing"] == "layer"
