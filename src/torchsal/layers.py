"""Area-partitioned layers: K mutually exclusive parameter areas plus an optional always-on shared path.

    a = S h + W[k] h + b[k]         k = area of the sample; S only with ``shared=True`` (dual path)

Parameter layout: one ``nn.Parameter`` per area (``area_weights.k``, ``area_biases.k``). An area that receives
no sample in a step takes no part in the graph, so its ``.grad`` stays ``None`` and every stock ``torch.optim``
optimizer (SGD, momentum, Adam, AdamW with weight decay; foreach and fused) skips it: its parameters and its
optimizer state stay bit-identical, and the optimizer pays only for areas that were touched. A single stacked
bank would need a sparse-aware optimizer for that guarantee; see docs/design.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from torchsal.dispatch import area_linear
from torchsal.feedback import feedback_point


class AreaLinear(nn.Module):
    """Linear layer with K areas, each sample using exactly one.

    Usage::

        layer = AreaLinear(64, 256, areas=16, shared=True)
        a = layer(x, area)                  # x (B, 64), area (B,) -> a (B, 256)

    With ``areas=1, shared=False`` it is exactly ``nn.Linear`` (one weight, one bias).

    Args:
        in_features, out_features: sizes of the map.
        areas: K, the number of mutually exclusive parameter areas.
        shared: add an always-on shared weight ``S`` used by every sample.
        generator: explicit generator for the (Kaiming-uniform) initialisation.
        gain: scale of the initialisation (residual branches of deep models start smaller).
    """

    def __init__(self, in_features: int, out_features: int, areas: int = 1, shared: bool = False,
                 generator: torch.Generator | None = None, gain: float = 1.0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.areas = in_features, out_features, areas
        bound = gain * math.sqrt(6 / in_features)    # Kaiming-uniform for ReLU, times ``gain``

        def uniform(*shape: int) -> nn.Parameter:
            return nn.Parameter((torch.rand(*shape, generator=generator) * 2 - 1) * bound)

        # With a shared path the areas start at zero: the model starts as the dense network and each area
        # learns its own correction (measured on digits: +1 point over Kaiming-initialised areas, see docs).
        area_init = (lambda: nn.Parameter(torch.zeros(out_features, in_features))) if shared else (
            lambda: uniform(out_features, in_features))
        self.area_weights = nn.ParameterList(area_init() for _ in range(areas))
        self.area_biases = nn.ParameterList(nn.Parameter(torch.zeros(out_features)) for _ in range(areas))
        self.shared = uniform(out_features, in_features) if shared else None

    def affine(self, x: Tensor, area: Tensor | None) -> Tensor:
        a = area_linear(x, area, list(self.area_weights), list(self.area_biases))
        return a if self.shared is None else a + x @ self.shared.T

    def forward(self, x: Tensor, area: Tensor | None, feedback: Tensor | None = None) -> Tensor:
        """``feedback`` (out, in), if given, replaces the transposed weights on the way back to ``x``."""
        if feedback is None:
            return self.affine(x, area)
        return feedback_point(x, self.affine(x.detach(), area), feedback)

    def active_parameters(self) -> int:
        """Parameters one sample uses: one area plus the shared path."""
        n = self.in_features * self.out_features + self.out_features
        return n + (self.in_features * self.out_features if self.shared is not None else 0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, areas={self.areas}, "
                f"shared={self.shared is not None}")
