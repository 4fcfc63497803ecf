"""The kernels of per-area products and which one runs: padded batched matmuls where areas hold few rows, gathered
banks where they are small, one matmul per area with the counts on the host (CPU), a grouped kernel over device
offsets otherwise. Each choice is one predicate here, with the measurement behind it (docs/design.md)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from torchsal import compat
from torchsal.dispatch.compile import compiled_call, has_few_rows, row_products
from torchsal.dispatch.groups import Groups, host_counts, padded
from torchsal.dispatch.memory import take_memory

# (shape, dtype, device) keys on which torch._grouped_mm refused the layout: those run the per-area loop.
_NO_GROUPED_MM: set[tuple] = set()

# Gathered banks (rows x out x in elements) up to which each row computes with its own area's copy (gather_pays).
GATHERED_ELEMENTS = 2 ** 18


def compute_weights(weight: Tensor, shared: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The weights a layer computes with: ``weight (+ shared)`` in ``dtype`` (scratch memory), or ``weight``."""
    if shared is None and dtype == weight.dtype:
        return weight
    out = take_memory(weight, "compute", dtype)
    if dtype == weight.dtype:
        return torch.add(weight, shared, out=out)
    out.copy_(weight)
    return out if shared is None else out.add_(shared.to(dtype))


def _pad_pays(groups: Groups) -> bool:
    """One batched matmul over the padded layout beats per-area kernels on CPU where areas hold few rows (below 32
    on average), unless padding more than doubles the rows (measured: 128 rows over 16 areas of 64x64, 2.5x faster
    forward; 16 rows of 784x256, 1.4x slower). From 32 rows per area the per-area products are efficient on their
    own and padding only adds rows (1024 rows over 16 areas of 1024 x 784, padded to 90 each: 18.3 against 12.1 ms).
    Nor where a quarter of the areas or more hold no row: the padded product reads every area, the per-area ones
    only those used, and weights read from memory cost more than the per-row overhead (16 rows over 16 areas of
    784 x 256, about 10 used: paper SAL step 0.95-0.99 of before, A/B in three runs; tuned's 64 rows unchanged)."""
    return has_few_rows(groups) and groups.areas * groups.capacity <= 2 * groups.order.numel() and \
        4 * groups.counts.count(0) < groups.areas


def gather_pays(groups: Groups, weight: Tensor) -> bool:
    """Small banks (a head of 10 x 256 per area) are cheapest gathered: each row gets its own area's copy (at most
    a megabyte in all), one batched product serves every row, and the backward adds each row's product into its
    area in one scatter, where per-area kernels run a few small kernels per area. Measured alone on CPU (forward
    and weight gradient, 2 threads): 0.43-0.74 of the per-area time up to 2^18 gathered elements, 0.9-1.1 at
    2^19-2^20, 30x slower at 2^23."""
    return groups.counts is not None and groups.order.numel() * weight.shape[1] * weight.shape[2] <= GATHERED_ELEMENTS


def pad_pays_here(groups: Groups, weight: Tensor) -> bool:
    return _pad_pays(groups) and not gather_pays(groups, weight)


def _gathered(rows: Tensor, groups: Groups, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``rows[i] @ weight[k_i].T + bias[k_i]`` with each row's bank gathered: one batched product."""
    banks = weight.index_select(0, groups.row_area).transpose(1, 2)
    if bias is None:
        return torch.bmm(rows.unsqueeze(1), banks).squeeze(1)
    return torch.baddbmm(bias.index_select(0, groups.row_area).unsqueeze(1), rows.unsqueeze(1), banks).squeeze(1)


def _affine(rows: Tensor, groups: Groups, weight: Tensor, bias: Tensor | None, padded_rows: Tensor | None) -> Tensor:
    """``rows[i] @ weight[k_i].T + bias[k_i]``: one batched matmul over ``padded_rows`` when given (bias added by the
    same kernel; padding rows are computed and dropped), over gathered banks where they are small, else the grouped
    kernels."""
    if gather_pays(groups, weight):
        return _gathered(rows, groups, weight, bias)
    if padded_rows is not None:
        w = weight.transpose(1, 2)
        out = torch.bmm(padded_rows, w) if bias is None else torch.baddbmm(bias.unsqueeze(1), padded_rows, w)
        return out.view(-1, out.shape[2]).index_select(0, groups.slot)
    return grouped_mm(rows, groups, weight, bias)


def grouped_kernel(a: Tensor, b: Tensor, groups: Groups) -> Tensor | None:
    """``torch._grouped_mm(a, b)`` over the group offsets, or None where it refuses this layout (remembered)."""
    key = (a.shape[1:], b.shape[1:] if b.dim() == 2 else b.shape, a.stride(), b.stride(), a.dtype, a.device.type)
    if key in _NO_GROUPED_MM:
        return None
    out = compat.grouped_mm(a, b, groups.ends)
    if out is None:
        _NO_GROUPED_MM.add(key)
    return out


def grouped_mm(rows: Tensor, groups: Groups, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``rows[i] @ weight[k_i].T (+ bias[k_i])`` for grouped rows. With the counts on the host (CPU), one matmul
    per non-empty area, its bias added by the same kernel: torch._grouped_mm runs a slower loop on CPU (wide regime
    of benchmarks/speed.py, SAL step 0.90-0.97 of it); a few rows per area under ``compiled_kernels``, one
    generated kernel. Else one grouped kernel over the device offsets."""
    if has_few_rows(groups):                            # (host counts and few rows per area)
        out = compiled_call(row_products, weight, bias, rows, groups.row_area)
        if out is not None:
            return out
    out = None if groups.counts is not None else grouped_kernel(rows, weight.transpose(1, 2), groups)
    if out is not None:
        return out if bias is None else out.add_(bias.index_select(0, groups.row_area))
    out, counts = rows.new_empty(rows.shape[0], weight.shape[1]), host_counts(groups)
    biases = [None] * len(counts) if bias is None else bias.unbind(0)
    # (the banks transposed in one view op, not one per area)
    for o, r, bank_t, b, n in zip(out.split(counts), rows.split(counts), weight.transpose(1, 2).unbind(0), biases,
                                  counts):
        if n and b is None:
            torch.mm(r, bank_t, out=o)
        elif n:
            torch.addmm(b, r, bank_t, out=o)
    return out


def weight_gradient(grad: Tensor, rows: Tensor, groups: Groups, out: Tensor, alpha: float | None = None,
                     padded_grad: Tensor | None = None, padded_rows: Tensor | None = None) -> Tensor:
    """``out[k] = grad_k.T @ rows_k`` per area (zeros for empty areas), or with ``alpha``, ``out[k] += alpha *
    grad_k.T @ rows_k`` (an in-place SGD step; empty areas untouched). Small banks: each row's product added into
    its area; few rows per area: one batched matmul over the padded layout; with host counts (CPU) one matmul per
    area (measured faster than the grouped kernel), an area stepped in place from one row by a broadcast product
    (``addcmul_``: 12-15 against 18-28 us for MKL's rank-one ``addmm_`` on 256 x 784, both threads; paper's SAL
    step 0.83-0.97 of the same with ``addmm_``, A/B in one process); without, one grouped kernel."""
    if out.dtype != grad.dtype:
        # Mixed precision: the products in the weights' type, from the rows and gradients widened. Forming them in
        # bfloat16 and converting them into the weights took longer on CPU than the float32 products: a (K, out,
        # in) write and read back, and torch's mixed-type add runs a slow path (docs/performance.md).
        grad, rows, padded_grad, padded_rows = (None if t is None else t.to(out.dtype)
                                                for t in (grad, rows, padded_grad, padded_rows))
    if gather_pays(groups, out):           # each row's product, added into its area (empty areas: untouched)
        products = grad.unsqueeze(2) * rows.unsqueeze(1)
        return out.zero_().index_add_(0, groups.row_area, products) if alpha is None else \
            out.index_add_(0, groups.row_area, products, alpha=alpha)
    # An in-place step with some areas empty updates only the touched ones (the padded product would rewrite all).
    if has_few_rows(groups) and (alpha is None or groups.every_area_used):
        padded_grad = (padded(grad, groups) if padded_grad is None else padded_grad).transpose(1, 2)
        padded_rows = padded(rows, groups) if padded_rows is None else padded_rows
        if alpha is None:
            return torch.bmm(padded_grad, padded_rows, out=out)
        return out.baddbmm_(padded_grad, padded_rows, alpha=alpha)    # empty areas: + alpha * 0, bit-identical
    product = None if groups.counts is not None else grouped_kernel(grad.T, rows, groups)
    if product is not None:
        return out.copy_(product) if alpha is None else out.add_(product, alpha=alpha)
    # one split per operand, not a slice per area: at 16 rows the per-area views were a third of a step's kernels
    counts = host_counts(groups)
    for bank, g, r, n in zip(out.unbind(0), grad.T.split(counts, 1), rows.split(counts), counts):
        if n and alpha is None:
            # zeroed, then accumulated: MKL's product into ``out`` took 1.0-1.8x as long (256 x 784 from 2-32 rows,
            # 1024 x 784 from 64; both threads: benchmarks/adam_by_area.py)
            bank.zero_().addmm_(g, r)
        elif n == 1:        # MKL's rank-one addmm_ runs a slow path: the broadcast product, on both threads
            bank.addcmul_(g, r, value=alpha)
        elif n:
            bank.addmm_(g, r, alpha=alpha)
        elif alpha is None:
            bank.zero_()
    return out


def each_area_gradient(grad: Tensor, rows: Tensor, groups: Groups, scratch: Tensor, total: Tensor | None
                        ) -> Iterator[tuple[int, Tensor]]:
    """``(k, grad_k.T @ rows_k)`` for each area with rows (CPU groupings), each formed in turn into ``scratch``
    (one area's size, so that it is still in cache when its step reads it) and added into ``total`` when given
    (a folded shared weight's gradient, their sum). One row's product is a broadcast one (MKL's rank-one path is
    slow: ``weight_gradient``)."""
    counts = host_counts(groups)
    for k, (g, r, n) in enumerate(zip(grad.T.split(counts, 1), rows.split(counts), counts)):
        if not n:
            continue
        if n == 1:
            torch.mul(g, r, out=scratch)
        else:
            scratch.zero_().addmm_(g, r)      # (weight_gradient: faster than MKL's product into ``out``)
        if total is not None:
            total.add_(scratch)
        yield k, scratch


def affine_forward(rows: Tensor, groups: Groups, weight: Tensor, bias: Tensor | None,
                    shared: Tensor | None) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor | None]]:
    """The output of per-area linear maps over grouped rows (the shared weight folded in), and what their update
    needs: the rows, the weights computed with, the padded rows (kept so that the update pads only the output
    gradient)."""
    # the weights in the rows' type (mixed precision), with the shared path folded in
    compute = compute_weights(weight, shared, rows.dtype)
    bias = None if bias is None else cast(bias, rows.dtype)
    if torch.compiler.is_compiling():       # (a compiled step) each row's product read in place from its area
        return row_products(compute, bias, rows, groups.row_area), (rows, compute, None)
    padded_rows = padded(rows, groups) if pad_pays_here(groups, weight) else None
    out = _affine(rows, groups, compute, bias, padded_rows)
    return out, (rows, compute, padded_rows)


def padded_gradient(grad: Tensor, groups: Groups, compute: Tensor, padded_rows: Tensor | None) -> Tensor | None:
    """The output gradient in the padded layout, where the products that read it use that layout."""
    gathered = gather_pays(groups, compute)
    return padded(grad, groups) if padded_rows is not None or has_few_rows(groups) and not gathered else None


def autocast_dtype(t: Tensor) -> torch.dtype | None:
    device = t.device.type
    if t.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)
