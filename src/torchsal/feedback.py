"""Fixed random feedback: tensors that stand in for the transposed forward weights, and local readouts.

Every tensor is created once, from an explicit generator, and kept as a persistent buffer of the learning rule (it
is in ``state_dict``, moves with ``.to()`` and never receives a gradient). Each is uniform in ``+-1/sqrt(fan_in)``
with the fan-in of the forward weight it stands in for: torch's default for ``nn.Linear``, and ``sqrt(6)`` times
smaller than an area layer's own Kaiming-uniform weights (``+-sqrt(6/fan_in)``).

Feedback alignment reaches the area layers through a context (``feedback_alignment``) rather than through the
model's forward signature, so it works on any model whose layers are area layers, a user's own included.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn


def random_matrix(rows: int, cols: int, fan_in: int, generator: torch.Generator) -> Tensor:
    """A fixed (rows, cols) matrix, uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``."""
    return random_tensor((rows, cols), fan_in, generator)


def random_tensor(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> Tensor:
    """A fixed tensor of ``shape`` (a matrix, or a bank of convolution kernels), uniform in ``+-1/sqrt(fan_in)``."""
    bound = fan_in ** -0.5
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


# A layer's input gradient with a fixed feedback tensor in place of its weights: (grad_a, feedback, input shape).
Send = Callable[[Tensor, Tensor, torch.Size], Tensor]
# The feedback of each area layer (by id) while a feedback-alignment forward pass runs.
_FEEDBACK: contextvars.ContextVar[Mapping[int, Tensor] | None] = contextvars.ContextVar("feedback", default=None)


@contextlib.contextmanager
def feedback_alignment(feedback: Mapping[nn.Module, Tensor]) -> Iterator[None]:
    """Inside this block each area layer in ``feedback`` sends the error back to its input through its fixed
    tensor instead of its transposed weights (the graph built inside keeps it: ``backward`` may run outside)."""
    token = _FEEDBACK.set({id(layer): t for layer, t in feedback.items()})
    try:
        yield
    finally:
        _FEEDBACK.reset(token)


def feedback_for(layer: nn.Module) -> Tensor | None:
    """The feedback tensor of ``layer`` in the current feedback-alignment pass, or None."""
    current = _FEEDBACK.get()
    return None if current is None else current.get(id(layer))


class _FeedbackPoint(torch.autograd.Function):
    """Identity on ``a`` whose backward sends ``send(grad_a, feedback, x.shape)`` to ``x`` instead of the gradient
    through the layer's own weights."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, feedback: Tensor, send: Send) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(feedback)
        ctx.send, ctx.shape = send, x.shape
        return a.view_as(a)

    @staticmethod
    def backward(ctx, grad_a: Tensor) -> tuple[Tensor, Tensor, None, None]:  # noqa: ANN001
        (feedback,) = ctx.saved_tensors
        # (mixed precision: in the error's type)
        return ctx.send(grad_a, feedback.to(grad_a.dtype), ctx.shape), grad_a, None, None


def _through_matrix(grad_a: Tensor, feedback: Tensor, shape: torch.Size) -> Tensor:  # noqa: ARG001
    return grad_a @ feedback


def feedback_point(x: Tensor, a: Tensor, feedback: Tensor, send: Send = _through_matrix) -> Tensor:
    """Connect a layer output ``a``, computed from ``x.detach()``, back to its input ``x`` through a fixed
    ``feedback``: feedback alignment without weight transport. ``send(grad_a, feedback, x.shape)`` is the layer's
    input gradient with ``feedback`` in place of its weights (default: ``grad_a @ feedback``, feedback (out, in))."""
    return _FeedbackPoint.apply(x, a, feedback, send)
