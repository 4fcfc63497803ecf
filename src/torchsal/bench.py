"""The benchmark suite: every (dataset, preset) cell of a recipe, tuned on validation, over several seeds.

    torchsal bench --datasets digits,mnist --presets bp,sal --seeds 0,1,2 --protocol paper --out DIR

Protocol, identical for every preset: each trial of the recipe's grid runs on the first seed; the trial with the
best final validation accuracy (ties: the earlier trial) is chosen and run on the remaining seeds. Test accuracy
never takes part in a choice.

Each finished run is one line of ``DIR/runs.jsonl`` (``--runs`` names another file, or a folder holding
``runs.jsonl``, that several benches share; ``torchsal.runstore`` says what a line holds and how it is written), so
an interrupted bench resumes where it stopped and never redoes a finished run. Runs stored the old way, one
``runs/<key>/metrics.json`` per run beside the JSONL file (or in the ``--runs`` folder), are still read.

Outputs in DIR: ``results.md`` (the tables), ``results.json`` (the summary and one record per run, without the
curves), ``results.csv`` (the records) and ``convergence-<recipe>.png`` (the curves of the chosen runs).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from torchsal.config import (
    RECIPES,
    ConfigError,
    RunConfig,
    make_config,
    resolve_areas,
)
from torchsal.data import load_dataset, locate_dataset, make_splits
from torchsal.errors import DataError
from torchsal.models import count_parameters
from torchsal.runstore import RunStore, run_entry, run_key, runs_file
from torchsal.storage import write_bytes_atomic
from torchsal.train import train

log = logging.getLogger(__name__)

# CPU-hours the whole suite took on the 2-core development box (sum of the stored runs' training seconds, ten
# datasets, the main presets, 3 seeds, lr selection included; docs/results.md "Cost"): printed before a bench of all.
SUITE_CPU_HOURS = {"tuned": 14.5, "paper": 16.5}
TEN_DATASETS = ("mnist", "fashion-mnist", "cifar10", "mnist1d", "digits", "wine", "breast-cancer", "letter",
                "satellite", "dna")

# Presets: a rule on a model. The capacity controls train the dense BP network on SAL's routed model (bp-areas) or
# with as many parameters as that model (bp-wide, width matched per dataset).
PRESETS: dict[str, dict[str, Any]] = {
    "bp": {"rule": "bp"},
    "fa": {"rule": "fa"},
    "dfa": {"rule": "dfa"},
    "sal": {"rule": "sal"},
    "sal-direct": {"rule": "sal", "signal": "direct"},
    "sal-local": {"rule": "sal", "signal": "local"},
    "bp-areas": {"rule": "bp", "areas": 16, "shared": True},
    "bp-wide": {"rule": "bp", "width": "matched"},
    # Ablations of SAL's components (docs/science.md): each changes one thing of the default SAL.
    "sal-both": {"rule": "sal", "signal": "both"},
    "sal-k1": {"rule": "sal", "areas": 1, "shared": False},
    "sal-k16": {"rule": "sal", "areas": 16, "shared": True},
    "sal-no-shared": {"rule": "sal", "shared": False},
    "sal-frozen-router": {"rule": "sal", "router": "frozen"},
    "sal-random-router": {"rule": "sal", "router": "random"},
    "sal-layer-routing": {"rule": "sal", "routing": "layer"},
    "sal-per-area-feedback": {"rule": "sal", "feedback": "per-area"},
    # SAL's local objectives and areas on conv nets (docs/conv.md), each changing one thing of the conv default
    "sal-readout": {"rule": "sal", "objective": "readout"},
    "sal-pred": {"rule": "sal", "objective": "pred"},
    "sal-sim": {"rule": "sal", "objective": "sim"},
    "sal-bpf": {"rule": "sal", "head_feedback": "fixed"},
    "sal-pred-bpf": {"rule": "sal", "objective": "pred", "head_feedback": "fixed"},
    "sal-deep-head": {"rule": "sal", "head_layers": 1},
    "sal-conv-areas": {"rule": "sal", "conv_areas": True},
}
ABLATIONS = ("sal", "sal-k1", "sal-no-shared", "sal-frozen-router", "sal-random-router", "sal-layer-routing",
             "sal-per-area-feedback", "sal-direct", "sal-local", "sal-both", "sal-readout", "sal-pred", "sal-sim",
             "sal-bpf", "sal-pred-bpf", "sal-deep-head", "sal-conv-areas", "sal-k16")
# What a bench runs unless told: the rules, the capacity controls and SAL's two single signals.
MAIN_PRESETS = tuple(p for p in PRESETS if p not in ABLATIONS or p in ("sal", "sal-direct", "sal-local"))

# Published numbers (test accuracy %) from ../shared/paper/REFERENCE-NUMBERS.md: BP (paper recipe) and SAL-16.
PAPER_NUMBERS: dict[str, tuple[float, float]] = {
    "mnist": (90.64, 94.71), "cifar10": (30.81, 36.60), "digits": (38.53, 71.63), "semeion": (35.16, 72.03)}


@dataclass(frozen=True)
class Protocol:
    """How the bench runs a family of cells: shared settings, the grid each preset searches, the budget."""

    name: str
    base: dict[str, Any]                                    # settings shared by every preset
    trials: Callable[[str], list[dict[str, Any]]]           # the grid searched for a preset
    epochs: Callable[[int], int]                            # epoch budget from the training-set size
    fixed: dict[str, dict[str, Any]]                        # extra rows run exactly as given (no search)
    # Settings per dataset (the model a dataset is run with, its budget); when given, the datasets it may run on.
    # A cell may also name its real "dataset" (cells "cifar10-vgg8b", "cifar10-vgg4" train other models on
    # cifar10), its own "trials" (the grid, in place of the recipe's) and the "presets" it runs.
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    presets: tuple[str, ...] = MAIN_PRESETS                 # the presets run by default
    default_datasets: tuple[str, ...] = ()                  # the cells run without --datasets (empty: all)


# Published numbers shown beside a recipe's table: the paper's MLP (BP, SAL-16), or BioTorch's conv nets (test
# accuracy = 100 - published error, Benchmarks.md; LeNet with SGD, the small CIFAR-10 CNN with Adam, as our recipe).
BIOTORCH_NUMBERS: dict[str, tuple[float, float, float]] = {
    "mnist": (99.09, 98.30, 98.39), "fashion-mnist": (90.80, 86.94, 87.19), "cifar10": (84.08, 59.33, 62.41)}
REFERENCES: dict[str, tuple[tuple[str, ...], dict[str, tuple[float, ...]]]] = {
    "paper": (("BP (paper)", "SAL-16 (paper)"), PAPER_NUMBERS),
    "conv": (("BP (BioTorch)", "FA (BioTorch)", "DFA (BioTorch)"), BIOTORCH_NUMBERS)}


def _paper_trials(preset: str) -> list[dict[str, Any]]:
    return [{"lr": lr} for lr in (1e-3, 3e-3, 1e-2, 3e-2)]


def _tuned_trials(preset: str) -> list[dict[str, Any]]:
    """Six trials for every preset: three learning rates times one second knob. For SAL presets that leave the
    signal free, that knob is the signal (SAL's extra knob counted inside the same budget); for the others
    AdamW's weight decay."""
    settings = PRESETS.get(preset, {})
    free_signal = settings.get("rule") == "sal" and "signal" not in settings
    second = ([{"signal": "local"}, {"signal": "both"}] if free_signal
              else [{"weight_decay": 0.0}, {"weight_decay": 1e-4}])
    return [{"lr": lr, **knob} for lr in (3e-4, 1e-3, 3e-3) for knob in second]


def _tuned_epochs(n_train: int) -> int:
    return 40 if n_train <= 10_000 else 20 if n_train <= 30_000 else 10


def _conv_trials(preset: str) -> list[dict[str, Any]]:
    return [{"lr": lr} for lr in (3e-4, 1e-3, 3e-3)]


# LeNet's grid reaches one step further: on it bp and sal (both sets) chose the three-step grid's edge, 3e-3.
_LENET = {"model": "lenet", "epochs": 8, "trials": [{"lr": lr} for lr in (3e-4, 1e-3, 3e-3, 1e-2)]}

# VGGs on CIFAR-10 at a quarter of their width (a VGG8b step there costs about 8 small-CNN steps): VGG8b for bp, sal
# and sal's bpf variant, two learning rates; the depth family of 4 to 11 conv layers for bp and sal, one learning
# rate (give --seeds 0: one seed per depth).
_VGG = {"dataset": "cifar10", "augment": "crop-flip", "width_mult": 0.25, "epochs": 10}
VGG_CELLS: dict[str, dict[str, Any]] = {
    "cifar10-vgg8b": {**_VGG, "model": "vgg8b", "presets": ("bp", "sal", "sal-bpf"),
                      "trials": [{"lr": 1e-3}, {"lr": 3e-3}]},
    **{f"cifar10-vgg{n}": {**_VGG, "model": "vgg", "depth": n, "presets": ("bp", "sal"), "trials": [{"lr": 1e-3}]}
       for n in (4, 6, 8, 11)}}

PROTOCOLS: dict[str, Protocol] = {
    # The paper's model and budget; only the learning rate is searched (SAL's is not published).
    "paper": Protocol("paper", {**{k: v for k, v in RECIPES["paper"].items() if k not in ("lr", "epochs")},
                                "grayscale": True},
                      _paper_trials, lambda n: RECIPES["paper"]["epochs"],
                      {"bp-published": {"rule": "bp", "lr": RECIPES["paper"]["lr"]}}),
    # One model for every preset, a tuning budget of six trials each.
    "tuned": Protocol("tuned", {"depth": 1, "width": 256, "optimizer": "adamw", "batch_size": 64,
                                "schedule": "cosine", "grayscale": False},
                      _tuned_trials, _tuned_epochs, {}),
    # Conv nets as BioTorch benchmarks them (docs/conv.md): LeNet on MNIST and Fashion-MNIST, the small CNN on
    # RGB CIFAR-10 with crop-and-flip augmentation; Adam with a cosine schedule, three learning rates per preset.
    # Budgets are a fraction of BioTorch's (250 epochs on CIFAR-10), so the whole table fits about 8 CPU-hours on
    # 2 cores.
    "conv": Protocol("conv", {"optimizer": "adam", "batch_size": 128, "schedule": "cosine", "grayscale": False},
                     _conv_trials, lambda n: 10, {},  # (epochs per dataset below)
                     datasets={"mnist": _LENET, "fashion-mnist": _LENET,
                               "cifar10": {"model": "cnn", "augment": "crop-flip", "epochs": 20},
                               **VGG_CELLS},
                     presets=("bp", "fa", "dfa", "sal", "sal-k1", "sal-k16", "sal-bpf", "sal-pred", "sal-sim",
                              "sal-readout", "sal-conv-areas"),
                     default_datasets=("mnist", "fashion-mnist", "cifar10")),
}


def preset_config(preset: str, **settings: Any) -> RunConfig:
    """The run configuration of a named preset, with ``settings`` on top (the studies in benchmarks/ use it)."""
    merged = {**PRESETS[preset], **settings}
    return _with_paper_areas(make_config(merged.pop("rule"), **merged))


def _with_paper_areas(config: RunConfig) -> RunConfig:
    """The benchmark keeps the paper's 16 areas on every dataset where a preset leaves the number to the default
    (``auto`` would pick fewer on the small sets), so its runs and tables stay comparable with the paper's."""
    return resolve_areas(config, 10**9)


def matched_width(in_features: int, num_classes: int, settings: dict[str, Any]) -> int:
    """Dense width whose total parameters equal those of SAL's routed model with the same settings."""
    sal = _with_paper_areas(make_config("sal", **{k: v for k, v in settings.items() if k != "rule"}))
    target = count_parameters(in_features, num_classes, sal.model)
    depth = sal.model.depth
    # total(w) = (d+1)w + (depth-1)(w^2+w) + (w+1)C ; solve for the dense width w (quadratic when depth > 1)
    a, b, c = depth - 1, in_features + 1 + (depth - 1) + num_classes, num_classes - target
    return round(-c / b) if a == 0 else round((-b + (b * b - 4 * a * c) ** 0.5) / (2 * a))


class Bench:
    """Runs (or reloads) every cell of one recipe and writes the tables and plots."""

    def __init__(self, protocol: str, datasets: list[str], presets: list[str], seeds: list[int], out: Path,
                 data_dir: str | None = None, threads: int | None = None, compile_: bool = False,
                 epochs: int | None = None, report_only: bool = False, grayscale: bool | None = None,
                 runs: Path | None = None) -> None:
        if protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {protocol!r}; choose one of: {', '.join(PROTOCOLS)}")
        unknown = [p for p in presets if p not in PRESETS]
        if unknown:
            raise ConfigError(f"unknown preset {unknown[0]!r}; choose from: {', '.join(PRESETS)}")
        if not seeds:
            raise ConfigError("--seeds needs at least one seed")
        foreign = [d for d in datasets if PROTOCOLS[protocol].datasets and d not in PROTOCOLS[protocol].datasets]
        if foreign:
            raise ConfigError(f"protocol {protocol} has no model for {foreign[0]!r}; it runs on "
                              f"{', '.join(PROTOCOLS[protocol].datasets)}")
        self.protocol, self.datasets, self.presets, self.seeds = PROTOCOLS[protocol], datasets, presets, seeds
        self.out, self.data_dir, self.threads, self.compile, self.epochs = out, data_dir, threads, compile_, epochs
        self.report_only = report_only          # tables from the finished runs only; train nothing
        self.base = {**self.protocol.base, **({} if grayscale is None else {"grayscale": grayscale})}
        # finished runs, one JSON line each; several benches may share the file. Runs stored the old way are read
        # from runs/ beside it and from a --runs folder.
        self.runs = runs_file(runs or out)
        self.store = RunStore(self.runs, [self.runs.parent / "runs", *([runs] if runs and runs.suffix != ".jsonl"
                                                                        else [])])
        self.records: list[dict[str, Any]] = []

    def check_datasets(self) -> None:
        """Every requested dataset must be found before anything trains: one error naming all that are missing."""
        missing = []
        for name in self.datasets:
            kind, _, path = name.partition(":")
            try:
                if path and kind in ("csv", "npz"):
                    if not Path(path).expanduser().is_file():
                        raise DataError(f"{name}: no such file")
                else:
                    real = self.protocol.datasets.get(name, {}).get("dataset", name)
                    for part in (path.split(",") if kind == "union" else [real]):
                        locate_dataset(part, self.data_dir)
            except DataError as exc:
                missing.append(str(exc).split(";")[0])
        if missing:
            raise DataError(f"bench: {len(missing)} of {len(self.datasets)} datasets not found, nothing was "
                            f"trained: {' | '.join(missing)}. Give --data-dir, or leave them out of --datasets")

    def _presets(self, cell: str) -> list[str]:
        own = self.protocol.datasets.get(cell, {}).get("presets")
        return [p for p in self.presets if own is None or p in own]

    def _trials(self, cell: str, preset: str) -> list[dict[str, Any]]:
        return self.protocol.datasets.get(cell, {}).get("trials") or self.protocol.trials(preset)

    def run(self) -> list[dict[str, Any]]:
        self.check_datasets()
        rows = list(self.protocol.fixed) if "bp" in self.presets else []
        if rows and not self.report_only:
            log.info("bench %s: besides the presets asked for, %s also runs with bp (%s); it is a fixed row of "
                     "the recipe", self.protocol.name, ", ".join(rows), "the published setup, no search")
        total = sum(len(self._trials(d, p)) + len(self.seeds) - 1 for d in self.datasets for p in self._presets(d)) \
            + len(self.datasets) * len(rows) * len(self.seeds)
        self.bar = tqdm(total=total, desc=f"bench {self.protocol.name}", unit="run")
        for dataset in self.datasets:
            own = {k: v for k, v in self.protocol.datasets.get(dataset, {}).items() if k not in ("trials", "presets")}
            real = own.pop("dataset", dataset)
            data = load_dataset(real, self.data_dir, self.base.get("grayscale", False))
            self.splits = {seed: make_splits(data, seed) for seed in self.seeds}
            n_train = len(self.splits[self.seeds[0]].y_train)
            epochs = self.epochs or own.pop("epochs", None) or self.protocol.epochs(n_train)
            base = {**self.base, **own, "dataset": real, "data_dir": self.data_dir, "threads": self.threads,
                    "compile": self.compile, "epochs": epochs}
            for preset in self._presets(dataset):
                self._cell(dataset, preset, base, self._trials(dataset, preset))
            for name in rows:
                self._cell(dataset, name, {**base, **self.protocol.fixed[name]}, [{}], preset_settings={})
        self.bar.close()
        self.write()
        return self.records

    def _cell(self, dataset: str, preset: str, base: dict[str, Any], trials: list[dict[str, Any]],
              preset_settings: dict[str, Any] | None = None) -> None:
        settings = {**base, **(PRESETS[preset] if preset_settings is None else preset_settings)}
        if settings.get("width") == "matched":
            s = self.splits[self.seeds[0]]
            settings["width"] = matched_width(s.in_features, s.num_classes, {**base, **trials[0]})
        first, *rest = self.seeds
        tried = [self._run(dataset, preset, {**settings, **t, "seed": first}, trial=t) for t in trials]
        if any(r is None for r in tried):          # --report-only and the selection is not complete yet
            return
        best = max(range(len(tried)), key=lambda i: (tried[i]["val_accuracy"], -i))
        tried[best]["chosen"] = True
        for seed in rest:
            self._run(dataset, preset, {**settings, **trials[best], "seed": seed}, trial=trials[best], chosen=True)

    def _run(self, dataset: str, preset: str, settings: dict[str, Any], trial: dict[str, Any],
             chosen: bool = False) -> dict[str, Any] | None:
        config = _with_paper_areas(make_config(settings["rule"], **{k: v for k, v in settings.items() if k != "rule"}))
        entry = self.store.find(config)
        if entry is None and self.report_only:
            self.bar.update()
            return None
        if entry is None:
            metrics = train(config, splits=self.splits[settings["seed"]], progress=False).metrics
            entry = run_entry(run_key(config), metrics)
            self.store.add(entry)
        self.bar.update()
        record = {"recipe": self.protocol.name, "dataset": dataset, "preset": preset, "seed": settings["seed"],
                  "trial": trial, "chosen": chosen, "test_accuracy": entry["test_accuracy"],
                  "val_accuracy": entry["val_accuracy"], "epochs": entry["epochs"],
                  "train_seconds": entry["train_seconds"], "params_total": entry["params_total"],
                  "params_active_per_sample": entry["params_active_per_sample"],
                  "test_curve": entry["test_curve"], "run": entry["key"]}
        self.records.append(record)
        return record

    # ------------------------------------------------------------------------------------------------ outputs
    def summary(self) -> list[dict[str, Any]]:
        """One row per (dataset, preset): mean and std over seeds of the chosen setting."""
        rows = []
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in self.records:
            if r["chosen"]:
                groups.setdefault((r["dataset"], r["preset"]), []).append(r)
        for (dataset, preset), rs in groups.items():
            acc = [100 * r["test_accuracy"] for r in rs]
            rows.append({"recipe": self.protocol.name, "dataset": dataset, "preset": preset, "seeds": len(rs),
                         "test_mean": statistics.mean(acc), "test_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                         "val_mean": 100 * statistics.mean(r["val_accuracy"] for r in rs),
                         "epochs": rs[0]["epochs"], "seconds_mean": statistics.mean(r["train_seconds"] for r in rs),
                         "chosen": rs[0]["trial"], "params_total": rs[0]["params_total"],
                         "params_active_per_sample": rs[0]["params_active_per_sample"]})
        return rows

    def write(self) -> None:
        summary = self.summary()
        # The records without their curves (those stay in the runs file; the plot is drawn from them), one per line.
        records = [{k: v for k, v in r.items() if k != "test_curve"} for r in self.records]
        head = json.dumps({"recipe": self.protocol.name, "seeds": self.seeds})[:-1]
        text = (head + ',\n "summary": [' + ",".join("\n  " + json.dumps(r) for r in summary) + '],\n "runs": ['
                + ",".join("\n  " + json.dumps(r) for r in records) + "]}\n")
        write_bytes_atomic(self.out / "results.json", text.encode())
        buffer = io.StringIO()
        fields = ["recipe", "dataset", "preset", "seed", "chosen", "trial", "test_accuracy", "val_accuracy",
                  "epochs", "train_seconds", "params_total", "params_active_per_sample", "run"]
        writer = csv.DictWriter(buffer, fields, extrasaction="ignore")
        writer.writeheader()
        for r in self.records:
            writer.writerow({**r, "trial": json.dumps(r["trial"], sort_keys=True)})
        write_bytes_atomic(self.out / "results.csv", buffer.getvalue().encode())
        write_bytes_atomic(self.out / "results.md", markdown(summary, self.protocol.name).encode())
        plot_curves(self.records, self.out / f"convergence-{self.protocol.name}.png", self.protocol.name)


def markdown(summary: list[dict[str, Any]], recipe: str) -> str:
    """Wide table of test accuracy (mean ± std) with the paper's numbers, then the long table with details."""
    datasets = list(dict.fromkeys(r["dataset"] for r in summary))
    presets = list(dict.fromkeys(r["preset"] for r in summary))
    cell = {(r["dataset"], r["preset"]): r for r in summary}
    names, published = REFERENCES.get(recipe, REFERENCES["paper"])
    head = ["dataset", *presets, *names]
    lines = [f"### Test accuracy %, recipe `{recipe}` (mean ± std over seeds; final epoch)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in datasets:
        values = [_accuracy(cell[d, p]) if (d, p) in cell else "–" for p in presets]
        reference = published.get(d)
        lines.append("| " + " | ".join([d, *values, *(f"{v:.2f}" for v in reference)] if reference
                                       else [d, *values, *("–" for _ in names)]) + " |")
    others = [p for p in presets if p != "sal"]
    if "sal" in presets and others:
        lines += ["", "Difference to `sal` in points (preset minus sal; * where it exceeds the seed spread, i.e. "
                  "the sum of both standard deviations):", "", "| dataset | " + " | ".join(others) + " |",
                  "|" + "---|" * (len(others) + 1)]
        for d in datasets:
            diffs = [difference_cell(cell.get((d, p)), cell.get((d, "sal"))) for p in others]
            lines.append(f"| {d} | " + " | ".join(diffs) + " |")
    lines += ["", "| dataset | preset | test % | val % | seeds | epochs | seconds/run | chosen setting | params "
              "(total / active per sample) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['dataset']} | {r['preset']} | {r['test_mean']:.2f} ± {r['test_std']:.2f} | "
                     f"{r['val_mean']:.2f} | {r['seeds']} | {r['epochs']} | {r['seconds_mean']:.1f} | "
                     f"{json.dumps(r['chosen'], sort_keys=True)} | {r['params_total']:,} / "
                     f"{r['params_active_per_sample']:,} |")
    return "\n".join(lines) + "\n"


def _accuracy(row: dict[str, Any]) -> str:
    if row["seeds"] == 1:
        return f"{row['test_mean']:.2f} (1 seed)"
    return f"{row['test_mean']:.2f} ± {row['test_std']:.2f}"


def difference_to_sal(row: dict[str, Any] | None, sal: dict[str, Any] | None) -> tuple[float, bool] | None:
    """(preset minus sal in points, whether that exceeds the seed spread: the sum of both stds); None where either
    row is missing. One seed has no spread, so its difference is never marked."""
    if row is None or sal is None:
        return None
    diff = row["test_mean"] - sal["test_mean"]
    return diff, abs(diff) > row["test_std"] + sal["test_std"] and min(row["seeds"], sal["seeds"]) > 1


def difference_cell(row: dict[str, Any] | None, sal: dict[str, Any] | None) -> str:
    """A table cell: the difference to sal, * where it exceeds the seed spread; a dash where a row is missing."""
    diff = difference_to_sal(row, sal)
    return "–" if diff is None else f"{diff[0]:+.2f}" + ("*" if diff[1] else "")


def plot_curves(records: list[dict[str, Any]], path: Path, recipe: str) -> None:
    """Test accuracy against epoch (mean over seeds of the chosen setting), one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [r for r in records if r["chosen"]]
    datasets = list(dict.fromkeys(r["dataset"] for r in chosen))
    if not datasets:
        return
    cols = min(5, len(datasets))
    rows = -(-len(datasets) // cols)
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(rows, cols, figsize=(max(3.2 * cols, 6.5), 2.6 * rows + 0.5), squeeze=False)
    presets = list(dict.fromkeys(r["preset"] for r in chosen))        # one colour per preset in every panel
    for ax, d in zip(axes.flat, datasets):
        for preset in dict.fromkeys(r["preset"] for r in chosen if r["dataset"] == d):
            curves = [r["test_curve"] for r in chosen if r["dataset"] == d and r["preset"] == preset]
            n = min(len(c) for c in curves)
            mean = [100 * statistics.mean(c[i] for c in curves) for i in range(n)]
            ax.plot(range(1, n + 1), mean, label=preset, lw=1.2, color=f"C{presets.index(preset) % 10}")
        ax.set_title(d, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("test accuracy %", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(datasets):]:
        ax.axis("off")
    for ax in list(axes.flat)[:len(datasets)]:
        ax.legend(fontsize=6)
    fig.suptitle(f"recipe {recipe}: test accuracy per epoch (mean over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))          # room for the title, which tight_layout alone may cut
    save_png(fig, path)
    plt.close(fig)


def save_png(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Write a matplotlib figure as a compact PNG, atomically: rendered at ``dpi``, then stored with a palette of at
    most 256 colours (``compact_png``). The studies in benchmarks/ save their plots with it too."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    write_bytes_atomic(path, compact_png(buffer.getvalue()))


def compact_png(data: bytes) -> bytes:
    """A PNG stored with a palette of at most 256 colours: a plot has few, so it looks the same (only some
    anti-aliased edge pixels move to a near colour) at about a third of the bytes of matplotlib's RGBA file."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB").quantize(colors=256)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
