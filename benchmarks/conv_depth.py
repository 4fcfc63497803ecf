"""SAL and BP across depth on CIFAR-10: the VGG depth family's table and plot, from the conv bench's runs.

    torchsal bench --protocol conv --datasets cifar10-vgg4,cifar10-vgg6,cifar10-vgg8,cifar10-vgg11 --presets bp,sal \\
        --seeds 0 --threads 1 --data-dir ../shared/data --out docs/conv/depth --runs docs/conv/bench/runs.jsonl
    python benchmarks/conv_depth.py --bench docs/conv/depth

The family (``torchsal.models.vgg_depth_plan``) spreads 4, 6, 8 and 11 conv layers over VGG8b's four pooling
stages at one width; each depth trains bp and sal with the bench's conv recipe. Writes ``depth.jsonl`` (one row per
depth and preset), ``depth.md`` (the table, with SAL's gap to BP) and ``depth.png`` beside the bench's results.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def rows(bench: Path) -> list[dict]:
    """One row per (depth, preset) of the bench's chosen runs."""
    runs = json.loads((bench / "results.json").read_text())["runs"]
    out: dict[tuple[int, str], list[dict]] = {}
    for run in runs:
        if run["chosen"] and run["dataset"].startswith("cifar10-vgg") and run["dataset"][11:].isdigit():
            out.setdefault((int(run["dataset"][11:]), run["preset"]), []).append(run)
    return [{"depth": depth, "preset": preset, "seeds": len(cell),
             "test_mean": 100 * statistics.mean(r["test_accuracy"] for r in cell),
             "test_std": 100 * statistics.stdev(r["test_accuracy"] for r in cell) if len(cell) > 1 else 0.0,
             "epochs": cell[0]["epochs"], "params_total": cell[0]["params_total"],
             "seconds": statistics.mean(r["train_seconds"] for r in cell)}
            for (depth, preset), cell in sorted(out.items())]


def markdown(table: list[dict]) -> str:
    presets = list(dict.fromkeys(r["preset"] for r in table))
    cell = {(r["depth"], r["preset"]): r for r in table}
    lines = [f"| conv layers | {' | '.join(presets)} | sal - bp |", "|---" * (len(presets) + 2) + "|"]
    for depth in sorted({r["depth"] for r in table}):
        values = [f"{cell[depth, p]['test_mean']:.2f}" if (depth, p) in cell else "–" for p in presets]
        gap = (f"{cell[depth, 'sal']['test_mean'] - cell[depth, 'bp']['test_mean']:+.2f}"
               if (depth, "sal") in cell and (depth, "bp") in cell else "–")
        lines.append(f"| {depth} | {' | '.join(values)} | {gap} |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from torchsal.bench import save_png

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for preset in dict.fromkeys(r["preset"] for r in table):
        points = [r for r in table if r["preset"] == preset]
        ax.plot([r["depth"] for r in points], [r["test_mean"] for r in points], "o-", label=preset)
    ax.set_xlabel("conv layers (VGG family, CIFAR-10)")
    ax.set_ylabel("test accuracy %")
    ax.set_xticks(sorted({r["depth"] for r in table}))
    ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--bench", type=Path, default=Path("docs/conv/depth"), help="the depth bench's --out")
    args = parser.parse_args()
    table = rows(args.bench)
    (args.bench / "depth.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table))
    (args.bench / "depth.md").write_text(markdown(table))
    plot(table, args.bench / "depth.png")
    print(markdown(table))


if __name__ == "__main__":
    main()
