"""Updates taken inside the backward: plain SGD in place, or an optimizer's ``AreaStep`` from each area's gradient
formed in cache, for the parameters ``torchsal.optim.updates_in_backward`` lists; and the record of the areas a
gradient touched (``touched_areas``), which the optimizers of ``torchsal.optim`` read."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor

from torchsal.dispatch.groups import Groups
from torchsal.dispatch.memory import give_memory, take_memory

# Parameters (by id) that take their update inside their own backward, each with its plain-SGD param group or an
# area-by-area step (``stepping_in_backward``).
_UPDATE_IN_BACKWARD: contextvars.ContextVar[dict[int, dict | AreaStep] | None] = \
    contextvars.ContextVar("update", default=None)


class AreaStep(Protocol):
    """An optimizer's update applied inside the backward from gradients formed there, area by area or of a whole
    parameter (``torchsal.optim.updates_in_backward``)."""

    def ready(self, p: Tensor) -> bool:
        """Whether ``p`` may be stepped here (its optimizer state exists)."""

    def __call__(self, p: Tensor, gradients: Iterator[tuple[int | None, Tensor]]) -> None:
        """Step each area ``k`` of ``p`` from its gradient, as ``gradients`` yields ``(k, gradient)`` pairs (``k``
        None: the whole parameter, one without areas)."""


@contextlib.contextmanager
def stepping_in_backward(updates: dict[int, dict | AreaStep] | None) -> Iterator[None]:
    """Inside this block the parameters in ``updates`` (by id) take their update inside their own backward (or a
    closed-form step's update, ``learn_linear``) and get no ``.grad``: plain SGD, by its param group (a ``dict``),
    ``w[k] -= lr * grad_k`` as one in-place product per area; an ``AreaStep``, area by area or whole. Built by
    ``torchsal.optim.updates_in_backward``, which says where that is exact."""
    token = _UPDATE_IN_BACKWARD.set(updates or None)
    try:
        yield
    finally:
        _UPDATE_IN_BACKWARD.reset(token)


def lr_in_backward(p: Tensor) -> float | None:
    """The learning rate of the plain-SGD step ``p`` takes inside its own backward (``stepping_in_backward``), or
    None where ``p`` gets a ``.grad`` as usual. For backward functions that write their parameters' gradients out."""
    update = _UPDATE_IN_BACKWARD.get()
    group = None if update is None else update.get(id(p))
    return group["lr"] if isinstance(group, dict) else None


def area_step_in_backward(p: Tensor) -> AreaStep | None:
    """The ``AreaStep`` ``p`` takes inside its own backward (``stepping_in_backward``), where it is ready."""
    update = _UPDATE_IN_BACKWARD.get()
    step = None if update is None else update.get(id(p))
    return step if step is not None and not isinstance(step, dict) and step.ready(p) else None


def step_product_or_gradient(p: Tensor, a: Tensor, b: Tensor) -> Tensor | None:
    """``step_or_gradient(p, a @ b)`` for a parameter without areas (a shared weight, a router's projection): plain
    SGD's step taken as one in-place product (``p -= lr a @ b``), an ``AreaStep``'s from the product formed in
    recycled memory, still in cache."""
    lr, step = lr_in_backward(p), area_step_in_backward(p)
    if a.dtype != p.dtype or lr is None and step is None:   # (mixed precision: formed in the rows' type, then cast)
        return step_or_gradient(p, a @ b.to(a.dtype))
    if lr is not None:
        p.addmm_(a, b.to(p.dtype), alpha=-lr)
        return None
    product = torch.mm(a, b.to(p.dtype), out=take_memory(p, "area gradient", p.dtype))
    step(p, iter([(None, product)]))
    give_memory(p, "area gradient", product)
    return None


def step_or_gradient(p: Tensor, grad: Tensor, whole: bool = True) -> Tensor | None:
    """``grad`` in ``p``'s type for a backward function to return, or None where ``p`` is stepped right here
    (``stepping_in_backward``): by plain SGD (exact on any parameter: a zero gradient moves nothing), or by an
    ``AreaStep`` on the whole parameter where ``whole`` says it may move all of it (a parameter without areas, or
    one whose every area had rows). A parameter updated in its backward skips autograd's accumulation and the
    optimizer."""
    grad = grad.to(p.dtype)
    lr = lr_in_backward(p)
    if lr is not None:
        p.add_(grad, alpha=-lr)
        return None
    step = area_step_in_backward(p) if whole else None
    if step is None:
        return grad
    step(p, iter([(None, grad)]))
    return None


def step_from_memory(p: Tensor, grad: Tensor, whole: bool = True) -> Tensor | None:
    """``step_or_gradient`` of a gradient in ``p``'s recycled memory (``take_memory(p, "gradient", ...)``), which
    is handed back where the step took it."""
    if step_or_gradient(p, grad, whole) is not None:
        return grad
    give_memory(p, "gradient", grad)
    return None


def mark_touched(p: Tensor, groups: Groups) -> None:
    """Record on an area parameter which areas this gradient covers, accumulated until ``.grad`` is released;
    None means all of them (known on the host without a device read: nothing for the optimizer to sort out)."""
    if not isinstance(p, torch.nn.Parameter):
        return
    fresh = p.grad is None
    before = None if fresh else getattr(p, "touched_areas", None)
    if groups.every_area_used:
        p.touched_areas = None
    elif fresh:
        p.touched_areas = groups.touched
    elif before is not None:
        p.touched_areas = before | groups.touched
