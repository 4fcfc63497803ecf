"""Dispatch by area: group a batch's rows by area once, then run every area's matmul in one grouped call.

The grouping of rows by area is made here; layers and rules use the ``Groups`` it returns rather than routing
indices of their own.

    groups = group_by_area(area, K)            # one stable sort per step (input routing: for every layer)
    rows = x[groups.order]                     # grouped: area 0's rows, then area 1's, ...
    y = grouped_linear(rows, groups, w, b)     # w (K, out, in), b (K, out): y[i] = rows[i] @ w[k_i].T + b[k_i]
    y[groups.inverse]                          # batch order again, once, at the output

Areas are one stacked ``(K, out, in)`` tensor per layer. On CPU, where areas hold few rows, the rows are
padded to the largest area's count and one batched matmul serves every area (2-4x faster than per-area kernels
below 32 rows per area); otherwise each non-empty area is one matmul, forward (bias in the same kernel) and weight
gradient (into a buffer recycled across steps): faster on CPU than ``torch._grouped_mm``, which a GPU runs over
the group offsets. Small banks (a head) are gathered: each row computes with a copy of its own area's weights.
Where areas hold many rows the shared path is folded into the areas' product. Areas no row used get a zero
gradient. Which areas a step used is recorded on the parameter (``touched_areas``: a (K,) bool
tensor, None when all were), so the optimizers of ``torchsal.optim`` update, and keep state for, exactly those
areas: an untouched area stays bit-identical. Plain SGD may apply each area's update inside its backward
(``stepping_in_backward``), and fused Adam may step each area from its gradient formed in cache. docs/design.md
gives the measurements behind each choice.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch
from torch import Tensor

from torchsal import compat
from torchsal.profiling import named_range

log = logging.getLogger(__name__)
T = TypeVar("T")

# (shape, dtype, device) keys on which torch._grouped_mm refused the layout: those run the per-area loop.
_NO_GROUPED_MM: set[tuple] = set()
# Gathered banks (rows x out x in elements) up to which each row computes with its own area's copy (_gather_pays).
GATHERED_ELEMENTS = 2 ** 18
# The grouping of the rows the area layers compute, while a routed model runs a block (``routed``).
_GROUPS: contextvars.ContextVar[Groups | None] = contextvars.ContextVar("groups", default=None)
# Whether work over a few rows per area runs as generated kernels (``compiled_kernels``), and why
# compiling failed on this machine, once it has (everything then runs eagerly).
_COMPILED: contextvars.ContextVar[bool] = contextvars.ContextVar("compiled", default=False)
_COMPILE_FAILURE: list[str] = []
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


def _step_from_memory(p: Tensor, grad: Tensor, whole: bool = True) -> Tensor | None:
    """``step_or_gradient`` of a gradient in ``p``'s recycled memory (``take_memory(p, "gradient", ...)``), which
    is handed back where the step took it."""
    if step_or_gradient(p, grad, whole) is not None:
        return grad
    give_memory(p, "gradient", grad)
    return None


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


def to_padded(rows: Tensor, groups: Groups) -> Tensor:
    """(K * capacity, ...) grouped rows in the padded layout: area k's rows from row ``k * capacity``, zero rows
    after them (CPU groupings)."""
    return _padded(rows.flatten(1), groups).view(-1, *rows.shape[1:])


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


def release_gradients(params: Iterable[Tensor]) -> None:
    """``zero_grad(set_to_none=True)`` that keeps the released buffers for the next step's weight gradients.

    Every ``.grad`` becomes None; the memory is reused instead of being freed and allocated again. A gradient that
    is a view (a layer stack hands its blocks slices of one buffer, which it recycles itself) is only let go."""
    for p in params:
        if p.grad is not None:
            if not compat.is_view(p.grad):
                give_memory(p, "gradient", p.grad)
            p.grad = None


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


def _compute_weights(weight: Tensor, shared: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The weights a layer computes with: ``weight (+ shared)`` in ``dtype`` (scratch memory), or ``weight``."""
    if shared is None and dtype == weight.dtype:
        return weight
    out = take_memory(weight, "compute", dtype)
    if dtype == weight.dtype:
        return torch.add(weight, shared, out=out)
    out.copy_(weight)
    return out if shared is None else out.add_(shared.to(dtype))


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


def _padded(t: Tensor, groups: Groups) -> Tensor:
    """(K, capacity, features): each area's rows, padded with zero rows to the largest area's count."""
    out = t.new_zeros(groups.areas * groups.capacity, t.shape[1])
    return out.index_copy_(0, groups.slot, t).view(groups.areas, groups.capacity, t.shape[1])


def _pad_pays(groups: Groups) -> bool:
    """One batched matmul over the padded layout beats per-area kernels on CPU where areas hold few rows (below 32
    on average), unless padding more than doubles the rows (measured: 128 rows over 16 areas of 64x64, 2.5x faster
    forward; 16 rows of 784x256, 1.4x slower). From 32 rows per area the per-area products are efficient on their
    own and padding only adds rows (1024 rows over 16 areas of 1024 x 784, padded to 90 each: 18.3 against 12.1 ms).
    Nor where a quarter of the areas or more hold no row: the padded product reads every area, the per-area ones
    only those used, and weights read from memory cost more than the per-row overhead (16 rows over 16 areas of
    784 x 256, about 10 used: paper SAL step 0.95-0.99 of before, A/B in three runs; tuned's 64 rows unchanged)."""
    return _few_rows(groups) and groups.areas * groups.capacity <= 2 * groups.order.numel() and \
        4 * groups.counts.count(0) < groups.areas


def _gather_pays(groups: Groups, weight: Tensor) -> bool:
    """Small banks (a head of 10 x 256 per area) are cheapest gathered: each row gets its own area's copy (at most
    a megabyte in all), one batched product serves every row, and the backward adds each row's product into its
    area in one scatter, where per-area kernels run a few small kernels per area. Measured alone on CPU (forward
    and weight gradient, 2 threads): 0.43-0.74 of the per-area time up to 2^18 gathered elements, 0.9-1.1 at
    2^19-2^20, 30x slower at 2^23."""
    return groups.counts is not None and groups.order.numel() * weight.shape[1] * weight.shape[2] <= GATHERED_ELEMENTS


def _pad_pays_here(groups: Groups, weight: Tensor) -> bool:
    return _pad_pays(groups) and not _gather_pays(groups, weight)


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
    if _gather_pays(groups, weight):
        return _gathered(rows, groups, weight, bias)
    if padded_rows is not None:
        w = weight.transpose(1, 2)
        out = torch.bmm(padded_rows, w) if bias is None else torch.baddbmm(bias.unsqueeze(1), padded_rows, w)
        return out.view(-1, out.shape[2]).index_select(0, groups.slot)
    return _grouped_mm(rows, groups, weight, bias)


def _grouped_kernel(a: Tensor, b: Tensor, groups: Groups) -> Tensor | None:
    """``torch._grouped_mm(a, b)`` over the group offsets, or None where it refuses this layout (remembered)."""
    key = (a.shape[1:], b.shape[1:] if b.dim() == 2 else b.shape, a.stride(), b.stride(), a.dtype, a.device.type)
    if key in _NO_GROUPED_MM:
        return None
    out = compat.grouped_mm(a, b, groups.ends)
    if out is None:
        _NO_GROUPED_MM.add(key)
    return out


def _grouped_mm(rows: Tensor, groups: Groups, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``rows[i] @ weight[k_i].T (+ bias[k_i])`` for grouped rows. With the counts on the host (CPU), one matmul
    per non-empty area, its bias added by the same kernel: torch._grouped_mm runs a slower loop on CPU (wide regime
    of benchmarks/speed.py, SAL step 0.90-0.97 of it); a few rows per area under ``compiled_kernels``, one
    generated kernel. Else one grouped kernel over the device offsets."""
    if _few_rows(groups):                            # (host counts and few rows per area)
        out = compiled_call(_row_products, weight, bias, rows, groups.row_area)
        if out is not None:
            return out
    out = None if groups.counts is not None else _grouped_kernel(rows, weight.transpose(1, 2), groups)
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


@contextlib.contextmanager
def compiled_kernels(enabled: bool = True) -> Iterator[None]:
    """Inside this block (``--compile``), work over a few rows per area runs as kernels generated by
    ``torch.compile``, where eager kernels are many and small: a local rule's step up to its updates
    (torchsal.rules.closed_form), and elsewhere CPU area products that are not padded. In them each row's product
    is a reduction over its area's weights, read in place and split across threads, where MKL's per-area products
    of one to three rows run one area after another on one core. It needs a C++ compiler and compiles once per
    shape (seconds); where compiling fails, everything runs eagerly, with one warning."""
    token = _COMPILED.set(enabled)
    try:
        yield
    finally:
        _COMPILED.reset(token)


def compiled_call(fn: Callable[..., T], *args: object) -> T | None:
    """``fn(*args)`` as ``torch.compile`` builds it, inside ``compiled_kernels``; None outside, or once compiling
    has failed on this machine (one warning says why): the caller then runs ``fn`` eagerly."""
    if not _COMPILED.get() or _COMPILE_FAILURE:
        return None
    try:
        return _compiled(fn)(*args)
    except Exception as exc:  # noqa: BLE001 (the caller runs eagerly next; a real error shows there)
        _COMPILE_FAILURE.append(f"{type(exc).__name__}: {next(iter(str(exc).strip().splitlines()), '')}")
        log.warning("--compile: torch.compile could not build %s (%s); everything runs eagerly from now on. It "
                    "needs a working C++ compiler (g++ or clang on the PATH); or drop --compile.", fn.__name__,
                    _COMPILE_FAILURE[0])
        return None


@functools.cache
def _compiled(fn: Callable[..., T]) -> Callable[..., T]:
    return torch.compile(fn, dynamic=False)


def _row_products(weight: Tensor, bias: Tensor | None, rows: Tensor, row_area: Tensor) -> Tensor:
    """``rows[i] @ weight[k_i].T + bias[k_i]`` as a reduction over each row's gathered area: compiled, the gather
    is a load inside the kernel, not a copy."""
    out = (weight[row_area] * rows.unsqueeze(1)).sum(-1, dtype=torch.float32).to(rows.dtype)
    return out if bias is None else out + bias[row_area]


def few_rows(rows: int, areas: int) -> bool:
    """Fewer than 32 rows per area on average: where one kernel over all areas beats per-area ones."""
    return rows < 32 * areas


def _few_rows(groups: Groups) -> bool:
    """Below 32 rows per area, one batched matmul over the padded layout (zeros for empty areas come free) forms
    the weight gradients 2-4x faster than per-area rank-n updates; above, the per-area matmuls win (measured)."""
    return groups.counts is not None and few_rows(groups.order.numel(), groups.areas)


def _weight_gradient(grad: Tensor, rows: Tensor, groups: Groups, out: Tensor, alpha: float | None = None,
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
    if _gather_pays(groups, out):           # each row's product, added into its area (empty areas: untouched)
        products = grad.unsqueeze(2) * rows.unsqueeze(1)
        return out.zero_().index_add_(0, groups.row_area, products) if alpha is None else \
            out.index_add_(0, groups.row_area, products, alpha=alpha)
    # An in-place step with some areas empty updates only the touched ones (the padded product would rewrite all).
    if _few_rows(groups) and (alpha is None or groups.every_area_used):
        padded_grad = (_padded(grad, groups) if padded_grad is None else padded_grad).transpose(1, 2)
        padded_rows = _padded(rows, groups) if padded_rows is None else padded_rows
        if alpha is None:
            return torch.bmm(padded_grad, padded_rows, out=out)
        return out.baddbmm_(padded_grad, padded_rows, alpha=alpha)    # empty areas: + alpha * 0, bit-identical
    product = None if groups.counts is not None else _grouped_kernel(grad.T, rows, groups)
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


def _each_area_gradient(grad: Tensor, rows: Tensor, groups: Groups, scratch: Tensor, total: Tensor | None
                        ) -> Iterator[tuple[int, Tensor]]:
    """``(k, grad_k.T @ rows_k)`` for each area with rows (CPU groupings), each formed in turn into ``scratch``
    (one area's size, so that it is still in cache when its step reads it) and added into ``total`` when given
    (a folded shared weight's gradient, their sum). One row's product is a broadcast one (MKL's rank-one path is
    slow: ``_weight_gradient``)."""
    counts = host_counts(groups)
    for k, (g, r, n) in enumerate(zip(grad.T.split(counts, 1), rows.split(counts), counts)):
        if not n:
            continue
        if n == 1:
            torch.mul(g, r, out=scratch)
        else:
            scratch.zero_().addmm_(g, r)      # (_weight_gradient: faster than MKL's product into ``out``)
        if total is not None:
            total.add_(scratch)
        yield k, scratch


def host_counts(groups: Groups) -> list[int]:
    """Rows per area on the host (read from the device where they are not there already)."""
    return groups.counts if groups.counts is not None else groups.per_area.tolist()


def _affine_forward(rows: Tensor, groups: Groups, weight: Tensor, bias: Tensor | None,
                    shared: Tensor | None) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor | None]]:
    """The output of per-area linear maps over grouped rows (the shared weight folded in), and what their update
    needs: the rows, the weights computed with, the padded rows (kept so that the update pads only the output
    gradient)."""
    # the weights in the rows' type (mixed precision), with the shared path folded in
    compute = _compute_weights(weight, shared, rows.dtype)
    bias = None if bias is None else _cast(bias, rows.dtype)
    if torch.compiler.is_compiling():       # (a compiled step) each row's product read in place from its area
        return _row_products(compute, bias, rows, groups.row_area), (rows, compute, None)
    padded_rows = _padded(rows, groups) if _pad_pays_here(groups, weight) else None
    out = _affine(rows, groups, compute, bias, padded_rows)
    return out, (rows, compute, padded_rows)


def _padded_gradient(grad: Tensor, groups: Groups, compute: Tensor, padded_rows: Tensor | None) -> Tensor | None:
    """The output gradient in the padded layout, where the products that read it use that layout."""
    gathered = _gather_pays(groups, compute)
    return _padded(grad, groups) if padded_rows is not None or _few_rows(groups) and not gathered else None


def _area_gradients(grad: Tensor, groups: Groups, rows: Tensor, padded_grad: Tensor | None,
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
            not _gather_pays(groups, weight) else None
        if lr is not None and not wants_shared:        # plain SGD in place: w[k] += (-lr) grad_k.T rows_k
            _weight_gradient(grad, rows, groups, weight, -lr, padded_grad, padded_rows)
        elif by_area is not None:                      # each area's gradient formed in cache and stepped at once
            _SCRATCH.pop((id(weight), "gradient"), None)        # (the first step's whole gradient: not needed again)
            scratch = take_memory(weight, "area gradient", weight.dtype, weight.shape[1:])
            grad_s = weight.new_zeros(weight.shape[1:]) if wants_shared else None
            by_area(weight, _each_area_gradient(_cast(grad, weight.dtype), _cast(rows, weight.dtype), groups,
                                                scratch, grad_s))
            give_memory(weight, "area gradient", scratch)
        else:
            buffer = take_memory(weight, "gradient", weight.dtype)
            grad_w = _weight_gradient(grad, rows, groups, buffer, None, padded_grad, padded_rows)
            if wants_shared:
                grad_s = grad_w.sum(0)                     # every row is in one area: S gets their sum
            # in place after all, from the product (plain SGD: empty areas + 0, bit-identical), or into .grad
            grad_w = _step_from_memory(weight, grad_w, groups.every_area_used) if wants_weight else None
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
        out, saved = _affine_forward(rows, groups, weight, bias, shared)
        ctx.save_for_backward(*saved)
        ctx.groups, ctx.weight, ctx.bias, ctx.shared = groups, weight, bias, shared
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        rows, weight, padded_rows = ctx.saved_tensors
        if weight is not ctx.weight:
            give_memory(ctx.weight, "compute", weight)       # the computed weights' memory serves the next forward
        groups: Groups = ctx.groups
        padded_grad = _padded_gradient(grad, groups, weight, padded_rows)
        grad_rows = None
        if ctx.needs_input_grad[0]:
            if _gather_pays(groups, weight):
                grad_rows = torch.bmm(grad.unsqueeze(1), weight.index_select(0, groups.row_area)).squeeze(1)
            elif padded_rows is not None:
                grad_rows = torch.bmm(padded_grad, weight).view(-1, weight.shape[2]).index_select(0, groups.slot)
            else:
                grad_rows = _grouped_mm(grad, groups, weight.transpose(1, 2))
        grad_w, grad_b, grad_s = _area_gradients(grad, groups, rows, padded_grad, padded_rows, ctx.weight, ctx.bias,
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
        dtype = _autocast_dtype(rows)
        if dtype is not None:
            rows = rows.to(dtype)
        if _shared_apart(rows, weight, shared):
            return grouped_linear(rows, groups, weight, bias) + rows @ _cast(shared, rows.dtype).T
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (rows, weight, bias, shared)):
            return _GroupedLinear.apply(rows, groups, weight, bias, shared)
        out, (_, compute, _) = _affine_forward(rows, groups, weight, bias, shared)
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
        out, (_, compute, padded_rows) = _affine_forward(rows, groups, weight, bias, None if apart else shared)
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
                accumulate_gradient(weight, _step_from_memory(weight, torch.bmm(
                    grad.T.to(weight.dtype).unsqueeze(0), rows.to(weight.dtype).unsqueeze(0), out=buffer)))
            if bias is not None and bias.requires_grad:
                accumulate_gradient(bias, step_or_gradient(bias, grad.sum(0, keepdim=True)))
        else:
            if state.compute is not weight:
                give_memory(weight, "compute", state.compute)
            # (no input gradient: the weight's product pads the output gradient itself where it needs it)
            wants = tuple(p is not None and p.requires_grad for p in (weight, bias, folded))
            grads = _area_gradients(grad, groups, rows, None, state.padded_rows, weight, bias, folded, wants)
            for p, g in zip((weight, bias, folded), grads):
                accumulate_gradient(p, g)
        if shared is not None and state.shared_apart and shared.requires_grad:
            accumulate_gradient(shared, step_product_or_gradient(shared, grad.T, rows))


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


def _autocast_dtype(t: Tensor) -> torch.dtype | None:
    device = t.device.type
    if t.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


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
