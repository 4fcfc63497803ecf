"""The finished runs of a benchmark, one JSON line each in a file several benches may share (``runs.jsonl``).

A line holds the run's key, its resolved config (``settings``: where it differs from ``STORED_BASE``), test and
validation accuracy, epochs, steps, training seconds, parameter counts and the per-epoch test accuracy curve
(rounded to ``CURVE_DIGITS``; what the convergence plots draw). It is appended with one ``write`` on an
``O_APPEND`` descriptor, under a lock, so lines of two benches never interleave, and a reader skips a torn line (a
bench killed mid-write). A run is found by its key, or, for one an older torchsal finished, by its config
(``_same_run``). Old ``<key>/metrics.json`` folders are still read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torchsal.config import DEPRECATED_VALUES, RunConfig, field_defaults

log = logging.getLogger(__name__)

# Decimals the stored per-epoch accuracy curves keep (they feed the plots only; the tables use the final accuracies,
# stored exactly).
CURVE_DIGITS = 4
RUNS_FILE = "runs.jsonl"
# A stored run's config is written as its difference from this table (a third of the bytes). The table never
# changes, whatever the defaults become, so every line keeps its meaning; a setting added later is appended here
# with the value runs stored before it had (its default when it was added).
STORED_BASE: dict[str, Any] = {
    "areas": "auto", "routing_dim": 64, "routing": "input", "router": "learned", "routing_temperature": 0.1,
    "model": "mlp", "depth": 1, "width": 256, "shared": True, "block": "plain", "norm": "none", "width_mult": 1.0,
    "conv_areas": True, "dtype": "float32", "rule": "sal", "signal": "local", "readout": "per-layer",
    "readout_pool": 2, "objective": "readout", "head_feedback": "weights", "head_layers": 0, "sim_weight": 0.99,
    "feedback": "per-layer", "memory": "standard", "dataset": "digits", "grayscale": False, "epochs": 60,
    "batch_size": 64, "optimizer": "adam", "lr": 0.003, "momentum": 0.0, "weight_decay": 0.0,
    "schedule": "constant", "augment": "none", "max_steps": None, "seed": 0, "device": "cpu", "precision": "fp32",
    "compile": False, "threads": None, "data_dir": None, "out": None, "diagnostics": False, "tensorboard": False,
    "parallel": "data", "execution": "fast"}


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """What makes a run itself: every setting but where its data and outputs live, how many CPU threads ran it and
    whether its step was compiled or took the reference path (a report rebuilt with another thread count, with
    --compile or with --execution reference, finds the same runs: they change only the order of floating-point
    sums)."""
    current = {k: DEPRECATED_VALUES.get((k, v), v) if isinstance(v, str) else v for k, v in config.items()}
    return {k: v for k, v in current.items() if k not in ("data_dir", "out", "threads", "compile", "execution")}


def run_key(config: RunConfig) -> str:
    """Runs are identified by their resolved configuration, so presets that resolve to the same run (``sal`` and
    ``sal-local`` when local is the default signal) share it."""
    identity = _identity(config.to_dict())
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"{identity['dataset']}-{identity['rule']}-s{identity['seed']}-{digest}"


def _same_run(stored: dict[str, Any], wanted: dict[str, Any], defaults: dict[str, Any]) -> bool:
    """A run finished by an older torchsal, whose config lacks settings added since, is the wanted run when it
    agrees on every setting it has and the wanted run leaves the newer settings at their defaults."""
    stored, wanted = _identity(stored), _identity(wanted)
    return (all(wanted.get(k) == v for k, v in stored.items())
            and all(k in stored or defaults.get(k, object()) == v for k, v in wanted.items()))


def run_entry(key: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The stored line of a finished run, from the metrics ``train`` returns (or an old ``metrics.json``)."""
    def curve(name: str) -> list[float | None]:
        return [None if h.get(name) is None else round(h[name], CURVE_DIGITS) for h in metrics["history"]]

    return {"key": key, "config": metrics["config"],
            **{k: metrics.get(k) for k in ("test_accuracy", "val_accuracy", "epochs", "steps", "train_seconds",
                                           "params_total", "params_active_per_sample")},
            "test_curve": curve("test_accuracy")}


def stored(entry: dict[str, Any]) -> dict[str, Any]:
    """A run's entry as its line holds it: its config as ``settings``, the difference from ``STORED_BASE``."""
    out = {k: v for k, v in entry.items() if k != "config"}
    out["settings"] = {k: v for k, v in entry["config"].items() if k not in STORED_BASE or STORED_BASE[k] != v}
    return out


def loaded(line: dict[str, Any]) -> dict[str, Any]:
    """A run's entry from its line: ``settings`` over ``STORED_BASE`` (or a line's full ``config``) as ``config``."""
    if "settings" not in line:
        return line
    out = {k: v for k, v in line.items() if k != "settings"}
    out["config"] = {**STORED_BASE, **line["settings"]}
    return out


def runs_file(path: Path) -> Path:
    """The JSONL file of finished runs that ``--runs PATH`` names: PATH itself when it ends in ``.jsonl``, else
    ``PATH/runs.jsonl``."""
    return path if path.suffix == ".jsonl" else path / RUNS_FILE


def append_line(path: Path, obj: dict[str, Any]) -> None:
    """Append ``obj`` as one JSON line with a single ``write`` on an ``O_APPEND`` descriptor, under an exclusive
    lock, so lines from several processes never interleave. A file whose last line was torn (a writer killed
    mid-write) gets a newline first, so the torn line stays one line that readers skip and this one stays whole."""
    line = (json.dumps(obj, separators=(",", ":")) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)          # (released with the descriptor) the check and the write as one
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        if os.write(fd, line) != len(line):     # a full disk; the part written is a torn line, which readers skip
            raise OSError(f"{path}: short write, the run was not stored")
        os.fsync(fd)
    finally:
        os.close(fd)


class RunStore:
    """The finished runs of one JSONL file (plus old ``<key>/metrics.json`` folders, read only): found by key or,
    for runs an older torchsal finished, by config. The file is read again, from where the last read stopped,
    whenever a run is not found, so runs another bench appended meanwhile are found as before."""

    def __init__(self, path: Path, legacy: Iterable[Path] = ()) -> None:
        self.path, self.legacy = path, list(dict.fromkeys(legacy))
        self.entries: dict[str, dict[str, Any]] = {}
        self._offset = 0
        self._legacy_read = False

    def reload(self) -> None:
        self._read_file()
        if not self._legacy_read:               # old folders do not grow: read once
            self._legacy_read = True
            for folder in self.legacy:
                for entry in legacy_entries(folder):
                    self.entries.setdefault(entry["key"], entry)

    def _read_file(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        complete = data.rfind(b"\n") + 1
        self._offset += complete
        for line in data[:complete].splitlines():
            self._take(line, warn=True)
        if data[complete:].strip():     # a last line without its newline: torn, or still being written; read again
            self._take(data[complete:], warn=False)       # next time, kept now only if it is a whole run

    def _take(self, line: bytes, warn: bool) -> None:
        if not line.strip():
            return
        try:
            entry = loaded(json.loads(line))
            self.entries.setdefault(entry["key"], entry)
        except (ValueError, TypeError, KeyError):
            if warn:
                log.warning("%s: skipped a line that is not a whole run (%d bytes; a bench killed mid-write?)",
                            self.path, len(line))

    def find(self, config: RunConfig) -> dict[str, Any] | None:
        key = run_key(config)
        if key not in self.entries:
            self.reload()
        if key in self.entries:
            return self.entries[key]
        wanted, defaults = config.to_dict(), field_defaults()
        return next((e for e in self.entries.values() if _same_run(e["config"], wanted, defaults)), None)

    def add(self, entry: dict[str, Any]) -> None:
        append_line(self.path, stored(entry))
        self.entries.setdefault(entry["key"], entry)


def migrate_runs(folder: Path, path: Path) -> int:
    """Append every run of an old ``folder/<key>/metrics.json`` layout that ``path`` lacks to the JSONL file
    ``path``, in key order; the number appended."""
    store = RunStore(path)
    store.reload()
    added = 0
    for entry in legacy_entries(folder):
        if entry["key"] not in store.entries:
            store.add(entry)
            added += 1
    return added


def legacy_entries(folder: Path) -> Iterable[dict[str, Any]]:
    """The runs of an old ``folder/<key>/metrics.json`` layout, as entries, in key order."""
    for metrics in sorted(folder.glob("*/metrics.json")):
        yield run_entry(metrics.parent.name, json.loads(metrics.read_text()))
