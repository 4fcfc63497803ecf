"""torchsal eval, report and info on a real (small) run."""

import json

import pytest

from torchsal.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    assert main(["train", "--rule", "bp", "--epochs", "3", "--quiet", "--out", str(d)]) == 0
    return d


def test_eval_reproduces_the_final_test_accuracy(run_dir, capsys, tmp_path):
    """The saved model carries its input scaling: evaluating it again gives the run's own test accuracy."""
    capsys.readouterr()
    assert main(["eval", "--model", str(run_dir), "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["accuracy"] == json.loads((run_dir / "metrics.json").read_text())["test_accuracy"]
    assert "accuracy" in capsys.readouterr().out


def test_eval_rejects_a_mismatched_dataset(run_dir, capsys):
    assert main(["eval", "--model", str(run_dir), "--dataset", "wine"]) == 2
    assert "dataset 'wine' has 13 features; the model was trained on 64" in capsys.readouterr().err


def test_eval_without_a_model_is_one_line(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_report_renders_a_table_and_a_plot(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "| epoch | step | train_loss |" in out and out.count("\n| 3 |") == 1
    assert (run_dir / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_report_of_an_unfinished_run_reads_the_csv(run_dir, tmp_path, capsys):
    (tmp_path / "metrics.csv").write_text((run_dir / "metrics.csv").read_text())
    assert main(["report", str(tmp_path)]) == 0
    assert "unfinished run" in capsys.readouterr().out


def test_info_lists_versions_and_datasets(tmp_path, capsys):
    assert main(["info", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "torch " in out and "digits" in out and "built in" in out and "mnist          not found" in out
