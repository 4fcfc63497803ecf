"""Alignment, interference and area statistics over training, several seeds: what `--diagnostics` measures, as tables.

    python benchmarks/diagnostics.py --datasets mnist,fashion-mnist --seeds 0,1,2 --epochs 5 \\
        --data-dir ../shared/data --threads 1 --out docs/science

Every preset trains the same two-hidden-layer model (width 256; each rule's default settings otherwise) with
``--diagnostics``, which after every epoch measures on a fixed probe batch of 512 training samples:

- ``alignment``: angle in degrees between the rule's update of each linear layer and the true backprop gradient;
- ``interference``: mean pairwise cosine between the per-class updates of each linear layer;
- area statistics of every router over the training split (utilisation, imbalance, entropy, class purity, share
  of samples that changed area since the previous epoch).

The presets pair up so each question has a control with one difference: areas vs none under the same rule
(``sal`` vs ``sal-k1``, ``bp-areas`` vs ``bp``) and SAL's signals vs the dense feedback rules (``fa``, ``dfa``).
Appends one line per finished run to ``OUT/diagnostics.jsonl`` (an interrupted study resumes), prints the tables,
writes ``OUT/diagnostics.png`` (alignment, interference) and ``OUT/areas.png`` (area statistics).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from study import RunLog, mean_std, study_parser

from torchsal import load_dataset, make_splits
from torchsal.bench import preset_config, save_png
from torchsal.train import Trainer

RULES = ("bp", "fa", "dfa", "sal-direct", "sal-local", "sal-k1", "bp-areas")


def run(preset: str, dataset: str, splits, seed: int, args) -> dict:
    config = preset_config(preset, depth=2, width=256, epochs=args.epochs, seed=seed, threads=args.threads,
                           dataset=dataset, diagnostics=True)
    trainer = Trainer(config, splits)
    metrics = trainer.fit(progress=False).metrics
    return {"test_accuracy": metrics["test_accuracy"],
            "per_epoch": [{"epoch": h["epoch"], "test_accuracy": h["test_accuracy"], **h["diagnostics"]}
                          for h in metrics["history"]]}


def report(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    groups = {(d, p): [r for r in rows if r["dataset"] == d and r["preset"] == p]
              for d in datasets for p in RULES if any(r["dataset"] == d and r["preset"] == p for r in rows)}

    # a dense model has one area: nothing to report on its areas
    routed = {key: sel for key, sel in groups.items() if len(sel[0]["per_epoch"][-1]["areas"][0]["shares"]) > 1}

    def layer_values(sel, key, layer, epoch):
        return [r["per_epoch"][epoch][key][layer] for r in sel]

    print("\n### Alignment with the true gradient (degrees; hidden 1, hidden 2, head), first and last epoch\n")
    print("| dataset | preset | test acc. | hidden 1: first -> last | hidden 2: first -> last | head: last | seeds |")
    print("|---|---|---|---|---|---|---|")
    for (d, p), sel in groups.items():
        cells = [f"{mean_std(layer_values(sel, 'alignment_degrees', i, 0), 1)} -> "
                 f"{mean_std(layer_values(sel, 'alignment_degrees', i, -1), 1)}" for i in (0, 1)]
        print(f"| {d} | {p} | {mean_std([r['test_accuracy'] for r in sel], 4)} | {cells[0]} | {cells[1]} | "
              f"{mean_std(layer_values(sel, 'alignment_degrees', 2, -1), 1)} | {len(sel)} |")

    print("\n### Class interference (mean pairwise cosine of per-class updates), last epoch\n")
    print("| dataset | preset | hidden 1 | hidden 2 | head |\n|---|---|---|---|---|")
    for (d, p), sel in groups.items():
        print(f"| {d} | {p} | " + " | ".join(mean_std(layer_values(sel, "interference", i, -1), 3)
                                              for i in range(3)) + " |")

    print("\n### Area statistics of the routed models, last epoch (one input router)\n")
    print("| dataset | preset | used | imbalance (1 = even) | entropy | class purity | changed in last epoch |")
    print("|---|---|---|---|---|---|---|")
    for (d, p), sel in routed.items():
        stats = [r["per_epoch"][-1]["areas"][0] for r in sel]
        print(f"| {d} | {p} | " + " | ".join(mean_std([s[k] for s in stats], 0 if k == "used" else 3)
                                              for k in ("used", "imbalance", "entropy", "purity", "changed")) + " |")

    fig, axes = plt.subplots(len(datasets), 3, figsize=(12, 3.2 * len(datasets)), squeeze=False)
    for row, d in enumerate(datasets):
        for (dd, p), sel in groups.items():
            if dd != d:
                continue
            epochs = [e["epoch"] for e in sel[0]["per_epoch"]]
            for col, (key, layer, title) in enumerate((("alignment_degrees", 0, "alignment, hidden 1 (deg)"),
                                                       ("alignment_degrees", 1, "alignment, hidden 2 (deg)"),
                                                       ("interference", 0, "interference, hidden 1"))):
                means = [statistics.mean(layer_values(sel, key, layer, e)) for e in range(len(epochs))]
                axes[row][col].plot(epochs, means, marker="o", ms=3, label=p)
                axes[row][col].set_title(f"{d}: {title}", fontsize=9)
                axes[row][col].set_xlabel("epoch", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out / "diagnostics.png", dpi=110)
    plt.close(fig)
    plot_areas(plt, datasets, routed, out)


def plot_areas(plt, datasets: list[str], routed: dict, out: Path) -> None:
    """Area statistics of the routed presets: class purity and routing churn per epoch, and how evenly the last
    epoch's samples spread over the areas (shares sorted, mean over seeds; the dashed line is an even share)."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(len(datasets), 3, figsize=(12, 3.2 * len(datasets)), squeeze=False)
    for (d, p), sel in routed.items():
        row = datasets.index(d)
        epochs = [e["epoch"] for e in sel[0]["per_epoch"]]
        for col, (key, title) in enumerate((("purity", "class purity of areas"),
                                            ("changed", "share of samples that changed area"))):
            points = [(e, statistics.mean(r["per_epoch"][i]["areas"][0][key] for r in sel))
                      for i, e in enumerate(epochs) if key in sel[0]["per_epoch"][i]["areas"][0]]
            axes[row][col].plot(*zip(*points), marker="o", ms=3, label=p)
            axes[row][col].set_title(f"{d}: {title}", fontsize=9)
            axes[row][col].set_xlabel("epoch", fontsize=8)
        shares = [sorted(r["per_epoch"][-1]["areas"][0]["shares"], reverse=True) for r in sel]
        axes[row][2].plot(range(1, len(shares[0]) + 1), [statistics.mean(s) for s in zip(*shares)], marker="o",
                          ms=3, label=p)
        axes[row][2].axhline(1 / len(shares[0]), color="grey", ls="--", lw=0.8)
        axes[row][2].set_title(f"{d}: area shares, last epoch (sorted)", fontsize=9)
        axes[row][2].set_xlabel("area rank", fontsize=8)
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out / "areas.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = study_parser(__doc__, rules=",".join(RULES), epochs=5)
    parser.add_argument("--datasets", default="mnist,fashion-mnist")
    args = parser.parse_args()
    out = Path(args.out)
    log = RunLog(out / "diagnostics.jsonl", key=lambda r: (r["dataset"], r["preset"], r["seed"], r["epochs"]))
    for dataset in args.datasets.split(","):
        data = load_dataset(dataset, args.data_dir)
        for seed in map(int, args.seeds.split(",")):
            splits = make_splits(data, seed)
            for preset in args.rules.split(","):
                if not log.done((dataset, preset, seed, args.epochs)):
                    log.add({"dataset": dataset, "preset": preset, "seed": seed, "epochs": args.epochs,
                             **run(preset, dataset, splits, seed, args)})
    report([r for r in log.rows if r["epochs"] == args.epochs], out)


if __name__ == "__main__":
    main()
