"""Append-only JSON-lines log of a study's finished runs, so a long study resumes where it stopped.

    log = RunLog(out / "study.jsonl", key=lambda r: (r["dataset"], r["seed"]))
    for ...:
        if log.done(row_key): continue
        log.add({...})          # written (and flushed) at once
    table(log.rows)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any


class RunLog:
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
