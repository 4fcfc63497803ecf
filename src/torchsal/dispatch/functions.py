"""The operations area layers call: grouped linear maps with their autograd functions (the shared path folded in
where that pays), the same without autograd for closed-form steps (``local_linear``, ``learn_linear``), grouped
convolutions, and ``area_linear`` for rows in batch order."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from torchsal.dispatch.groups import Groups, group_by_area
from torchsal.dispatch.kernels import (
    affine_forward,
    autocast_dtype,
    cast,
    each_area_gradient,
    gather_pays,
    grouped_mm,
    padded_gradient,
    weight_gradient,
)
from torchsal.dispatch.memory import accumulate_gradient, forget_memory, give_memory, take_memory
from torchsal.dispatch.updates import (
    area_step_in_backward,
    lr_in_backward,
    mark_touched,
    step_from_memory,
    step_or_gradient,
    step_product_or_gradient,
)
from torchsal.profiling import named_range


def area_gradients(grad: Tensor, groups: Groups, rows: Tensor, padded_grad: Tensor | None,
                    padded_rows: Tensor | None, weight: Tensor, bias: Tensor | None, shared: Tensor | None,
                    wants: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients of an area layer's weight, bias and folded shared weight (those ``wants`` asks for) from its
    output gradient, the areas each touched marked on it; None for those stepped in place by plain SGD
    (``stepping_in_backward``), or stepped area by area there (an ``AreaStep``: fused Adam). Weight gradients go
    into a buffer recycled across steps."""
    grad_w = grad_b = grad_s = None
    wants_weight, wants_bias, wants_shared = wants[0], wants[1] and bias is not None, wants[2] and shared is not None
    if wants_weight or wants_shared:
        lr = lr_in_backward(weight) if wants_weight else None
        # (CPU groupings, whose counts a loop over areas reads; not small banks gathered per row: a head's areas are
        # too small for a step each)
        by_area = area_step_in_backward(weight) if wants_weight and groups.counts is not None and \
            not gather_pays(groups, weight) else None
        if lr is not None and not wants_shared:        # plain SGD in place: w[k] += (-lr) grad_k.T rows_k
            weight_gradient(grad, rows, groups, weight, -lr, padded_grad, padded_rows)
        elif by_area is not None:                      # each area's gradient formed in cache and stepped at once
            forget_memory(weight, "gradient")              # (the first step's whole gradient: not needed again)
            scratch = take_memory(weight, "area gradient", weight.dtype, weight.shape[1:])
            grad_s = weight.new_zeros(weight.shape[1:]) if wants_shared else None
            by_area(weight, each_area_gradient(cast(grad, weight.dtype), cast(rows, weight.dtype), groups,
                                                scratch, grad_s))
            give_memory(weight, "area gradient", scratch)
        else:
            buffer = take_memory(weight, "gradient", weight.dtype)
            grad_w = weight_gradient(grad, rows, groups, buffer, None, padded_grad, padded_rows)
            if wants_shared:
                grad_s = grad_w.sum(0)                     # every row is in one area: S gets their sum
            # in place after all, from the product (plain SGD: empty areas + 0, bit-identical), or into .grad
            grad_w = step_from_memory(weight, grad_w, groups.every_area_used) if wants_weight else None
            if grad_w is not None:
                mark_touched(weight, groups)
    if wants_bias:
        lr = lr_in_backward(bias)
        if padded_grad is None and lr is not None:         # stepped row by row: only the rows' areas change
            bias.index_add_(0, groups.row_area, grad.to(bias.dtype), alpha=-lr)
        else:
            per_area = padded_grad.sum(1, dtype=bias.dtype) if padded_grad is not None else \
                bias.new_zeros(bias.shape).index_add_(0, groups.row_area, grad.to(bias.dtype))
            # stepped: by plain SGD, empty areas + 0, bit-identical; whole by Adam only where every area had rows
            grad_b = step_or_gradient(bias, per_area, groups.every_area_used)
            if grad_b is not None:
                mark_touched(bias, groups)
    return grad_w, grad_b, grad_s


class _GroupedLinear(torch.autograd.Function):
    """Per-area linear maps over grouped rows, optionally with a shared weight folded into every area; backward
    fills a recycled (K, out, in) weight gradient (zeros for areas without rows) and marks the areas it touched on
    the parameter. The padded rows of the forward pass are kept for the backward one, which pads the output
    gradient once for all of its products.

    Folding the shared path: ``rows @ (W[k] + S).T`` is one product instead of two, and since every row is in one
    area, the shared weight's gradient is the sum of the areas' gradients, a reduction instead of a dense matmul.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, groups: Groups, weight: Tensor, bias: Tensor | None,  # noqa: ANN001
                shared: Tensor | None) -> Tensor:
        out, saved = affine_forward(rows, groups, weight, bias, shared)
        ctx.save_for_backward(*saved)
        ctx.groups, ctx.weight, ctx.bias, ctx.shared = groups, weight, bias, shared
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        rows, weight, padded_rows = ctx.saved_tensors
        if weight is not ctx.weight:
            give_memory(ctx.weight, "compute", weight)       # the computed weights' memory serves the next forward
        groups: Groups = ctx.groups
        padded_grad = padded_gradient(grad, groups, weight, padded_rows)
        grad_rows = None
        if ctx.needs_input_grad[0]:
            if gather_pays(groups, weight):
                grad_rows = torch.bmm(grad.unsqueeze(1), weight.index_select(0, groups.row_area)).squeeze(1)
            elif padded_rows is not None:
                grad_rows = torch.bmm(padded_grad, weight).view(-1, weight.shape[2]).index_select(0, groups.slot)
            else:
                grad_rows = grouped_mm(grad, groups, weight.transpose(1, 2))
        grad_w, grad_b, grad_s = area_gradients(grad, groups, rows, padded_grad, padded_rows, ctx.weight, ctx.bias,
                                                 ctx.shared, ctx.needs_input_grad[2:5])
        return grad_rows, None, grad_w, grad_b, grad_s


def _shared_apart(rows: Tensor, weight: Tensor, shared: Tensor | None) -> bool:
    """Whether a shared weight goes as a dense product of its own rather than folded into the areas' product: where
    areas hold fewer than 32 rows each (from there a (K, out, in) addition costs less than a second dense product)."""
    return shared is not None and rows.shape[0] < 32 * weight.shape[0]


def grouped_linear(rows: Tensor, groups: Groups, weight: Tensor, bias: Tensor | None = None,
                   shared: Tensor | None = None) -> Tensor:
    """``y[i] = rows[i] @ (weight[k_i] + shared).T + bias[k_i]`` for rows grouped by ``groups``; weight (K, out,
    in), shared (out, in) or None.

    The shared weight is folded into the areas' product where areas hold many rows (at least 32 each: there a
    (K, out, in) addition costs less than a second dense product), else it is a separate dense product. Under
    ``torch.autocast`` it computes in the autocast type, as ``nn.Linear`` does (the grouped kernels are not
    registered with autocast): weights are cast per call, their gradients and updates stay in the weights' type.
    """
    with named_range("torchsal.dispatch"):
        dtype = autocast_dtype(rows)
        if dtype is not None:
            rows = rows.to(dtype)
        if _shared_apart(rows, weight, shared):
            return grouped_linear(rows, groups, weight, bias) + rows @ cast(shared, rows.dtype).T
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (rows, weight, bias, shared)):
            return _GroupedLinear.apply(rows, groups, weight, bias, shared)
        out, (_, compute, _) = affine_forward(rows, groups, weight, bias, shared)
        if compute is not weight:
            give_memory(weight, "compute", compute)
        return out


@dataclass
class LinearState:
    """What ``learn_linear`` needs from the forward pass of ``local_linear``."""

    rows: Tensor
    groups: Groups | None
    compute: Tensor | None          # the weights the areas computed with (None: one area)
    padded_rows: Tensor | None
    shared_apart: bool              # the shared weight went as a dense product of its own, not folded in


@torch.no_grad()
def local_linear(rows: Tensor, groups: Groups | None, weight: Tensor, bias: Tensor | None = None,
                 shared: Tensor | None = None) -> tuple[Tensor, LinearState]:
    """``grouped_linear`` (``groups`` None: one area, a plain linear map) without autograd, and what
    ``learn_linear`` needs to update the parameters from the output's gradient: for a step that forms its updates
    in closed form (torchsal.closed_form). The same kernels and the same choices as ``grouped_linear``."""
    with named_range("torchsal.dispatch"):
        if groups is None:
            out = torch.nn.functional.linear(rows, weight[0], None if bias is None else bias[0])
            return out if shared is None else out.addmm_(rows, shared.T), LinearState(rows, None, None, None, True)
        apart = _shared_apart(rows, weight, shared)
        out, (_, compute, padded_rows) = affine_forward(rows, groups, weight, bias, None if apart else shared)
        if apart:
            out.addmm_(rows, shared.T)
        return out, LinearState(rows, groups, compute, padded_rows, apart)


@torch.no_grad()
def learn_linear(state: LinearState, grad: Tensor, weight: Tensor, bias: Tensor | None = None,
                 shared: Tensor | None = None) -> None:
    """The update of ``local_linear``'s parameters from its output's gradient ``grad``, as autograd would leave it:
    accumulated into ``.grad`` with the touched areas marked, or stepped in place under plain SGD
    (``stepping_in_backward``). Parameters that do not require a gradient are left alone."""
    with named_range("torchsal.dispatch"):
        rows, groups = state.rows, state.groups
        folded = None if state.shared_apart else shared
        if groups is None:
            lr = lr_in_backward(weight) if weight.requires_grad else None
            if lr is not None:                          # one area stepped in place: no gradient written
                weight[0].addmm_(grad.T, rows, alpha=-lr)
            elif weight.requires_grad:                  # (into recycled memory, as the areas' gradients)
                buffer = take_memory(weight, "gradient", weight.dtype)
                accumulate_gradient(weight, step_from_memory(weight, torch.bmm(
                    grad.T.to(weight.dtype).unsqueeze(0), rows.to(weight.dtype).unsqueeze(0), out=buffer)))
            if bias is not None and bias.requires_grad:
                accumulate_gradient(bias, step_or_gradient(bias, grad.sum(0, keepdim=True)))
        else:
            if state.compute is not weight:
                give_memory(weight, "compute", state.compute)
            # (no input gradient: the weight's product pads the output gradient itself where it needs it)
            wants = tuple(p is not None and p.requires_grad for p in (weight, bias, folded))
            grads = area_gradients(grad, groups, rows, None, state.padded_rows, weight, bias, folded, wants)
            for p, g in zip((weight, bias, folded), grads):
                accumulate_gradient(p, g)
        if shared is not None and state.shared_apart and shared.requires_grad:
            accumulate_gradient(shared, step_product_or_gradient(shared, grad.T, rows))


def grouped_conv2d(rows: Tensor, groups: Groups, weight: Tensor, bias: Tensor, owner: Tensor | None = None,
                   **conv: object) -> Tensor:
    """Per-area convolutions of rows grouped by area: weight (K, out, in, kh, kw), bias (K, out); ``conv`` takes
    stride, padding and dilation as ``F.conv2d``. The areas the backward touches are marked on ``owner`` (the
    parameter ``weight`` is, or is computed from) and on ``bias``, as ``grouped_linear`` does.

    With the counts on the host (CPU), one convolution per non-empty area on its contiguous rows: measured 1.3-5x
    faster than the padded grouped convolution below, and within 1.1-1.6x of one dense convolution of the whole
    batch (batch 128 over 16 areas, channels last, 2 threads; docs/conv.md). On a GPU, where reading the counts
    would stall, the rows are padded to the largest area's count and laid side by side, area k's rows in channels
    ``k * in .. (k + 1) * in`` of a ``(capacity, K * in, H, W)`` batch, and one ``conv2d(..., groups=K)`` runs every
    area's bank on its own rows (padding rows computed and dropped; the capacity is read once per call).
    """
    with named_range("torchsal.dispatch"):
        weight, bias = _marking(weight, owner, groups), _marking(bias, None, groups)
        if groups.counts is not None:
            banks, biases, outs, start = weight.unbind(0), bias.unbind(0), [], 0
            for k, n in enumerate(groups.counts):
                if n:
                    outs.append(torch.nn.functional.conv2d(rows[start: start + n], banks[k], biases[k], **conv))
                    start += n
            return torch.cat(outs)
        areas, (n, c, h, w) = weight.shape[0], rows.shape
        ends = groups.ends.long()
        counts = groups.per_area
        capacity = int(counts.max())
        position = torch.arange(n, device=rows.device) - (ends - counts)[groups.row_area]
        padded = rows.new_zeros(capacity, h, w, areas, c)
        padded[position, :, :, groups.row_area] = rows.permute(0, 2, 3, 1)
        out = torch.nn.functional.conv2d(padded.view(capacity, h, w, areas * c).permute(0, 3, 1, 2),
                                         weight.flatten(0, 1), bias.flatten(), groups=areas, **conv)
        out = out.permute(0, 2, 3, 1).unflatten(3, (areas, weight.shape[1]))[position, :, :, groups.row_area]
        return out.permute(0, 3, 1, 2)


def _marking(t: Tensor, owner: Tensor | None, groups: Groups) -> Tensor:
    """``t`` as a view whose gradient, on its way to ``owner`` (``t`` itself by default), marks the areas
    ``groups`` touched on it (a hook on the view lives with this step's graph, not on the parameter)."""
    if not (t.requires_grad and torch.is_grad_enabled()):
        return t
    view = t.view_as(t)
    view.register_hook(lambda g: mark_touched(t if owner is None else owner, groups))
    return view


def area_linear(x: Tensor, area: Tensor | Groups | None, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y[i] = x[i] @ weight[area[i]].T + bias[area[i]]`` with x in batch order: group, compute, restore.

    With one area (or ``area=None``) this is exactly ``F.linear`` on the only area."""
    if weight.shape[0] == 1 or area is None:
        return torch.nn.functional.linear(x, weight.squeeze(0), None if bias is None else bias.squeeze(0))
    groups = area if isinstance(area, Groups) else group_by_area(area, weight.shape[0])
    return grouped_linear(x[groups.order], groups, weight, bias)[groups.inverse]
