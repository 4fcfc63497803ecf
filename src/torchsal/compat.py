"""Every private torch API torchsal uses, each beside a public fallback that computes the same thing.

A private API is looked up in ``PRIVATE`` at each call: a torch without it (or a test that sets its entry to None)
gets the fallback. Only speed differs; ``tests/test_compat.py`` forces each fallback and compares.

- ``torch._fused_adam_`` / ``torch._fused_adamw_``: one Adam step of a list of tensors (used by ``optim``, which
  steps each touched area's slice from its own gradient).
- ``torch._grouped_mm``: one matmul per group of rows (``dispatch``); without it, one matmul per area.
- ``aten.threshold_backward``: ReLU's backward, optionally written into the ReLU output's own memory.
- ``aten._adaptive_avg_pool2d_backward``: the adjoint of adaptive average pooling, without building a graph.
- ``Tensor._base``: whether a gradient is a view of a larger buffer (then it is not recycled).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

PRIVATE: dict[str, Any] = {
    "fused_adam": getattr(torch, "_fused_adam_", None),
    "fused_adamw": getattr(torch, "_fused_adamw_", None),
    "grouped_mm": getattr(torch, "_grouped_mm", None),
    "threshold_backward": getattr(torch.ops.aten, "threshold_backward", None),
    "adaptive_avg_pool2d_backward": getattr(torch.ops.aten, "_adaptive_avg_pool2d_backward", None),
}


@torch.no_grad()
def adam_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
              max_exp_avg_sqs: list[Tensor], steps: list[Tensor], *,
              decoupled: bool, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
              amsgrad: bool, maximize: bool) -> None:
    """Adam (AdamW with ``decoupled``) on each tensor in place, its step count already advanced, as torch's
    fused kernel does it."""
    kernel = PRIVATE["fused_adamw" if decoupled else "fused_adam"]
    if kernel is not None:
        kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr=lr, beta1=beta1, beta2=beta2,
               weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=maximize)
        return
    maxima = max_exp_avg_sqs if amsgrad else [None] * len(params)
    for p, g, m, v, v_max, step in zip(params, grads, exp_avgs, exp_avg_sqs, maxima, steps, strict=True):
        g = -g if maximize else g
        if weight_decay and decoupled:
            p.mul_(1 - lr * weight_decay)
        elif weight_decay:
            g = g.add(p, alpha=weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        t = float(step)
        if v_max is not None:
            torch.maximum(v_max, v, out=v_max)
        denom = (v if v_max is None else v_max).sqrt().div_(math.sqrt(1 - beta2 ** t)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))


def grouped_mm(a: Tensor, b: Tensor, ends: Tensor) -> Tensor | None:
    """``torch._grouped_mm(a, b, offs=ends)``, or None where torch lacks it or refuses this layout (the caller
    then runs one matmul per group)."""
    kernel = PRIVATE["grouped_mm"]
    if kernel is None:
        return None
    try:
        return kernel(a, b, offs=ends)
    except RuntimeError:
        return None


def relu_backward(grad: Tensor, output: Tensor, *, into_output: bool = False) -> Tensor:
    """The gradient through ``output = relu(a)``: ``grad`` where ``output > 0``, else 0. With ``into_output`` it
    is written into ``output``'s memory (which the caller no longer needs)."""
    kernel = PRIVATE["threshold_backward"]
    if kernel is not None:
        return kernel.grad_input(grad, output, 0, grad_input=output) if into_output else kernel(grad, output, 0)
    mask = output > 0
    return torch.mul(grad, mask, out=output) if into_output else grad * mask


def adaptive_avg_pool2d_backward(grad: Tensor, h: Tensor) -> Tensor:
    """The gradient with respect to ``h`` (B, C, H, W) of ``adaptive_avg_pool2d(h, grad.shape[-2:])`` given the
    pooled output's gradient ``grad``."""
    kernel = PRIVATE["adaptive_avg_pool2d_backward"]
    if kernel is not None:
        return kernel(grad, h)
    with torch.enable_grad():
        x = h.detach().requires_grad_()
        return torch.autograd.grad(F.adaptive_avg_pool2d(x, grad.shape[-2:]), x, grad)[0]


def is_view(t: Tensor) -> bool:
    """Whether ``t`` is a view of another tensor's memory (True when torch cannot say: the safe answer)."""
    base = getattr(t, "_base", t)
    return base is t or base is not None
