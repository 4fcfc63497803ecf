"""What a SAL training step costs against a BP step, regime by regime, and how far both are from the machine.

    python benchmarks/speed.py                                   # every regime, ~3 min on a quiet 2-core machine
    python benchmarks/speed.py --regimes paper,wide --rounds 9 --out docs/performance/speed.json
    python benchmarks/speed.py --regimes none --whole-run --data-dir ../shared/data      # K=16 against K=1, CLI
    python benchmarks/speed.py --precision-speedup                # bf16-mixed against fp32, BP and SAL
    python benchmarks/speed.py --compile        # with --compile (a C++ compiler at run time): the fastest SAL step

For each regime the trainer's own step (``Trainer.train_step``: batch gather, rule, backward, optimizer, scheduler,
metrics) runs for BP on the dense model and for SAL (16 areas, local signal) without and with the shared path,
timed **in turns** in one process (BP, SAL, SAL shared, BP, ...) on random batches of MNIST's shape; each time is
the median over rounds of the mean step time of a round, and each ratio the median over rounds of the ratio
within a round (a round's steps share the host's drift). SAL's step is then split with the PyTorch profiler into
routing, dispatch (grouping rows by area and restoring their order), matmuls, compiled (under ``--compile``:
what torch.compile generated, with its guards and wrappers), optimizer and other (elementwise work, losses,
autograd bookkeeping, Python), scaled to the measured step.

The physical floor of each step is ``max(FLOPs / matmul rate, bytes / bandwidth)``: matmul FLOPs of the forward
and update (and, for BP, input-gradient) products at the rate measured on the regime's own dense matmul, and the
bytes the step must move (weights read, the update's traffic: no weight gradient, which can be formed in cache
and consumed there) at the measured streaming bandwidth (the fastest of a copy, a scale and an add over 256 MB:
scale.stream_bandwidth).
For SAL the bytes count every *touched* area (the expected number of distinct areas a batch of B uniform samples
hits, ``K (1 - (1 - 1/K)^B)``): each must be read, and its update written.

``--whole-run`` times whole ``torchsal train`` commands (data loading, training, evaluation, in fresh processes,
in turns) on MNIST at width 1024, batch 1024, plain SGD, for SAL with K=16 and with K=1 (no shared path).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scale import MATMULS, ancestors, median_seconds, stream_bandwidth  # benchmarks/scale.py: shared helpers
from torch.profiler import ProfilerActivity, profile

from torchsal import make_config
from torchsal.data import Splits
from torchsal.train import Trainer

FEATURES, CLASSES = 784, 10
# Bytes an optimizer step moves per updated element (fp32): read and write p (and Adam's two moments). The weight
# gradient need not reach memory: formed in cache and consumed there (as SAL's is: optim.updates_in_backward).
OPTIMIZER_BYTES = {"sgd": 2 * 4, "adam": 6 * 4, "adamw": 6 * 4}
# Kernels of an optimizer's update wherever they run (fused Adam steps an area inside SAL's update).
OPTIMIZER_KERNELS = ("aten::_fused_adam_", "aten::_fused_adamw_", "aten::_fused_sgd_")


@dataclass(frozen=True)
class Regime:
    name: str
    depth: int
    width: int
    batch: int
    optimizer: str
    extra: dict[str, Any] = field(default_factory=dict)
    steps: int = 20                  # steps per timed round


REGIMES = {r.name: r for r in (
    Regime("paper", 1, 256, 16, "sgd", steps=100),
    Regime("tuned", 1, 256, 64, "adamw", {"weight_decay": 1e-4}, steps=50),
    Regime("deep", 128, 64, 128, "adam", {"block": "residual", "norm": "layer"}, steps=5),
    Regime("wide", 2, 1024, 1024, "adam", steps=3),
    Regime("wide-sgd", 2, 1024, 1024, "sgd", steps=3),
)}

VARIANTS = {"bp": ("bp", {"areas": 1, "shared": False}),
            "sal": ("sal", {"areas": 16, "shared": False, "signal": "local"}),
            "sal-shared": ("sal", {"areas": 16, "shared": True, "signal": "local"})}


def random_splits(batch: int, seed: int = 0) -> Splits:
    """MNIST-shaped random data, a few batches' worth (the step gathers its batch from it as training does)."""
    g = torch.Generator().manual_seed(seed)
    n = max(4 * batch, 256)
    x, y = torch.randn(n, FEATURES, generator=g), torch.randint(CLASSES, (n,), generator=g)
    return Splits(x, y, x[:64], y[:64], x[:64], y[:64], [str(c) for c in range(CLASSES)],
                  np.zeros(FEATURES), np.ones(FEATURES))


def make_trainer(regime: Regime, variant: str, precision: str, device: str, compile_: bool = False) -> Trainer:
    rule, settings = VARIANTS[variant]
    config = make_config(rule, depth=regime.depth, width=regime.width, batch_size=regime.batch,
                         optimizer=regime.optimizer, lr=1e-4, epochs=1, device=device, compile=compile_,
                         **regime.extra, **settings, **({"precision": precision} if precision != "fp32" else {}))
    return Trainer(config, random_splits(regime.batch))


class Stepper:
    """Runs a trainer's real training step on a rotating set of batches."""

    def __init__(self, trainer: Trainer, batch: int) -> None:
        self.trainer = trainer
        order = torch.randperm(len(trainer.y_train), generator=torch.Generator().manual_seed(1))
        self.batches = [b.to(trainer.device) for b in order.split(batch) if len(b) == batch]
        self.i = 0

    def __call__(self, steps: int = 1) -> None:
        for _ in range(steps):
            self.trainer.train_step(self.batches[self.i % len(self.batches)])
            self.i += 1
        if self.trainer.device.type == "cuda":
            torch.cuda.synchronize()


def in_turns(steppers: dict[str, Stepper], rounds: int, steps: int) -> dict[str, float]:
    """Median over rounds of the mean step time, each round timing every stepper in turn."""
    return {name: statistics.median(t) for name, t in rounds_in_turns(steppers, rounds, steps).items()}


def rounds_in_turns(steppers: dict[str, Stepper], rounds: int, steps: int) -> dict[str, list[float]]:
    """The mean step time of every round, each round timing every stepper in turn."""
    for s in steppers.values():
        s(max(2, steps // 2))                       # warm-up: allocations, optimizer state, caches
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, s in steppers.items():
            start = time.perf_counter()
            s(steps)
            times[name].append((time.perf_counter() - start) / steps)
    return times


def paired_ratio(times: dict[str, list[float]], variant: str, baseline: str = "bp") -> float:
    """Median over rounds of ``variant``'s step time over ``baseline``'s in the same round: this host's speed
    drifts by 20-30% within minutes, and a round's neighbours share its drift (a ratio of medians does not)."""
    return statistics.median(v / b for v, b in zip(times[variant], times[baseline]))


# Where a SAL step's time goes; "compiled": what --compile generated and runs (its kernels, guards, wrappers).
SPLIT = ("routing", "dispatch", "matmuls", "compiled", "optimizer", "other")
COMPILED = ("## Call CompiledFxGraph", "Torch-Compiled Region", "TorchDynamo Cache Lookup", "AOTDispatcher",
            "Pregraph bytecode")


def category(event) -> str:
    above = [event.name, *ancestors(event)]
    if event.name in OPTIMIZER_KERNELS or any(n.startswith("Optimizer.") for n in above):
        return "optimizer"
    if any(n.startswith(COMPILED) for n in above):
        return "compiled"
    if "torchsal.route" in above:
        return "routing"
    if event.name in MATMULS:
        return "matmuls"
    if "torchsal.dispatch" in above:
        return "dispatch"
    return "other"


def profile_split(stepper: Stepper, wall: float, steps: int) -> dict[str, float]:
    """Seconds per step by category: profiler self-time shares scaled to the measured step ``wall``."""
    stepper(2)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        stepper(steps)
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        totals[category(event)] += event.self_cpu_time_total
    total = sum(totals.values()) or 1.0
    return {name: wall * totals.get(name, 0.0) / total
            for name in SPLIT}


# ----------------------------------------------------------------------------------------------- the floor
def _synced(fn, *args) -> None:
    fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def matmul_rate(rows: int, n_in: int, n_out: int, device: str) -> float:
    """FLOP/s of the regime's own dense matmul shape (batch x in -> out)."""
    a, b = torch.randn(rows, n_in, device=device), torch.randn(n_out, n_in, device=device)
    reps = max(1, int(2e8 // (2 * rows * n_in * n_out)))
    seconds = median_seconds(lambda: _synced(lambda: [a @ b.T for _ in range(reps)]), 7) / reps
    return 2 * rows * n_in * n_out / seconds


def touched_areas(areas: int, batch: int) -> float:
    return areas * (1 - (1 - 1 / areas) ** batch)


def floor(regime: Regime, variant: str, rate: float, bandwidth: float) -> dict[str, float]:
    """Lower bound of a step from its matmul FLOPs and the bytes it must move (fp32)."""
    sizes = [FEATURES] + [regime.width] * regime.depth + [CLASSES]
    layers = list(zip(sizes, sizes[1:]))
    b, weights = regime.batch, sum(i * o for i, o in layers)
    opt = OPTIMIZER_BYTES[regime.optimizer]
    if variant == "bp":
        # forward + weight gradient everywhere, input gradient above the first layer
        flops = 2 * b * (2 * weights + sum(i * o for i, o in layers[1:]))
        moved = 4 * weights * 2 + opt * weights            # read (forward, input gradient); update
    else:
        shared = variant == "sal-shared"
        touched = touched_areas(16, b)
        flops = 2 * b * 2 * weights * (2 if shared else 1)
        paths = touched + (1 if shared else 0)
        moved = 4 * weights * paths + opt * weights * paths     # read (forward); update
    return {"flops": flops, "bytes": moved, "flop_s": flops / rate, "byte_s": moved / bandwidth,
            "floor_s": max(flops / rate, moved / bandwidth)}


# --------------------------------------------------------------------------------------------- the report
def machine() -> dict[str, Any]:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        lscpu = ""
    info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = info.get("Flags", "").split()
    return {"cpu": info.get("Model name", platform.processor()).strip(), "threads": torch.get_num_threads(),
            "amx": any(f.startswith("amx") for f in flags), "avx512_bf16": "avx512_bf16" in flags,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": torch.__version__}


def measure(name: str, args, bandwidth: float, split: bool) -> dict[str, Any]:
    """One in-turns timing of a regime (fresh trainers), with its floor and, if asked, SAL's profile split."""
    regime = REGIMES[name]
    steppers = {v: Stepper(make_trainer(regime, v, args.precision, args.device, args.compile), regime.batch)
                for v in VARIANTS}
    steps = max(1, int(regime.steps * args.scale))
    rounds = rounds_in_turns(steppers, args.rounds, steps)
    times = {v: statistics.median(t) for v, t in rounds.items()}
    rate = matmul_rate(regime.batch, regime.width, regime.width, args.device)
    row = {"regime": name, "depth": regime.depth, "width": regime.width, "batch": regime.batch,
           "optimizer": regime.optimizer, "step_s": times,
           "ratio": {v: paired_ratio(rounds, v) for v in ("sal", "sal-shared")}, "round_s": rounds,
           "matmul_flop_per_s": rate, "floor": {v: floor(regime, v, rate, bandwidth) for v in VARIANTS}}
    if split and args.device == "cpu":
        row["split_s"] = {v: profile_split(steppers[v], times[v], steps) for v in ("sal", "sal-shared")}
    print(json.dumps(row), flush=True)
    return row


def median_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated measurements of one regime: medians of the step times and of the ratios, and every ratio seen."""
    out = dict(rows[-1])
    out["step_s"] = {v: statistics.median(r["step_s"][v] for r in rows) for v in VARIANTS}
    out["ratio"] = {v: statistics.median(r["ratio"][v] for r in rows) for v in ("sal", "sal-shared")}
    out["ratio_runs"] = {v: [r["ratio"][v] for r in rows] for v in ("sal", "sal-shared")}
    return out


def run(args) -> dict[str, Any]:
    """Every regime ``--repeats`` times, the repeats spread over the whole run (this shared machine drifts by
    20-30% over minutes); each regime's table row holds the medians."""
    results = {"machine": machine(), "precision": args.precision, "compile": args.compile, "rounds": args.rounds,
               "repeats": args.repeats}
    bandwidth = stream_bandwidth(args.device)
    results["stream_bandwidth_bytes_per_s"] = bandwidth
    print(f"# {results['machine']}\n# streaming bandwidth {bandwidth / 1e9:.1f} GB/s, precision {args.precision}"
          f"{', --compile' if args.compile else ''}",
          flush=True)
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in args.regimes}
    for repeat in range(args.repeats):
        for name in args.regimes:
            rows[name].append(measure(name, args, bandwidth, split=repeat == args.repeats - 1))
    results["regimes"] = [median_of(rows[name]) for name in args.regimes]
    return results


def whole_runs(args) -> dict[str, Any]:
    """Wall seconds of whole CLI runs, K=16 against K=1, timed in turns (median over rounds)."""
    import sys
    command = [sys.executable, "-m", "torchsal", "train", "--rule", "sal", "--dataset", "mnist", "--depth", "2",
               "--width", "1024", "--batch-size", "1024", "--optimizer", "sgd", "--lr", "0.05", "--no-shared",
               "--max-steps", str(args.run_steps), "--quiet"]
    if args.data_dir:
        command += ["--data-dir", str(args.data_dir)]
    times: dict[int, list[float]] = {1: [], 16: []}
    for _ in range(args.run_rounds):
        for k in times:
            start = time.perf_counter()
            subprocess.run([*command, "--areas", str(k)], check=True, capture_output=True)
            times[k].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    row = {"command": " ".join(command[1:]), "seconds": median, "ratio_k16_k1": median[16] / median[1],
           "all_seconds": times}
    print(f"\nwhole run ({args.run_steps} steps, MNIST, width 1024, batch 1024, plain SGD): K=1 {median[1]:.1f} s, "
          f"K=16 {median[16]:.1f} s, ratio {row['ratio_k16_k1']:.2f}x", flush=True)
    return row


def precision_speedups(args) -> list[dict[str, Any]]:
    """Step time of bf16-mixed against fp32 for BP and for SAL (no shared path), each pair timed in turns (two
    trainers at a time: with three large models in turns the bf16 steps measured up to 2x slower than alone)."""
    rows = []
    for name in args.regimes:
        regime = REGIMES[name]
        steps = max(1, int(regime.steps * args.scale))
        row = {"regime": name}
        for variant in ("bp", "sal"):
            pair = {p: Stepper(make_trainer(regime, variant, p, args.device), regime.batch)
                    for p in ("fp32", "bf16-mixed")}
            times = in_turns(pair, args.rounds, steps)
            row[variant] = {**times, "speedup": times["fp32"] / times["bf16-mixed"]}
            del pair
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| regime | BP fp32 ms | BP bf16-mixed ms | BP speed-up | SAL fp32 ms | SAL bf16-mixed ms | SAL speed-up |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        b, s_ = r["bp"], r["sal"]
        print(f"| {r['regime']} | {1e3 * b['fp32']:.2f} | {1e3 * b['bf16-mixed']:.2f} | {b['speedup']:.2f}x "
              f"| {1e3 * s_['fp32']:.2f} | {1e3 * s_['bf16-mixed']:.2f} | {s_['speedup']:.2f}x |")
    return rows


def _ratio(row: dict[str, Any], variant: str) -> str:
    runs = row.get("ratio_runs", {}).get(variant, [])
    spread = f" ({min(runs):.2f}-{max(runs):.2f})" if len(runs) > 1 else ""
    return f"{row['ratio'][variant]:.2f}x{spread}"


def table(results: dict[str, Any]) -> str:
    lines = ["| regime | model | batch | optimizer | BP ms | SAL ms | SAL shared ms | SAL / BP (range) "
             "| SAL shared / BP (range) | floor ms (BP, SAL, SAL shared) |", "|---" * 10 + "|"]
    for r in results["regimes"]:
        t, f = r["step_s"], r["floor"]
        model = f"{FEATURES}-" + "-".join([str(r["width"])] * min(r["depth"], 2)) + f"-{CLASSES}"
        if r["depth"] > 2:
            model = f"{r['depth']} x {r['width']}"
        lines.append(f"| {r['regime']} | {model} | {r['batch']} | {r['optimizer']} | {1e3 * t['bp']:.2f} "
                     f"| {1e3 * t['sal']:.2f} | {1e3 * t['sal-shared']:.2f} | {_ratio(r, 'sal')} "
                     f"| {_ratio(r, 'sal-shared')} | "
                     + ", ".join(f"{1e3 * f[v]['floor_s']:.2f}" for v in VARIANTS) + " |")
    if all("split_s" in r for r in results["regimes"]):
        lines += ["", "SAL step split (ms per step, profiler self-time shares of the measured step):", "",
                  "| regime | variant | " + " | ".join(SPLIT) + " |", "|---|---|" + "---|" * len(SPLIT)]
        for r in results["regimes"]:
            for v, split in r["split_s"].items():
                lines.append(f"| {r['regime']} | {v} | "
                             + " | ".join(f"{1e3 * split.get(n, 0.0):.2f}" for n in SPLIT) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regimes", default=",".join(REGIMES), help="comma-separated: " + ", ".join(REGIMES))
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per regime (median)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure every regime this many times, spread over the run; the table shows medians")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every regime's steps per round")
    parser.add_argument("--precision", default="fp32", help="fp32, or bf16-mixed (autocast, fp32 weights)")
    parser.add_argument("--compile", action="store_true",
                        help="train with --compile (under 32 rows per area, a local rule's step up to its updates "
                             "as generated kernels; BP's step is unchanged)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--whole-run", action="store_true", help="also time whole CLI runs, K=16 against K=1")
    parser.add_argument("--precision-speedup", action="store_true",
                        help="instead of the SAL/BP table: bf16-mixed against fp32, for BP and for SAL")
    parser.add_argument("--run-steps", type=int, default=100, help="--max-steps of each whole run")
    parser.add_argument("--run-rounds", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=None, help="where MNIST is (for --whole-run)")
    args = parser.parse_args()
    args.regimes = [] if args.regimes == "none" else args.regimes.split(",")
    unknown = [r for r in args.regimes if r not in REGIMES]
    if unknown:
        parser.error(f"unknown regime(s) {', '.join(unknown)}; choose from {', '.join(REGIMES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision_speedup:
        results = {"machine": machine(), "rounds": args.rounds, "precision_speedup": precision_speedups(args)}
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1) + "\n")
        return
    results = run(args)
    if results["regimes"]:
        print("\n" + table(results))
    if args.whole_run:
        results["whole_run"] = whole_runs(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
