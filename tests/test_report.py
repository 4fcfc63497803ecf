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


def _csv_of_digits(path, keep_classes):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rows = [i for i in range(len(y)) if y[i] in keep_classes]
    header = ",".join(f"p{j}" for j in range(64)) + ",label\n"
    path.write_text(header + "".join(",".join(str(int(v)) for v in x[i]) + f",{y[i]}\n" for i in rows))
    return len(rows)


def test_eval_split_all_scores_every_row_of_a_new_file_with_some_classes(run_dir, capsys, tmp_path):
    """A new CSV holding only classes 3 and 7 of the model's ten: every row is scored against the model's own
    class indices."""
    n = _csv_of_digits(tmp_path / "new.csv", {3, 7})
    capsys.readouterr()
    assert main(["eval", "--model", str(run_dir), "--dataset", f"csv:{tmp_path / 'new.csv'}", "--split", "all",
                 "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["samples"] == n and result["classes_present"] == 2
    assert result["accuracy"] > 0.8                       # a trained digits model recognises 3s and 7s
    assert "2 of the model's 10 classes" in capsys.readouterr().out


def test_eval_names_a_class_the_model_does_not_know(run_dir, capsys, tmp_path):
    header = ",".join(f"p{j}" for j in range(64)) + ",label\n"
    (tmp_path / "odd.csv").write_text(header + "".join(",".join(["0"] * 64) + ",cat\n" for _ in range(5)))
    assert main(["eval", "--model", str(run_dir), "--dataset", f"csv:{tmp_path / 'odd.csv'}", "--split", "all"]) == 2
    assert "classes the model was not trained on: cat" in capsys.readouterr().err


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


def test_info_says_whether_compile_finds_a_compiler(tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: "/opt/bin/clang++" if name == "clang++" else None)
    assert main(["info", "--data-dir", str(tmp_path)]) == 0
    assert "--compile: C++ compiler /opt/bin/clang++" in capsys.readouterr().out
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["info", "--data-dir", str(tmp_path)]) == 0
    assert "--compile: no C++ compiler found" in capsys.readouterr().out
