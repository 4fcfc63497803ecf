"""How each rule's default settings were chosen: a grid on digits, selected on validation accuracy.

    python benchmarks/defaults.py --out docs/defaults

Grid: Adam lr {3e-4, 1e-3, 3e-3} x epochs {20, 30, 40}, 3 seeds, each rule on the model it trains by default.
With a constant learning rate, the first E epochs of a 40-epoch run *are* the E-epoch run (same shuffles, same
steps), so one 40-epoch run per (rule, lr, seed) gives all three epoch budgets. Writes defaults.json and prints a
markdown table; the chosen setting per rule is the best mean validation accuracy (test is reported beside it,
never used to choose).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from torchsal import load_dataset, make_config, make_splits, train

LRS = (3e-4, 1e-3, 3e-3)
EPOCHS = (20, 30, 40)
SEEDS = (0, 1, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/defaults")
    parser.add_argument("--rules", default="bp,fa,dfa,sal")
    args = parser.parse_args()
    dataset = load_dataset("digits")
    splits = {seed: make_splits(dataset, seed) for seed in SEEDS}
    rows = []
    for rule in args.rules.split(","):
        for lr in LRS:
            histories = [train(make_config(rule, lr=lr, epochs=max(EPOCHS), seed=seed), splits=splits[seed],
                               progress=False).metrics["history"] for seed in SEEDS]
            for epochs in EPOCHS:
                val = [h[epochs - 1]["val_accuracy"] for h in histories]
                test = [h[epochs - 1]["test_accuracy"] for h in histories]
                rows.append({"rule": rule, "lr": lr, "epochs": epochs,
                             "val_mean": statistics.mean(val), "val_std": statistics.stdev(val),
                             "test_mean": statistics.mean(test), "test_std": statistics.stdev(test)})
                print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "defaults.json").write_text(json.dumps(rows, indent=2) + "\n")
    best = {}
    for r in rows:
        if r["rule"] not in best or r["val_mean"] > best[r["rule"]]["val_mean"]:
            best[r["rule"]] = r
    print("\n| rule | lr | epochs | val (mean ± std) | test (mean ± std) | chosen |\n|---|---|---|---|---|---|")
    for r in rows:
        mark = "**yes**" if best[r["rule"]] is r else ""
        print(f"| {r['rule']} | {r['lr']:g} | {r['epochs']} | {r['val_mean']:.4f} ± {r['val_std']:.4f} | "
              f"{r['test_mean']:.4f} ± {r['test_std']:.4f} | {mark} |")


if __name__ == "__main__":
    main()
