"""Dispatch by area: group a batch's rows by area, run one matmul per non-empty area, restore the order.

All index arithmetic of the library lives here, so layers and rules never touch routing indices themselves.
No per-sample weight copies are made and no Python loop runs over samples: the loop is over the (at most K)
non-empty areas, and an area with no row is never read, so its parameters get no gradient at all.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.profiler import record_function


def group_by_area(area: Tensor, areas: int) -> tuple[Tensor, Tensor, list[int]]:
    """Sort rows by area. Returns ``(order, inverse, counts)``: ``x[order]`` is grouped by area,
    ``y_sorted[inverse]`` restores the batch order, ``counts[k]`` rows belong to area k."""
    order = torch.argsort(area, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(area, minlength=areas).tolist()
    return order, inverse, counts


def area_linear(x: Tensor, area: Tensor | None, weights: Sequence[Tensor],
                biases: Sequence[Tensor] | None = None) -> Tensor:
    """``y[i] = x[i] @ weights[area[i]].T + biases[area[i]]`` for x (B, in), weights K x (out, in).

    With one area (or ``area=None``) this is exactly ``F.linear``.
    """
    if len(weights) == 1 or area is None:
        return F.linear(x, weights[0], None if biases is None else biases[0])
    with record_function("torchsal.dispatch"):     # a named range for profiles (benchmarks/scale.py)
        order, inverse, counts = group_by_area(area, len(weights))
        pieces = (x[order]).split(counts)
        outputs = [F.linear(piece, weights[k], None if biases is None else biases[k])
                   for k, piece in enumerate(pieces) if counts[k]]
        return torch.cat(outputs)[inverse]
