import csv
import json
from types import SimpleNamespace

import pytest

import torchsal.bench as bench
import torchsal.runstore as runstore
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
    lines = (tmp_path / "runs.jsonl").read_text().splitlines()
    assert len(lines) == 8 and not (tmp_path / "runs").exists()          # one line per finished run, no folders
    stored = runstore.loaded(json.loads(lines[0]))
    assert stored["config"]["lr"] == 3e-4 and stored["test_curve"] == [0.5] and "val_curve" not in stored
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
    assert len((runs / "runs.jsonl").read_text().splitlines()) == 12           # a folder holds runs.jsonl
    Bench("paper", ["wine"], ["sal"], [0], tmp_path / "again", runs=runs / "runs.jsonl").run()
    assert len(calls) == 12                                       # --runs may name the file itself


def test_two_benches_appending_to_one_runs_file_find_each_others_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "train", fake_train_any(calls))
    shared = tmp_path / "shared.jsonl"
    first = Bench("paper", ["wine"], ["sal"], [0], tmp_path / "a", runs=shared)
    second = Bench("paper", ["wine"], ["sal", "bp"], [0], tmp_path / "b", runs=shared)
    first.run()
    second.run()                        # started before the first finished: its runs are found in the file anyway
    assert len(calls) == 4 + 4 + 1                                # sal once, bp's grid and the published bp row
    lines = [json.loads(line) for line in shared.read_text().splitlines()]
    assert len(lines) == 9 and len({e["key"] for e in lines}) == 9


def _append_many(path, tag, n):
    for i in range(n):
        runstore.append_line(path, {"key": f"{tag}-{i}", "pad": tag * 20_000})


def test_concurrent_appends_never_interleave(tmp_path):
    import multiprocessing

    path = tmp_path / "runs.jsonl"
    procs = [multiprocessing.get_context("spawn").Process(target=_append_many, args=(path, tag, 100))
             for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    lines = [json.loads(line) for line in path.read_text().splitlines()]      # every line whole
    assert sorted(e["key"] for e in lines) == sorted(f"{t}-{i}" for t in "ab" for i in range(100))


def test_a_torn_last_line_is_ignored_and_the_next_run_stays_whole(tmp_path, monkeypatch, caplog):
    import logging

    calls = []
    monkeypatch.setattr(bench, "train", fake_train(calls))
    Bench("tuned", ["wine"], ["bp"], [0, 1, 2], tmp_path).run()
    path = tmp_path / "runs.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    torn = runstore.loaded(json.loads(lines[-1]))
    path.write_text("".join(lines[:-1]) + lines[-1][:50])           # the last run's line cut by a kill mid-write
    calls.clear()
    Bench("tuned", ["wine"], ["bp"], [0, 1, 2], tmp_path).run()
    assert [c.train.seed for c in calls] == [torn["config"]["seed"]]   # only the torn run is redone
    with caplog.at_level(logging.WARNING, logger="torchsal.runstore"):
        calls.clear()
        records = Bench("tuned", ["wine"], ["bp"], [0, 1, 2], tmp_path).run()
    assert calls == [] and len(records) == 8
    assert "skipped a line that is not a whole run" in caplog.text
    assert path.read_text().splitlines()[-2] == lines[-1][:50]          # the torn line kept apart, on its own line


def _to_old_folders(runs_jsonl, folder):
    """Store the runs of a runs.jsonl as an older torchsal did: one <key>/metrics.json each."""
    for line in runs_jsonl.read_text().splitlines():
        entry = runstore.loaded(json.loads(line))
        history = [{"test_accuracy": t, "val_accuracy": entry["val_accuracy"]} for t in entry["test_curve"]]
        metrics = {k: v for k, v in entry.items() if k not in ("key", "test_curve")}
        (folder / entry["key"]).mkdir(parents=True)
        (folder / entry["key"] / "metrics.json").write_text(json.dumps({**metrics, "history": history}))
    runs_jsonl.unlink()


def test_runs_in_old_metrics_folders_are_still_reused(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "train", fake_train(calls))
    first = Bench("tuned", ["wine"], ["bp"], [0, 1, 2], tmp_path).run()
    _to_old_folders(tmp_path / "runs.jsonl", tmp_path / "runs")
    calls.clear()
    again = Bench("tuned", ["wine"], ["bp"], [0, 1, 2, 3], tmp_path).run()
    assert [c.train.seed for c in calls] == [3]                   # the old folders' runs reused, the new seed trained
    assert [r["test_accuracy"] for r in again[:8]] == [r["test_accuracy"] for r in first]
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 1      # new runs go to the JSONL file only
    shared = tmp_path / "shared"                                  # an old --runs folder of <key>/metrics.json
    Bench("paper", ["wine"], ["sal"], [0], tmp_path / "x", runs=shared).run()
    _to_old_folders(shared / "runs.jsonl", shared)
    calls.clear()
    Bench("paper", ["wine"], ["sal"], [0], tmp_path / "y", runs=shared).run()
    assert calls == []


def test_old_runs_folders_migrate_to_runs_jsonl(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "train", fake_train(calls))
    Bench("tuned", ["wine"], ["bp"], [0, 1, 2], tmp_path).run()
    entries = (tmp_path / "runs.jsonl").read_text().splitlines()
    _to_old_folders(tmp_path / "runs.jsonl", tmp_path / "runs")
    assert runstore.migrate_runs(tmp_path / "runs", tmp_path / "runs.jsonl") == 8
    assert runstore.migrate_runs(tmp_path / "runs", tmp_path / "runs.jsonl") == 0      # nothing twice
    assert sorted(json.loads(e)["key"] for e in entries) == sorted(
        json.loads(e)["key"] for e in (tmp_path / "runs.jsonl").read_text().splitlines())
    import shutil

    shutil.rmtree(tmp_path / "runs")
    calls.clear()
    Bench("tuned", ["wine"], ["bp"], [0, 1, 2], tmp_path).run()
    assert calls == []


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
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["runs"]) == 14 and "test_curve" not in results["runs"][0]      # the curves stay in runs.jsonl
    stored = {json.loads(line)["key"]: json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()}
    assert all(len(stored[r["run"]]["test_curve"]) == 2 for r in results["runs"])
    table = (tmp_path / "results.md").read_text()
    assert "| wine | bp |" in table and "| wine | sal |" in table
    assert (tmp_path / "convergence-tuned.png").read_bytes()[:4] == b"\x89PNG"
    from PIL import Image

    assert Image.open(tmp_path / "convergence-tuned.png").mode == "P"          # stored with a palette (compact)


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
    calls = []
    monkeypatch.setattr(bench, "train", fake_train(calls))
    records = Bench("tuned", ["wine"], ["bp"], [0, 1, 2], tmp_path).run()
    last = next(r for r in records if r["chosen"] and r["seed"] == 2)
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(line for line in path.read_text().splitlines(keepends=True)
                            if json.loads(line)["key"] != last["run"]))
    calls.clear()
    report = Bench("tuned", ["wine"], ["bp"], [0, 1, 2], tmp_path, report_only=True)
    report.run()
    assert calls == []
    assert report.summary()[0]["seeds"] == 2                        # the missing seed is not invented


def test_runs_finished_before_new_settings_existed_are_reused():
    from torchsal.config import field_defaults
    from torchsal.runstore import _same_run

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
    from torchsal.bench import PROTOCOLS, Bench

    assert PROTOCOLS["conv"].default_datasets == ("mnist", "fashion-mnist", "cifar10")
    assert set(PROTOCOLS["conv"].datasets) == {"mnist", "fashion-mnist", "cifar10", "cifar10-vgg8b", "cifar10-vgg4",
                                             "cifar10-vgg6", "cifar10-vgg8", "cifar10-vgg11"}
    with pytest.raises(ConfigError, match="protocol conv has no model for 'wine'; it runs on mnist, fashion-mnist, "
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


def test_every_setting_has_a_stored_base_value():
    """A stored run's settings are its difference from ``STORED_BASE``: a setting missing there would be stored in
    every line, and one removed from it would change what old lines mean. A new setting is appended with the value
    older runs had."""
    settings = set(make_config("sal").to_dict())
    assert settings == set(runstore.STORED_BASE), settings ^ set(runstore.STORED_BASE)
    line = runstore.stored({"key": "k", "config": make_config("sal", areas=4).to_dict()})
    assert "execution" not in line["settings"] and line["settings"]["areas"] == 4
