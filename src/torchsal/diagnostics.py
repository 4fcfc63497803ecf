"""Measurements of a training step that do not change it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


class ActivationMeter:
    """Peak bytes of activations held for backward during the ``measure()`` block.

    Every tensor autograd saves for a backward pass goes through ``saved_tensors_hooks``; the meter counts each
    storage once while any graph still holds it, and records the peak. Parameters (saved by matmuls) are not
    activations and are excluded. Unlike process RSS this does not depend on the allocator's caching, so it
    measures exactly what grows with depth under backprop and stays flat in SAL's lean mode.

    Usage::

        meter = ActivationMeter(model)
        with meter.measure():
            rule(model, x, y).loss.backward()
        meter.peak_bytes
    """

    def __init__(self, model: nn.Module) -> None:
        self._params = {p.data_ptr() for p in model.parameters()}
        self._live: dict[int, list[int]] = {}           # storage pointer -> [bytes, holders]
        self.current_bytes = 0
        self.peak_bytes = 0

    def _release(self, ptr: int) -> None:
        entry = self._live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.current_bytes -= entry[0]
            del self._live[ptr]

    def _pack(self, t: Tensor) -> object:
        ptr = t.untyped_storage().data_ptr()
        if ptr in self._params or t.untyped_storage().nbytes() == 0:
            return t
        entry = self._live.setdefault(ptr, [t.untyped_storage().nbytes(), 0])
        if entry[1] == 0:
            self.current_bytes += entry[0]
            self.peak_bytes = max(self.peak_bytes, self.current_bytes)
        entry[1] += 1
        return _Held(t, ptr, self)

    @staticmethod
    def _unpack(held: object) -> Tensor:
        return held.tensor if isinstance(held, _Held) else held

    @contextmanager
    def measure(self) -> Iterator[ActivationMeter]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self


class _Held:
    """A saved tensor; when autograd frees the graph that holds it, its bytes are released."""

    __slots__ = ("tensor", "ptr", "meter")

    def __init__(self, tensor: Tensor, ptr: int, meter: ActivationMeter) -> None:
        self.tensor, self.ptr, self.meter = tensor, ptr, meter

    def __del__(self) -> None:
        self.meter._release(self.ptr)
