"""Feedback alignment (Lillicrap et al. 2016): the error travels down layer by layer through fixed random
tensors B_l that replace the transposed weights, so no layer ever reads another layer's forward weights.

    delta_L = softmax(logits) - onehot(y)
    delta_l = (delta_{l+1} B_{l+1}) * f'(a_l)          B_{l+1}: (out, in) like W_{l+1}
    grad W_l[k] = mean over the batch of delta_l h_{l-1}^T, for the samples routed to area k

A convolution sends the error back as a transposed convolution with fixed random kernels B_l (out, in, kh, kw);
pooling, normalisation, activations and skip connections pass it on as in backprop.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchsal.blocks import BlockNet
from torchsal.config import RuleConfig
from torchsal.feedback import feedback_alignment, random_tensor
from torchsal.rules.base import LearningRule, OutputTerm, StepOutput, output_step, register_rule


@register_rule("fa")
class FeedbackAlignment(LearningRule):
    # lr and epochs: the best of lr {3e-4, 1e-3, 3e-3} x epochs {20, 30, 40} on digits
    defaults = {"areas": 1, "shared": False, "epochs": 30}

    def __init__(self, model: BlockNet, config: RuleConfig, generator: torch.Generator) -> None:
        super().__init__(model, config, generator)
        # One tensor per area layer after the first (the first layer's input is the data: nothing to send back).
        self._register_matrices("feedback", [random_tensor(tuple(layer.weight.shape[1:]), layer.weight[0, 0].numel(),
                                                           generator) for layer in model.area_layers()[1:]])

    def forward(self, model: BlockNet, x: Tensor, y: Tensor, output_term: OutputTerm | None = None) -> StepOutput:
        with feedback_alignment(dict(zip(model.area_layers()[1:], self._matrices("feedback"), strict=True))):
            return output_step(model.trace(x), y, output_term=output_term)
