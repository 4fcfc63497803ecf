"""Adam stepped area by area from gradients formed in cache, against a whole-bank gradient then one fused step.

Two measurements, each path timed in turns in one process (medians over rounds):

- ``update``: an area layer's update alone at a regime's shape, through the library's own code: the weight gradient
  (``dispatch.area_gradients``) then ``torchsal.optim.AdamW(fused=True).step()``, against the same inside
  ``optim.updates_in_backward`` (each touched area's gradient formed into one area's scratch memory and stepped
  at once), with the fused step alone as the floor of both.
- ``step``: the trainer's whole step (``Trainer.train_step``) with and without the area-by-area path, and BP's.
- ``product``: one area's weight gradient from its rows, as MKL's product into ``out`` (``torch.mm(g, r, out=)``)
  and as the library forms it, zeroed then accumulated (``out.zero_().addmm_(g, r)``).

    python benchmarks/adam_by_area.py --threads 2 --out docs/performance/adam-by-area.json      # about a minute
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from speed import REGIMES, Stepper, machine, make_trainer, paired_ratio, rounds_in_turns  # benchmarks/speed.py

from torchsal import dispatch, optim

SHAPES = {"tuned": (16, 256, 784, 64), "wide": (16, 1024, 784, 1024)}     # areas, out, in, rows


def update_paths(areas: int, out: int, in_: int, rows: int) -> dict[str, Callable[[], None]]:
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(areas, out, in_, generator=g) * 0.01)
    opt = optim.AdamW([weight], lr=1e-3, weight_decay=1e-4, fused=True)
    groups = dispatch.group_by_area(torch.randint(areas, (rows,), generator=g), areas)
    x, grad = torch.randn(rows, in_, generator=g), torch.randn(rows, out, generator=g) / rows

    def gradient() -> None:
        dispatch.release_gradients([weight])
        grad_w = dispatch.area_gradients(grad, groups, x, None, None, weight, None, None, (True, False, False))[0]
        dispatch.accumulate_gradient(weight, grad_w)

    def whole() -> None:
        gradient()
        opt.step()

    def by_area() -> None:
        with optim.updates_in_backward(opt):
            gradient()
        opt.step()                                  # (nothing left to step)

    whole()                                         # torch's first step makes the state
    gradient()
    held = weight.grad.clone()

    def step_alone() -> None:                       # the fused step on a gradient already in memory
        weight.grad = held
        opt.step()

    return {"whole": whole, "by_area": by_area, "step_alone": step_alone}


def product_paths(out: int, in_: int, rows: int) -> dict[str, Callable[[], None]]:
    g = torch.Generator().manual_seed(0)
    grad, x, area = torch.randn(rows, out, generator=g).T, torch.randn(rows, in_, generator=g), torch.empty(out, in_)
    return {"mm_out": lambda: torch.mm(grad, x, out=area), "zero_addmm": lambda: area.zero_().addmm_(grad, x)}


def median_ms(paths: dict[str, Callable[[], None]], rounds: int, reps: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, path in paths.items():
            start = time.perf_counter()
            for _ in range(reps):
                path()
            times[name].append((time.perf_counter() - start) / reps)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


class Toggled:
    """A trainer's step with the area-by-area path on or off (``optim._steps_by_area`` for the step's duration)."""

    def __init__(self, stepper: Stepper, on: bool) -> None:
        self.stepper, self.on = stepper, on

    def __call__(self, steps: int = 1) -> None:
        original = optim._steps_by_area
        optim._steps_by_area = original if self.on else (lambda optimizer, group: False)
        try:
            self.stepper(steps)
        finally:
            optim._steps_by_area = original


def trainer_steps(name: str, rounds: int, compile_: bool) -> dict[str, float]:
    regime = REGIMES[name]
    steppers = {"bp": Stepper(make_trainer(regime, "bp", "fp32", "cpu", compile_), regime.batch),
                **{path: Toggled(Stepper(make_trainer(regime, "sal", "fp32", "cpu", compile_), regime.batch), on)
                   for path, on in (("by_area", True), ("whole", False))}}
    times = rounds_in_turns(steppers, rounds, regime.steps)
    return {**{f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()},
            "by_area_vs_whole": statistics.median(a / b for a, b in zip(times["by_area"], times["whole"])),
            "by_area_vs_bp": paired_ratio(times, "by_area"), "whole_vs_bp": paired_ratio(times, "whole")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regimes", default="tuned,wide")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="the trainer's steps with --compile")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"machine": machine(), "compile": args.compile, "update": {}, "step": {}, "product": {}}
    for out, in_, rows in ((256, 784, 2), (256, 784, 4), (256, 784, 8), (256, 784, 32), (1024, 784, 64)):
        key = f"{out}x{in_} from {rows} rows"
        results["product"][key] = median_ms(product_paths(out, in_, rows), args.rounds, 100 if rows < 64 else 10)
        print("area product ms", key, {k: round(v, 4) for k, v in results["product"][key].items()})
    for name in args.regimes.split(","):
        shape = SHAPES[name]
        results["update"][name] = median_ms(update_paths(*shape), args.rounds, 20 if shape[3] < 512 else 3)
        results["step"][name] = trainer_steps(name, args.rounds, args.compile)
        print(name, "update ms", {k: round(v, 3) for k, v in results["update"][name].items()})
        print(name, "trainer step", {k: round(v, 3) for k, v in results["step"][name].items()})
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
