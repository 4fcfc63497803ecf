"""What SAL's 128-layer step would cost with its hidden layers held as one *layer stack*: a measured prototype.

    python benchmarks/layer_stack.py --threads 2 --out docs/performance/layer-stack.json     # ~2 min

Under a local rule no gradient crosses a block, so the blocks' backward passes are independent, and with input
routing every block groups its rows the same way. A model whose hidden blocks are alike (the deep regime of
benchmarks/speed.py: 127 pre-norm residual blocks of width 64 after the first layer, 16 areas, batch 128, Adam)
can then keep their parameters stacked, ``(L, K, out, in)``, and train them in a few kernels instead of a few per
block:

1. a forward pass without autograd, block by block (each block needs the one before): the blocks' inputs;
2. one recomputation of every block at once with autograd (each kind of operation runs once, over all blocks);
3. the local signals of every block at once (as ``LocalSignalRule.signals_at_once`` does now);
4. one backward pass over the stacked graph, and Adam over a handful of stacked tensors instead of 500.

This prototype writes that step in plain tensor code, beside the trainer's own BP and SAL steps (timed in turns
in one process, as benchmarks/speed.py does). It is a measurement of the design, not an implementation: routing
is a uniformly random area per sample (balanced, as the Sinkhorn router is) with no router loss, and it keeps no
per-layer diagnostics, so it omits about 2 ms of what the trainer's SAL step does (routing and its objective,
per-layer RMS, the finiteness check). The area product keeps the weight gradient contiguous (a custom autograd
function): autograd's own ``bmm`` backward forms it transposed and then copies it, 7 ms per step here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from speed import REGIMES, Stepper, in_turns, machine, make_trainer  # benchmarks/speed.py
from torch import Tensor

from torchsal.dispatch import group_by_area, to_padded
from torchsal.rules.local import softmax_error


class AreaProduct(torch.autograd.Function):
    """``rows (N, cap, in) @ weight (N, out, in).T``, the weight gradient formed as ``grad.T @ rows``."""

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(rows, weight)
        return torch.bmm(rows, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        rows, weight = ctx.saved_tensors
        return torch.bmm(grad, weight), torch.bmm(grad.transpose(1, 2), rows)


class LayerStackStep:
    """The deep regime's SAL step with its residual blocks as one stack (see the module docstring)."""

    def __init__(self, depth: int, width: int, batch: int, areas: int = 16, classes: int = 10,
                 features: int = 784, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.depth, self.width, self.batch, self.areas, self.classes = depth - 1, width, batch, areas, classes
        n, k, d = self.depth, areas, width
        self.weight = torch.nn.Parameter(torch.randn(n, k, d, d, generator=g) / d ** 0.5 / depth ** 0.5)
        self.bias = torch.nn.Parameter(torch.zeros(n, k, d))
        self.norm_weight, self.norm_bias = torch.nn.Parameter(torch.ones(n, d)), torch.nn.Parameter(torch.zeros(n, d))
        self.first = torch.nn.Parameter(torch.randn(k, d, features, generator=g) / features ** 0.5)
        self.first_bias = torch.nn.Parameter(torch.zeros(k, d))
        self.head, self.head_bias = torch.nn.Parameter(torch.randn(k, classes, d, generator=g) / d ** 0.5), \
            torch.nn.Parameter(torch.zeros(k, classes))
        self.readouts = torch.randn(n + 1, classes, d, generator=g) / d ** 0.5      # fixed local readouts
        self.params = [self.weight, self.bias, self.norm_weight, self.norm_bias, self.first, self.first_bias,
                       self.head, self.head_bias]
        self.optimizer = torch.optim.Adam(self.params, lr=1e-4, fused=True)
        self.route = torch.Generator().manual_seed(seed + 1)
        data = torch.Generator().manual_seed(seed + 2)
        self.batches = [(torch.randn(batch, features, generator=data), torch.randint(classes, (batch,), generator=data))
                        for _ in range(4)]
        self.i = 0

    def __call__(self, steps: int = 1) -> None:
        for _ in range(steps):
            self.step(*self.batches[self.i % len(self.batches)])
            self.i += 1

    def step(self, x: Tensor, y: Tensor) -> None:
        for p in self.params:
            p.grad = None
        groups = group_by_area(torch.randint(self.areas, (self.batch,), generator=self.route), self.areas)
        k, cap, d, n = self.areas, groups.capacity, self.width, self.depth
        rows = k * cap                                      # the padded layout: area k's rows at k * cap ...
        onehot = to_padded(F.one_hot(y[groups.order], self.classes).float(), groups)
        real = to_padded(torch.ones(self.batch, 1), groups)
        first = torch.baddbmm(self.first_bias.unsqueeze(1), to_padded(x[groups.order], groups).view(k, cap, -1),
                              self.first.transpose(1, 2)).relu_().view(rows, d)
        inputs, h = [first], first
        with torch.no_grad():                               # 1. block by block, no graph
            for layer in range(n - 1):
                h = h + self._block(h, layer)
                inputs.append(h)
        stacked_in = torch.stack(inputs)                    # (n, rows, d): every block's input
        normed = F.layer_norm(stacked_in, (d,)) * self.norm_weight.unsqueeze(1) + self.norm_bias.unsqueeze(1)
        branch = AreaProduct.apply(normed.view(n * k, cap, d), self.weight.view(n * k, d, d))   # 2. all at once
        outputs = stacked_in + (branch.view(n, k, cap, d) + self.bias.unsqueeze(2)).relu().view(n, rows, d)
        hidden = torch.cat([first.unsqueeze(0), outputs])   # (n + 1, rows, d)
        logits = torch.baddbmm(self.head_bias.unsqueeze(1), outputs[-1].detach().view(k, cap, d),
                               self.head.transpose(1, 2)).view(rows, -1).index_select(0, groups.slot)
        with torch.no_grad():                               # 3. (softmax(h G^T) - y) G for every block, padding 0
            error = softmax_error(hidden @ self.readouts.transpose(1, 2), onehot.expand(n + 1, -1, -1)).mul_(real)
            signals = error @ self.readouts
        loss = (hidden * signals).sum() / self.batch + F.cross_entropy(logits, y[groups.order])
        loss.backward()                                     # 4.
        self.optimizer.step()

    def _block(self, h: Tensor, layer: int) -> Tensor:
        k, d = self.areas, self.width
        normed = F.layer_norm(h, (d,), self.norm_weight[layer], self.norm_bias[layer])
        return torch.baddbmm(self.bias[layer].unsqueeze(1), normed.view(k, -1, d),
                             self.weight[layer].transpose(1, 2)).relu_().view(h.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    regime = REGIMES["deep"]
    steppers = {"bp": Stepper(make_trainer(regime, "bp", "fp32", "cpu"), regime.batch),
                "sal": Stepper(make_trainer(regime, "sal", "fp32", "cpu"), regime.batch),
                "sal-layer-stack": LayerStackStep(regime.depth, regime.width, regime.batch)}
    start = time.perf_counter()
    times = in_turns(steppers, args.rounds, args.steps)
    result = {"machine": machine(), "regime": "deep", "step_s": times,
              "ratio": {v: times[v] / times["bp"] for v in ("sal", "sal-layer-stack")},
              "seconds": time.perf_counter() - start}
    print("| step | ms | / BP |\n|---|---|---|")
    for name, seconds in times.items():
        print(f"| {name} | {1e3 * seconds:.2f} | {seconds / times['bp']:.2f}x |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
