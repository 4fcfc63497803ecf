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
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from torchsal.dispatch import area_linear
from torchsal.distributed import area_parallel_linear
from torchsal.feedback import feedback_point


class AreaParameters(nn.Module):
    """One parameter per area held here, named by its area index, so state dicts look the same whether a process
    holds every area or a shard of them. Indexing and iteration give the parameters in area order."""

    def __init__(self, tensors: dict[int, Tensor]) -> None:
        super().__init__()
        for k, t in tensors.items():
            self.register_parameter(str(k), nn.Parameter(t))

    def __getitem__(self, area: int) -> nn.Parameter:
        return self._parameters[str(area)]

    def __iter__(self) -> Iterator[nn.Parameter]:
        return iter(self._parameters.values())

    def __len__(self) -> int:
        return len(self._parameters)

    def items(self) -> Iterator[tuple[int, nn.Parameter]]:
        return ((int(k), p) for k, p in self._parameters.items())


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
        owned: the areas this process holds (area parallel); all of them by default.
        dtype: weight type; each tensor is drawn in float32 and converted on its own (no whole-model copy).
    """

    def __init__(self, in_features: int, out_features: int, areas: int = 1, shared: bool = False,
                 generator: torch.Generator | None = None, gain: float = 1.0, owned: range | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.areas = in_features, out_features, areas
        bound = gain * math.sqrt(6 / in_features)    # Kaiming-uniform for ReLU, times ``gain``

        def uniform(*shape: int) -> Tensor:    # in place: no transient copies of large weights
            return torch.rand(*shape, generator=generator).mul_(2).sub_(1).mul_(bound).to(dtype)

        # With a shared path the areas start at zero: the model starts as the dense network and each area
        # learns its own correction (measured on digits: +1 point over Kaiming-initialised areas, see docs).
        self.owned = range(areas) if owned is None else owned
        weights = {}
        for k in range(areas):      # every area's draw is made, so a shard's areas start as in the full model
            weight = None if shared else uniform(out_features, in_features)
            if k in self.owned:
                weights[k] = torch.zeros(out_features, in_features, dtype=dtype) if weight is None else weight
        self.area_weights = AreaParameters(weights)
        self.area_biases = AreaParameters({k: torch.zeros(out_features, dtype=dtype) for k in self.owned})
        self.shared = nn.Parameter(uniform(out_features, in_features)) if shared else None

    @property
    def sharded(self) -> bool:
        """True when this process holds only some of the areas (area parallel, ``torchsal.distributed``)."""
        return len(self.owned) < self.areas

    def affine(self, x: Tensor, area: Tensor | None) -> Tensor:
        if self.sharded:
            a = area_parallel_linear(x, area, self.area_weights, self.area_biases, self.areas)
        else:
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
