"""Where layer stacks stop paying: the deep SAL step with its alike blocks run as one stack against block by block.

    python benchmarks/stack_threshold.py --out docs/performance/stack-threshold.json     # ~6 min, 2 cores

For residual LayerNorm models of 16 areas at several widths (batch 128, Adam), each with and without the shared
path, the trainer's own step runs with ``model.stack_alike_blocks`` on and off in alternating rounds of one
process (this host drifts by 20-30% within minutes), and the table gives the median of the paired ratios and their
quartiles. ``STACK_MAX_WEIGHTS`` is lifted for the run, so that every width is stacked when asked; the library's
threshold (``torchsal.models.STACK_MAX_WEIGHTS``) is chosen from this table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from speed import Regime, Stepper, machine, make_trainer  # benchmarks/speed.py

import torchsal.models

SHAPES = ((128, 16, 5), (256, 16, 3), (512, 12, 2), (1024, 6, 1))       # width, depth, steps per round


def stack_against_blocks(width: int, depth: int, steps: int, variant: str, rounds: int) -> dict:
    regime = Regime(f"width {width}", depth, width, 128, "adam", {"block": "residual", "norm": "layer"}, steps=steps)
    trainer = make_trainer(regime, variant, "fp32", "cpu")
    stepper = Stepper(trainer, regime.batch)
    for stack in (True, False):                      # warm-up: memory, optimizer state
        trainer.model.stack_alike_blocks = stack
        stepper(2)
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds):
        for stack in (True, False) if r % 2 == 0 else (False, True):
            trainer.model.stack_alike_blocks = stack
            start = time.perf_counter()
            stepper(steps)
            times[stack].append((time.perf_counter() - start) / steps)
    ratios = [s / b for s, b in zip(times[True], times[False])]
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return {"width": width, "depth": depth, "variant": variant, "area_weights_per_block": 16 * width * width,
            "stack_ms": 1e3 * statistics.median(times[True]), "blocks_ms": 1e3 * statistics.median(times[False]),
            "stack_over_blocks": statistics.median(ratios), "quartiles": [q1, q3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torchsal.models.STACK_MAX_WEIGHTS = 2**62
    rows = []
    for width, depth, steps in SHAPES:
        for variant in ("sal", "sal-shared"):
            rows.append(stack_against_blocks(width, depth, steps, variant, args.rounds))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| width | area weights per block | variant | stack ms | block by block ms | stack / blocks (quartiles) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['width']} | 16 x {r['width']}^2 = {r['area_weights_per_block']:,} | {r['variant']} "
              f"| {r['stack_ms']:.1f} | {r['blocks_ms']:.1f} | {r['stack_over_blocks']:.2f} "
              f"({r['quartiles'][0]:.2f}-{r['quartiles'][1]:.2f}) |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine(), "rounds": args.rounds, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
