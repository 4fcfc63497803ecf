"""Heterogeneous data: one model on the union of MNIST, Fashion-MNIST and CIFAR-10 (grayscale, 28x28; 30 classes).

    python benchmarks/heterogeneous.py --data-dir ../shared/data --seeds 0,1,2 --epochs 3 --out docs/science

Two orders of the same data, for bp, dfa, sal and the capacity control bp-areas (BP on SAL's routed model):

- ``interleaved``: ordinary shuffled training on the union (the domains share every batch);
- ``sequence``: the domains one after another (mnist, then fashion-mnist, then cifar10), each for ``--epochs``,
  optimizer state kept (``torchsal.continual.run_sequence`` with one task per domain; routing never sees the
  domain).

Reports test accuracy per domain (30-way, over the domain's test samples) after the last domain, and for the routed
models whether areas specialise by domain: the domain purity of the areas (share of each area's training samples
from its majority domain, weighted by area size; 1/3 = domain-blind, 1 = one domain per area). Appends one line per
finished run to ``OUT/heterogeneous.jsonl`` (an interrupted study resumes), prints the table, writes a PNG.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from study import RunLog, mean_std, study_parser

from torchsal import load_dataset, make_splits
from torchsal.bench import preset_config, save_png
from torchsal.continual import accuracy, split_tasks
from torchsal.diagnostics import area_statistics
from torchsal.evaluation import route_all
from torchsal.train import Trainer

DOMAINS = ("mnist", "fashion-mnist", "cifar10")
RULES = ("bp", "dfa", "sal", "bp-areas")


def domain_of(classes: list[str]) -> torch.Tensor:
    """Domain index of each of the union's class labels (class names are ``domain/class``)."""
    return torch.tensor([DOMAINS.index(name.split("/")[0]) for name in classes])


def evaluate(trainer: Trainer, splits, domains: torch.Tensor) -> dict:
    d, test_domain = trainer.device, domains[splits.y_test]
    per_domain = {name: accuracy(trainer.model, splits.x_test[test_domain == i].to(d),
                                 splits.y_test[test_domain == i].to(d))
                  for i, name in enumerate(DOMAINS)}
    row = {"test_accuracy": accuracy(trainer.model, splits.x_test.to(d), splits.y_test.to(d)), **per_domain}
    if trainer.model.routers:
        area = route_all(trainer.model, splits.x_train.to(d))[0].cpu()
        k = trainer.config.model.routing_config.areas
        row["domain_purity"] = area_statistics(area, k, domains[splits.y_train])["purity"]
        row["class_purity"] = area_statistics(area, k, splits.y_train)["purity"]
    return row


def run(preset: str, order: str, splits, seed: int, args) -> dict:
    config = preset_config(preset, epochs=args.epochs, seed=seed, threads=args.threads)
    domains = domain_of(splits.classes)
    if order == "interleaved":
        trainer = Trainer(config, splits)
        trainer.fit(progress=False)
        return evaluate(trainer, splits, domains)
    # One task per domain, in DOMAINS order (the union's labels are grouped by domain, 10 classes each).
    tasks = split_tasks(splits, classes_per_task=10)
    trainer, after = Trainer(config, tasks[0][0]), []
    for i, (task, _) in enumerate(tasks):
        if i:
            trainer.next_task(task)
        trainer.fit(progress=False)
        after.append(evaluate(trainer, splits, domains))
    final = after[-1]
    forgetting = [max(row[d] for row in after) - final[d] for d in DOMAINS[:-1]]
    return {**final, "forgetting": sum(forgetting) / len(forgetting), "after_each_domain": after}


def report(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    print("\n| order | preset | all | mnist | fashion-mnist | cifar10 | forgetting | domain purity | class purity "
          "| seeds |\n|---|---|---|---|---|---|---|---|---|---|")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, order in zip(axes, ("interleaved", "sequence")):
        presets = [p for p in RULES if any(r["preset"] == p and r["order"] == order for r in rows)]
        for i, preset in enumerate(presets):
            sel = [r for r in rows if r["preset"] == preset and r["order"] == order]

            keys = ("test_accuracy", *DOMAINS, "forgetting", "domain_purity", "class_purity")
            cells = [mean_std([r[k] for r in sel if k in r]) for k in keys]
            print(f"| {order} | {preset} | " + " | ".join(cells) + f" | {len(sel)} |")
            means = [statistics.mean(r[d] for r in sel) for d in DOMAINS]
            ax.bar([j + 0.2 * i for j in range(3)], means, 0.2, label=preset)
        ax.set_title(order, fontsize=9)
        ax.set_xticks([j + 0.3 for j in range(3)], DOMAINS, fontsize=8)
    axes[0].set_ylabel("test accuracy (30-way)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, out / "heterogeneous.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = study_parser(__doc__, rules=",".join(RULES), epochs=3,
                          epochs_help="epochs (interleaved) or epochs per domain (sequence)")
    parser.add_argument("--orders", default="interleaved,sequence")
    args = parser.parse_args()
    out = Path(args.out)
    log = RunLog(out / "heterogeneous.jsonl", key=lambda r: (r["order"], r["preset"], r["seed"], r["epochs"]))
    data = load_dataset("union:" + ",".join(DOMAINS), args.data_dir)
    for seed in map(int, args.seeds.split(",")):
        splits = make_splits(data, seed)
        for order in args.orders.split(","):
            for preset in args.rules.split(","):
                if not log.done((order, preset, seed, args.epochs)):
                    log.add({"order": order, "preset": preset, "seed": seed, "epochs": args.epochs,
                             **run(preset, order, splits, seed, args)})
    report([r for r in log.rows if r["epochs"] == args.epochs], out)      # one budget per table


if __name__ == "__main__":
    main()
