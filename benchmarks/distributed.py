"""Distributed step time and traffic: 1 process against 2, data parallel and area parallel (gloo, loopback).

    python benchmarks/distributed.py --out docs/distributed        # ~2 min on 2 CPU cores

Launches ``torchrun`` for each setting; every process uses one thread. A worker trains SAL (16 areas, shared
path, 2 hidden layers of 512, global batch 512) on random MNIST-shaped inputs for warm-up + timed steps and rank 0
reports the median step time and the bytes each process sent per step, by collective (``torchsal.distributed.
TRAFFIC``: all-to-all = activation rows leaving the process; all-reduce = gradient flags and gradients of the
replicated parameters; all-gather = routing scores and per-area row counts). Prints a table and writes
``OUT/distributed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import torch

    from torchsal import build_model, build_rule, distributed, make_config
    from torchsal.dispatch import release_gradients
    from torchsal.train import make_optimizer

    torch.set_num_threads(1)
    ctx = distributed.init_from_env()
    config = make_config("sal", areas=16, shared=True, depth=2, width=args.width)
    owned = distributed.owned_areas(16, ctx) if args.parallel == "area" else None
    model = build_model(784, 10, config.model, 0, owned)
    rule = build_rule(model, config.rule)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], config.train)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(args.batch, 784, generator=g), torch.randint(10, (args.batch,), generator=g)
    mine = torch.arange(args.batch).tensor_split(ctx.world)[ctx.rank]
    times = []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            distributed.TRAFFIC.clear()
        start = time.perf_counter()
        release_gradients(model.parameters())
        rule(model, x[mine], y[mine]).loss.backward()
        distributed.sync_gradients(model, len(mine), args.batch)
        optimizer.step()
        times.append(time.perf_counter() - start)
    if ctx.is_main:
        print(json.dumps({"processes": ctx.world, "parallel": args.parallel, "step_s": statistics.median(
            times[args.warmup:]), "bytes_per_step": {k: v / args.steps for k, v in distributed.TRAFFIC.items()},
            "params_on_rank0": sum(p.numel() for p in model.parameters())}))


def launch(processes: int, parallel: str, args: argparse.Namespace) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-addr",
               "127.0.0.1", "--master-port", str(port), __file__, "worker", "--parallel", parallel,
               "--width", str(args.width), "--batch", str(args.batch), "--steps", str(args.steps)]
    res = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         check=False)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="1 vs 2 process benchmark")
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "worker"])
    parser.add_argument("--parallel", default="data", choices=["data", "area"])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="docs/distributed")
    args = parser.parse_args()
    if args.mode == "worker":
        worker(args)
        return
    rows = [launch(n, parallel, args) for n, parallel in ((1, "data"), (2, "data"), (2, "area"))]
    base = rows[0]["step_s"]
    print(f"SAL, 16 areas + shared path, 2 hidden layers of {args.width}, global batch {args.batch}, "
          "one thread per process\n")
    print("| processes | parallel | step ms | speed-up | params on rank 0 | all-to-all KiB | all-reduce KiB "
          "| all-gather KiB |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r["bytes_per_step"]
        print(f"| {r['processes']} | {r['parallel']} | {1e3 * r['step_s']:.1f} | {base / r['step_s']:.2f}x "
              f"| {r['params_on_rank0'] / 1e6:.2f}M | {b.get('all_to_all', 0) / 1024:.0f} "
              f"| {b.get('all_reduce', 0) / 1024:.0f} | {b.get('all_gather', 0) / 1024:.0f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "distributed.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
