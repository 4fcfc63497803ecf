"""Mixed precision on MNIST: accuracy and training time of ``--precision bf16-mixed`` against fp32, 3 seeds.

    python benchmarks/precision.py --data-dir ../shared/data --out docs/performance/precision   # ~15 min, 2 cores

The models and hyper-parameters are the tuned recipe's MNIST choices (docs/results.md): SAL with 16 areas, shared
path, layer routing, local signal, AdamW lr 3e-3; BP on the dense MLP, AdamW lr 1e-3; 10 epochs, batch 64, cosine.
Each run is its own process on one thread (two at a time on two cores) and writes ``OUT/<name>.json``, so an
interrupted study resumes where it stopped. Training seconds are comparable only within one machine and load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RUNS = {
    "sal": {"rule": "sal", "areas": 16, "shared": True, "routing": "layer", "signal": "local", "lr": 3e-3},
    "bp": {"rule": "bp", "areas": 1, "shared": False, "lr": 1e-3},
}
COMMON = {"dataset": "mnist", "depth": 1, "width": 256, "epochs": 10, "batch_size": 64, "optimizer": "adamw",
          "weight_decay": 0.0, "schedule": "cosine", "threads": 1}
CHILD = """
import json, sys
from torchsal import make_config, train
settings = json.loads(sys.argv[1])
result = train(make_config(settings.pop("rule"), **settings), progress=False)
print(json.dumps({k: result.metrics[k] for k in ("test_accuracy", "val_accuracy", "train_seconds")}))
"""


def run_one(out: Path, name: str, settings: dict) -> dict:
    path = out / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)], check=True, capture_output=True,
                          text=True)
    result = {**json.loads(done.stdout.splitlines()[-1]), "settings": settings}
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(name, result["test_accuracy"], f"{result['train_seconds']:.0f} s", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/performance/precision"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = {f"{rule}-{precision}-s{seed}": {**COMMON, **settings, "precision": precision, "seed": seed,
                                           **({"data_dir": args.data_dir} if args.data_dir else {})}
            for rule, settings in RUNS.items() for precision in ("fp32", "bf16-mixed") for seed in range(args.seeds)}
    with ThreadPoolExecutor(args.workers) as pool:
        results = dict(zip(jobs, pool.map(lambda item: run_one(args.out, *item), jobs.items()), strict=True))
    print("\n| rule | precision | test accuracy (mean ± std, 3 seeds) | train seconds (mean) | time / fp32 |")
    print("|---|---|---|---|---|")
    summary = {}
    for rule in RUNS:
        base = None
        for precision in ("fp32", "bf16-mixed"):
            rows = [results[f"{rule}-{precision}-s{s}"] for s in range(args.seeds)]
            acc = [r["test_accuracy"] for r in rows]
            seconds = statistics.mean(r["train_seconds"] for r in rows)
            base = base or seconds
            summary[f"{rule}-{precision}"] = {"accuracy_mean": statistics.mean(acc), "accuracy_std":
                                              statistics.stdev(acc) if len(acc) > 1 else 0.0, "seconds": seconds}
            print(f"| {rule} | {precision} | {100 * statistics.mean(acc):.2f} ± "
                  f"{100 * summary[f'{rule}-{precision}']['accuracy_std']:.2f} | {seconds:.0f} | "
                  f"{seconds / base:.2f} |")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
