"""The one interface every learning rule implements (rules are named in ``torchsal.registry``).

A rule turns a batch into one scalar whose ``backward()`` fills every parameter's ``.grad`` with that rule's
update (a *surrogate loss*, batch-mean like a standard loss). Rules own their fixed feedback matrices as buffers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchsal.blocks import BlockNet, Trace
from torchsal.config import RuleConfig
from torchsal.registry import RULES, get_rule, register_rule

__all__ = ["RULES", "LearningRule", "StepOutput", "build_rule", "get_rule", "register_rule"]


@dataclass
class StepOutput:
    loss: Tensor                        # call .backward() on it: fills .grad with the rule's update
    logits: Tensor                      # (B, C), detached, batch order
    task_loss: Tensor                   # cross-entropy of the logits, detached (what to log)
    activation_rms: Tensor | None = None  # (L,) RMS of each hidden layer's output (diagnostics)
    signal_rms: Tensor | None = None      # (L,) RMS of each hidden layer's learning signal, where it has one


@torch.no_grad()
def rms(tensors: list[Tensor]) -> Tensor | None:
    """(L,) root-mean-square of each tensor, detached; None for an empty list. One multi-tensor kernel for all
    layers (two kernels per layer made this 3% of a 128-layer step)."""
    if not tensors:
        return None
    norms = torch.stack(torch._foreach_norm(tensors))
    sizes = {t.numel() for t in tensors}
    if len(sizes) == 1:                 # one kernel, not a tensor of sizes built and divided by
        return norms.div_(math.sqrt(sizes.pop()))
    return norms / torch.tensor([t.numel() for t in tensors], device=norms.device).sqrt()


@torch.no_grad()
def stacked_rms(t: Tensor) -> Tensor:
    """(L,) root-mean-square of each layer of a stacked (L, ...) tensor, in one reduction (``rms`` of its L views
    runs a kernel per view on CPU: 0.3 ms of a 128-layer step)."""
    return torch.linalg.vector_norm(t.flatten(1), dim=1) / math.sqrt(t[0].numel())


def hidden_rms(trace: Trace) -> Tensor | None:
    """(L,) RMS of every hidden output of a trace, a layer stack's at once."""
    parts = [rms([trace.hidden[i] for i in layers]) if stacked is None else stacked_rms(stacked)
             for layers, stacked in trace.segments()]
    return torch.cat(parts) if len(parts) > 1 else parts[0] if parts else None


def softmax_error(logits: Tensor, onehot: Tensor) -> Tensor:
    """``softmax(logits) - onehot`` over the last dimension, without autograd. Written out in elementwise kernels,
    because torch 2.13's CPU softmax along a dimension shorter than 16 runs a slow path: 16,384 x 10 (the local
    signals of a 128-layer step at batch 128) took 1.1-2.1 ms against 0.27-0.39 ms this way, and 16,384 x 16 took
    0.13-0.23 ms (1 and 2 threads, an AMD EPYC). Below 128 rows torch's one kernel is faster than these five (16
    x 10: 3.8 against 12.9 us; even at 128 rows). It computes in float32 and returns the labels' type."""
    if logits.numel() < 128 * logits.shape[-1]:
        return torch.softmax(logits, -1, dtype=torch.float32).to(onehot.dtype).sub_(onehot)
    x = logits.float()
    e = (x - x.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True)).to(onehot.dtype).sub_(onehot)


def one_hot(y: Tensor, classes: int, dtype: torch.dtype) -> Tensor:
    """``F.one_hot(y, classes).to(dtype)`` in two kernels instead of seven (F.one_hot checks the labels' range with
    two reductions read on the host, then converts); out-of-range labels still raise, in ``scatter_``."""
    return torch.zeros(y.shape[0], classes, dtype=dtype, device=y.device).scatter_(1, y.unsqueeze(1), 1)


class _Surrogate(torch.autograd.Function):
    """``sum_l (h_l * g_l).sum() / B`` in one node: forward one dot product per layer, backward hands each h_l its
    signal ``g_l / B`` (the autograd of the plain expression took five kernels per layer)."""

    @staticmethod
    def forward(ctx, batch: int, *pairs: Tensor) -> Tensor:  # noqa: ANN001
        hidden, signals = pairs[: len(pairs) // 2], pairs[len(pairs) // 2:]
        ctx.signals, ctx.batch = signals, batch
        return surrogate_value(hidden, signals, batch)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        scale = grad / ctx.batch
        return (None, *(g * scale.to(g.dtype) for g in ctx.signals), *(None for _ in ctx.signals))


@torch.no_grad()
def surrogate_value(hidden: Sequence[Tensor], signals: Sequence[Tensor], batch: int) -> Tensor:
    """``sum_l (h_l * g_l).sum() / B`` in float32, one dot product per layer (zero without hidden layers)."""
    if not hidden:
        return torch.zeros((), device=signals[0].device if signals else None)
    # at least float32: torch 2.13's CPU dot of bfloat16 vectors runs a scalar path (23 ms for 2^20 elements
    # against 0.75 ms cast to float32 first, an Intel Xeon), and the loss is logged in float32 anyway
    wide = torch.promote_types(hidden[0].dtype, torch.float32)
    dots = [torch.vdot(h.reshape(-1).to(wide), g.reshape(-1).to(wide)) for h, g in zip(hidden, signals)]
    return (torch.stack(dots).sum() if len(dots) > 1 else dots[0]).float() / batch


def surrogate(hidden: list[Tensor], signals: list[Tensor], batch: int) -> Tensor:
    """The hidden layers' surrogate loss, whose gradient with respect to each h_l is g_l / B."""
    return _Surrogate.apply(batch, *hidden, *signals)


# An extra term of the output layer's objective for one step (continual learning: LwF's distillation), a function
# of the step's trace returning a scalar. Each rule's own graph carries it: through every layer for bp, through the
# fixed feedback for fa, into the head only for dfa and sal (their hidden layers follow their own signals).
OutputTerm = Callable[[Trace], Tensor]


def output_step(trace: Trace, y: Tensor, hidden_loss: Tensor | None = None, activation_rms: Tensor | None = None,
                signal_rms: Tensor | None = None, output_term: OutputTerm | None = None) -> StepOutput:
    """The output layer's cross-entropy plus the routers' objective (and the hidden layers' surrogate, and an
    extra output term, if any)."""
    task = F.cross_entropy(trace.logits, trace.in_trace_order(y))
    loss = task + trace.routing_loss if hidden_loss is None else task + hidden_loss + trace.routing_loss
    if output_term is not None:
        loss = loss + output_term(trace)
    return StepOutput(loss, trace.in_batch_order(trace.logits.detach()), task.detach(),
                      hidden_rms(trace) if activation_rms is None else activation_rms, signal_rms)


class LearningRule(nn.Module):
    """Base class: ``rule(model, x, y) -> StepOutput``.

    Usage::

        rule = build_rule(model, RuleConfig(rule="sal"))
        optimizer.zero_grad()       # set_to_none (the default) keeps untouched areas' .grad None;
                                    # torchsal.dispatch.release_gradients(model.parameters()) does the same and
                                    # reuses the gradient memory in the next step (faster for large layers)
        out = rule(model, x, y)     # zero_grad first: a lean rule fills hidden layers' .grad already here
        out.loss.backward()
        optimizer.step()

    or, the same in one call::

        out = rule.step(model, x, y)

    Both are the reference path; a Trainer runs the fast path where it fits (torchsal.execution).
    """

    name: ClassVar[str]
    # The settings this rule changes from the dataclass defaults, on every model and on conv nets only.
    defaults: ClassVar[dict[str, Any]] = {}
    conv_defaults: ClassVar[dict[str, Any]] = {}
    # The RuleConfig fields it reads (beyond ``rule``): given for a rule that ignores them, the CLI refuses them.
    options: ClassVar[frozenset[str]] = frozenset()
    # True when no gradient crosses a block (dfa, sal): the fast path (torchsal.execution) may then run alike
    # blocks as one stack, and form the step in closed form.
    local: ClassVar[bool] = False

    def __init__(self, model: BlockNet, config: RuleConfig, generator: torch.Generator) -> None:
        super().__init__()
        self.config = config
        self._counts: dict[str, int] = {}       # matrices registered per prefix

    def _register_matrices(self, prefix: str, matrices: list[Tensor]) -> None:
        for i, m in enumerate(matrices):
            self.register_buffer(f"{prefix}_{i}", m)
        self._counts[prefix] = len(matrices)

    def _matrices(self, prefix: str, start: int = 0, stop: int | None = None) -> list[Tensor]:
        """Matrices ``start:stop`` of ``prefix``, fetched by name on every call so they follow ``.to()`` and
        ``load_state_dict``; only those asked for (this runs once per hidden layer per step: fetching all of them
        each time made a 128-layer step quadratic in depth)."""
        count = self._counts.get(prefix, 0)
        return [getattr(self, f"{prefix}_{i}") for i in range(start, count if stop is None else min(stop, count))]

    def forward(self, model: BlockNet, x: Tensor, y: Tensor, output_term: OutputTerm | None = None) -> StepOutput:
        raise NotImplementedError

    def step(self, model: BlockNet, x: Tensor, y: Tensor,
             before_update: Callable[[StepOutput], None] | None = None,
             output_term: OutputTerm | None = None) -> StepOutput:
        """``rule(model, x, y).loss.backward()`` as one call: the update applied (every gradient accumulated into
        ``.grad``, or taken in place under ``optim.updates_in_backward``) and the step's output returned,
        its loss detached. ``before_update(out)`` runs between the forward pass and the update (the trainer stops
        there at a non-finite loss). This is the reference path; a run's fast path (torchsal.execution) may form
        the same update without autograd."""
        # a rule of a user's own may not take output terms; only a run with one asks (continual learning's LwF)
        out = self(model, x, y) if output_term is None else self(model, x, y, output_term=output_term)
        if before_update is not None:
            before_update(out)
        with torch.autocast(x.device.type, enabled=False):      # the backward outside autocast, as it should be
            out.loss.backward()
        out.loss = out.loss.detach()
        return out


def build_rule(model: BlockNet, config: RuleConfig | str, seed: int = 0) -> LearningRule:
    """The rule of a run (a ``RuleConfig``, or a rule's name with its defaults), its feedback drawn from a
    generator of its own (independent of the model's)."""
    config = RuleConfig(rule=config) if isinstance(config, str) else config
    generator = torch.Generator().manual_seed(seed + 1_000_003)
    return get_rule(config.rule)(model, config, generator).to(model.dtype)
