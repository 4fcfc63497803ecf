"""Rules whose hidden layers learn from a per-layer signal, with every layer input detached.

Each hidden layer l gets a signal g_l (B, width), the per-sample gradient its output h_l should follow, and
minimises the surrogate ``(h_l * g_l).sum() / B``. Autograd runs only inside the layer, so

    grad W_l[k] = (1/B) sum over samples routed to k of (g_l * f'(a_l)) h_{l-1}^T

and no gradient crosses a layer boundary. The output layer minimises its own cross-entropy. ``rule.step`` forms
that same update without autograd where every block has it in closed form (torchsal.rules.closed_form). Signals:

- ``direct`` (DFA, Nokland 2016): g_l = e B_l, e = softmax(logits) - onehot(y), B_l (C, width) fixed random.
- ``local``: g_l = (softmax(h_l G_l^T) - onehot(y)) G_l, the gradient of a layer-local cross-entropy through a
  fixed random readout G_l (C, width). It needs no global error, so a layer may update as soon as its own
  forward step is done. A feature map is read out after average pooling to at most 2x2 (``--readout-pool``;
  G_l: (C, channels * 4)); its signal is the pooling's adjoint of the readout's gradient. With ``--objective
  pred``, ``sim`` or ``predsim`` the local signal is instead the gradient of a learned local objective
  (torchsal.objectives), taken by autograd inside the block and its head.
- ``both``: their sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from torchsal import compat
from torchsal.blocks import BlockNet, Trace
from torchsal.config import RuleConfig
from torchsal.dispatch import Groups, area_linear, grouped_linear
from torchsal.errors import ConfigError
from torchsal.feedback import random_matrix
from torchsal.objectives import LocalObjective, pooled, pooled_shape
from torchsal.profiling import named_range
from torchsal.rules.base import (
    LearningRule,
    OutputTerm,
    StepOutput,
    one_hot,
    output_step,
    register_rule,
    rms,
    softmax_error,
    stacked_rms,
    surrogate,
)

SIGNALS = {"direct": ("direct",), "local": ("local",), "both": ("direct", "local")}


def read_out_adjoint(h: Tensor, grad: Tensor, pool: int = 2) -> Tensor:
    """The gradient with respect to ``h`` of a readout's input gradient ``grad`` (the pooling's adjoint)."""
    if h.dim() == 2:
        return grad
    pooled = grad.view(h.shape[0], *pooled_shape(h.shape[1:], pool))
    return compat.adaptive_avg_pool2d_backward(pooled.to(h.dtype), h)


class LocalSignalRule(LearningRule):
    """Base of DFA and SAL: which signals a hidden layer receives is the only difference."""

    local = True

    def signals(self) -> tuple[str, ...]:
        raise NotImplementedError

    def fixed_signals(self) -> tuple[str, ...]:
        """The signals formed in closed form from fixed matrices: all of them, but ``local`` under a learned
        objective (whose gradient autograd takes through the block and its head)."""
        return tuple(s for s in self.signals() if s != "local" or self.objective is None)

    def __init__(self, model: BlockNet, config: RuleConfig, generator: torch.Generator) -> None:
        super().__init__(model, config, generator)
        shapes, classes = model.hidden_shapes, model.num_classes
        widths = [math.prod(s) for s in shapes]
        # With per-area feedback each layer has one matrix per area (K), otherwise one.
        self.per_layer = model.areas if config.feedback == "per-area" else 1
        self.objective: LocalObjective | None = None         # a learned local objective and its heads
        if "local" in self.signals() and config.objective != "readout":
            if config.feedback == "per-area":
                raise ConfigError(f"--feedback per-area splits fixed matrices by area; --objective "
                                  f"{config.objective} learns one head per block: use --feedback per-layer")
            self._check_single(config, ["x".join(map(str, s)) for s in shapes], "a head")
            self.objective = LocalObjective(shapes, classes, config.objective, generator, config.readout_pool,
                                            config.head_layers, config.head_feedback, config.sim_weight,
                                            single=config.readout == "single")
        # Both kinds of fixed matrix stand in for a (C, features) output weight and are initialised like one.
        if "direct" in self.signals():
            self._register_matrices("direct", [random_matrix(classes, w, w, generator)
                                               for w in widths for _ in range(self.per_layer)])
        if "local" in self.fixed_signals():
            features = [math.prod(pooled_shape(s, config.readout_pool)) for s in shapes]
            self._check_single(config, features, "one readout")
            readouts = features[:1] if config.readout == "single" else features
            self._register_matrices("local", [random_matrix(classes, w, w, generator)
                                              for w in readouts for _ in range(self.per_layer)])

    @staticmethod
    def _check_single(config: RuleConfig, features: list, what: str) -> None:
        if config.readout == "single" and len(set(features)) > 1:
            raise ConfigError(f"--readout single shares {what} across hidden blocks, but their outputs differ "
                              f"({', '.join(map(str, features))} features): use --readout per-layer")

    def fixed_matrices(self, kind: str, layer: int) -> list[Tensor]:
        """The fixed matrices of ``kind`` that serve hidden layer ``layer``: one, or one per area."""
        if kind == "local" and self.config.readout == "single":
            layer = 0
        return self._matrices(kind, layer * self.per_layer, (layer + 1) * self.per_layer)

    def _stacked(self, kind: str, layers: Sequence[int]) -> Tensor:
        """The one matrix of ``kind`` of each of ``layers``, stacked (L, C, F); the matrix itself when they all
        share it (a single readout)."""
        matrices = [self.fixed_matrices(kind, layer)[0] for layer in layers]
        return matrices[0] if all(m is matrices[0] for m in matrices) else torch.stack(matrices)

    @torch.no_grad()
    def signal(self, layer: int, h: Tensor, error: Tensor | None, onehot: Tensor, groups: Groups | None,
               grouped: bool) -> Tensor:
        """g_l (B, ...) for hidden layer ``layer`` from its detached output ``h``; ``groups`` (the layer's
        grouping) picks each sample's feedback matrix under per-area feedback, ``grouped`` says whether the rows
        of ``h`` are already grouped by it."""
        if self.per_layer == 1:
            return self.signals_at_once([layer], h.unsqueeze(0), error, onehot)[0]
        with named_range("torchsal.signal"):     # a named range for profiles (benchmarks/speed.py)
            parts = []
            if "direct" in self.fixed_signals():             # e B_l[k]
                direct = self._per_area(error, self.fixed_matrices("direct", layer), groups, grouped, transpose=True)
                parts.append(direct.view_as(h))
            if "local" in self.fixed_signals():              # (softmax(h G^T) - y) G, through the pooling
                readouts, pool = self.fixed_matrices("local", layer), self.config.readout_pool
                logits = self._per_area(pooled(h, pool), readouts, groups, grouped)
                grad = self._per_area(softmax_error(logits, onehot), readouts, groups, grouped,
                                      transpose=True)
                parts.append(read_out_adjoint(h, grad, pool))
            return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    @torch.no_grad()
    def signals_at_once(self, layers: Sequence[int], h: Tensor, error: Tensor | None, onehot: Tensor) -> Tensor:
        """g_l (L, B, ...) for hidden layers whose detached outputs ``h`` (L, B, ...) share one shape (one matrix
        per layer), computed for all of them at once: each kind is one batched product for every layer instead of
        a few kernels per layer (at 128 layers of width 64 the per-layer loop took about a tenth of the step)."""
        with named_range("torchsal.signal"):
            parts = []
            if "direct" in self.fixed_signals():                 # e B_l
                parts.append(torch.matmul(error, self._stacked("direct", layers)).view_as(h))
            if "local" in self.fixed_signals():                  # (softmax(h G^T) - y) G, through the pooling
                readouts, flat, pool = self._stacked("local", layers), h.flatten(0, 1), self.config.readout_pool
                features = pooled(flat, pool).view(len(h), h.shape[1], -1)
                # (G f^T)^T: MKL forms a product with C = 10 rows 2-3x faster than one with 10 columns (128 layers
                # of 128 x 64: 0.20 against 0.57 ms; 2 of 1024 x 1024: 0.48 against 1.03)
                if readouts.dim() == 2:          # one readout for every layer: one product over all rows
                    logits = (readouts @ features.flatten(0, 1).T).T.view(*features.shape[:2], -1)
                else:
                    logits = (readouts @ features.transpose(-1, -2)).transpose(-1, -2)
                grad = softmax_error(logits, onehot) @ readouts
                parts.append(read_out_adjoint(flat, grad.flatten(0, 1), pool).view_as(h))
            return parts[0] if len(parts) == 1 else parts[0] + parts[1]

    @staticmethod
    def _per_area(t: Tensor, matrices: list[Tensor], groups: Groups | None, grouped: bool,
                  transpose: bool = False) -> Tensor:
        """``t @ M.T`` (or ``t @ M``) with one matrix, or each row's own area's matrix under per-area feedback."""
        if len(matrices) == 1:
            return t @ matrices[0] if transpose else t @ matrices[0].T
        stack = torch.stack([m.T if transpose else m for m in matrices])
        return grouped_linear(t, groups, stack) if grouped else area_linear(t, groups, stack)

    def step(self, model: BlockNet, x: Tensor, y: Tensor,
             before_update: Callable[[StepOutput], None] | None = None,
             output_term: OutputTerm | None = None) -> StepOutput:
        """``LearningRule.step``, refusing heads whose gradients nothing cleared (a forgotten optimizer)."""
        if self.objective is not None and any(p.grad is not None for p in self.objective.parameters()):
            raise ConfigError("the rule's local heads still hold an earlier step's gradients, so no optimizer steps "
                              "them: give the optimizer rule.parameters() beside model.parameters(), and zero both "
                              "before each step (torchsal's Trainer does)")
        return super().step(model, x, y, before_update, output_term)

    def forward(self, model: BlockNet, x: Tensor, y: Tensor, output_term: OutputTerm | None = None) -> StepOutput:
        batch = x.shape[0]
        labels = one_hot(y, model.num_classes, model.dtype)
        if self.config.memory == "lean":
            # Update each layer from its local signal as soon as it is computed; its graph is freed at once and
            # only two scalars per layer (for diagnostics) outlive it.
            mean_squares: list[Tensor] = []

            def update(i: int, h: Tensor, groups: Groups | None, rows: Tensor | None) -> None:
                if self.objective is not None:      # the learned objective's gradient, by autograd
                    self.objective.block_loss(i, h, y if rows is None else y[rows]).backward()
                    mean_squares.append(h.detach().pow(2).mean().unsqueeze(0))
                    return
                onehot = labels if rows is None else labels[rows]
                g = self.signal(i, h.detach(), None, onehot, groups, rows is not None)
                surrogate([h], [g], batch).backward()
                mean_squares.append(torch.stack([h.detach().pow(2).mean(), g.pow(2).mean()]))

            trace = model.trace(x, detach=True, on_hidden=update)
            activation_rms = signal_rms = None
            if mean_squares:                # (1 or 2, L): the activations' RMS, then the signals' if formed here
                per_layer = torch.stack(mean_squares).sqrt().T
                activation_rms, signal_rms = per_layer[0], per_layer[1] if len(per_layer) > 1 else None
            return output_step(trace, y, activation_rms=activation_rms, signal_rms=signal_rms,
                               output_term=output_term)
        trace = model.trace(x, detach=True)
        onehot = trace.in_trace_order(labels)
        error = softmax_error(trace.logits.detach(), onehot) if "direct" in self.signals() else None
        hidden_loss, signal_rms = None, None
        if self.fixed_signals():
            graph, signals, signal_rms = self.hidden_signals(trace, error, onehot)
            hidden_loss = surrogate(graph, signals, batch)
        if self.objective is not None:          # no gradient leaves a block: each loss sees one block's output
            local = self.objective(trace.hidden, trace.in_trace_order(y))
            hidden_loss = local if hidden_loss is None else hidden_loss + local
        return output_step(trace, y, hidden_loss, signal_rms=signal_rms, output_term=output_term)

    def hidden_signals(self, trace: Trace, error: Tensor | None, onehot: Tensor
                       ) -> tuple[list[Tensor], list[Tensor], Tensor | None]:
        """``(outputs, signals, signal RMS)`` of the hidden blocks of ``trace``, side by side for the surrogate:
        a layer stack's outputs whole with its signals (L, B, ...), other blocks one by one (their signals computed
        at once where they share a shape and a matrix); ``error`` is the head's (softmax - onehot), needed by the
        direct signal."""
        hidden = trace.hidden
        if self.per_layer == 1 and len({h.shape for h in hidden}) == 1:
            graph, signal, signal_rms = [], [], []
            for layers, stacked in trace.segments():
                if stacked is not None:          # a stack's outputs as they are: one signal, one dot product
                    g = self.signals_at_once(layers, stacked.detach(), error, onehot)
                    graph.append(stacked)
                    signal.append(g)
                else:                            # the blocks between stacks, stacked for their signals
                    outputs = [hidden[i].detach() for i in layers]
                    g = self.signals_at_once(layers, torch.stack(outputs) if len(outputs) > 1 else
                                             outputs[0].unsqueeze(0), error, onehot)
                    graph.extend(hidden[i] for i in layers)
                    signal.extend(g.unbind(0))
                signal_rms.append(stacked_rms(g))
            return graph, signal, torch.cat(signal_rms) if len(signal_rms) > 1 else signal_rms[0]
        signals = [self.signal(i, h.detach(), error, onehot, groups, trace.rows is not None)
                   for i, (h, groups) in enumerate(zip(hidden, trace.groups))]
        return list(hidden), signals, rms(signals)


@register_rule("dfa")
class DirectFeedbackAlignment(LocalSignalRule):
    defaults = {"areas": 1, "shared": False, "epochs": 30}    # as fa's
    options = frozenset({"feedback"})

    def signals(self) -> tuple[str, ...]:
        return SIGNALS["direct"]


@register_rule("sal")
class SelectiveAdaptiveLearning(LocalSignalRule):
    """SAL's refined feedback (``--signal``); its areas and routing are the model's, shared with every rule. The
    dataclass defaults are its own."""

    # On conv nets (docs/conv.md, the small CNN on CIFAR-10): a learned local objective, predsim, where the fixed
    # random readout stays 13 points below BP even on the dense net; 4 areas with the shared path in the fully
    # connected layers only: areas in the convolutions (each area's kernels seeing 1/K of the images) cost 10
    # points, 16 fc areas 0.95 against the dense net, 4 fc areas 0.27 (3 seeds each); heads read maps pooled to
    # 4x4 (a learned head reached 44.7% after 300 steps on 4x4, 41.6% on 2x2; 2x2 lost 0.7 points over 20 epochs);
    # the similarity term weighted 0.7, chosen on validation from {0.5, 0.7, 0.9, 0.99} (predsim's published 0.99
    # was 1.8 validation points below).
    conv_defaults = {"objective": "predsim", "conv_areas": False, "readout_pool": 4, "areas": 4, "sim_weight": 0.7}
    options = frozenset({"signal", "readout", "readout_pool", "objective", "head_feedback", "head_layers",
                         "sim_weight", "feedback", "memory"})

    def signals(self) -> tuple[str, ...]:
        return SIGNALS[self.config.signal]
