"""A local rule's step in closed form: no autograd graph, for models whose every block forms its own update.

Under a local rule (dfa, sal) no gradient crosses a block: each block's update is a closed-form function of its
input, its output and its signal, and the router's a closed-form function of its own objective. Where every block
provides that (``closed_form()``, ``local_forward``, ``learn``: torchsal.models.MLPBlock) and the batch is routed
once (input routing, or one area), the step runs one pass forward without recording a graph, computes the signals,
and applies every update at once (the update ``LearningRule.step`` makes): into ``.grad`` with the touched areas
marked, for any optimizer, or in place (``optim.updates_in_backward``: plain SGD, fused Adam), as
``rule(model, x, y).loss.backward()`` leaves it. At small batches autograd's graph, built and run again every
step, cost as much as the kernels it drives: docs/performance.md measures both.

Models and objectives it does not cover take the autograd step (the run's execution, torchsal.execution, chooses
once): learned local objectives (torchsal.objectives),
norms and convolutions (their parameters need gradients through the block), a user's own modules, layer routing,
runs of alike blocks (``torchsal.stacks`` batches those), lean memory, mixed precision and extra output terms
(continual learning's distillation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from torchsal import distributed
from torchsal.blocks import BlockNet, Trace
from torchsal.dispatch import compiled_call, few_rows, group_by_area
from torchsal.rules.base import (
    LearningRule,
    StepOutput,
    one_hot,
    output_step,
    softmax_error,
    surrogate_value,
)

if TYPE_CHECKING:
    from torchsal.rules.local import LocalSignalRule


def covers(rule: LearningRule, model: BlockNet) -> bool:
    """True when ``rule`` may train ``model`` in closed form: a local rule with fixed signals only, every block
    with its own update, the batch routed once, no lean memory and no runs of alike blocks (layer stacks serve
    those). The run's execution (torchsal.execution) asks this once, and adds what only the run knows: no mixed
    precision and no extra output term."""
    return (rule.local and rule.config.memory != "lean" and getattr(rule, "objective", None) is None
            and (model.areas == 1 or model.routing.routing == "input")
            and all(callable(getattr(b, "closed_form", None)) and b.closed_form() for b in model.blocks)
            and not model.alike_runs())


def step(rule: LocalSignalRule, model: BlockNet, x: Tensor, y: Tensor,
         before_update: Callable[[StepOutput], None] | None = None) -> StepOutput:
    """The rule's whole step on ``(x, y)``, as ``LearningRule.step`` makes it: its hidden blocks learn from the
    rule's signals, the head from its cross-entropy, the router from its own objective.

    It runs in ``torch.inference_mode`` (no version counters, no view tracking: the trainer's step 0.92-0.94 of
    the same under ``no_grad`` at batch 16, 0.97-1.00 at 64, A/B in four runs each), so what leaves it is made
    ordinary: the output's tensors here, gradients and recycled memory where they are made
    (``dispatch.accumulate_gradient``, ``dispatch.take_memory``). Its two phases, the forward pass with every
    signal (``forward_phase``) and the updates, are apart so that ``--compile`` can build the first as one graph
    (``dispatch.compiled_call``): the updates write the parameters in place, area by area, which eager MKL does
    best."""
    with torch.inference_mode():
        phase = compiled_call(forward_phase, rule, model, x, y) if _compiling_pays(model, x) else None
        made, states, grads, router_state = phase or forward_phase(rule, model, x, y)
    out = StepOutput(*(None if t is None else t.clone() for t in vars(made).values()))
    if before_update is not None:
        before_update(out)
    with torch.inference_mode():
        for block, state, g in zip(model.blocks, states, grads):
            block.learn(state, g)
        if router_state is not None:
            model.routers[0].learn(router_state)
    return out


def _compiling_pays(model: BlockNet, x: Tensor) -> bool:
    """Under ``--compile``, the step up to its updates runs as generated kernels where areas hold a few rows each
    on CPU (paper: 16 rows over 16 areas), in one process (a data-parallel router gathers every rank's scores);
    its updates stay eager (MKL's in-place products)."""
    return x.device.type == "cpu" and model.areas > 1 and few_rows(x.shape[0], model.areas) and \
        distributed.current().world == 1


def forward_phase(rule: LocalSignalRule, model: BlockNet, x: Tensor, y: Tensor
                  ) -> tuple[StepOutput, list, list[Tensor], tuple | None]:
    """The step up to its updates: ``(output, each block's state, each block's output gradient, the router's
    state)``."""
    x = model.prepared(x)
    batch = x.shape[0]
    area = groups = rows = inverse = router_state = None
    routing_loss = x.new_zeros((), dtype=torch.float32)
    h = x
    if model.routers:
        router = model.routers[0]
        area, routing_loss, router_state = router.local_step(x.flatten(1))
        groups = group_by_area(area, model.areas)
        rows, inverse = groups.order, groups.inverse
        h = x[rows]
    outputs, states = [], []
    for block in model.blocks:
        h, state = block.local_forward(h, groups)
        outputs.append(h)
        states.append(state)
    count = len(outputs)
    trace = Trace(outputs[-1], outputs[:-1], [area] * count, [groups] * count, routing_loss, rows, inverse)
    labels = trace.in_trace_order(y)
    onehot = one_hot(labels, model.num_classes, model.dtype)
    error = softmax_error(trace.logits, onehot)           # the head's output gradient, times B
    hidden, signals, signal_rms = rule.hidden_signals(trace, error, onehot)
    made = output_step(trace, y, surrogate_value(hidden, signals, batch), signal_rms=signal_rms)
    return made, states, [g.div(batch) for g in [*signals, error]], router_state
