"""Measurements that do not change training: activation memory, alignment with the true gradient, interference
between classes, and area statistics. See docs/science.md for the definitions."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from torchsal.blocks import BlockNet
    from torchsal.rules import LearningRule


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


# ---------------------------------------------------------------------------------------------- alignment
def layer_gradients(model: BlockNet, loss_fn: Callable[[BlockNet], Tensor]) -> list[Tensor]:
    """Per block (a linear layer of the MLP), all its parameters' gradients as one vector (zeros where none)."""
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    return [torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                       for p in block.parameters()]) for block in model.blocks]


def angle(a: Tensor, b: Tensor) -> tuple[float, float]:
    """(cosine, angle in degrees) between two vectors; (nan, nan) if either is zero."""
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return math.nan, math.nan
    cos = float((a @ b) / (na * nb))
    return cos, math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def alignment(model: BlockNet, rule: LearningRule, x: Tensor, y: Tensor) -> list[dict[str, float]]:
    """Per linear layer, the angle between ``rule``'s update and the true backprop gradient of the task loss on
    the same batch. Computed on a copy with the RNG state restored, so training is unaffected; both passes see
    the same routing (also under the random router)."""
    twin = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        seed = int(torch.randint(2**62, (1,)))
        torch.manual_seed(seed)
        update = layer_gradients(twin, lambda m: rule(m, x, y).loss)
        torch.manual_seed(seed)
        true = layer_gradients(twin, lambda m: F.cross_entropy(m(x), y))
    return [dict(zip(("cosine", "degrees"), angle(u, t), strict=True)) for u, t in zip(update, true)]


# ------------------------------------------------------------------------------------------- interference
def mean_pairwise_cosine(vectors: list[Tensor]) -> float:
    """Mean cosine over all pairs of non-zero vectors: 1 = all agree, 0 = orthogonal, < 0 = conflicting."""
    vs = [v for v in vectors if v.norm() > 0]
    if len(vs) < 2:
        return math.nan
    unit = torch.stack([v / v.norm() for v in vs])
    cos = unit @ unit.T
    n = len(vs)
    return float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))


def interference(model: BlockNet, rule: LearningRule, x: Tensor, y: Tensor) -> list[float]:
    """Per linear layer, the mean pairwise cosine between the updates the rule makes from each class's samples
    alone (every class present in the batch): negative means classes push the layer's parameters in conflicting
    directions. Updates that land in different areas are orthogonal by construction. On a copy; RNG restored."""
    twin = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        per_class = [layer_gradients(twin, lambda m, c=c: rule(m, x[y == c], y[y == c]).loss)
                     for c in torch.unique(y).tolist()]
    return [mean_pairwise_cosine([g[layer] for g in per_class]) for layer in range(len(model.blocks))]


# --------------------------------------------------------------------------------------- area statistics
def area_statistics(area: Tensor, areas: int, labels: Tensor | None = None,
                    previous: Tensor | None = None) -> dict[str, Any]:
    """Statistics of one routing of N samples into ``areas`` areas.

    - ``shares``: fraction of samples per area (utilisation); ``used``: areas with at least one sample;
    - ``imbalance``: largest share times K (1 = perfectly even, K = everything in one area);
    - ``entropy``: entropy of the shares divided by log K (1 = even, 0 = one area);
    - ``purity`` (with labels): share of each area's samples in its majority class, weighted by area size;
    - ``changed`` (with a previous routing of the same samples): share of samples whose area changed.
    """
    counts = torch.bincount(area, minlength=areas).double()
    shares = counts / counts.sum()
    nz = shares[shares > 0]
    stats: dict[str, Any] = {
        "shares": shares.tolist(), "used": int((counts > 0).sum()), "imbalance": float(shares.max() * areas),
        "entropy": float(-(nz * nz.log()).sum() / math.log(areas)) if areas > 1 else 1.0}
    if labels is not None:
        joint = torch.zeros(areas, int(labels.max()) + 1, dtype=torch.float64)
        joint.index_put_((area, labels), torch.ones(len(area), dtype=torch.float64), accumulate=True)
        stats["purity"] = float(joint.max(dim=1).values.sum() / len(area))
    if previous is not None:
        stats["changed"] = float((previous != area).double().mean())
    return stats
