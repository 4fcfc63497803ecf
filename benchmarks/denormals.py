"""What denormal floats cost on this CPU, with and without torchsal's flush-to-zero.

    python benchmarks/denormals.py --threads 2 --out docs/performance/denormals.json     # about a minute

Times the kernels a training step spends its time in (a convolution, a linear layer, an elementwise update) on
weights of which 10% are denormal (1e-40, as dead units' weights become under Adam with weight decay) against the
same weights without them. Each setting runs in a fresh process, because torch's worker threads take the
flush-to-zero setting of the thread that starts them: ``keep`` is plain torch, ``flush`` imports torchsal first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from speed import machine

KERNELS = r"""
import json, sys, time
if sys.argv[1] == "flush":
    import torchsal  # noqa: F401  (sets flush-to-zero before torch starts its threads)
import torch
torch.set_num_threads(int(sys.argv[2]))
g = torch.Generator().manual_seed(0)

def with_denormals(w):
    w = w.clone()
    w[torch.rand(w.shape, generator=g) < 0.1] = 1e-40
    return w

def ms(f, n=10):
    f()
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n * 1e3

x = torch.randn(128, 32, 14, 14, generator=g).to(memory_format=torch.channels_last)
a = torch.randn(128, 3200, generator=g)
cases = [("conv2d 32->64 5x5, batch 128 at 14x14", lambda k: torch.nn.functional.conv2d(x, k),
          0.05 * torch.randn(64, 32, 5, 5, generator=g)),
         ("linear 3200->84, batch 128", lambda w: a @ w.T, torch.randn(84, 3200, generator=g)),
         ("elementwise update of 2^20 values (mul_)", lambda v: v.mul_(1.0), torch.randn(1 << 20, generator=g))]
out = {}
for name, kernel, weights in cases:
    denormal = with_denormals(weights)
    out[name] = {"normal_ms": ms(lambda: kernel(weights)), "denormal_ms": ms(lambda: kernel(denormal))}
print(json.dumps(out))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    results = {"machine": machine(), "threads": args.threads}
    for setting in ("keep", "flush"):
        run = subprocess.run([sys.executable, "-c", KERNELS, setting, str(args.threads)], capture_output=True,
                             text=True, check=True)
        results[setting] = json.loads(run.stdout)
    print(f"| kernel ({args.threads} threads) | normal ms | 10% denormal, kept | 10% denormal, flushed (torchsal) |")
    print("|---|---|---|---|")
    for name, keep in results["keep"].items():
        flush = results["flush"][name]
        print(f"| {name} | {keep['normal_ms']:.2f} | {keep['denormal_ms']:.2f} "
              f"({keep['denormal_ms'] / keep['normal_ms']:.0f}x) | {flush['denormal_ms']:.2f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
