"""The ablation table of docs/science.md: every variant against full SAL, one column per dataset, and a plot.

Reads the reports that `torchsal bench --rules ablations --out docs/science/ablations/<dataset>` wrote (it trains
nothing) and writes ``table.md``, ``table.csv`` and ``ablations.png`` beside them:

    python benchmarks/ablations.py --out docs/science/ablations --doc docs/science.md

``--doc`` also replaces the table between ``<!-- ablation table -->`` and ``<!-- end ablation table -->`` there.

A cell is mean ± std over the seeds finished (a cell with fewer than three seeds says how many); a difference to
full SAL is marked * when it exceeds the sum of both seed standard deviations, as in the benchmark tables.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path
from typing import Any

from torchsal.bench import ABLATIONS, TEN_DATASETS, difference_cell, difference_to_sal, save_png
from torchsal.storage import write_bytes_atomic

WHAT = {
    "sal": "none: 16 areas, shared path, learned input routing, signal tuned",
    "sal-k1": "one dense area, no shared path",
    "sal-no-shared": "areas only, no shared path",
    "sal-frozen-router": "routing projection frozen at its random start",
    "sal-random-router": "input-independent random areas",
    "sal-layer-routing": "a router per layer instead of one from the input",
    "sal-per-area-feedback": "one fixed feedback matrix per area",
    "sal-direct": "direct signal only",
    "sal-local": "local signal only",
    "sal-both": "direct + local signals",
}


def load(out: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """{dataset: {variant: summary row}} from every ``<dataset>/results.json`` under ``out``, in the suite's order."""
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(out.glob("*/results.json")):
        for row in json.loads(path.read_text())["summary"]:
            rows.setdefault(row["dataset"], {})[row["preset"]] = row
    order = {d: i for i, d in enumerate(TEN_DATASETS)}
    return dict(sorted(rows.items(), key=lambda item: order.get(item[0], len(order))))


def cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "not run yet"
    seeds = "" if row["seeds"] >= 3 else f" ({row['seeds']} seed{'s' if row['seeds'] > 1 else ''})"
    spread = f" ± {row['test_std']:.2f}" if row["seeds"] > 1 else ""
    return f"{row['test_mean']:.2f}{spread}{seeds}"


def markdown(rows: dict[str, dict[str, dict[str, Any]]]) -> str:
    datasets = list(rows)
    head = ["variant (one change to full SAL)", *(f"{d} {col}" for d in datasets for col in ("test %", "vs sal"))]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant in ABLATIONS:
        cells = []
        for d in datasets:
            row, sal = rows[d].get(variant), rows[d].get("sal")
            cells += [cell(row), "–" if variant == "sal" else difference_cell(row, sal)]
        lines.append(f"| `{variant}` ({WHAT[variant]}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: dict[str, dict[str, dict[str, Any]]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["dataset", "variant", "seeds", "test_mean", "test_std", "difference_to_sal", "beyond_spread",
                     "chosen"])
    for d, variants in rows.items():
        for variant in ABLATIONS:
            row = variants.get(variant)
            if row is not None:
                diff = difference_to_sal(row, variants.get("sal"))
                writer.writerow([d, variant, row["seeds"], f"{row['test_mean']:.4f}", f"{row['test_std']:.4f}",
                                 "" if diff is None else f"{diff[0]:.4f}", "" if diff is None else diff[1],
                                 json.dumps(row["chosen"], sort_keys=True)])
    return buffer.getvalue()


def plot(rows: dict[str, dict[str, dict[str, Any]]], path: Path) -> None:
    """Difference to full SAL per variant, one group of bars per variant, error bar = the sum of both stds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in ABLATIONS if v != "sal"]
    datasets = list(rows)
    width = 0.8 / max(1, len(datasets))
    fig, ax = plt.subplots(figsize=(9, 3.6))
    for i, d in enumerate(datasets):
        sal = rows[d].get("sal")
        xs, ys, errs = [], [], []
        for j, variant in enumerate(variants):
            row = rows[d].get(variant)
            if row is not None and sal is not None:
                xs.append(j + (i - (len(datasets) - 1) / 2) * width)
                ys.append(row["test_mean"] - sal["test_mean"])
                errs.append(row["test_std"] + sal["test_std"])
        ax.bar(xs, ys, width, yerr=errs, capsize=2, label=d)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy minus full SAL (points)", fontsize=8)
    ax.set_title("Ablations: one change to SAL each (tuned budget, mean over seeds; bars: sum of stds)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--out", default="docs/science/ablations", type=Path)
    parser.add_argument("--doc", type=Path, help="markdown file whose ablation table block is replaced")
    args = parser.parse_args()
    out = args.out
    rows = load(out)
    if not rows:
        raise SystemExit(f"no ablation reports under {out}/<dataset>/results.json; run `torchsal bench --rules "
                         f"ablations --out {out}/<dataset> ...` first")
    table = markdown(rows)
    write_bytes_atomic(out / "table.md", table.encode())
    write_bytes_atomic(out / "table.csv", table_csv(rows).encode())
    plot(rows, out / "ablations.png")
    print(table, end="")
    print(f"written: {out}/table.md, table.csv, ablations.png")
    if args.doc:
        embed(args.doc, table)
        print(f"table replaced in {args.doc}")


def embed(doc: Path, table: str, begin: str = "<!-- ablation table -->\n",
          end: str = "<!-- end ablation table -->") -> None:
    text = doc.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{doc} has no {begin.strip()} ... {end} block to replace")
    head, rest = text.split(begin, 1)
    write_bytes_atomic(doc, (head + begin + table + end + rest.split(end, 1)[1]).encode())


if __name__ == "__main__":
    main()
