"""The paper and tuned regimes' SAL steps written out by hand: the operations the step needs, no autograd, no
modules, no trainer.

What separates the library's SAL step from these is the cost of its generality (autograd, the rule's, the
dispatch's and the optimizer's Python, bookkeeping for other models); what separates them from BP is what eager
kernels cost on this machine. The trainer's BP and SAL steps, a hand-written BP step and the hand-written SAL steps
are timed in turns in one process, as ratios to the trainer's BP step (the issue's measure). A second
hand-written variant updates each area while it is in cache: AdamW right after the area's gradient is formed
(tuned), plain SGD together with the area's forward and local signal (paper), which reads each area once. Before
timing, every hand-written SAL step is checked against the trainer's (same parameters after five steps from the
same start), so it computes what the library computes.

    python benchmarks/eager_floor.py --threads 2 --out docs/performance/eager-floor.json      # about 3 minutes
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from speed import REGIMES, Stepper, machine, make_trainer, paired_ratio, rounds_in_turns  # benchmarks/speed.py
from torch import Tensor


def adamw_settings(optimizer: torch.optim.Optimizer) -> dict | None:
    """The keyword arguments of torch's fused AdamW kernel for ``optimizer``'s first group; None for SGD."""
    if isinstance(optimizer, torch.optim.SGD):
        return None
    group = optimizer.param_groups[0]
    return {"lr": group["lr"], "beta1": group["betas"][0], "beta2": group["betas"][1], "eps": group["eps"],
            "weight_decay": group["weight_decay"], "amsgrad": False, "maximize": False}


def fused_adamw(params: list[Tensor], grads: list[Tensor], moments: tuple[list[Tensor], list[Tensor]], step: int,
                settings: dict) -> None:
    """torch's fused AdamW (what ``torch.optim.AdamW(fused=True)`` runs) as the ``step``-th update (from 1) of every
    tensor; the kernel reads the count, ``torch.optim`` increments it before the call."""
    steps = [torch.full((), float(step)) for _ in params]
    torch._fused_adamw_(params, grads, moments[0], moments[1], [], steps, **settings)


class HandWrittenSAL:
    """One step of the 784-256-10 model with 16 areas (input routing, local readout signal): plain SGD applied in
    place area by area (paper), or AdamW (tuned) over the touched areas from gradient buffers, as the library does.
    ``in_cache``: each area updated while it is in cache, AdamW right after the area's gradient is formed, plain
    SGD together with the area's forward and signal (the area's weights read once)."""

    def __init__(self, trainer, in_cache: bool = False) -> None:  # noqa: ANN001
        model, rule = trainer.model, trainer.rule
        router = model.routers[0]
        take = lambda t: t.detach().clone()  # noqa: E731
        self.P, self.c = take(router.projection.weight), take(router.projection.bias)
        self.C = router.prototypes.clone()
        self.W1, self.b1 = take(model.blocks[0].linear.weight), take(model.blocks[0].linear.bias)
        self.W2, self.b2 = take(model.blocks[1].linear.weight), take(model.blocks[1].linear.bias)
        self.G = take(rule.fixed_matrices("local", 0)[0])
        self.temperature = router.config.routing_temperature
        self.adamw = adamw_settings(trainer.optimizer)
        self.lr, self.in_cache = trainer.optimizer.param_groups[0]["lr"], in_cache
        self.x, self.y = trainer.x_train, trainer.y_train
        if self.adamw:
            params = self.parameters()
            self.grads = [torch.zeros_like(p) for p in params]
            self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
            self.step = 0

    def parameters(self) -> list[Tensor]:
        return [self.W1, self.b1, self.W2, self.b2, self.P, self.c]

    @torch.no_grad()
    def __call__(self, batch: Tensor) -> None:
        x, y, lr, areas = self.x[batch], self.y[batch], self.lr, self.W1.shape[0]
        b = x.shape[0]
        # routing: scores, balanced target, argmax, and the router's gradient
        u = torch.addmm(self.c, x, self.P.T)
        norm = torch.linalg.vector_norm(u, dim=1, keepdim=True).clamp_min_(1e-12)
        z = u / norm
        s = z @ self.C.T
        q = torch.exp(s / 0.05)
        for _ in range(3):
            q.div_(q.sum(dim=0, keepdim=True))
            q.div_(q.sum(dim=1, keepdim=True))
        area = s.argmax(dim=1)
        ds = torch.softmax(s / self.temperature, dim=1).sub_(q).mul_(1 / (b * self.temperature))
        dz = ds @ self.C
        du = dz.sub_(z * (z * dz).sum(dim=1, keepdim=True)).div_(norm)
        # grouping
        order = torch.argsort(area, stable=True)
        counts = torch.bincount(area, minlength=areas).tolist()
        rows, labels, row_area = x[order], y[order], area[order]
        onehot = torch.zeros(b, self.W2.shape[1]).scatter_(1, labels.unsqueeze(1), 1)
        # hidden layer: area by area, or where padding at most doubles the rows one batched product over the
        # rows padded to the largest area's count (the library's choice)
        touched = [(k, n) for k, n in enumerate(counts) if n]
        starts = [sum(counts[:k]) for k, _ in touched]
        capacity = max(counts)
        padded = areas * capacity <= 2 * b
        if self.adamw is None and self.in_cache:   # each area read once: forward, signal and update in cache
            h = self._sgd_area_by_area(rows, onehot, touched, starts)
            self._sgd_head_and_router(x, du, h, onehot, row_area)
            return
        if padded:
            ends = torch.tensor(counts).cumsum(0)
            slot = row_area * capacity + torch.arange(b) - (ends - torch.tensor(counts))[row_area]
            padded_rows = rows.new_zeros(areas * capacity, rows.shape[1]).index_copy_(0, slot, rows)
            padded_rows = padded_rows.view(areas, capacity, -1)
            a = torch.baddbmm(self.b1.unsqueeze(1), padded_rows, self.W1.transpose(1, 2)).view(areas * capacity, -1)
            a = a.index_select(0, slot)
        else:
            a = rows.new_empty(b, self.W1.shape[1])
            for (k, n), start in zip(touched, starts):
                torch.addmm(self.b1[k], rows[start:start + n], self.W1[k].T, out=a[start:start + n])
        h = torch.relu(a)
        # the local signal (softmax(h G^T) - y) G
        da = torch.softmax(h @ self.G.T, dim=1).sub_(onehot).matmul(self.G).mul_(a > 0).div_(b)
        if self.adamw is None:                    # plain SGD in place: no gradient is written
            for (k, n), start in zip(touched, starts):
                d = da[start:start + n]
                self.W1[k].addmm_(d.T, rows[start:start + n], alpha=-lr)
                self.b1[k].add_(d.sum(0), alpha=-lr)
            self._sgd_head_and_router(x, du, h, onehot, row_area)
            return
        e = self._head_error(h, onehot, row_area)
        gW1, gb1, gW2, gb2, gP, gc = self.grads
        torch.mm(du.T, x, out=gP)
        torch.sum(du, 0, out=gc)
        gW2.zero_().index_add_(0, row_area, e.unsqueeze(2) * h.unsqueeze(1))
        gb2.zero_().index_add_(0, row_area, e)
        gb1.zero_().index_add_(0, row_area, da)
        if self.in_cache:                         # each area's gradient stepped while it is in cache
            scratch = gW1[0]
            for (k, n), start in zip(touched, starts):
                torch.mm(da[start:start + n].T, rows[start:start + n], out=scratch)
                m, v = self.moments[0]
                fused_adamw([self.W1[k]], [scratch], ([m[k]], [v[k]]), self.step + 1, self.adamw)
        elif padded:
            padded_da = da.new_zeros(areas * capacity, da.shape[1]).index_copy_(0, slot, da)
            torch.bmm(padded_da.view(areas, capacity, -1).transpose(1, 2), padded_rows, out=gW1)
        else:
            for (k, n), start in zip(touched, starts):
                torch.mm(da[start:start + n].T, rows[start:start + n], out=gW1[k])
        # the area tensors over their runs of consecutive touched areas (whole when all were), the router's whole
        runs, start = [], None
        for k, n in enumerate([*counts, 0]):
            if n and start is None:
                start = k
            elif not n and start is not None:
                runs.append((start, k))
                start = None
        stacked = [(p, gr, m) for p, gr, m in zip(self.parameters()[:4], self.grads, self.moments)]
        if self.in_cache:
            stacked = stacked[1:]
        params, grads, exp_avg, exp_avg_sq = [], [], [], []
        for p, gr, (m, v) in stacked:
            for start, stop in runs:
                params.append(p[start:stop]), grads.append(gr[start:stop])
                exp_avg.append(m[start:stop]), exp_avg_sq.append(v[start:stop])
        for p, gr, (m, v) in zip(self.parameters()[4:], self.grads[4:], self.moments[4:]):
            params.append(p), grads.append(gr), exp_avg.append(m), exp_avg_sq.append(v)
        fused_adamw(params, grads, (exp_avg, exp_avg_sq), self.step + 1, self.adamw)
        self.step += 1                            # one count per tensor, as the library's optimizers


    def _head_error(self, h: Tensor, onehot: Tensor, row_area: Tensor) -> Tensor:
        """The head's output error (softmax - y) / B, each row through its own area's gathered bank."""
        out = torch.baddbmm(self.b2.index_select(0, row_area).unsqueeze(1), h.unsqueeze(1),
                            self.W2.index_select(0, row_area).transpose(1, 2)).squeeze(1)
        return torch.softmax(out, dim=1).sub_(onehot).div_(h.shape[0])

    def _sgd_head_and_router(self, x: Tensor, du: Tensor, h: Tensor, onehot: Tensor, row_area: Tensor) -> None:
        e = self._head_error(h, onehot, row_area)
        self.W2.index_add_(0, row_area, e.unsqueeze(2) * h.unsqueeze(1), alpha=-self.lr)
        self.b2.index_add_(0, row_area, e, alpha=-self.lr)
        self.P.addmm_(du.T, x, alpha=-self.lr)
        self.c.add_(du.sum(0), alpha=-self.lr)

    def _sgd_area_by_area(self, rows: Tensor, onehot: Tensor, touched: list[tuple[int, int]],
                          starts: list[int]) -> Tensor:
        """The hidden layer's output, each area's forward, local signal and in-place update taken together: a
        row's signal needs only its own output, so an area is read from memory once instead of twice."""
        h = rows.new_empty(rows.shape[0], self.W1.shape[1])
        for (k, n), start in zip(touched, starts):
            r, part = rows[start:start + n], slice(start, start + n)
            a = torch.addmm(self.b1[k], r, self.W1[k].T)
            torch.clamp_min(a, 0, out=h[part])
            d = torch.softmax(h[part] @ self.G.T, dim=1).sub_(onehot[part]).matmul(self.G)
            d = d.mul_(a > 0).div_(rows.shape[0])
            self.W1[k].addmm_(d.T, r, alpha=-self.lr)
            self.b1[k].add_(d.sum(0), alpha=-self.lr)
        return h


class HandWrittenBP:
    """One step of the dense 784-256-10 model, written out the same way (plain SGD in place, or fused AdamW)."""

    def __init__(self, trainer) -> None:  # noqa: ANN001
        w1, w2 = trainer.model.blocks[0].linear, trainer.model.blocks[1].linear
        self.W1, self.b1 = w1.weight.detach()[0].clone(), w1.bias.detach()[0].clone()
        self.W2, self.b2 = w2.weight.detach()[0].clone(), w2.bias.detach()[0].clone()
        self.lr, self.x, self.y = trainer.optimizer.param_groups[0]["lr"], trainer.x_train, trainer.y_train
        self.adamw = adamw_settings(trainer.optimizer)
        if self.adamw:
            params = [self.W1, self.b1, self.W2, self.b2]
            self.grads = [torch.zeros_like(p) for p in params]
            self.moments = ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params])
            self.step = 0

    @torch.no_grad()
    def __call__(self, batch: Tensor) -> None:
        x, y, lr = self.x[batch], self.y[batch], self.lr
        a = torch.addmm(self.b1, x, self.W1.T)
        h = torch.relu(a)
        e = torch.softmax(torch.addmm(self.b2, h, self.W2.T), dim=1)
        e = e.sub_(F.one_hot(y, e.shape[1]).to(e.dtype)).div_(x.shape[0])
        da = (e @ self.W2).mul_(a > 0)
        if self.adamw is None:
            self.W2.addmm_(e.T, h, alpha=-lr)
            self.b2.add_(e.sum(0), alpha=-lr)
            self.W1.addmm_(da.T, x, alpha=-lr)
            self.b1.add_(da.sum(0), alpha=-lr)
            return
        gW1, gb1, gW2, gb2 = self.grads
        torch.mm(e.T, h, out=gW2)
        torch.sum(e, 0, out=gb2)
        torch.mm(da.T, x, out=gW1)
        torch.sum(da, 0, out=gb1)
        fused_adamw([self.W1, self.b1, self.W2, self.b2], self.grads, self.moments, self.step + 1, self.adamw)
        self.step += 1


class Rotating(Stepper):
    """A hand-written step on the trainer's rotating batches."""

    def __init__(self, step, trainer, regime: str) -> None:  # noqa: ANN001
        super().__init__(trainer, REGIMES[regime].batch)
        self.step = step

    def __call__(self, steps: int = 1) -> None:
        for _ in range(steps):
            self.step(self.batches[self.i % len(self.batches)])
            self.i += 1


def check_same_updates(regime: str, in_cache: bool = False, steps: int = 5) -> float:
    """Largest difference between the trainer's SAL parameters and the hand-written step's after ``steps`` steps
    from the same start on the same batches, relative to how far the parameters moved."""
    def trainer():  # noqa: ANN202
        made = make_trainer(REGIMES[regime], "sal", "fp32", "cpu")
        for group in made.optimizer.param_groups:
            group["lr"] = 0.05 if regime == "paper" else 1e-3      # large enough that a wrong update shows
        made.scheduler.base_lrs = [group["lr"]]                    # (the scheduler sets lr from these)
        return made

    library = trainer()
    hand = HandWrittenSAL(library, in_cache)
    Stepper(library, REGIMES[regime].batch)(steps)
    Rotating(hand, library, regime)(steps)
    model = library.model
    theirs = [model.blocks[0].linear.weight, model.blocks[0].linear.bias, model.blocks[1].linear.weight,
              model.blocks[1].linear.bias, model.routers[0].projection.weight, model.routers[0].projection.bias]
    worst = 0.0
    for a, b, s in zip(theirs, hand.parameters(), HandWrittenSAL(trainer()).parameters()):
        moved = (a.detach() - s).norm().item()
        assert moved > 0, "a parameter did not move: the check would prove nothing"
        difference = (a.detach() - b).norm().item() / moved
        worst = difference if not difference <= worst else worst        # NaN stays NaN
    return worst


class _Timed:
    """Wraps a callable and keeps the wall time of every call."""

    def __init__(self, fn) -> None:  # noqa: ANN001
        self.fn, self.seconds = fn, []

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds.append(time.perf_counter() - start)


def phases(regime: str, steps: int = 400) -> dict[str, dict[str, float]]:
    """Microseconds per step of the trainer's BP and SAL steps by phase (medians over ``steps`` steps): the rule's
    step without its backward (forward pass and, in closed form, the update), autograd's backward, the optimizer,
    the scheduler, and the rest (batch gather, gradient release, loss check, running metrics), each timed by
    wrapping the trainer's own calls."""
    out = {}
    for variant in ("bp", "sal"):
        trainer = make_trainer(REGIMES[regime], variant, "fp32", "cpu")
        stepper = Stepper(trainer, REGIMES[regime].batch)
        stepper(50)
        parts = {"rule": _Timed(trainer.execution.step), "optimizer": _Timed(trainer.optimizer.step),
                 "scheduler": _Timed(trainer.scheduler.step), "backward": _Timed(torch.autograd.backward)}
        trainer.execution = SimpleNamespace(step=parts["rule"])       # the step is all the trainer asks of it
        trainer.optimizer.step, trainer.scheduler.step = parts["optimizer"], parts["scheduler"]
        whole = _Timed(stepper)
        original, torch.autograd.backward = torch.autograd.backward, parts["backward"]
        try:
            for _ in range(steps):
                whole()
        finally:
            torch.autograd.backward = original
        per = {name: 1e6 * statistics.median(t.seconds) if t.seconds else 0.0 for name, t in parts.items()}
        per["rule"] -= per["backward"]              # (the backward runs inside the rule's step)
        per["rest"] = 1e6 * statistics.median(whole.seconds) - sum(per.values())
        out[variant] = per
    return out


def check(regime: str) -> tuple[dict[str, bool], dict[str, float]]:
    """The hand-written SAL variants of ``regime`` (name -> in_cache), each checked against the trainer's step."""
    variants = {"sal-by-hand": False, "sal-by-hand-in-cache": True}
    difference = {name: check_same_updates(regime, in_cache) for name, in_cache in variants.items()}
    for name, d in difference.items():
        if not d <= 1e-3:      # rounding only (Adam's first steps divide by the gradient's size, so it shows)
            raise SystemExit(f"{regime}: {name} differs from the trainer's step by {d:.1e} of the update")
    return variants, difference


def measure(regime: str, variants: dict[str, bool], rounds: int) -> dict[str, list[float]]:
    """Seconds per step of the trainer's BP and SAL steps and the hand-written ones, every round timing each in
    turn."""
    bp, sal = (make_trainer(REGIMES[regime], v, "fp32", "cpu") for v in ("bp", "sal"))
    batch = REGIMES[regime].batch
    steppers = {"bp": Stepper(bp, batch), "sal": Stepper(sal, batch),
                "bp-by-hand": Rotating(HandWrittenBP(bp), bp, regime)}
    steppers.update({name: Rotating(HandWrittenSAL(sal, in_cache), sal, regime) for name, in_cache in variants.items()})
    return rounds_in_turns(steppers, rounds, REGIMES[regime].steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regimes", default="paper,tuned", help="comma-separated: paper, tuned")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3, help="measure every regime this many times, in turns")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    regimes = args.regimes.split(",")
    checked = {regime: check(regime) for regime in regimes}
    runs: dict[str, list[dict[str, list[float]]]] = {regime: [] for regime in regimes}
    for _ in range(args.repeats):                  # this host drifts: the repeats are spread over the run
        for regime in regimes:
            runs[regime].append(measure(regime, checked[regime][0], args.rounds))
    results = {"machine": machine(), "rounds": args.rounds, "repeats": args.repeats, "regimes": {}}
    print("| regime | step | ms | / the trainer's BP step (range over repeats) |\n|---|---|---|---|")
    for regime in regimes:
        ratios = {name: [paired_ratio(times, name) for times in runs[regime]]
                  for name in runs[regime][0]}
        ms = {name: statistics.median(1e3 * statistics.median(times[name]) for times in runs[regime])
              for name in ratios}
        results["regimes"][regime] = {"update_difference": checked[regime][1], "ms": ms,
                                      "ratio_to_bp": {n: statistics.median(r) for n, r in ratios.items()},
                                      "ratio_runs": ratios, "round_s": runs[regime]}
        for name, r in ratios.items():
            print(f"| {regime} | {name} | {ms[name]:.3f} | {statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f}) |")
    print("\n| regime | phase | BP us | SAL us |\n|---|---|---|---|")
    for regime in regimes:
        split = results["regimes"][regime]["phases_us"] = phases(regime)
        for name in split["bp"]:
            print(f"| {regime} | {name} | {split['bp'][name]:.0f} | {split['sal'][name]:.0f} |")
    print("hand-written SAL steps against the trainer's after 5 steps (difference / update): " + ", ".join(
        f"{regime} {name} {d:.1e}" for regime in regimes for name, d in checked[regime][1].items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
