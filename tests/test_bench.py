import csv
import json
from types import SimpleNamespace

import pytest

import torchsal.bench as bench
from torchsal.bench import Bench, matched_width
from torchsal.config import make_config
from torchsal.data import load_dataset
from torchsal.errors import ConfigError
from torchsal.models import build_model


def fake_train(calls):
    """Validation prefers lr 3e-4, test prefers lr 3e-3: selection must follow validation."""
    def train(config, splits=None, progress=False):
        calls.append(config)
        lr = config.train.lr
        val = {3e-4: 0.9, 1e-3: 0.8, 3e-3: 0.7}.get(lr, 0.6)
        test = {3e-4: 0.5, 1e-3: 0.6, 3e-3: 0.99}.get(lr, 0.4) + config.train.seed / 100
        history = [{"test_accuracy": test, "val_accuracy": val}]
        return SimpleNamespace(metrics={"test_accuracy": test, "val_accuracy": val, "epochs": 1, "train_seconds": 0.1,
                                        "params_total": 1, "params_active_per_sample": 1, "history": history,
                                        "config": config.to_dict()})
    return train


def test_selection_uses_validation_only_and_resumes(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "train", fake_train(calls))
    records = Bench("tuned", ["wine"], ["bp"], [0, 1, 2], tmp_path).run()
    assert len(calls) == 6 + 2                                  # six trials on seed 0, the chosen one on 1 and 2
    chosen = [r for r in records if r["chosen"]]
    assert {r["seed"] for r in chosen} == {0, 1, 2}
    assert all(r["trial"]["lr"] == 3e-4 for r in chosen)          # best validation, not best test
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert summary[0]["test_mean"] == pytest.approx(51.0)         # mean of 0.50, 0.51, 0.52
    calls.clear()
    Bench("tuned", ["wine"], ["bp"], [0, 1, 2], tmp_path, threads=2, compile_=True).run()
    assert calls == []          # every finished run is reloaded, none redone (threads, --compile: not settings)
    Bench("tuned", ["wine"], ["bp"], [0, 1, 2, 3], tmp_path, compile_=True).run()
    assert [(c.train.seed, c.train.compile) for c in calls] == [(3, True)]     # a new run takes --compile


def test_identical_presets_share_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "train", fake_train_any(calls))
    Bench("paper", ["wine"], ["sal", "sal-local"], [0], tmp_path).run()
    assert len(calls) == 4                                        # sal's default signal is local: one grid, not two


def test_benches_share_a_runs_folder_and_grayscale_is_part_of_a_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "train", fake_train_any(calls))
    runs = tmp_path / "runs"
    Bench("paper", ["wine"], ["sal"], [0], tmp_path / "main", runs=runs).run()
    assert len(calls) == 4 and not (tmp_path / "main" / "runs").exists()
    Bench("paper", ["wine"], ["sal-k1", "sal"], [0], tmp_path / "ablations", runs=runs).run()
    assert len(calls) == 4 + 4                                    # only sal-k1 trains; sal's runs are reused
    Bench("paper", ["wine"], ["sal"], [0], tmp_path / "colour", runs=runs, grayscale=False).run()
    assert len(calls) == 4 + 4 + 4                                # another colour setting is another run
    assert all(c.train.grayscale is False for c in calls[-4:])


def test_markdown_marks_differences_to_sal_beyond_the_seed_spread():
    def row(preset, mean, std, seeds=3):
        return {"dataset": "wine", "preset": preset, "test_mean": mean, "test_std": std, "seeds": seeds,
                "val_mean": mean, "epochs": 1, "seconds_mean": 1.0, "chosen": {}, "params_total": 1,
                "params_active_per_sample": 1}
    table = bench.markdown([row("sal", 90.0, 0.5), row("bp", 92.0, 1.0), row("dfa", 89.0, 0.6),
                            row("fa", 80.0, 0.0, seeds=1)], "tuned")
    assert "| wine | +2.00* | -1.00 | -10.00 |" in table     # 2 > 0.5 + 1.0; 1 < 0.5 + 0.6; one seed: no spread


def test_real_bench_writes_tables_and_plots(tmp_path):
    Bench("tuned", ["wine"], ["bp", "sal"], [0, 1], tmp_path, epochs=2).run()
    for name in ("results.json", "results.csv", "results.md", "convergence-tuned.png"):
        assert (tmp_path / name).stat().st_size > 0
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == 2 * (6 + 1) and {r["preset"] for r in rows} == {"bp", "sal"}
    table = (tmp_path / "results.md").read_text()
    assert "| wine | bp |" in table and "| wine | sal |" in table
    assert (tmp_path / "convergence-tuned.png").read_bytes()[:4] == b"\x89PNG"


def test_paper_recipe_adds_the_published_bp_row(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "train", fake_train_any(calls))
    Bench("paper", ["digits"], ["bp"], [0], tmp_path).run()
    published = [c for c in calls if c.train.lr == 1e-4]
    assert len(published) == 1 and published[0].train.optimizer == "sgd" and published[0].train.batch_size == 16
    assert "38.53" in (tmp_path / "results.md").read_text()          # the paper's BP column for digits


def fake_train_any(calls):
    def train(config, splits=None, progress=False):
        calls.append(config)
        return SimpleNamespace(metrics={"test_accuracy": 0.5, "val_accuracy": config.train.lr, "epochs": 1,
                                        "train_seconds": 0.1, "params_total": 1, "params_active_per_sample": 1,
                                        "history": [{"test_accuracy": 0.5}], "config": config.to_dict()})
    return train


@pytest.mark.parametrize("depth", [1, 2])
def test_bp_wide_matches_sal_parameter_count(depth):
    width = matched_width(64, 10, {"depth": depth, "width": 256})
    sal = build_model(64, 10, make_config("sal", depth=depth, areas=16).model).parameter_counts()["params_total"]
    dense = build_model(64, 10, make_config("bp", depth=depth, width=width).model).parameter_counts()["params_total"]
    assert abs(dense - sal) / sal < 0.01


def test_unknown_preset_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'sgd'"):
        Bench("tuned", ["wine"], ["sgd"], [0], tmp_path)


def test_report_only_trains_nothing_and_reports_what_is_finished(tmp_path, monkeypatch):
    import shutil

    calls = []
    monkeypatch.setattr(bench, "train", fake_train(calls))
    records = Bench("tuned", ["wine"], ["bp"], [0, 1, 2], tmp_path).run()
    last = next(r for r in records if r["chosen"] and r["seed"] == 2)
    shutil.rmtree(tmp_path / "runs" / last["run"])
    calls.clear()
    report = Bench("tuned", ["wine"], ["bp"], [0, 1, 2], tmp_path, report_only=True)
    report.run()
    assert calls == []
    assert report.summary()[0]["seeds"] == 2                        # the missing seed is not invented


def test_runs_finished_before_new_settings_existed_are_reused():
    from torchsal.bench import _same_run
    from torchsal.config import field_defaults

    wanted = make_config("sal", dataset="wine").to_dict()
    older = {k: v for k, v in wanted.items() if k not in ("memory", "diagnostics")}   # an older torchsal's config
    defaults = field_defaults()
    assert _same_run(older, wanted, defaults)
    assert not _same_run(older, {**wanted, "memory": "lean"}, defaults)       # a new setting off its default
    assert not _same_run({**older, "lr": 0.5}, wanted, defaults)              # a setting that differs
    assert _same_run({**wanted, "data_dir": "/elsewhere"}, wanted, defaults)   # where data lives is not identity


def test_every_dataset_is_checked_before_anything_trains(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "train", fake_train(calls))
    b = Bench("tuned", ["digits", "mnist", "csv:/no/such.csv"], ["sal"], [0], tmp_path / "out",
              data_dir=str(tmp_path))
    with pytest.raises(bench.DataError, match="2 of 3 datasets not found, nothing was trained") as err:
        b.run()
    assert "mnist" in str(err.value) and "/no/such.csv" in str(err.value)
    assert calls == []


def test_a_fixed_row_the_user_did_not_ask_for_is_announced(tmp_path, monkeypatch, caplog):
    import logging

    monkeypatch.setattr(bench, "train", fake_train([]))
    with caplog.at_level(logging.INFO, logger="torchsal.bench"):
        Bench("paper", ["digits"], ["bp"], [0], tmp_path / "out").run()
    assert "besides the presets asked for, bp-published also runs with bp" in caplog.text


def test_the_conv_recipe_runs_only_on_its_image_datasets(tmp_path):
    from torchsal.bench import RECIPES, Bench

    assert RECIPES["conv"].default_datasets == ("mnist", "fashion-mnist", "cifar10")
    assert set(RECIPES["conv"].datasets) == {"mnist", "fashion-mnist", "cifar10", "cifar10-vgg8b", "cifar10-vgg4",
                                             "cifar10-vgg6", "cifar10-vgg8", "cifar10-vgg11"}
    with pytest.raises(ConfigError, match="recipe conv has no model for 'wine'; it runs on mnist, fashion-mnist, "
                                          "cifar10, cifar10-vgg8b"):
        Bench("conv", ["mnist", "wine"], ["bp"], [0], tmp_path)


def test_a_conv_cell_trains_its_own_model_on_its_dataset_with_its_own_grid_and_presets(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "train", fake_train_any(calls))
    wine = load_dataset("wine")                            # (stands in for cifar10: only the cells' plans matter)
    monkeypatch.setattr(bench, "load_dataset", lambda name, *args: wine)
    monkeypatch.setattr(bench, "locate_dataset", lambda name, data_dir: name)
    records = Bench("conv", ["cifar10-vgg8b", "cifar10-vgg4"], ["bp", "dfa", "sal"], [0, 1, 2], tmp_path).run()
    vgg8b = [c for c in calls if c.model.model == "vgg8b"]
    assert {c.train.dataset for c in calls} == {"cifar10"} and {c.model.width_mult for c in calls} == {0.25}
    assert {c.rule.rule for c in calls} == {"bp", "sal"}                     # dfa is not one of the cells' presets
    assert len(vgg8b) == 2 * (2 + 2)                       # two learning rates on seed 0, the chosen on seeds 1, 2
    assert sorted({c.model.depth for c in calls if c.model.model == "vgg"}) == [4]
    assert {r["dataset"] for r in records} == {"cifar10-vgg8b", "cifar10-vgg4"}     # table rows by cell
