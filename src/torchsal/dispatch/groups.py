"""Rows grouped by area: one stable sort per step, and the grouping a routed model lends its area layers.

    groups = group_by_area(area, K)            # input routing: once per step, for every layer
    rows = x[groups.order]                     # area 0's rows, then area 1's, ...
    y[groups.inverse]                          # batch order again, once, at the output
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from torchsal.profiling import named_range


class _derived:  # noqa: N801 (a decorator, as functools.cached_property)
    """``functools.cached_property`` without its lock (Python 3.11 takes one, which torch.compile cannot trace):
    computed on first use, then read from the instance."""

    def __init__(self, fn) -> None:  # noqa: ANN001
        self.fn, self.name = fn, fn.__name__

    def __get__(self, obj, owner=None):  # noqa: ANN001, ANN204
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


@dataclass(frozen=True)
class Groups:
    """A batch's rows grouped by area: ``x[order]`` holds area 0's rows, then area 1's, and so on.

    What only some paths read (offsets, areas touched, each row's area, the padded layout) is derived on first use:
    at small batches every kernel of a step counts (a training step at batch 16 used a third of them)."""

    order: Tensor             # (B,) batch index of each grouped row
    inverse: Tensor           # (B,) grouped[inverse] restores the batch order
    per_area: Tensor          # (K,) rows per area (device)
    area: Tensor              # (B,) area of each row in batch order
    on_host: bool             # whether reading the counts on the host costs no device sync (CPU)

    @property
    def areas(self) -> int:
        return self.per_area.numel()

    @_derived
    def counts(self) -> list[int] | None:
        """Rows per area on the host (CPU), read on first use (a compiled step groups its rows inside the graph and
        reads them after it); None on a GPU."""
        return self.per_area.tolist() if self.on_host else None

    @_derived
    def row_area(self) -> Tensor:
        """(B,) area of each grouped row (sorted)."""
        return self.area[self.order]

    @_derived
    def ends(self) -> Tensor:
        """(K,) int32 end offset of each area's rows (device; for grouped kernels)."""
        return self.per_area.cumsum(0).to(torch.int32)

    @_derived
    def touched(self) -> Tensor:
        """(K,) bool: areas with at least one row."""
        return self.per_area > 0

    @_derived
    def every_area_used(self) -> bool:
        """True when every area holds a row, known on the host (CPU): nothing for an optimizer to leave out."""
        return self.counts is not None and all(self.counts)

    @property
    def capacity(self) -> int:
        """Rows per area in the padded layout (CPU): the largest area's count."""
        return max(self.counts, default=0)

    @_derived
    def slot(self) -> Tensor | None:
        """(B,) row of each grouped row in the padded (K * capacity) layout; None without host counts."""
        if self.counts is None:
            return None
        starts = self.ends - self.per_area
        return self.row_area * self.capacity + torch.arange(self.order.numel()) - starts[self.row_area]

# The grouping of the rows the area layers compute, while a routed model runs a block (``routed``).
_GROUPS: contextvars.ContextVar[Groups | None] = contextvars.ContextVar("groups", default=None)


@contextlib.contextmanager
def routed(groups: Groups | None) -> Iterator[None]:
    """Inside this block, area layers called without an explicit grouping compute their rows as grouped by
    ``groups`` (a routed model sets it around each block, so area layers inside a user's own modules need no
    extra argument)."""
    token = _GROUPS.set(groups)
    try:
        yield
    finally:
        _GROUPS.reset(token)


def current_groups() -> Groups | None:
    return _GROUPS.get()


def group_by_area(area: Tensor, areas: int) -> Groups:
    """Sort rows by area (stable). One per step with input routing; per layer with layer routing."""
    with named_range("torchsal.dispatch"):
        order = torch.argsort(area, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        on_host = area.device.type == "cpu"
        if on_host and not torch.compiler.is_compiling():
            per_area = torch.bincount(area, minlength=areas)
        else:   # bincount reads the largest id back to the host to size its output: a sync, a break in a graph
            per_area = torch.zeros(areas, dtype=torch.long, device=area.device).index_add_(0, area,
                                                                                           torch.ones_like(area))
        return Groups(order, inverse, per_area, area, on_host)


def host_counts(groups: Groups) -> list[int]:
    """Rows per area on the host (read from the device where they are not there already)."""
    return groups.counts if groups.counts is not None else groups.per_area.tolist()


def padded(t: Tensor, groups: Groups) -> Tensor:
    """(K, capacity, features): each area's rows, padded with zero rows to the largest area's count."""
    out = t.new_zeros(groups.areas * groups.capacity, t.shape[1])
    return out.index_copy_(0, groups.slot, t).view(groups.areas, groups.capacity, t.shape[1])


def to_padded(rows: Tensor, groups: Groups) -> Tensor:
    """(K * capacity, ...) grouped rows in the padded layout: area k's rows from row ``k * capacity``, zero rows
    after them (CPU groupings)."""
    return padded(rows.flatten(1), groups).view(-1, *rows.shape[1:])


def from_padded(t: Tensor, groups: Groups) -> Tensor:
    """The grouped rows of ``t`` (..., K * capacity, ...) in the padded layout, along dimension -2 (``index_select``:
    a 128-layer stack's rows, (127, 224, 64) to (127, 128, 64), in 95 us against 467 for ``t[..., slot, :]``)."""
    if t.requires_grad and torch.is_grad_enabled():
        return _FromPadded.apply(t, groups.slot)
    return t.index_select(-2, groups.slot)


class _FromPadded(torch.autograd.Function):
    """``t.index_select(-2, slot)`` whose backward writes each row's gradient into its slot: the slots are distinct,
    so a plain copy serves, where autograd's indexing backward accumulates one row at a time (a 128-layer stack's
    rows, (127, 208, 64): 3.9 ms against 0.3, measured)."""

    @staticmethod
    def forward(ctx, t: Tensor, slot: Tensor) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(slot)
        ctx.shape = t.shape
        return t.index_select(-2, slot)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ANN001
        (slot,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).index_copy_(-2, slot, grad), None
