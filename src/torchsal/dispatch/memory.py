"""Memory recycled across steps, per (parameter, purpose): released gradients and the weights a layer computes
with. A fresh weight-sized block per step costs its page faults (8 ms for 64 MB, measured) on top of the work
(2 ms)."""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import Tensor

from torchsal import compat

# Memory per (parameter, purpose), handed back after use for the next step: released gradients and the weights a
# layer computes with (folded with the shared path, or cast to bfloat16). A fresh weight-sized block per step costs
# its page faults (8 ms for 64 MB, measured) on top of the work (2 ms); each entry is dropped as soon as its
# parameter is garbage-collected.
_SCRATCH: dict[tuple[int, str], tuple[weakref.ref, Tensor]] = {}


def take_memory(p: Tensor, purpose: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> Tensor:
    """A tensor shaped like ``p`` (or ``shape``) in ``dtype``: the one last handed back for ``purpose``, else a new
    one."""
    shape = p.shape if shape is None else torch.Size(shape)
    owner, out = _SCRATCH.pop((id(p), purpose), (None, None))
    if owner is None or owner() is not p or out.shape != shape or out.dtype != dtype or out.device != p.device:
        with torch.inference_mode(False):      # ordinary memory even when asked for in inference mode: it outlives
            out = torch.empty(shape, dtype=dtype, device=p.device)          # the step (a closed-form one)
    return out


def give_memory(p: Tensor, purpose: str, t: Tensor) -> None:
    """Hand ``t`` back for ``p``'s next ``take_memory(p, purpose, ...)``."""
    key = (id(p), purpose)
    _SCRATCH[key] = (weakref.ref(p, lambda _, key=key: _SCRATCH.pop(key, None)), t)


def release_gradients(params: Iterable[Tensor]) -> None:
    """``zero_grad(set_to_none=True)`` that keeps the released buffers for the next step's weight gradients.

    Every ``.grad`` becomes None; the memory is reused instead of being freed and allocated again. A gradient that
    is a view (a layer stack hands its blocks slices of one buffer, which it recycles itself) is only let go."""
    for p in params:
        if p.grad is not None:
            if not compat.is_view(p.grad):
                give_memory(p, "gradient", p.grad)
            p.grad = None


def accumulate_gradient(p: Tensor | None, grad: Tensor | None) -> None:
    """Add ``grad`` into ``p.grad`` as autograd's accumulation does (the first gradient is taken as it is, a copy
    of it where it was made in inference mode, so that autograd may add to it later); a None gradient (stepped in
    place) adds nothing."""
    if p is None or grad is None:
        return
    if p.grad is None:
        if grad.is_inference():
            with torch.inference_mode(False):
                grad = grad.clone()
        p.grad = grad
    else:
        p.grad.add_(grad)


def forget_memory(p: Tensor, purpose: str) -> None:
    """Drop what was handed back for ``p``'s ``purpose`` (a buffer that will not be asked for again)."""
    _SCRATCH.pop((id(p), purpose), None)
