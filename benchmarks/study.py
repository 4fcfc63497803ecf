"""What the studies in benchmarks/ share: their command line, a resumable log of finished runs, mean ± std cells.

    parser = study_parser(__doc__, rules="bp,sal", epochs=5)
    log = RunLog(out / "study.jsonl", key=lambda r: (r["dataset"], r["seed"]))
    for ...:
        if log.done(row_key): continue
        log.add({...})          # written (and flushed) at once
    table(log.rows)
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any


def study_parser(doc: str, rules: str, epochs: int, epochs_help: str = "training epochs") -> argparse.ArgumentParser:
    """The options every study has; a study adds its own."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--rules", default=rules)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=epochs, help=epochs_help)
    parser.add_argument("--data-dir")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", default="docs/science")
    return parser


def mean_std(values: list[float], digits: int = 4) -> str:
    """A table cell: mean ± sample std over seeds (the mean alone for one seed, a dash for none)."""
    if not values:
        return "–"
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


class RunLog:
    """Append-only JSON-lines log of a study's finished runs, so a long study resumes where it stopped."""

    def __init__(self, path: Path, key: Callable[[dict[str, Any]], Hashable]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.key = path, key
        self.rows: list[dict[str, Any]] = (
            [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else [])
        self._done = {key(r) for r in self.rows}

    def done(self, key: Hashable) -> bool:
        return key in self._done

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._done.add(self.key(row))
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
