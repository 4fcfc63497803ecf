"""Scale and speed: what a SAL step costs against K, against BP, against the machine's peak, and at 1B parameters.

    python benchmarks/scale.py all --out docs/performance        # every part; ~15 min on 2 CPU cores
    python benchmarks/scale.py cost                              # one part: cost | versus | efficiency | billion

Each part prints a markdown table and writes ``OUT/<part>.json``. Times are medians of repeated steps after
warm-up, on random inputs of MNIST's shape (784 features, 10 classes); ratios compare runs of the same process.
The step is the trainer's fast path without its updates in backward, so that forming the gradients and the
optimizer's step are timed apart (``step``).

- ``cost``: SAL (width 1024, 2 hidden layers, batch 1024, shared path, local signal) for K = 1, 4, 16 with SGD and
  Adam. The step is split with the PyTorch profiler into routing, dispatch (grouping rows by area and restoring
  their order), matmuls (forward, learning signals, weight gradients), optimizer and the rest (elementwise ops,
  losses, autograd bookkeeping); profiler self-times are scaled to the wall-clock step. The optimizer's
  throughput is the bytes it must move for the parameters it touched (Adam: read p, g, m, v and write p, m, v)
  per second, against this machine's measured streaming bandwidth.
- ``versus``: SAL against BP on the dense model of the same width, depth and batch (Adam), both signal modes.
- ``efficiency``: useful FLOP/s at width 4096, 2 x rows x active weights for every forward and every
  weight-update matmul, against the machine's large fp32 matmul FLOP/s.
- ``billion``: a SAL model of over 1B parameters (width 4096, 5 hidden layers, 16 areas, shared path) trained for
  50 steps on MNIST in a fresh process: parameters, peak resident memory, seconds per step, loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from torchsal import build_model, build_rule, make_config
from torchsal.config import resolve_areas
from torchsal.dispatch import release_gradients
from torchsal.train import make_optimizer

MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::baddbmm_",
           "aten::_grouped_mm"}
# Bytes an optimizer moves per touched parameter element (fp32): reads and writes of p, g and its state.
ELEMENT_BYTES = {"sgd": 3 * 4, "sgd-momentum": 5 * 4, "adam": 7 * 4, "adamw": 7 * 4}


def build(rule: str, width: int, depth: int, batch: int, optimizer: str, **settings):
    config = make_config(rule, width=width, depth=depth, batch_size=batch, optimizer=optimizer,
                         **({"momentum": 0.9} if optimizer == "sgd" else {}), **settings)
    config = resolve_areas(config, 60_000)                  # MNIST-sized: areas "auto" are 16
    model = build_model(784, 10, config.model)
    learning_rule = build_rule(model, config.rule)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], config.train)
    g = torch.Generator().manual_seed(0)
    return model, learning_rule, opt, torch.randn(batch, 784, generator=g), torch.arange(batch) % 10


def step(model, rule, opt, x, y, optimize: bool = True) -> float:
    """The trainer's step but for its updates in backward: the gradients reach ``.grad`` and the optimizer steps
    them, so that the two can be timed apart (the trainer's own step: benchmarks/speed.py)."""
    from torchsal.execution import choose  # here: benchmarks/ab.py imports this module beside older torchsal

    release_gradients(model.parameters())
    out = choose(rule, model, grad_protocol=True).step(rule, model, opt, x, y)
    if optimize:
        opt.step()
    return float(out.task_loss)


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ancestors(event) -> list[str]:
    names, parent = [], event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


def category(event, backward: str) -> str:
    above = ancestors(event)
    if any(n.startswith("Optimizer.") for n in above + [event.name]):
        return "optimizer"
    if "torchsal.route" in above:
        return "routing"
    if event.name in MATMULS:
        if "torchsal.signal" in above:
            return "matmul: signals"
        if any(n.startswith("autograd::engine") for n in above):
            return backward
        return "matmul: forward"
    if "torchsal.dispatch" in above:
        return "dispatch"
    return "other"


def split_step(model, rule, opt, x, y, wall: float) -> dict[str, float]:
    """Wall-clock seconds per category of one step: profiler self-time shares times the measured step. With
    detached layer inputs (SAL) the backward pass computes weight gradients only."""
    step(model, rule, opt, x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step(model, rule, opt, x, y)
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        totals[category(event, "matmul: weight gradients")] += event.self_cpu_time_total
    total = sum(totals.values())
    return {name: wall * t / total for name, t in sorted(totals.items())}


def touched_elements(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.grad is not None)


def stream_bandwidth(device: str = "cpu") -> float:
    """Bytes per second of the fastest of three streaming kernels over 256 MB tensors: a copy and an in-place scale
    (one read, one write) and an in-place add (two reads, one write, an SGD update's shape). Kernels with more
    streams move more bytes per second here (AVX-512 EPYC: copy 40, add 61-66 GB/s, and fused Adam over
    eight streams 66), so a floor taken from the copy alone overstated memory-bound steps by about 1.6x."""
    a, b = torch.randn(64 * 2**20, device=device), torch.randn(64 * 2**20, device=device)

    def rate(streams: int, fn) -> float:  # noqa: ANN001
        def synced() -> None:
            fn()
            if device != "cpu":
                torch.cuda.synchronize()
        return streams * a.numel() * 4 / median_seconds(synced, 7)

    return max(rate(2, lambda: b.copy_(a)), rate(2, lambda: b.mul_(1.0)), rate(3, lambda: b.add_(a)))


def matmul_flops(n: int = 4096) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_seconds(lambda: a @ b, 5)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each function, timed in turns (a, b, c, a, b, c, ...) so that the machine's drift
    affects all of them alike and their ratios stay meaningful on a noisy machine."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def part_cost(args) -> list[dict]:
    rows, bandwidth = [], stream_bandwidth()
    for optimizer in ("sgd", "adam"):
        kind = "sgd-momentum" if optimizer == "sgd" else optimizer
        setups = {k: build("sal", 1024, 2, 1024, optimizer, areas=k) for k in (1, 4, 16)}
        fns = {**{("step", k): partial(step, *s) for k, s in setups.items()},
               **{("no_optimizer", k): partial(step, *s, optimize=False) for k, s in setups.items()}}
        medians = interleaved(fns, args.repeats)
        for k, (model, rule, opt, x, y) in setups.items():
            step(model, rule, opt, x, y, optimize=False)              # grads in place, then time the update
            opt_time = median_seconds(opt.step, args.repeats)
            rows.append({"optimizer": kind, "areas": k, "step_s": medians[("step", k)],
                         "no_optimizer_s": medians[("no_optimizer", k)], "optimizer_s": opt_time,
                         "touched_params": touched_elements(model),
                         "optimizer_bandwidth_fraction": ELEMENT_BYTES[kind] * touched_elements(model)
                         / opt_time / bandwidth,
                         "split_s": split_step(model, rule, opt, x, y, medians[("step", k)])})
            print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        base = next(r for r in rows if r["optimizer"] == row["optimizer"] and r["areas"] == 1)
        row["no_optimizer_vs_k1"] = row["no_optimizer_s"] / base["no_optimizer_s"]
        row["step_vs_k1"] = row["step_s"] / base["step_s"]
    print(f"\nstreaming bandwidth {bandwidth / 1e9:.1f} GB/s\n")
    print("| optimizer | K | step ms | step / K=1 | without optimizer ms | / K=1 | optimizer ms "
          "| optimizer / bandwidth |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['areas']} | {1e3 * r['step_s']:.1f} | {r['step_vs_k1']:.2f} "
              f"| {1e3 * r['no_optimizer_s']:.1f} | {r['no_optimizer_vs_k1']:.2f} | {1e3 * r['optimizer_s']:.1f} "
              f"| {r['optimizer_bandwidth_fraction']:.0%} |")
    names = sorted({n for r in rows for n in r["split_s"]})
    print("\n| optimizer | K | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
    for r in rows:
        print(f"| {r['optimizer']} | {r['areas']} | "
              + " | ".join(f"{1e3 * r['split_s'].get(n, 0):.1f}" for n in names) + " |")
    rows.append({"stream_bandwidth_bytes_per_s": bandwidth})
    rows.append({"stock_adam_variants": adam_variants(args, bandwidth)})
    return rows


def adam_variants(args, bandwidth: float) -> list[dict]:
    """Stock torch.optim.Adam's three implementations on the K=16 model's touched parameters."""
    out = []
    for name, flags in (("foreach (default)", {"foreach": True}), ("for-loop", {"foreach": False}),
                        ("fused", {"fused": True})):
        model, rule, _, x, y = build("sal", 1024, 2, 1024, "adam", areas=16)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, **flags)
        step(model, rule, opt, x, y, optimize=False)
        seconds = median_seconds(opt.step, args.repeats)
        out.append({"adam": name, "optimizer_s": seconds,
                    "bandwidth_fraction": ELEMENT_BYTES["adam"] * touched_elements(model) / seconds / bandwidth})
        print(f"stock Adam, {name}: {1e3 * seconds:.1f} ms, {out[-1]['bandwidth_fraction']:.0%} of stream bandwidth")
    return out


def part_versus(args) -> list[dict]:
    settings = {"bp": ("bp", {}),
                "sal local (K=16, shared path)": ("sal", {"signal": "local"}),
                "sal direct (K=16, shared path)": ("sal", {"signal": "direct"}),
                "sal local (K=16, no shared path)": ("sal", {"signal": "local", "shared": False}),
                "sal direct (K=16, no shared path)": ("sal", {"signal": "direct", "shared": False})}
    setups = {name: build(rule_name, 1024, 2, 1024, "adam", **extra) for name, (rule_name, extra) in settings.items()}
    medians = interleaved({name: partial(step, *s) for name, s in setups.items()}, args.repeats)
    rows = [{"model": name, "step_s": medians[name], "vs_bp": medians[name] / medians["bp"],
             "active_params_per_sample": s[0].parameter_counts()["params_active_per_sample"]}
            for name, s in setups.items()]
    print("| model (width 1024, 2 hidden layers, batch 1024, Adam) | active params | step ms | / BP |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['active_params_per_sample'] / 1e6:.2f}M | {1e3 * r['step_s']:.1f} "
              f"| {r['vs_bp']:.2f} |")
    return rows


def useful_flops(model, batch: int) -> float:
    """2 x rows x active weights, for the forward matmul and the weight-update matmul of every layer."""
    weights = sum(layer.in_features * layer.out_features * (1 + (layer.shared is not None))
                  for layer in model.layers)
    return 2 * 2 * batch * weights


def matmul_shapes(width: int = 4096, rows: int = 64) -> dict[str, float]:
    """FLOP/s of the step's matmul shapes: one area's forward and weight gradient (``rows`` rows) against the
    dense 1024-row forward: what per-area dispatch costs in kernel efficiency."""
    x, w, g = torch.randn(rows, width), torch.randn(width, width), torch.randn(rows, width)
    big = torch.randn(1024, width)
    return {f"area forward {rows} x {width} -> {width}": 2 * rows * width**2 / median_seconds(lambda: x @ w.T, 10),
            f"area weight gradient ({width} x {rows}) @ ({rows} x {width})":
                2 * rows * width**2 / median_seconds(lambda: g.T @ x, 10),
            f"dense forward 1024 x {width} -> {width}": 2 * 1024 * width**2 / median_seconds(lambda: big @ w.T, 5)}


def part_efficiency(args) -> list[dict]:
    peak = matmul_flops()
    rows = []
    for optimizer in ("sgd",):
        model, rule, opt, x, y = build("sal", 4096, 2, 1024, optimizer, areas=16)
        wall = median_seconds(partial(step, model, rule, opt, x, y), max(3, args.repeats // 4), warmup=1)
        no_opt = median_seconds(partial(step, model, rule, opt, x, y, optimize=False), max(3, args.repeats // 4),
                                warmup=1)
        flops = useful_flops(model, 1024)
        rows.append({"optimizer": "sgd-momentum", "width": 4096, "batch": 1024, "areas": 16,
                     "useful_flop": flops, "step_s": wall, "no_optimizer_s": no_opt,
                     "peak_matmul_flops": peak, "efficiency": flops / wall / peak,
                     "efficiency_without_optimizer": flops / no_opt / peak})
    rows[0]["matmul_shapes_flops"] = shapes = matmul_shapes()
    r = rows[0]
    print(f"peak fp32 matmul (4096^3): {peak / 1e9:.1f} GFLOP/s")
    print("| matmul shape (rows x in -> out) | GFLOP/s | of peak |\n|---|---|---|")
    for name, flops in shapes.items():
        print(f"| {name} | {flops / 1e9:.1f} | {flops / peak:.0%} |")
    print("| step | seconds | useful GFLOP/s | of peak |\n|---|---|---|---|")
    print(f"| whole step (SGD momentum) | {r['step_s']:.3f} | {r['useful_flop'] / r['step_s'] / 1e9:.1f} "
          f"| {r['efficiency']:.0%} |")
    print(f"| without optimizer | {r['no_optimizer_s']:.3f} | {r['useful_flop'] / r['no_optimizer_s'] / 1e9:.1f} "
          f"| {r['efficiency_without_optimizer']:.0%} |")
    return rows


def billion_child(args) -> dict:
    """The 1B run itself (a fresh process, so its peak resident memory is its own)."""
    import resource

    from torchsal import load_dataset, make_splits

    splits = make_splits(load_dataset("mnist", args.data_dir), 0)
    x_all, y_all = splits.x_train, splits.y_train
    start = time.perf_counter()
    model, rule, opt, _, _ = build("sal", 4096, 5, args.billion_batch, args.billion_optimizer, areas=16,
                                   lr=args.billion_lr, dtype=args.billion_dtype)
    build_s = time.perf_counter() - start
    counts = model.parameter_counts()
    g = torch.Generator().manual_seed(0)
    losses, times = [], []
    for _ in range(args.steps):
        idx = torch.randint(len(y_all), (args.billion_batch,), generator=g)
        start = time.perf_counter()
        losses.append(step(model, rule, opt, x_all[idx], y_all[idx]))
        times.append(time.perf_counter() - start)
    return {"params_total": counts["params_total"], "params_active_per_sample": counts["params_active_per_sample"],
            "batch": args.billion_batch, "steps": args.steps, "optimizer": args.billion_optimizer,
            "lr": args.billion_lr, "dtype": args.billion_dtype, "build_s": build_s,
            "seconds_per_step": statistics.median(times), "peak_rss_gb": resource.getrusage(
                resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "losses": losses,
            "loss_first5": statistics.mean(losses[:5]), "loss_last5": statistics.mean(losses[-5:])}


def plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from torchsal.bench import save_png

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(range(1, len(losses) + 1), losses, marker=".")
    ax.set(xlabel="step", ylabel="training loss (batch)", title="1.2B-parameter SAL on MNIST")
    fig.tight_layout()
    save_png(fig, path, dpi=110)
    plt.close(fig)


def part_billion(args) -> list[dict]:
    command = [sys.executable, __file__, "billion-child", "--steps", str(args.steps), "--billion-lr",
               str(args.billion_lr), "--billion-batch", str(args.billion_batch), "--billion-dtype",
               args.billion_dtype, "--billion-optimizer", args.billion_optimizer]
    command += ["--data-dir", args.data_dir] if args.data_dir else []
    result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    r = result
    suffix = "" if args.billion_dtype == "float32" else f"-{args.billion_dtype}"
    plot_losses(r["losses"], Path(args.out) / f"billion-loss{suffix}.png")
    print("| weights | optimizer | total params | active per sample | batch | s / step | peak RSS "
          "| loss first 5 -> last 5 steps |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {r['dtype']} | {r['optimizer']} | {r['params_total'] / 1e9:.3f}B "
          f"| {r['params_active_per_sample'] / 1e6:.1f}M | {r['batch']} "
          f"| {r['seconds_per_step']:.2f} | {r['peak_rss_gb']:.1f} GB | {r['loss_first5']:.3f} -> "
          f"{r['loss_last5']:.3f} |")
    return [result]


PARTS = {"cost": part_cost, "versus": part_versus, "efficiency": part_efficiency, "billion": part_billion}


def main() -> None:
    parser = argparse.ArgumentParser(description="scale and speed benchmark")
    parser.add_argument("part", choices=[*PARTS, "all", "billion-child"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--billion-batch", type=int, default=256)
    parser.add_argument("--billion-lr", type=float, default=2e-3)
    parser.add_argument("--billion-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--billion-optimizer", default="sgd", choices=["sgd", "adam"])
    parser.add_argument("--threads", type=int)
    parser.add_argument("--data-dir")
    parser.add_argument("--out", default="docs/performance")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part == "billion-child":
        print(json.dumps(billion_child(args)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"torch": torch.__version__, "threads": torch.get_num_threads(), "platform": sys.platform}
    for name in PARTS if args.part == "all" else [args.part]:
        print(f"\n## {name}\n", flush=True)
        rows = PARTS[name](args)
        stem = f"{name}-{args.billion_dtype}" if name == "billion" and args.billion_dtype != "float32" else name
        (out / f"{stem}.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
