"""Continual learning: split-MNIST, split-Fashion-MNIST (5 tasks of 2 classes) and permuted-MNIST (10 tasks), for
bp, dfa and sal with the same total parameters (bp and dfa on a dense network as wide as SAL's 16-area model).
Any benchmark preset runs too: ``--rules bp-areas`` (backprop on SAL's routed model) separates what the routing
does from what SAL's learning rule does.

    python benchmarks/continual.py --data-dir ../shared/data --seeds 0,1,2 --epochs 2 --out docs/science
    python benchmarks/continual.py --methods naive,ewc,si,replay,lwf --rules bp,sal --protocols split-mnist-domain \
        --data-dir ../shared/data --seeds 0 --epochs 2 --out docs/continual

Methods (torchsal.continual_methods): naive (plain fine-tuning), ewc, online-ewc, si, replay (a class-balanced
buffer of --replay-per-task samples per finished task), lwf. Each strength is chosen from GRIDS on the validation
parts of the first tasks (seed 0; OUT/selection.json), never on test. Runs already in OUT/continual.jsonl are kept,
so an interrupted study resumes.

Writes continual.md, continual.png and matrices-<protocol>.png from the runs in continual.jsonl, and prints average
accuracy and forgetting (mean ± std over seeds), class-incremental and task-incremental (for permuted tasks the
two coincide: every task uses all ten classes). Routing never sees task identity. See torchsal/continual.py for
the definitions.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from study import RunLog, mean_std, study_parser

from torchsal import load_dataset, make_splits
from torchsal.bench import matched_width, preset_config, save_png
from torchsal.continual import permuted_tasks, run_sequence, split_tasks
from torchsal.continual_methods import EWC, SI, LwF, Replay


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


PROTOCOLS = {"split-mnist": ("mnist", "split"), "split-fashion-mnist": ("fashion-mnist", "split"),
             "permuted-mnist": ("mnist", "permuted"), "split-mnist-domain": ("mnist", "split-domain"),
             "split-fashion-mnist-domain": ("fashion-mnist", "split-domain")}


def label(row: dict) -> str:
    """A rule, and its continual-learning method unless plain fine-tuning ("naive")."""
    method = row.get("method", "naive")
    return row["rule"] if method == "naive" else f"{row['rule']} + {method}"


def make_method(name: str, strength: float | None, args, seed: int):  # noqa: ANN001, ANN201
    methods = {"naive": lambda: None, "ewc": lambda: EWC(strength), "online-ewc": lambda: EWC(strength, decay=0.9),
               "si": lambda: SI(strength), "replay": lambda: Replay(args.replay_per_task, seed=seed),
               "lwf": lambda: LwF(strength)}
    return methods[name]()


# Strengths tried per method, chosen on validation (never test): the main metric of the protocol's scenario,
# averaged over the first SELECTION_TASKS tasks after training them, seed 0.
GRIDS = {"ewc": (10.0, 100.0, 1000.0, 10000.0), "online-ewc": (10.0, 100.0, 1000.0, 10000.0),
         "si": (0.1, 1.0, 10.0), "lwf": (0.5, 1.0, 2.0)}
SELECTION_TASKS = 3


# The recipe check: Avalanche's continual-learning-baselines for permuted-MNIST, bp only, one recipe per method
# (their experiments/permuted_mnist/{ewc,synaptic_intelligence}.py): EWC on a 784-512-10 MLP with plain SGD
# lr 1e-3, SI on 784-1000-10 with Adam lr 1e-3, both batch 256 and 10 epochs per task, and each with fine-tuning
# alone on the same recipe. Their strengths are kept, in our convention: Avalanche adds lambda * sum F d^2 to the
# loss, our EWC strength s adds s/2 * sum F d^2 (so s = 2 lambda); both SIs add lambda * sum Omega d^2.
AVALANCHE = {"ewc": ({"width": 512, "optimizer": "sgd", "lr": 1e-3, "batch_size": 256}, 2.0),
             "si": ({"width": 1000, "optimizer": "adam", "lr": 1e-3, "batch_size": 256}, 10.0)}
AVALANCHE_EPOCHS = 10


def main_metric(protocol: str) -> str:
    """Split protocols are judged class-incrementally (the hard scenario); domain and permuted ones have one."""
    return "class_incremental" if protocol in ("split-mnist", "split-fashion-mnist") else "task_incremental"


def choose_strength(protocol: str, rule: str, method: str, tasks, config, args, selection: dict) -> float | None:  # noqa: ANN001
    if method not in GRIDS:
        return None
    key = f"{protocol}/{rule}/{method}"
    if key not in selection:
        scores = {}
        for strength in GRIDS[method]:
            result = run_sequence(config, tasks[:SELECTION_TASKS], make_method(method, strength, args, 0), part="val")
            scores[strength] = result[main_metric(protocol)]["average"]
        selection[key] = {"scores": scores, "chosen": max(scores, key=scores.get)}
    return selection[key]["chosen"]


def save_selection(path: Path, selection: dict) -> None:
    """Merge this process's choices into the stored ones and replace the file atomically, so processes running
    different rules of one study (one per core) share it without losing each other's entries."""
    stored = json.loads(path.read_text()) if path.is_file() else {}
    selection.update({k: v for k, v in stored.items() if k not in selection})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(selection, indent=1) + "\n")
    tmp.replace(path)


def recipe_check(args, log: RunLog) -> None:  # noqa: ANN001
    """bp on Avalanche's permuted-MNIST recipes (AVALANCHE), each method beside fine-tuning on the same recipe."""
    data = load_dataset("mnist", args.data_dir)
    for seed in map(int, args.seeds.split(",")):
        splits = make_splits(data, seed)
        tasks = permuted_tasks(splits, 10, seed)
        for reference, (settings, strength) in AVALANCHE.items():
            for method in ("naive", reference):
                recipe = f"avalanche-{reference}"
                if log.done(("permuted-mnist", "bp", seed, AVALANCHE_EPOCHS, method, recipe)):
                    continue
                config = preset_config("bp", epochs=AVALANCHE_EPOCHS, seed=seed, threads=args.threads, **settings)
                start = time.perf_counter()
                result = run_sequence(config, tasks, make_method(method, strength, args, seed))
                log.add({"protocol": "permuted-mnist", "rule": "bp", "seed": seed, "width": settings["width"],
                         "method": method, "strength": strength if method != "naive" else None,
                         "epochs_per_task": AVALANCHE_EPOCHS, "recipe": recipe,
                         "seconds": round(time.perf_counter() - start, 1), **result})
    (Path(args.out) / "avalanche.md").write_text(avalanche_table(log.rows))


def avalanche_table(rows: list[dict]) -> str:
    """The recipe check: each Avalanche recipe with fine-tuning alone and with its method, beside their 0.83."""
    lines = ["| recipe (Avalanche's) | method | strength (ours) | average accuracy | forgetting | Avalanche |",
             "|---|---|---|---|---|---|"]
    for reference, (settings, strength) in AVALANCHE.items():
        model = (f"784-{settings['width']}-10, {settings['optimizer']} lr {settings['lr']:g}, batch "
                 f"{settings['batch_size']}, {AVALANCHE_EPOCHS} epochs per task")
        for method in ("naive", reference):
            runs = [r for r in rows if r.get("recipe") == f"avalanche-{reference}" and r["method"] == method]
            if runs:
                values = [r["task_incremental"] for r in runs]
                lines.append(f"| {model} | {method} [{len(runs)}] | {strength if method != 'naive' else ''} | "
                             f"{mean_std([v['average'] for v in values], 3)} | "
                             f"{mean_std([v['forgetting'] for v in values], 3)} | "
                             f"{'0.83' if method != 'naive' else ''} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Average final accuracy and forgetting per protocol and rule (mean and std over seeds), both evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols, rules = list(dict.fromkeys(r["protocol"] for r in rows)), list(dict.fromkeys(label(r) for r in rows))
    fig, axes = plt.subplots(2, 2, figsize=(9, 5.5), sharex=True)
    bar = 0.8 / len(rules)
    for col, ev in enumerate(("class_incremental", "task_incremental")):
        for row, key in enumerate(("average", "forgetting")):
            ax = axes[row][col]
            for i, rule in enumerate(rules):
                values = [[r[ev][key] for r in rows if r["protocol"] == p and label(r) == rule] for p in protocols]
                means = [statistics.mean(v) if v else float("nan") for v in values]      # nan: not run
                ax.bar([j + bar * i for j in range(len(protocols))], means, bar, yerr=[spread(v) for v in values],
                       label=rule)
            ax.set_title(f"{ev.replace('_', '-')}: {key}", fontsize=9)
            ax.set_xticks([j + bar * (len(rules) - 1) / 2 for j in range(len(protocols))], protocols, fontsize=8)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict], protocol: str) -> str:
    """The doc's table for one protocol: per rule and method the chosen strength, then average accuracy and
    forgetting (mean ± std over seeds; seeds done in brackets) in each of the protocol's scenarios."""
    scenarios = ["class_incremental", "task_incremental"] if main_metric(protocol) == "class_incremental" \
        else ["task_incremental"]
    names = {"class_incremental": "class-incremental", "task_incremental": "task-incremental" if protocol.startswith(
        "split-") and not protocol.endswith("-domain") else "domain-incremental" if protocol.endswith("-domain")
        else "permuted"}
    head = ["rule", "method", "strength (chosen on validation)"] + [
        f"{names[s]}: {k}" for s in scenarios for k in ("average", "forgetting")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    present = list(dict.fromkeys(r["rule"] for r in rows if r["protocol"] == protocol))
    for rule in sorted(present, key=lambda name: (["bp", "sal", "dfa"] + present).index(name)):
        for method in dict.fromkeys(r.get("method", "naive") for r in rows if r["protocol"] == protocol):
            runs = [r for r in rows if r["protocol"] == protocol and r["rule"] == rule
                    and r.get("method", "naive") == method]
            if not runs:
                continue
            strength = "" if runs[0]["strength"] is None else f"{runs[0]['strength']:g}"
            cells = [mean_std([r[s][k] for r in runs], 3) for s in scenarios for k in ("average", "forgetting")]
            lines.append(f"| {rule} | {method} [{len(runs)}] | {strength} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_matrices(rows: list[dict], protocol: str, path: Path) -> None:
    """The accuracy matrix of every rule and method (mean over seeds) in the protocol's main scenario: row i is
    the accuracy on each task after training task i, so forgetting shows as fading columns below the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluation = main_metric(protocol)
    labels = list(dict.fromkeys(label(r) for r in rows if r["protocol"] == protocol))
    if not labels:
        return
    columns = min(4, len(labels))
    lines = -(-len(labels) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(2.6 * columns, 2.5 * lines), squeeze=False)
    for ax, name in zip(axes.flat, labels):
        runs = [r[evaluation]["accuracy"] for r in rows if r["protocol"] == protocol and label(r) == name]
        mean = [[statistics.mean(run[i][j] for run in runs) for j in range(len(runs[0]))] for i in range(len(runs[0]))]
        ax.imshow(mean, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"{name} [{len(runs)}]: {statistics.mean(mean[-1]):.2f}", fontsize=8)
        ax.set_xlabel("task evaluated", fontsize=7)
        ax.set_ylabel("after training task", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    scenario = "every task ten-way" if protocol.startswith("permuted") else evaluation.replace("_", "-")
    fig.suptitle(f"{protocol}, {scenario}: accuracy matrices (mean over [seeds]; title: final "
                 "average)", fontsize=9)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = study_parser(__doc__, rules="bp,dfa,sal", epochs=2, epochs_help="epochs per task")
    parser.add_argument("--protocols", default="split-mnist,split-fashion-mnist,permuted-mnist")
    parser.add_argument("--methods", default="naive", help="naive, ewc, online-ewc, si, replay, lwf")
    parser.add_argument("--replay-per-task", type=int, default=200, help="samples kept per finished task")
    parser.add_argument("--recipe", choices=("study", "avalanche"), default="study",
                        help="avalanche: the recipe check, bp on Avalanche's permuted-MNIST EWC and SI recipes")
    args = parser.parse_args()
    out = Path(args.out)
    selection_path = out / "selection.json"
    selection = json.loads(selection_path.read_text()) if selection_path.is_file() else {}
    log = RunLog(out / "continual.jsonl", key=lambda r: (r["protocol"], r["rule"], r["seed"], r["epochs_per_task"],
                                                         r.get("method", "naive"), r.get("recipe", "study")))
    if args.recipe == "avalanche":
        recipe_check(args, log)
        return
    for protocol in args.protocols.split(","):
        dataset, kind = PROTOCOLS[protocol]
        data = load_dataset(dataset, args.data_dir)
        for seed in map(int, args.seeds.split(",")):
            splits = make_splits(data, seed)
            tasks = (split_tasks(splits, domain=kind == "split-domain") if kind.startswith("split")
                     else permuted_tasks(splits, 10, seed))
            for rule in args.rules.split(","):
                for method in args.methods.split(","):
                    if log.done((protocol, rule, seed, args.epochs, method, "study")):
                        continue
                    routed = preset_config(rule).model.routing_config.areas > 1
                    classes = tasks[0][0].num_classes
                    width = 256 if routed else matched_width(splits.in_features, classes, {})  # same parameters
                    config = preset_config(rule, epochs=args.epochs, seed=seed, threads=args.threads, width=width)
                    select_config = preset_config(rule, epochs=args.epochs, seed=0, threads=args.threads, width=width)
                    strength = choose_strength(protocol, rule, method, tasks, select_config, args, selection)
                    save_selection(selection_path, selection)
                    start = time.perf_counter()
                    result = run_sequence(config, tasks, make_method(method, strength, args, seed))
                    log.add({"protocol": protocol, "rule": rule, "seed": seed, "width": width, "method": method,
                             "strength": strength, "epochs_per_task": args.epochs,
                             "seconds": round(time.perf_counter() - start, 1), **result})
    rows = [r for r in log.rows if r["epochs_per_task"] == args.epochs and r.get("recipe", "study") == "study"]
    plot(rows, out / "continual.png")
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        plot_matrices(rows, protocol, out / f"matrices-{protocol}.png")
    (out / "continual.md").write_text("\n".join(f"**{p}**\n\n{markdown(rows, p)}"
                                                for p in dict.fromkeys(r["protocol"] for r in rows)))
    print("\n| protocol | rule | evaluation | average accuracy | forgetting |\n|---|---|---|---|---|")
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        for rule in dict.fromkeys(label(r) for r in rows):
            for ev in ("class_incremental", "task_incremental"):
                sel = [r[ev] for r in rows if r["protocol"] == protocol and label(r) == rule]
                if not sel:
                    continue
                avg, fgt = [s["average"] for s in sel], [s["forgetting"] for s in sel]
                print(f"| {protocol} | {rule} | {ev.replace('_', '-')} | {mean_std(avg)} | {mean_std(fgt)} |")


if __name__ == "__main__":
    main()
