"""Backpropagation: plain autograd through the whole model (the reference every other rule is measured by)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from torchsal.models import AreaMLP
from torchsal.rules.base import LearningRule, StepOutput, register_rule


@register_rule("bp")
class Backprop(LearningRule):
    def forward(self, model: AreaMLP, x: Tensor, y: Tensor) -> StepOutput:
        trace = model.trace(x)
        task = F.cross_entropy(trace.logits, y)
        return StepOutput(task + trace.routing_loss, trace.logits.detach(), task.detach())
