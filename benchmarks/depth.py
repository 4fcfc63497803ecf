"""Depth benchmark: accuracy, time per epoch and peak activation memory against depth.

    python benchmarks/depth.py memory   --depths 8,32,128 --out docs/depth        # minutes
    python benchmarks/depth.py accuracy --depths 2,8,32,128 --datasets mnist,fashion-mnist \\
        --rules bp,dfa,sal-direct,sal-local --seeds 0,1,2 --epochs 3 --data-dir ../shared/data --out docs/depth

Models: residual pre-norm blocks (LayerNorm) of a fixed width, one area set per layer (16 areas, shared path) for
the SAL presets and the dense model for bp/dfa, as in docs/depth.md.

Peak activation memory: the peak bytes of tensors that autograd holds for backward during one training step
(``torchsal.diagnostics.ActivationMeter``), parameters excluded: exactly what a step needs beyond parameters,
gradients and optimizer state. We first tried process RSS (a fresh process per depth, high-water mark reset after
a warm-up step) and dropped it: the allocator reuses freed gradient blocks, so RSS hid most of the growth.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from study import RunLog, mean_std

PRESETS = {
    "bp": {"rule": "bp", "areas": 1, "shared": False},
    "dfa": {"rule": "dfa", "areas": 1, "shared": False},
    "sal-direct": {"rule": "sal", "signal": "direct"},
    "sal-local": {"rule": "sal", "signal": "local", "readout": "single"},
    "sal-lean": {"rule": "sal", "signal": "local", "readout": "single", "memory": "lean"},
}
DEEP = {"block": "residual", "norm": "layer"}


def deep_config(preset: str, depth: int, width: int, batch: int, **extra):  # noqa: ANN201
    """The run config of ``preset`` on the deep model: ``depth`` residual pre-norm blocks of ``width``."""
    from torchsal import make_config
    from torchsal.config import resolve_areas

    settings = {**DEEP, **PRESETS[preset], "depth": depth, "width": width, "batch_size": batch, **extra}
    return resolve_areas(make_config(settings.pop("rule"), **settings), 60_000)     # MNIST-sized: 16 areas


def measure_memory(preset: str, depth: int, width: int, batch: int) -> dict:
    """Peak activation bytes of one training step (``torchsal.diagnostics.ActivationMeter``)."""
    import torch

    from torchsal import build_model, build_rule
    from torchsal.diagnostics import ActivationMeter

    config = deep_config(preset, depth, width, batch)
    model = build_model(784, 10, config.model)
    rule = build_rule(model, config.rule)
    x, y = torch.randn(batch, 784, generator=torch.Generator().manual_seed(0)), torch.arange(batch) % 10
    meter = ActivationMeter(model)
    with meter.measure():
        rule(model, x, y).loss.backward()
    return {"preset": preset, "depth": depth, "width": width, "batch": batch,
            "params": sum(p.numel() for p in model.parameters()), "activation_mib": meter.peak_bytes / 2**20}


def timing(args: argparse.Namespace) -> list[dict]:
    """Seconds per training step (median of 20 after warm-up) per preset and depth, on MNIST-shaped random
    batches: a clean time per epoch (54,000 MNIST training rows; the accuracy runs share the machine)."""
    import time

    import torch

    from torchsal import build_model, build_rule
    from torchsal.dispatch import release_gradients
    from torchsal.train import make_optimizer

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    x, y = torch.randn(args.batch, 784, generator=torch.Generator().manual_seed(0)), torch.arange(args.batch) % 10
    for preset in args.rules.split(","):
        for depth in map(int, args.depths.split(",")):
            config = deep_config(preset, depth, args.width, args.batch)
            model = build_model(784, 10, config.model)
            rule = build_rule(model, config.rule)
            optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config.train)
            times = []
            for _ in range(23):
                start = time.perf_counter()
                release_gradients(model.parameters())
                rule(model, x, y).loss.backward()
                optimizer.step()
                times.append(time.perf_counter() - start)
            step = statistics.median(times[3:])
            rows.append({"preset": preset, "depth": depth, "width": args.width, "batch": args.batch,
                         "seconds_per_step": step, "seconds_per_mnist_epoch": step * math.ceil(54_000 / args.batch)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def memory(args: argparse.Namespace) -> list[dict]:
    rows = []
    for preset in args.rules.split(","):
        for depth in map(int, args.depths.split(",")):
            rows.append(measure_memory(preset, depth, args.width, args.batch))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def accuracy(args: argparse.Namespace) -> list[dict]:
    """Train every (dataset, seed, preset, depth) cell; rows are appended to ``accuracy.jsonl`` as they finish, so
    an interrupted run resumes where it stopped and finished cells are not redone."""
    from torchsal import load_dataset, make_splits, train

    log = RunLog(Path(args.out) / "accuracy.jsonl",
                 key=lambda r: (r["dataset"], r["preset"], r["depth"], r["seed"], r["epochs"], r["width"]))
    for dataset in args.datasets.split(","):
        data = load_dataset(dataset, args.data_dir)
        for seed in map(int, args.seeds.split(",")):
            splits = make_splits(data, seed)
            for preset in args.rules.split(","):
                for depth in map(int, args.depths.split(",")):
                    if log.done((dataset, preset, depth, seed, args.epochs, args.width)):
                        continue
                    config = deep_config(preset, depth, args.width, args.batch, seed=seed, epochs=args.epochs,
                                         threads=args.threads)
                    m = train(config, splits=splits, progress=False).metrics
                    log.add({"dataset": dataset, "preset": preset, "depth": depth, "seed": seed,
                             "width": args.width, "batch": args.batch, "epochs": m["epochs"],
                             "test_accuracy": m["test_accuracy"], "val_accuracy": m["val_accuracy"],
                             "seconds_per_epoch": m["train_seconds"] / m["epochs"]})
    return log.rows


def plot(rows: list[dict], key: str, ylabel: str, path: Path, group: str = "preset") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from torchsal.bench import save_png

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name in dict.fromkeys(r[group] for r in rows):
        depths = sorted({r["depth"] for r in rows if r[group] == name})
        means = [statistics.mean(r[key] for r in rows if r[group] == name and r["depth"] == d) for d in depths]
        ax.plot(depths, means, marker="o", label=name)
    ax.set(xscale="log", xlabel="hidden layers (depth)", ylabel=ylabel)
    ax.set_xticks(sorted({r["depth"] for r in rows}), [str(d) for d in sorted({r["depth"] for r in rows})])
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def report(out: Path) -> None:
    """Tables (mean ± std over seeds) and plots from every finished cell in ``OUT/accuracy.jsonl`` and, if
    measured, the clean step times in ``OUT/timing.json``."""
    rows = [json.loads(line) for line in (out / "accuracy.jsonl").read_text().splitlines()]
    if (out / "timing.json").exists():
        timing = json.loads((out / "timing.json").read_text())
        plot(timing, "seconds_per_mnist_epoch", "seconds per MNIST epoch (1 thread)", out / "time.png")
        depths = sorted({r["depth"] for r in timing})
        print("\nseconds per MNIST epoch (54,000 rows), one thread, quiet machine\n")
        print("| preset | " + " | ".join(f"depth {d}" for d in depths) + " |\n|---|" + "---|" * len(depths))
        for preset in dict.fromkeys(r["preset"] for r in timing):
            print(f"| {preset} | " + " | ".join(f"{r['seconds_per_mnist_epoch']:.1f}" for r in timing
                                               if r["preset"] == preset) + " |")
    depths = sorted({r["depth"] for r in rows})
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        subset = [r for r in rows if r["dataset"] == dataset]
        plot(subset, "test_accuracy", f"test accuracy ({dataset})", out / f"accuracy-{dataset}.png")
        print(f"\n{dataset}: test accuracy, mean ± std over seeds (number of seeds)\n")
        print("| preset | " + " | ".join(f"depth {d}" for d in depths) + " |\n|---|" + "---|" * len(depths))
        for preset in dict.fromkeys(r["preset"] for r in subset):
            cells = []
            for d in depths:
                cell = [r for r in subset if r["preset"] == preset and r["depth"] == d]
                cells.append(f"{mean_std([r['test_accuracy'] for r in cell])} ({len(cell)})" if cell else "–")
            print(f"| {preset} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description="depth benchmark")
    parser.add_argument("part", choices=["memory", "accuracy", "timing", "report"])
    parser.add_argument("--depths", default="2,8,32,128")
    parser.add_argument("--rules", default="bp,dfa,sal-direct,sal-local,sal-lean")
    parser.add_argument("--datasets", default="mnist,fashion-mnist")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default="docs/depth")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "report":
        report(out)
        return
    rows = {"memory": memory, "accuracy": accuracy, "timing": timing}[args.part](args)
    if args.part != "accuracy":                 # (the accuracy rows are in accuracy.jsonl already)
        (out / f"{args.part}.json").write_text(json.dumps(rows, indent=2) + "\n")
    if args.part == "memory":
        plot(rows, "activation_mib", "peak activation memory (MiB)", out / "memory.png")
        print("\n| preset | " + " | ".join(f"depth {d}" for d in sorted({r['depth'] for r in rows})) + " |")
        for preset in dict.fromkeys(r["preset"] for r in rows):
            cells = [f"{r['activation_mib']:.1f}" for r in sorted(rows, key=lambda r: r["depth"])
                     if r["preset"] == preset]
            print(f"| {preset} | " + " | ".join(cells) + " |")
    elif args.part == "accuracy":
        for dataset in dict.fromkeys(r["dataset"] for r in rows):
            subset = [r for r in rows if r["dataset"] == dataset]
            plot(subset, "test_accuracy", f"test accuracy ({dataset})", out / f"accuracy-{dataset}.png")


if __name__ == "__main__":
    main()
