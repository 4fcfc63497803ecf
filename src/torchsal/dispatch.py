"""Dispatch by area: group a batch's rows by area, run one matmul per non-empty area, restore the order.

All index arithmetic of the library lives here, so layers and rules never touch routing indices themselves.
No per-sample weight copies are made and no Python loop runs over samples: the loop is over the (at most K)
non-empty areas, and an area with no row is never read, so its parameters get no gradient at all.

Weight gradients are written into buffers recycled from the previous step (``release_gradients``): a fresh
gradient per area per step means allocating and first-touching K weight-sized blocks of memory, which made the
per-area weight-gradient matmul run at a tenth of peak at width 4096 (docs/performance.md).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.profiler import record_function

# Gradient buffers of parameters whose gradient was released, reused by the next backward pass; keyed by the
# parameter's id, each entry dropped as soon as its parameter is garbage-collected.
_SPARE: dict[int, tuple[weakref.ref, Tensor]] = {}


def release_gradients(params: Iterable[Tensor]) -> None:
    """``zero_grad(set_to_none=True)`` that keeps the released buffers for the next step's weight gradients.

    Every ``.grad`` becomes None (so untouched areas stay untouched by any optimizer); the memory is reused
    instead of being freed and allocated again."""
    for p in params:
        if p.grad is not None:
            key = id(p)
            _SPARE[key] = (weakref.ref(p, lambda _, key=key: _SPARE.pop(key, None)), p.grad)
            p.grad = None


def _gradient_buffer(p: Tensor) -> Tensor:
    owner, spare = _SPARE.pop(id(p), (None, None))
    if owner is not None and owner() is p and spare.shape == p.shape and spare.dtype == p.dtype \
            and spare.device == p.device:
        return spare
    return torch.empty_like(p, memory_format=torch.contiguous_format)


def group_by_area(area: Tensor, areas: int) -> tuple[Tensor, Tensor, list[int]]:
    """Sort rows by area. Returns ``(order, inverse, counts)``: ``x[order]`` is grouped by area,
    ``y_sorted[inverse]`` restores the batch order, ``counts[k]`` rows belong to area k."""
    order = torch.argsort(area, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(area, minlength=areas).tolist()
    return order, inverse, counts


def _per_area_linear(rows: Tensor, counts: list[int], weights: Sequence[Tensor],
                     biases: Sequence[Tensor | None]) -> Tensor:
    """One ``F.linear`` per non-empty area over rows already grouped by area."""
    return torch.cat([F.linear(piece, weights[k], biases[k])
                      for k, piece in enumerate(rows.split(counts)) if counts[k]])


class _GroupedLinear(torch.autograd.Function):
    """Per-area linear maps over rows already grouped by area; backward writes each touched area's weight
    gradient into a recycled buffer and gives untouched areas no gradient at all."""

    @staticmethod
    def forward(ctx, x: Tensor, counts: list[int], has_bias: bool, *params: Tensor) -> Tensor:  # noqa: ANN001
        k = len(counts)
        weights, biases = params[:k], (params[k:] if has_bias else (None,) * k)
        ctx.save_for_backward(x, *weights)
        ctx.counts, ctx.has_bias, ctx.weights = counts, has_bias, weights
        return _per_area_linear(x, counts, weights, biases)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        x, *weights = ctx.saved_tensors
        counts, k = ctx.counts, len(ctx.counts)
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w: list[Tensor | None] = [None] * k
        grad_b: list[Tensor | None] = [None] * k
        start = 0
        for i, n in enumerate(counts):
            if not n:
                continue
            g, rows = grad[start: start + n], x[start: start + n]
            if ctx.needs_input_grad[3 + i]:
                grad_w[i] = torch.mm(g.T, rows, out=_gradient_buffer(ctx.weights[i]))
            if ctx.has_bias and ctx.needs_input_grad[3 + k + i]:
                grad_b[i] = g.sum(0)
            if grad_x is not None:
                torch.mm(g, weights[i], out=grad_x[start: start + n])
            start += n
        return (grad_x, None, None, *grad_w, *(grad_b if ctx.has_bias else ()))


def area_linear(x: Tensor, area: Tensor | None, weights: Sequence[Tensor],
                biases: Sequence[Tensor] | None = None) -> Tensor:
    """``y[i] = x[i] @ weights[area[i]].T + biases[area[i]]`` for x (B, in), weights K x (out, in).

    With one area (or ``area=None``) this is exactly ``F.linear``.
    """
    if len(weights) == 1 or area is None:
        return F.linear(x, weights[0], None if biases is None else biases[0])
    with record_function("torchsal.dispatch"):     # a named range for profiles (benchmarks/scale.py)
        order, inverse, counts = group_by_area(area, len(weights))
        rows = x[order]
        if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights)):
            out = _GroupedLinear.apply(rows, counts, biases is not None, *weights, *(biases or ()))
        else:
            out = _per_area_linear(rows, counts, weights, [None] * len(weights) if biases is None else biases)
        return out[inverse]
