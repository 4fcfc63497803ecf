"""Continual-learning methods that work with every learning rule: a per-parameter term added to each parameter's
update (EWC, online EWC, SI) or a data stream (experience replay). None needs a global gradient: each acts on the
update ``.grad`` the rule produced, so SAL's local updates are consolidated exactly as backprop's are.

    method = EWC(strength=100.0)                    # or SI(strength=1.0), Replay(per_task=200), None
    result = run_sequence(config, tasks, method)    # torchsal.continual

- **EWC** (Kirkpatrick et al. 2017): after task t, the importance of each parameter is its Fisher information,
  estimated from the rule's own update ``g`` on the task's training data (the mean over batches of ``g ** 2``: for
  BP the empirical Fisher, for a local rule the Fisher of the objective that rule follows). Later updates get
  ``strength * F * (theta - theta_t)`` added, the gradient of ``strength / 2 * sum F (theta - theta_t) ** 2``.
  ``decay`` < 1 gives online EWC (Schwarz et al. 2018): ``F <- decay * F + F_t``, one anchor.
- **SI** (Zenke et al. 2017): during a task each parameter accumulates ``omega += -g * delta`` (its update times
  its actual change per step); at the task's end ``Omega += omega / (Delta ** 2 + xi)`` with ``Delta`` the task's
  total change; the penalty is ``strength * sum Omega (theta - theta_t) ** 2``.
- **LwF** (Li & Hoiem 2016): a copy of the model as it left the last task; each step's output objective gets
  ``strength * T^2 * KL(softmax(old / T) || softmax(new / T))`` on the current batch. The rule's own graph carries
  it: through every layer for bp, through the fixed feedback for fa, into the output layer only for dfa and sal
  (their hidden layers follow their own signals, so for them LwF consolidates the head).
- **Replay**: a buffer keeping ``per_task`` training samples of every finished task, as many per class as the task
  has classes allow; each training batch is joined by ``batch`` samples drawn from it.

The penalties need the ``.grad`` protocol, so the trainer does not apply plain SGD inside the backward while a
method is active.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchsal.data import Splits


class ContinualMethod:
    """Hooks the trainer calls; each method overrides what it needs."""

    adds_output_term = False        # whether ``output_term`` may return a term (the run's execution asks)

    def batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The batch a step trains on (replay adds stored samples)."""
        return x, y

    def output_term(self, x: Tensor) -> Callable[[Any], Tensor] | None:
        """A term for this step's output objective, a function of the step's trace (LwF), or None."""
        return None

    def penalize(self, model: nn.Module) -> None:
        """Called after the rule's backward pass, before the optimizer: add this method's term to ``.grad``."""

    def after_step(self, model: nn.Module) -> None:
        """Called after the optimizer step."""

    def after_task(self, trainer: Any, splits: Splits) -> None:
        """Called when a task's training is over."""


def _params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class _Quadratic(ContinualMethod):
    """A penalty ``strength * sum importance * (theta - anchor) ** 2`` (scaled as each method defines it)."""

    def __init__(self, strength: float, scale: float) -> None:
        self.strength, self.scale = strength, scale
        self.importance: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    def penalty(self, model: nn.Module) -> Tensor:
        """The penalty's value (for tests and logs)."""
        total = torch.zeros(())
        for name, p in _params(model).items():
            if name in self.importance:
                total = total + self.scale / 2 * self.strength * (self.importance[name] * (p - self.anchor[name])
                                                                  ** 2).sum()
        return total

    @torch.no_grad()
    def penalize(self, model: nn.Module) -> None:
        for name, p in _params(model).items():
            if name in self.importance and p.grad is not None:
                p.grad.add_(self.importance[name] * (p - self.anchor[name]), alpha=self.scale * self.strength)


class EWC(_Quadratic):
    """Elastic weight consolidation; ``decay`` < 1 makes it online EWC. ``batches`` caps the Fisher estimate."""

    def __init__(self, strength: float, decay: float = 1.0, batches: int = 100) -> None:
        super().__init__(strength, scale=1.0)
        self.decay, self.batches = decay, batches

    def after_task(self, trainer: Any, splits: Splits) -> None:
        fisher = fisher_diagonal(trainer, splits, self.batches)
        for name, f in fisher.items():
            old = self.importance.get(name)
            self.importance[name] = f if old is None else self.decay * old + f
        self.anchor = {name: p.detach().clone() for name, p in _params(trainer.model).items()}


class SI(_Quadratic):
    """Synaptic intelligence; ``xi`` keeps the normalisation finite for parameters that did not move."""

    def __init__(self, strength: float, xi: float = 0.1) -> None:
        super().__init__(strength, scale=2.0)      # the gradient of strength * sum Omega (theta - anchor) ** 2
        self.xi = xi
        self.omega: dict[str, Tensor] = {}
        self.start: dict[str, Tensor] = {}
        self._before: dict[str, Tensor] = {}
        self._update: dict[str, Tensor] = {}

    def penalize(self, model: nn.Module) -> None:
        params = _params(model)
        if not self.start:
            self.start = {name: p.detach().clone() for name, p in params.items()}
        # the task's own update, before the penalty is added, and where each parameter is now
        self._update = {name: p.grad.detach().clone() for name, p in params.items() if p.grad is not None}
        self._before = {name: params[name].detach().clone() for name in self._update}
        super().penalize(model)

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        for name, p in _params(model).items():
            if name in self._update:
                change = p - self._before[name]
                self.omega[name] = self.omega.get(name, torch.zeros_like(p)) - self._update[name] * change

    @torch.no_grad()
    def after_task(self, trainer: Any, splits: Splits) -> None:
        for name, p in _params(trainer.model).items():
            if name not in self.omega:
                continue
            total = (p - self.start[name]) ** 2
            self.importance[name] = self.importance.get(name, torch.zeros_like(p)) + self.omega[name] / (
                total + self.xi)
        self.anchor = {name: p.detach().clone() for name, p in _params(trainer.model).items()}
        self.omega, self.start = {}, {}


class LwF(ContinualMethod):
    """Learning without forgetting: distillation from the model as it left the previous task."""

    adds_output_term = True

    def __init__(self, strength: float = 1.0, temperature: float = 2.0) -> None:
        self.strength, self.temperature = strength, temperature
        self.old: nn.Module | None = None

    def output_term(self, x: Tensor) -> Callable[[Any], Tensor] | None:
        if self.old is None:
            return None
        with torch.no_grad():
            old = self.old(x)                       # batch order

        def distillation(trace: Any) -> Tensor:
            t = self.temperature
            target = F.softmax(trace.in_trace_order(old).float() / t, dim=1)
            return self.strength * t * t * F.kl_div(F.log_softmax(trace.logits.float() / t, dim=1), target,
                                                    reduction="batchmean")
        return distillation

    def after_task(self, trainer: Any, splits: Splits) -> None:
        self.old = copy.deepcopy(trainer.model).eval()
        self.old.requires_grad_(False)


class Replay(ContinualMethod):
    """Experience replay from a class-balanced buffer of ``per_task`` samples per finished task."""

    def __init__(self, per_task: int, batch: int = 32, seed: int = 0) -> None:
        self.per_task, self.replay_batch = per_task, batch
        self.generator = torch.Generator().manual_seed(seed)
        self.x: Tensor | None = None
        self.y: Tensor | None = None

    def batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.x is None:
            return x, y
        pick = torch.randint(len(self.y), (self.replay_batch,), generator=self.generator)
        return torch.cat([x, self.x[pick].to(x.device)]), torch.cat([y, self.y[pick].to(y.device)])

    def after_task(self, trainer: Any, splits: Splits) -> None:
        x, y = splits.x_train, splits.y_train
        classes = y.unique()
        per_class = self.per_task // len(classes)
        keep = []
        for c in classes:
            rows = (y == c).nonzero().squeeze(1)
            keep.append(rows[torch.randperm(len(rows), generator=self.generator)[:per_class]])
        keep = torch.cat(keep)
        self.x = x[keep] if self.x is None else torch.cat([self.x, x[keep]])
        self.y = y[keep] if self.y is None else torch.cat([self.y, y[keep]])


def fisher_diagonal(trainer: Any, splits: Splits, batches: int) -> dict[str, Tensor]:
    """Mean over up to ``batches`` training batches of each parameter's squared update, as the trainer's rule
    computes it (no optimizer step)."""
    from torchsal.dispatch import release_gradients

    model, rule = trainer.model, trainer.rule
    params = _params(model)
    sums = {name: torch.zeros_like(p) for name, p in params.items()}
    size = trainer.config.train.batch_size
    count = 0
    for xb, yb in zip(splits.x_train.split(size), splits.y_train.split(size)):
        if count == batches:
            break
        release_gradients(model.parameters())
        rule(model, xb.to(trainer.device), yb.to(trainer.device)).loss.backward()
        for name, p in params.items():
            if p.grad is not None:
                sums[name] += p.grad.detach() ** 2
        count += 1
    release_gradients(model.parameters())
    return {name: s / max(count, 1) for name, s in sums.items()}
