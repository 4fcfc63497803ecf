"""Rules whose hidden layers learn from a per-layer signal, with every layer input detached.

Each hidden layer l gets a signal g_l (B, width), the per-sample gradient its output h_l should follow, and
minimises the surrogate ``(h_l * g_l).sum() / B``. Autograd runs only inside the layer, so

    grad W_l[k] = (1/B) sum over samples routed to k of (g_l * f'(a_l)) h_{l-1}^T

and no gradient crosses a layer boundary. The output layer minimises its own cross-entropy. Signals:

- ``direct`` (DFA, Nokland 2016): g_l = e B_l, e = softmax(logits) - onehot(y), B_l (C, width) fixed random.
- ``local``: g_l = (softmax(h_l G_l^T) - onehot(y)) G_l, the gradient of a layer-local cross-entropy through a
  fixed random readout G_l (C, width). It needs no global error, so a layer may update as soon as its own
  forward step is done.
- ``both``: their sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from torchsal.config import RuleConfig
from torchsal.feedback import random_matrix
from torchsal.models import AreaMLP
from torchsal.rules.base import LearningRule, StepOutput, register_rule

SIGNALS = {"direct": ("direct",), "local": ("local",), "both": ("direct", "local")}


class LocalSignalRule(LearningRule):
    """Base of DFA and SAL: which signals a hidden layer receives is the only difference."""

    def signals(self) -> tuple[str, ...]:
        raise NotImplementedError

    def __init__(self, model: AreaMLP, config: RuleConfig, generator: torch.Generator) -> None:
        super().__init__(model, config, generator)
        widths, classes = model.sizes[1:-1], model.sizes[-1]
        # Both kinds stand in for a (C, width) output weight and are initialised like one.
        if "direct" in self.signals():
            self._register_matrices("direct", [random_matrix(classes, w, w, generator) for w in widths])
        if "local" in self.signals():
            readouts = widths[:1] if config.readout == "shared" else widths
            self._register_matrices("local", [random_matrix(classes, w, w, generator) for w in readouts])

    @torch.no_grad()
    def signal(self, layer: int, h: Tensor, error: Tensor | None, onehot: Tensor) -> Tensor:
        """g_l (B, width) for hidden layer ``layer`` from its detached output ``h``."""
        g = torch.zeros_like(h)
        if "direct" in self.signals():
            g.add_(error @ self._matrices("direct")[layer])
        if "local" in self.signals():
            readouts = self._matrices("local")
            readout = readouts[0] if self.config.readout == "shared" else readouts[layer]
            g.add_((torch.softmax(h @ readout.T, dim=1) - onehot) @ readout)
        return g

    def forward(self, model: AreaMLP, x: Tensor, y: Tensor) -> StepOutput:
        batch = x.shape[0]
        onehot = F.one_hot(y, model.sizes[-1]).to(x.dtype)
        if self.config.memory == "lean":
            # Update each layer from its local signal as soon as it is computed; its graph is freed at once.
            def update(i: int, h: Tensor) -> None:
                ((h * self.signal(i, h.detach(), None, onehot)).sum() / batch).backward()

            trace = model.trace(x, detach=True, on_hidden=update)
            task = F.cross_entropy(trace.logits, y)
            return StepOutput(task + trace.routing_loss, trace.logits.detach(), task.detach())
        trace = model.trace(x, detach=True)
        task = F.cross_entropy(trace.logits, y)       # the output layer's own local gradient
        error = torch.softmax(trace.logits.detach(), dim=1) - onehot
        surrogate = sum(((h * self.signal(i, h.detach(), error, onehot)).sum() for i, h in enumerate(trace.hidden)),
                        x.new_zeros(()))
        loss = task + surrogate / batch + trace.routing_loss
        return StepOutput(loss, trace.logits.detach(), task.detach())


@register_rule("dfa")
class DirectFeedbackAlignment(LocalSignalRule):
    def signals(self) -> tuple[str, ...]:
        return SIGNALS["direct"]


@register_rule("sal")
class SelectiveAdaptiveLearning(LocalSignalRule):
    """SAL's refined feedback (``--signal``); its areas and routing are the model's, shared with every rule."""

    def signals(self) -> tuple[str, ...]:
        return SIGNALS[self.config.signal]
