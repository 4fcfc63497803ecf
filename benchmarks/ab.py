"""The trainer's step under two versions of torchsal, A/B, interleaved: does a change slow any regime down?

    git worktree add /tmp/torchsal-old <commit>
    python benchmarks/ab.py --old /tmp/torchsal-old/src --rounds 9 --out docs/performance/ab.json
    python benchmarks/ab.py --old /tmp/torchsal-old/src --compile --regimes paper,tuned

For every regime of benchmarks/speed.py and every variant (bp, sal, sal-shared), one worker process per version
builds the same trainer (each importing torchsal from its own source tree) and waits; the parent then asks them in
turns (old, new, old, new, ...) to time a round of the trainer's own step (``speed.Stepper``: ``train_step``), so
that the two share the host's drift, and only one runs at a time. Each cell is the median over rounds of new/old
within a round (speed.paired_ratio); under 1 the new code is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
NEW_SRC = HERE.parent / "src"


def worker(regime: str, variant: str, compile_: bool, threads: int | None) -> None:
    """Build one trainer, then answer every line on stdin with the mean seconds per step of that many steps."""
    import torch
    from speed import REGIMES, Stepper, make_trainer

    if threads:
        torch.set_num_threads(threads)
    stepper = Stepper(make_trainer(REGIMES[regime], variant, "fp32", "cpu", compile_), REGIMES[regime].batch)
    stepper(max(2, REGIMES[regime].steps // 2))                 # warm-up: allocations, state, compiling
    print("ready", flush=True)
    for line in sys.stdin:
        steps = int(line)
        start = time.perf_counter()
        stepper(steps)
        print((time.perf_counter() - start) / steps, flush=True)


def start(sources: dict[str, Path], args: list[str]) -> dict[str, subprocess.Popen]:
    """One worker per source tree, started together (building and compiling is not timed), each ready."""
    procs = {name: subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", *args],
                                    env={**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{HERE}"},
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for name, src in sources.items()}
    for name, proc in procs.items():
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {name} worker ({sources[name]}) did not start: {' '.join(args)}")
    return procs


def ask(proc: subprocess.Popen, steps: int) -> float:
    proc.stdin.write(f"{steps}\n")
    proc.stdin.flush()
    return float(proc.stdout.readline())


def compare(old: Path, regime: str, variant: str, rounds: int, compile_: bool, threads: int | None) -> dict:
    from speed import REGIMES, paired_ratio

    args = [regime, variant] + (["--compile"] if compile_ else []) + ([f"--threads={threads}"] if threads else [])
    procs = start({"old": old, "new": NEW_SRC}, args)
    times: dict[str, list[float]] = {"old": [], "new": []}
    try:
        for _ in range(rounds):
            for name, proc in procs.items():
                times[name].append(ask(proc, REGIMES[regime].steps))
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    return {"regime": regime, "variant": variant, "compile": compile_, "rounds": rounds,
            "old_ms": 1e3 * statistics.median(times["old"]), "new_ms": 1e3 * statistics.median(times["new"]),
            "new_over_old": paired_ratio(times, "new", "old")}


def markdown(rows: list[dict]) -> str:
    lines = ["| regime | variant | compile | old ms | new ms | new / old (median of paired ratios) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['regime']} | {r['variant']} | {'yes' if r['compile'] else 'no'} | {r['old_ms']:.3f} | "
              f"{r['new_ms']:.3f} | {r['new_over_old']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    from speed import REGIMES, VARIANTS, machine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, help="the old version's source folder (the one holding torchsal/)")
    parser.add_argument("--regimes", default=",".join(REGIMES), help="comma-separated: " + ", ".join(REGIMES))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per version (median)")
    parser.add_argument("--compile", action="store_true", help="both versions with --compile")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--worker", nargs=2, metavar=("REGIME", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.compile, args.threads)
        return
    if args.old is None or not (args.old / "torchsal" / "__init__.py").is_file():
        parser.error("--old must name a source folder holding torchsal/ (e.g. a git worktree's src)")
    rows = []
    for regime in args.regimes.split(","):
        for variant in args.variants.split(","):
            rows.append(compare(args.old, regime, variant, args.rounds, args.compile, args.threads))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    print(markdown(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
