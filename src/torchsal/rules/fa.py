"""Feedback alignment (Lillicrap et al. 2016): the error travels down layer by layer through fixed random
matrices B_l that replace W_l^T, so no layer ever reads another layer's forward weights.

    delta_L = softmax(logits) - onehot(y)
    delta_l = (delta_{l+1} B_{l+1}) * f'(a_l)          B_{l+1}: (out, in) like W_{l+1}
    grad W_l[k] = mean over the batch of delta_l h_{l-1}^T, for the samples routed to area k
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchsal.config import RuleConfig
from torchsal.feedback import random_matrix
from torchsal.models import AreaMLP
from torchsal.rules.base import LearningRule, StepOutput, output_step, register_rule


@register_rule("fa")
class FeedbackAlignment(LearningRule):
    def __init__(self, model: AreaMLP, config: RuleConfig, generator: torch.Generator) -> None:
        super().__init__(model, config, generator)
        sizes = model.sizes
        # One matrix per layer above the first (the first layer's input is the data: nothing to send back).
        self._register_matrices("feedback", [random_matrix(n_out, n_in, n_in, generator)
                                             for n_in, n_out in zip(sizes[1:-1], sizes[2:])])

    def forward(self, model: AreaMLP, x: Tensor, y: Tensor) -> StepOutput:
        return output_step(model.trace(x, feedback=[None, *self._matrices("feedback")]), y)
