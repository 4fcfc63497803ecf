"""What a training step of a conv net costs under each local objective, against BP and the old fixed readout.

    python benchmarks/conv_step.py --threads 1 --out docs/conv/step-cost.json            # ~3 min
    python benchmarks/conv_step.py --model vgg8b --width-mult 0.25 --rounds 3 --out docs/conv/step-cost-vgg8b.json

Each variant is a bench preset on the model (``torchsal.bench.preset_config``), plus ``sal-old``: the conv default
before learned objectives (fixed random readout of 2x2-pooled maps, areas in every convolution). One step is the
trainer's (the rule's step as the run's execution forms it, then Adam's) on a fixed CIFAR-shaped batch of 128,
without the batch gather and schedule around it. Variants are timed in alternating rounds in one process (so a
slow minute slows all of them), and each cell is the median over rounds.
Beside every time stands its floor: the step's floating-point operations (counted by torch's FlopCounterMode) at
the rate of one large float32 matrix product on the same threads, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from torchsal.bench import preset_config
from torchsal.execution import choose
from torchsal.models import build_model
from torchsal.rules import build_rule
from torchsal.train import make_optimizer

VARIANTS = {
    "bp": ("bp", {}),
    "sal-old": ("sal", {"objective": "readout", "conv_areas": True, "readout_pool": 2}),
    "sal-readout": ("sal-readout", {}),
    "sal": ("sal", {}),
    "sal-pred": ("sal-pred", {}),
    "sal-sim": ("sal-sim", {}),
    "sal-bpf": ("sal-bpf", {}),
    "sal-k1": ("sal-k1", {}),
}


def make_step(preset: str, settings: dict, precision: str):  # noqa: ANN201
    config = preset_config(preset, dataset="cifar10", precision=precision, **settings)
    model = build_model(0, 10, config.model, in_shape=(3, 32, 32))
    rule = build_rule(model, config.rule)
    optimizer = make_optimizer([*model.parameters(), *rule.parameters()], config.train)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(128, 3, 32, 32, generator=generator), torch.randint(0, 10, (128,), generator=generator)

    mixed = precision == "bf16-mixed"
    execution = choose(rule, model, mixed_precision=mixed)     # as the trainer's

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=mixed):
            execution.step(rule, model, optimizer, x, y)
        optimizer.step()

    return step


def matmul_rate(seconds: float = 1.0) -> float:
    """FLOP/s of a 1024^3 float32 matrix product on the current threads (best of a second of repeats)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best


def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    return {"cpu": fields.get("Model name", platform.processor()).strip(), "threads": torch.get_num_threads(),
            "avx512": any(f.startswith("avx512") for f in flags), "amx": any(f.startswith("amx") for f in flags),
            "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--width-mult", type=float)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16-mixed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    extra = {"model": args.model, **({"width_mult": args.width_mult} if args.width_mult else {})}
    steps, flops = {}, {}
    for name in args.variants.split(","):
        for precision in args.precision.split(","):
            preset, settings = VARIANTS[name]
            key = name if precision == "fp32" else f"{name} {precision}"
            steps[key] = make_step(preset, {**settings, **extra}, precision)
            steps[key]()                                          # warm up: first-step allocations, Adam's state
            with FlopCounterMode(display=False) as counter:
                steps[key]()
            flops[key] = counter.get_total_flops()
    rate = matmul_rate()
    times: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(args.rounds):
        for key, step in steps.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[key].append((time.perf_counter() - start) / args.steps)
    rows = []
    base = statistics.median(times["bp"]) if "bp" in times else None
    old = statistics.median(times["sal-old"]) if "sal-old" in times else None
    print(f"\n{args.model}, batch 128, {args.threads} thread(s), matmul {rate / 1e9:.0f} GFLOP/s\n")
    print("| variant | ms per step | / bp | / sal-old | GFLOP per step | floor ms | step / floor |")
    print("|---|---|---|---|---|---|---|")
    for key, values in times.items():
        ms = 1000 * statistics.median(values)
        floor = 1000 * flops[key] / rate
        row = {"variant": key, "ms": ms, "ms_min": 1000 * min(values), "ms_max": 1000 * max(values),
               "gflop": flops[key] / 1e9, "floor_ms": floor,
               "vs_bp": ms / 1000 / base if base else None, "vs_old": ms / 1000 / old if old else None}
        rows.append(row)
        ratio = lambda r: f"{r:.2f}x" if r else "–"   # noqa: E731
        print(f"| {key} | {ms:.0f} ({row['ms_min']:.0f}-{row['ms_max']:.0f}) | {ratio(row['vs_bp'])} | "
              f"{ratio(row['vs_old'])} | {row['gflop']:.2f} | {floor:.0f} | {ms / floor:.1f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": args.model, "width_mult": args.width_mult, "batch": 128,
                                        "rounds": args.rounds, "matmul_gflops": rate / 1e9, "machine": machine(),
                                        "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
