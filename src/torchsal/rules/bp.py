"""Backpropagation: plain autograd through the whole model (the reference every other rule is measured by)."""

from __future__ import annotations

from torch import Tensor

from torchsal.blocks import BlockNet
from torchsal.rules.base import LearningRule, OutputTerm, StepOutput, output_step, register_rule


@register_rule("bp")
class Backprop(LearningRule):
    defaults = {"areas": 1, "shared": False}     # the dense MLP; --areas 16 --shared: SAL's routed model

    def forward(self, model: BlockNet, x: Tensor, y: Tensor, output_term: OutputTerm | None = None) -> StepOutput:
        return output_step(model.trace(x), y, output_term=output_term)
