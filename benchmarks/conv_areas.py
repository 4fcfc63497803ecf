"""Why SAL trails its dense variant on conv nets: accuracy against the number of areas and the shared path.

    python benchmarks/conv_areas.py --data-dir ../shared/data --threads 1 --out docs/conv/areas     # ~40 min/core

SAL on BioTorch's LeNet (the conv protocol of ``torchsal bench --protocol conv``: 8 epochs, Adam, batch 128,
cosine schedule) with 1 area (no shared path: SAL's rule on the dense net), 2, 4 and 16 areas with the shared path,
and 16 areas without it. Every variant trains at one learning rate (``--lr``, default 1e-3: the rate the conv
bench chose for SAL on MNIST), so the number of areas is the only thing that changes. Runs are logged as they
finish (``areas.jsonl``) and a rerun resumes; ``areas.md`` and ``areas.png`` are written from the log.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from study import RunLog, mean_std, study_parser

# (label, settings) of each variant, fewest areas first
VARIANTS = {
    "1 area (dense)": {"areas": 1, "shared": False},
    "2 + shared": {"areas": 2, "shared": True},
    "4 + shared": {"areas": 4, "shared": True},
    "16 + shared": {"areas": 16, "shared": True},
    "16, no shared": {"areas": 16, "shared": False},
}


def run(args) -> list[dict]:  # noqa: ANN001
    from torchsal import load_dataset, make_config, make_splits, train
    from torchsal.bench import RECIPES

    recipe = RECIPES["conv"]
    own = dict(recipe.datasets[args.dataset])
    log = RunLog(Path(args.out) / "areas.jsonl", key=lambda r: (r["dataset"], r["variant"], r["seed"], r["epochs"]))
    data = load_dataset(args.dataset, args.data_dir, False)
    epochs = args.epochs or own.pop("epochs")
    own.pop("epochs", None)
    for seed in map(int, args.seeds.split(",")):
        splits = make_splits(data, seed)
        for variant, settings in VARIANTS.items():
            if log.done((args.dataset, variant, seed, epochs)):
                continue
            config = make_config("sal", **{**recipe.base, **own, **settings}, dataset=args.dataset, lr=args.lr,
                                 epochs=epochs, seed=seed, threads=args.threads)
            result = train(config, splits=splits, progress=False)
            m = result.metrics
            log.add({"dataset": args.dataset, "variant": variant, "areas": settings["areas"],
                     "shared": settings["shared"], "seed": seed, "epochs": epochs, "lr": args.lr,
                     "test_accuracy": m["test_accuracy"], "val_accuracy": m["val_accuracy"],
                     "params_total": m.get("params_total"), "seconds": m["train_seconds"],
                     "val_curve": [h["val_accuracy"] for h in m["history"]]})
    return log.rows


def markdown(rows: list[dict]) -> str:
    lines = ["| SAL on LeNet, " + rows[0]["dataset"] + " | test % | validation % | seeds | total parameters |",
             "|---|---|---|---|---|"]
    for variant in VARIANTS:
        cell = [r for r in rows if r["variant"] == variant]
        if cell:
            test = [100 * r["test_accuracy"] for r in cell]
            val = [100 * r["val_accuracy"] for r in cell]
            lines.append(f"| {variant} | {mean_std(test, 2)} | {mean_std(val, 2)} | {len(cell)} | "
                         f"{cell[0]['params_total']:,} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for shared, marker in ((True, "o-"), (False, "s--")):
        points = sorted({r["areas"] for r in rows if r["shared"] == shared or r["areas"] == 1})
        cells = [[100 * r["test_accuracy"] for r in rows if r["areas"] == k and (r["shared"] == shared or k == 1)]
                 for k in points]
        ax.errorbar(points, [statistics.mean(c) for c in cells],
                    [statistics.stdev(c) if len(c) > 1 else 0 for c in cells], fmt=marker, capsize=3,
                    label="shared path" if shared else "no shared path")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("areas per layer")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"SAL on LeNet, {rows[0]['dataset']}: accuracy against areas")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = study_parser(__doc__, rules="sal", epochs=0, epochs_help="epochs (default: the conv recipe's)")
    parser.add_argument("--dataset", default="mnist", choices=("mnist", "fashion-mnist"))
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.set_defaults(out="docs/conv/areas")
    args = parser.parse_args()
    rows = [r for r in run(args) if r["dataset"] == args.dataset]
    out = Path(args.out)
    (out / "areas.md").write_text(markdown(rows))
    plot(rows, out / "areas.png")
    print(markdown(rows))


if __name__ == "__main__":
    main()
