"""Area-partitioned layers: K mutually exclusive parameter areas plus an optional always-on shared path.

    a = S h + W[k] h + b[k]         k = area of the sample; S only with ``shared=True`` (dual path)

Parameter layout: the areas of a layer are one stacked tensor, ``weight`` (K, out, in) and ``bias`` (K, out), so a
layer is one grouped kernel forward and one recycled gradient buffer backward, and an optimizer handles one tensor
per layer instead of K. Which areas a step used is recorded on the parameter by the backward pass
(``touched_areas``); the optimizers of ``torchsal.optim`` update only those, so an untouched area and its
optimizer state stay bit-identical (docs/design.md says why this layout and not one parameter per area).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from torchsal.dispatch import Groups, grouped_linear
from torchsal.distributed import area_parallel_linear
from torchsal.feedback import feedback_point


class AreaLinear(nn.Module):
    """Linear layer with K areas, each sample using exactly one.

    Usage::

        layer = AreaLinear(64, 256, areas=16, shared=True)
        groups = group_by_area(area, 16)                  # torchsal.dispatch
        a = layer(x[groups.order], groups)                # rows grouped by area -> (B, 256), same row order

    With ``areas=1, shared=False`` it is exactly ``nn.Linear`` (call it with ``groups=None``).

    Args:
        in_features, out_features: sizes of the map.
        areas: K, the number of mutually exclusive parameter areas.
        shared: add an always-on shared weight ``S`` used by every sample.
        generator: explicit generator for the (Kaiming-uniform) initialisation.
        gain: scale of the initialisation (residual branches of deep models start smaller).
        owned: the areas this process holds (area parallel); all of them by default.
        dtype: weight type; each area is drawn in float32 and converted on its own (no whole-model copy).
    """

    def __init__(self, in_features: int, out_features: int, areas: int = 1, shared: bool = False,
                 generator: torch.Generator | None = None, gain: float = 1.0, owned: range | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.areas = in_features, out_features, areas
        bound = gain * math.sqrt(6 / in_features)    # Kaiming-uniform for ReLU, times ``gain``

        def uniform_(t: Tensor) -> Tensor:    # drawn in float32 in place, one area at a time: no transient copies
            return t.copy_(torch.rand(t.shape, generator=generator).mul_(2).sub_(1).mul_(bound))

        # With a shared path the areas start at zero: the model starts as the dense network and each area
        # learns its own correction (measured on digits: +1 point over Kaiming-initialised areas, see docs).
        self.owned = range(areas) if owned is None else owned
        weight = torch.zeros(len(self.owned), out_features, in_features, dtype=dtype)
        if not shared:
            for k in range(areas):  # every area's draw is made, so a shard's areas start as in the full model
                area = uniform_(torch.empty(out_features, in_features))
                if k in self.owned:
                    weight[k - self.owned.start].copy_(area)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(len(self.owned), out_features, dtype=dtype))
        self.shared = nn.Parameter(uniform_(torch.empty(out_features, in_features)).to(dtype)) if shared else None

    @property
    def sharded(self) -> bool:
        """True when this process holds only some of the areas (area parallel, ``torchsal.distributed``)."""
        return len(self.owned) < self.areas

    def affine(self, rows: Tensor, groups: Groups | None) -> Tensor:
        if groups is None:          # one area: a plain linear map (views, so the backward copies nothing)
            a = nn.functional.linear(rows, self.weight.squeeze(0), self.bias.squeeze(0))
        elif self.sharded:
            a = area_parallel_linear(rows, groups, self.weight, self.bias, self.areas)
        else:                       # the shared path goes in with the areas (folded in where that pays)
            return grouped_linear(rows, groups, self.weight, self.bias, self.shared)
        return a if self.shared is None else a + rows @ self.shared.T

    def forward(self, rows: Tensor, groups: Groups | None, feedback: Tensor | None = None) -> Tensor:
        """``rows`` grouped by ``groups`` (or any order with one area). ``feedback`` (out, in), if given,
        replaces the transposed weights on the way back to ``rows``."""
        if feedback is None:
            return self.affine(rows, groups)
        return feedback_point(rows, self.affine(rows.detach(), groups), feedback)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        """Model files written before the stacked layout held one tensor per area (``area_weights.k``)."""
        for old, new in (("area_weights.", "weight"), ("area_biases.", "bias")):
            keys = sorted((k for k in state_dict if k.startswith(prefix + old)), key=lambda k: int(k.rsplit(".")[-1]))
            if keys and prefix + new not in state_dict:
                state_dict[prefix + new] = torch.stack([state_dict.pop(k) for k in keys])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def active_parameters(self) -> int:
        """Parameters one sample uses: one area plus the shared path."""
        n = self.in_features * self.out_features + self.out_features
        return n + (self.in_features * self.out_features if self.shared is not None else 0)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, areas={self.areas}, "
                f"shared={self.shared is not None}")
