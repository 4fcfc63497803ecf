"""Human-readable views of runs and of the installation: ``torchsal report DIR`` and ``torchsal info``."""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import shutil
from pathlib import Path

import torch

from torchsal.errors import ConfigError, TorchsalError
from torchsal.storage import write_bytes_atomic

COLUMNS = ("epoch", "step", "train_loss", "train_accuracy", "val_accuracy", "test_accuracy", "seconds")


def read_history(run_dir: Path) -> tuple[list[dict[str, float]], dict | None]:
    """Per-epoch rows from ``metrics.json`` (a finished run) or ``metrics.csv`` (one still running or killed)."""
    if (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        return metrics["history"], metrics
    if (run_dir / "metrics.csv").is_file():
        with open(run_dir / "metrics.csv") as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)], None
    raise ConfigError(f"{run_dir}: no metrics.json or metrics.csv; is it a run folder (train --out DIR)?")


def report(run_dir: str | Path) -> str:
    """Markdown table of a run's epochs; writes ``DIR/report.png`` (loss and accuracies per epoch)."""
    run_dir = Path(run_dir)
    history, metrics = read_history(run_dir)
    if not history:
        raise ConfigError(f"{run_dir}: the run has not finished an epoch yet")
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in history:
        lines.append("| " + " | ".join(f"{int(row[c])}" if c in ("epoch", "step") else f"{row[c]:.4f}"
                                         for c in COLUMNS) + " |")
    head = (f"{metrics['rule']} on {metrics['dataset']}: test {metrics['test_accuracy']:.4f}, "
            f"val {metrics['val_accuracy']:.4f}, {metrics['train_seconds']:.1f} s" if metrics
            else "unfinished run (from metrics.csv)")
    title = (f"{metrics['rule']} on {metrics['dataset']}, run {run_dir.resolve().name}" if metrics
             else f"run {run_dir.resolve().name} (unfinished)")
    _plot(history, run_dir / "report.png", title)
    return "\n".join([head, "", *lines, "", f"plot: {run_dir / 'report.png'}"])


def _plot(history: list[dict[str, float]], path: Path, title: str) -> None:
    """Training loss on a log scale; accuracies on an axis zoomed to the data (not 0 to 1); integer epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
    losses = [row["train_loss"] for row in history]
    loss_ax.plot(epochs, losses, marker="." if len(epochs) < 30 else None)
    loss_ax.set(xlabel="epoch", ylabel="training loss")
    if min(losses) > 0:
        loss_ax.set_yscale("log")
    values = []
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        values += [row[key] for row in history]
        acc_ax.plot(epochs, [row[key] for row in history], label=key.split("_")[0],
                    marker="." if len(epochs) < 30 else None)
    low, high = min(values), max(values)
    pad = max(0.01, 0.08 * (high - low))
    acc_ax.set_ylim(max(0.0, low - pad), min(1.0, high + pad))
    acc_ax.set(xlabel="epoch", ylabel="accuracy")
    acc_ax.legend()
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def _compiler() -> str:
    """Whether torch.compile finds a C++ compiler here (what ``--compile`` needs; $CXX first, as Inductor)."""
    found = next(filter(None, (shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++", "c++") if c)), None)
    return f"C++ compiler {found}" if found else "no C++ compiler found (g++ or clang++ on the PATH, or $CXX): " \
        "--compile would run eagerly"


def info(data_dir: str | None = None) -> str:
    """Versions, threads, devices, and where each registered dataset was found."""
    import numpy
    import sklearn

    from torchsal.data import DATASETS, locate_dataset, search_dirs
    from torchsal.version import __version__

    cuda = (", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
            if torch.cuda.is_available() else "none")
    lines = [f"torchsal {__version__}, torch {torch.__version__}, numpy {numpy.__version__}, "
             f"scikit-learn {sklearn.__version__}, Python {platform.python_version()}",
             f"threads: {torch.get_num_threads()} (CPU cores: {torch.multiprocessing.cpu_count()})",
             f"devices: cpu; cuda: {cuda}",
             f"--compile: {_compiler()}",
             f"data folders searched: {', '.join(str(d) for d in search_dirs(data_dir))}", "datasets:"]
    for name in sorted(DATASETS):
        try:
            where = locate_dataset(name, data_dir)
            lines.append(f"  {name:14s} {'built in' if where is None else where}")
        except TorchsalError:
            lines.append(f"  {name:14s} not found")
    return "\n".join(lines)
