"""Fixed random feedback: matrices that stand in for the transposed forward weights, and local readouts.

Every matrix is created once, from an explicit generator, and kept as a persistent buffer of the learning
rule (it is in ``state_dict``, moves with ``.to()`` and never receives a gradient). Each is initialised like
the forward weight it stands in for (uniform, bound ``1/sqrt(fan_in)`` of that forward weight), so at
initialisation the feedback signal has the magnitude the true gradient would have.
"""

from __future__ import annotations

import torch
from torch import Tensor


def random_matrix(rows: int, cols: int, fan_in: int, generator: torch.Generator) -> Tensor:
    """A fixed (rows, cols) matrix, uniform in ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``."""
    bound = fan_in ** -0.5
    return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound


class _FeedbackPoint(torch.autograd.Function):
    """Identity on ``a`` whose backward sends ``grad_a @ feedback`` to ``x`` instead of ``grad_a @ W``."""

    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, feedback: Tensor) -> Tensor:  # noqa: ARG004
        ctx.save_for_backward(feedback)
        return a.view_as(a)

    @staticmethod
    def backward(ctx, grad_a: Tensor) -> tuple[Tensor, Tensor, None]:
        (feedback,) = ctx.saved_tensors
        return grad_a @ feedback.to(grad_a.dtype), grad_a, None       # (mixed precision: in the error's type)


def feedback_point(x: Tensor, a: Tensor, feedback: Tensor) -> Tensor:
    """Connect a layer output ``a`` (B, out), computed from ``x.detach()``, back to its input ``x`` (B, in)
    through a fixed ``feedback`` (out, in): feedback alignment without weight transport."""
    return _FeedbackPoint.apply(x, a, feedback)
