"""Area-partitioned layers: K mutually exclusive parameter areas plus an optional always-on shared path.

    a = S h + W[k] h + b[k]         k = area of the sample; S only with ``shared=True`` (dual path)

``AreaLinear`` is the counterpart of ``nn.Linear``, ``AreaConv2d`` of ``nn.Conv2d`` (W[k] a bank of kernels); with
one area and no shared path each is exactly its torch counterpart. Both take their rows' grouping by area from the
routed model that calls them (``dispatch.routed``), so they drop into a user's own modules unchanged, and the
feedback of a feedback-alignment pass from ``feedback.feedback_alignment``.

Parameter layout: the areas of a layer are one stacked tensor, ``weight`` (K, out, in) and ``bias`` (K, out), so a
layer is one grouped kernel forward and one recycled gradient buffer backward, and an optimizer handles one tensor
per layer instead of K. Which areas a step used is recorded on the parameter by the backward pass
(``touched_areas``); the optimizers of ``torchsal.optim`` update only those, so an untouched area and its
optimizer state stay bit-identical (docs/design.md says why this layout and not one parameter per area).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchsal.dispatch import (
    Groups,
    LinearState,
    current_groups,
    grouped_conv2d,
    grouped_linear,
    learn_linear,
    local_linear,
)
from torchsal.distributed import area_parallel_linear
from torchsal.feedback import feedback_for, feedback_point
from torchsal.optim import guard_stock_optimizers


class AreaLayer(nn.Module):
    """What area layers share: the grouping and feedback they compute with, and their parameter counts. A
    subclass defines ``affine(rows, groups)`` and ``send_back(grad, feedback, input_shape)`` (its input gradient
    with ``feedback`` in place of its weights)."""

    areas: int
    weight: nn.Parameter
    bias: nn.Parameter
    shared: nn.Parameter | None
    owned: range

    def __init__(self) -> None:
        super().__init__()
        guard_stock_optimizers()

    @property
    def sharded(self) -> bool:
        """True when this process holds only some of the areas (area parallel, ``torchsal.distributed``)."""
        return len(self.owned) < self.areas

    def forward(self, rows: Tensor, groups: Groups | None = None, feedback: Tensor | None = None) -> Tensor:
        """``rows`` grouped by ``groups`` (by default the grouping of the routed model running this layer; any
        order with one area). ``feedback`` (by default this layer's in a feedback-alignment pass), if any,
        replaces the transposed weights on the way back to ``rows``."""
        groups = None if self.areas == 1 else current_groups() if groups is None else groups   # dense: any order
        if groups is None and self.areas > 1:
            raise RuntimeError(f"{type(self).__name__} with {self.areas} areas needs each row's area: run it inside "
                               "a routed model (torchsal.BlockNet), or pass groups=group_by_area(area, K)")
        feedback = feedback_for(self) if feedback is None else feedback
        if feedback is None:
            return self.affine(rows, groups)
        return feedback_point(rows, self.affine(rows.detach(), groups), feedback, self.send_back)

    def affine(self, rows: Tensor, groups: Groups | None) -> Tensor:
        raise NotImplementedError

    def send_back(self, grad: Tensor, feedback: Tensor, shape: torch.Size) -> Tensor:
        raise NotImplementedError

    def active_parameters(self) -> int:
        """Parameters one sample uses: one area plus the shared path."""
        per_area = self.weight[0].numel()
        return per_area + self.bias.shape[1] + (per_area if self.shared is not None else 0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        """Model files written before the stacked layout held one tensor per area (``area_weights.k``)."""
        for old, new in (("area_weights.", "weight"), ("area_biases.", "bias")):
            keys = sorted((k for k in state_dict if k.startswith(prefix + old)), key=lambda k: int(k.rsplit(".")[-1]))
            if keys and prefix + new not in state_dict:
                state_dict[prefix + new] = torch.stack([state_dict.pop(k) for k in keys])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _uniform(bound: float, generator: torch.Generator | None) -> Callable[[Tensor], Tensor]:
    def uniform_(t: Tensor) -> Tensor:    # drawn in float32 in place, one area at a time: no transient copies
        return t.copy_(torch.rand(t.shape, generator=generator).mul_(2).sub_(1).mul_(bound))
    return uniform_


class AreaLinear(AreaLayer):
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
        uniform_ = _uniform(gain * math.sqrt(6 / in_features), generator)   # Kaiming-uniform for ReLU, times gain
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

    def affine(self, rows: Tensor, groups: Groups | None) -> Tensor:
        if groups is None:          # one area: a plain linear map (views, so the backward copies nothing)
            a = nn.functional.linear(rows, self.weight.squeeze(0), self.bias.squeeze(0))
        elif self.sharded:
            a = area_parallel_linear(rows, groups, self.weight, self.bias, self.areas)
        else:                       # the shared path goes in with the areas (folded in where that pays)
            return grouped_linear(rows, groups, self.weight, self.bias, self.shared)
        return a if self.shared is None else a + rows @ self.shared.T

    def send_back(self, grad: Tensor, feedback: Tensor, shape: torch.Size) -> Tensor:  # noqa: ARG002
        return grad @ feedback

    def local_forward(self, rows: Tensor, groups: Groups | None) -> tuple[Tensor, LinearState]:
        """The output without autograd, and what ``learn`` needs (a closed-form step: torchsal.rules.closed_form)."""
        return local_linear(rows, None if self.areas == 1 else groups, self.weight, self.bias, self.shared)

    def learn(self, state: LinearState, grad: Tensor) -> None:
        """This layer's update from the gradient of ``local_forward``'s output (``dispatch.learn_linear``)."""
        learn_linear(state, grad, self.weight, self.bias, self.shared)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, areas={self.areas}, "
                f"shared={self.shared is not None}")


class AreaConv2d(AreaLayer):
    """``nn.Conv2d`` with K areas (banks of kernels and biases), each sample using exactly one; all areas run in
    one grouped convolution (``dispatch.grouped_conv2d``).

    Usage::

        conv = AreaConv2d(3, 32, 5, areas=16, padding=2)
        with routed(group_by_area(area, 16)):               # torchsal.dispatch; BlockNet does this per block
            a = conv(x[groups.order])                      # rows grouped by area

    With ``areas=1, shared=False`` it is exactly ``nn.Conv2d``. Kaiming-uniform
    initialisation as ``AreaLinear`` (fan-in ``in * kh * kw``); with a shared path the areas start at zero.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], areas: int = 1,
                 shared: bool = False, generator: torch.Generator | None = None, stride: int | tuple = 1,
                 padding: int | tuple = 0, dilation: int | tuple = 1, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size, self.areas = in_channels, out_channels, (kh, kw), areas
        self.conv = {"stride": stride, "padding": padding, "dilation": dilation}
        self.owned = range(areas)
        uniform_ = _uniform(math.sqrt(6 / (in_channels * kh * kw)), generator)
        bank = (out_channels, in_channels, kh, kw)
        weight = torch.zeros(areas, *bank)
        if not shared:
            for k in range(areas):
                uniform_(weight[k])
        self.weight = nn.Parameter(weight.to(dtype))
        self.bias = nn.Parameter(torch.zeros(areas, out_channels, dtype=dtype))
        self.shared = nn.Parameter(uniform_(torch.empty(bank)).to(dtype)) if shared else None

    def affine(self, rows: Tensor, groups: Groups | None) -> Tensor:
        # The shared path folded into every area's kernels: one convolution, and the shared kernels' gradient is
        # the sum of the areas' (a (K, out, in, kh, kw) addition costs little beside a convolution).
        weight = self.weight if self.shared is None else self.weight + self.shared
        if groups is None:
            return F.conv2d(rows, weight.squeeze(0), self.bias.squeeze(0), **self.conv)
        return grouped_conv2d(rows, groups, weight, self.bias, self.weight, **self.conv)

    def send_back(self, grad: Tensor, feedback: Tensor, shape: torch.Size) -> Tensor:
        """The input gradient of this convolution with the fixed kernels ``feedback`` in place of its own."""
        return torch.nn.grad.conv2d_input(shape, feedback, grad, **self.conv)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, areas={self.areas}, "
                f"shared={self.shared is not None}, " + ", ".join(f"{k}={v}" for k, v in self.conv.items()))
