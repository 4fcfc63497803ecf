"""Why SAL trails on conv nets: SAL's accuracy against the number of areas, the shared path and the signal.

    python benchmarks/conv_ablations.py --data-dir ../shared/data --threads 1                   # LeNet, MNIST: ~40 min
    python benchmarks/conv_ablations.py --dataset cifar10 --seeds 0 --variants k1,k16,k16-direct,k16-both \\
        --lr 3e-3 --data-dir ../shared/data --threads 1
    python benchmarks/conv_ablations.py --dataset cifar10 --seeds 0 --variants sal-conv-areas,sal-readout,sal-pred \\
        --lr 1e-3 --data-dir ../shared/data --threads 1        # the objectives and areas of the conv default

Each dataset's model and budget are those of ``torchsal bench --protocol conv`` (LeNet for 8 epochs on MNIST and
Fashion-MNIST, the small CNN with crop-and-flip for 20 on CIFAR-10; Adam, batch 128, cosine schedule). The ``k``
variants are the conv default before learned objectives (a fixed random readout, areas in every layer): 1 area (no
shared path: SAL's rule on the dense net), 2, 4 and 16 areas with the shared path, 16 without it, the direct
signal or both instead of the local one, and readouts of 4x4-pooled maps (``--readout-pool 4``). The ``sal``
variants change one thing each of the learned-objective layout (predsim weighting its similarity term 0.99, 16
areas in the fully connected layers only); the ``sal-k4`` variants each change one thing of its 4-area twin, and
``sal-k4-sim0.7`` is today's default (``sal-k1-sim0.7`` its dense twin). Every variant trains at one learning
rate (``--lr``, default 1e-3), so the variant is the only thing that changes. Runs
are logged as they finish (``OUT/DATASET/ablations.jsonl``; also into the conv bench's run file, ``--runs``, where
the bench reuses them) and a rerun resumes; ``ablations.md`` and
``areas.png`` (accuracy against areas) are written beside the log.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from study import RunLog, mean_std, study_parser

# The conv default before learned objectives: a fixed random readout of 2x2-pooled maps, areas in every conv.
OLD = {"objective": "readout", "conv_areas": True, "readout_pool": 2}
# name: (what it is, settings); fewest areas first
VARIANTS = {
    "k1": ("1 area (dense), no shared path", {**OLD, "areas": 1, "shared": False}),
    "k2": ("2 areas + shared path", {**OLD, "areas": 2, "shared": True}),
    "k4": ("4 areas + shared path", {**OLD, "areas": 4, "shared": True}),
    "k16": ("16 areas + shared path (bench's sal)", {**OLD, "areas": 16, "shared": True}),
    "k16-no-shared": ("16 areas, no shared path", {**OLD, "areas": 16, "shared": False}),
    "k16-direct": ("16 areas + shared path, direct signal", {**OLD, "areas": 16, "shared": True, "signal": "direct"}),
    "k16-both": ("16 areas + shared path, local + direct", {**OLD, "areas": 16, "shared": True, "signal": "both"}),
    "k16-pool4": ("16 areas + shared path, readout of 4x4-pooled maps", {**OLD, "areas": 16, "shared": True,
                                                                          "readout_pool": 4}),
    "k1-pool4": ("1 area (dense), readout of 4x4-pooled maps", {**OLD, "areas": 1, "shared": False,
                                                                 "readout_pool": 4}),
    # the learned-objective layout (predsim, 4x4 heads, areas in the fully connected layers only; 16 of them, each
    # variant one change from it): where the areas are, then which objective
    "sal": ("predsim, areas in the fc layers (16 + shared path)", {"areas": 16, "shared": True}),
    "sal-k1": ("predsim, 1 area (dense)", {"areas": 1, "shared": False}),
    "sal-conv-areas": ("predsim, areas in the convs too", {"areas": 16, "shared": True, "conv_areas": True}),
    "sal-conv-areas-k4": ("predsim, 4 areas in every layer", {"areas": 4, "shared": True, "conv_areas": True}),
    "sal-layer-routing": ("predsim, each fc layer routed from its own input", {"areas": 16, "shared": True,
                                                                               "routing": "layer"}),
    "sal-no-shared": ("predsim, areas in the fc layers, no shared path", {"areas": 16, "shared": False}),
    "sal-k4": ("predsim, 4 areas + shared path in the fc layers (sim weight 0.99)", {"areas": 4, "shared": True}),
    "sal-both": ("predsim plus the direct signal", {"areas": 16, "shared": True, "signal": "both"}),
    "sal-readout": ("fixed random readout, areas in the fc layers", {"areas": 16, "shared": True,
                                                                     "objective": "readout"}),
    "sal-pred": ("pred (learned head only)", {"areas": 16, "shared": True, "objective": "pred"}),
    "sal-sim": ("sim (similarity matching only)", {"areas": 16, "shared": True, "objective": "sim"}),
    "sal-bpf": ("predsim, bpf (fixed feedback in the heads)", {"areas": 16, "shared": True,
                                                               "head_feedback": "fixed"}),
    "sal-pred-bpf": ("pred, bpf", {"areas": 16, "shared": True, "objective": "pred", "head_feedback": "fixed"}),
    "sal-deep-head": ("predsim, heads with one 3x3 conv layer", {"areas": 16, "shared": True, "head_layers": 1}),
    "sal-pool2": ("predsim, heads on 2x2-pooled maps", {"areas": 16, "shared": True, "readout_pool": 2}),
    "sal-pool8": ("predsim, heads on 8x8-pooled maps", {"areas": 16, "shared": True, "readout_pool": 8}),
    # one change each from sal-k4 (the sim weight variants: the choice of today's default, 0.7)
    "sal-k4-pool2": ("sal-k4, heads on 2x2-pooled maps", {"areas": 4, "shared": True, "readout_pool": 2}),
    "sal-k4-sim0.9": ("sal-k4, sim weight 0.9", {"areas": 4, "shared": True, "sim_weight": 0.9}),
    "sal-k4-sim0.7": ("sim weight 0.7: the default", {"areas": 4, "shared": True, "sim_weight": 0.7}),
    "sal-k4-sim0.5": ("sal-k4, sim weight 0.5", {"areas": 4, "shared": True, "sim_weight": 0.5}),
    "sal-k4-sim0.7-bpf": ("the default with bpf heads (fixed feedback)", {"areas": 4, "shared": True,
                                                                          "sim_weight": 0.7, "head_feedback": "fixed"}),
    "sal-k1-sim0.7": ("the default's dense twin (1 area, sim weight 0.7)", {"areas": 1, "shared": False,
                                                                            "sim_weight": 0.7}),
    "sal-k4-layer-routing": ("sal-k4, each fc layer routed from its own input", {"areas": 4, "shared": True,
                                                                                  "routing": "layer"}),
}
# The learned-objective variants ran with predsim's published weight of the similarity term, 0.99, where they name no
# other (the conv default's until the sim-weight variants chose 0.7 on validation).
for _, _settings in (v for name, v in VARIANTS.items() if name.startswith("sal")):
    _settings.setdefault("sim_weight", 0.99)
AREA_VARIANTS = ("k1", "k2", "k4", "k16", "k16-no-shared")


def run(args) -> list[dict]:  # noqa: ANN001
    from torchsal import load_dataset, make_config, make_splits, train
    from torchsal.bench import PROTOCOLS
    from torchsal.runstore import RunStore, run_entry, run_key

    recipe = PROTOCOLS["conv"]
    own = dict(recipe.datasets[args.dataset])
    log = RunLog(Path(args.out) / args.dataset / "ablations.jsonl",
                 key=lambda r: (r["dataset"], r["variant"], r["seed"], r["epochs"], r["lr"]))
    data = load_dataset(args.dataset, args.data_dir, recipe.base.get("grayscale", False))
    epochs = own.pop("epochs")
    epochs = args.epochs or epochs
    store = RunStore(Path(args.runs)) if args.runs else None
    for seed in map(int, args.seeds.split(",")):
        splits = make_splits(data, seed)
        for variant in args.variants.split(","):
            settings = VARIANTS[variant][1]
            if log.done((args.dataset, variant, seed, epochs, args.lr)):
                continue
            config = make_config("sal", **{**recipe.base, **own, **settings}, dataset=args.dataset, lr=args.lr,
                                 epochs=epochs, seed=seed, threads=args.threads)
            result = train(config, splits=splits, progress=False)
            m = result.metrics
            if store is not None:           # the bench finds the run there when a preset resolves to its config
                store.add(run_entry(run_key(config), m))
            log.add({"dataset": args.dataset, "variant": variant, "areas": settings["areas"],
                     "shared": settings["shared"], "signal": config.rule.signal,
                     "objective": config.rule.objective, "conv_areas": config.model.conv_areas, "seed": seed,
                     "epochs": epochs, "lr": args.lr,
                     "test_accuracy": m["test_accuracy"], "val_accuracy": m["val_accuracy"],
                     "params_total": m.get("params_total"), "seconds": m["train_seconds"],
                     "val_curve": [h["val_accuracy"] for h in m["history"]]})
    return log.rows


def markdown(rows: list[dict]) -> str:
    lines = [f"| SAL, {rows[0]['dataset']} | epochs | lr | test % | validation % | seeds | total parameters |",
             "|---|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        for epochs, lr in sorted({(r["epochs"], r["lr"]) for r in rows if r["variant"] == variant}):
            cell = [r for r in rows if (r["variant"], r["epochs"], r["lr"]) == (variant, epochs, lr)]
            test = [100 * r["test_accuracy"] for r in cell]
            val = [100 * r["val_accuracy"] for r in cell]
            lines.append(f"| {VARIANTS[variant][0]} | {epochs} | {lr:g} | {mean_std(test, 2)} | "
                         f"{mean_std(val, 2)} | {len(cell)} | {cell[0]['params_total']:,} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Test accuracy against the number of areas (local signal), with and without the shared path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from torchsal.bench import save_png

    rows = [r for r in rows if r["variant"] in AREA_VARIANTS]
    rows = [r for r in rows if (r["lr"], r["epochs"]) == (rows[0]["lr"], rows[0]["epochs"])] if rows else []
    if len({r["areas"] for r in rows}) < 2:
        return                                   # nothing to plot against
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for shared, marker in ((True, "o-"), (False, "s--")):
        points = sorted({r["areas"] for r in rows if r["shared"] == shared or r["areas"] == 1})
        cells = [[100 * r["test_accuracy"] for r in rows if r["areas"] == k and (r["shared"] == shared or k == 1)]
                 for k in points]
        ax.errorbar(points, [statistics.mean(c) for c in cells],
                    [statistics.stdev(c) if len(c) > 1 else 0 for c in cells], fmt=marker, capsize=3,
                    label="shared path" if shared else "no shared path")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["areas"] for r in rows}), [str(k) for k in sorted({r["areas"] for r in rows})])
    ax.set_xlabel("areas per layer")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"SAL, {rows[0]['dataset']}: accuracy against areas ({rows[0]['epochs']} epochs, "
                 f"lr {rows[0]['lr']:g})")
    ax.legend()
    fig.tight_layout()
    save_png(fig, path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = study_parser(__doc__, rules="sal", epochs=0, epochs_help="epochs (default: the conv recipe's)")
    parser.add_argument("--dataset", default="mnist", choices=("mnist", "fashion-mnist", "cifar10"))
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--variants", default=",".join(AREA_VARIANTS),
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--runs", default="docs/conv/bench/runs.jsonl",
                        help="also store every finished run in this bench run file ('' for none), so that "
                             "`torchsal bench --protocol conv` reuses a run whose preset resolves to its config")
    parser.set_defaults(out="docs/conv/ablations")
    args = parser.parse_args()
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; choose from: {', '.join(VARIANTS)}")
    rows = run(args)
    out = Path(args.out) / args.dataset
    (out / "ablations.md").write_text(markdown(rows))
    plot(rows, out / "areas.png")
    print(markdown(rows))


if __name__ == "__main__":
    main()
