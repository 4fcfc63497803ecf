"""Layer stacks: runs of alike blocks trained at once under a local rule.

Under a local rule (dfa, sal) every block input is detached, so no gradient crosses a block, and under input
routing every block groups its rows the same way: the graphs of alike blocks are independent and shaped alike. A
block class may then run a run of its blocks as one (``run_stack``): a pass without autograd for the blocks'
inputs (each needs the one before), then every block at once, so autograd records and runs a few operations for
the run instead of a few per block. ``BlockNet.trace`` finds the runs: consecutive hidden blocks whose
``stack_key()`` is equal and not None.

This module holds what every such class needs: the run's parameters as one ``(L, ...)`` tensor without a copy per
step (``stacked``), and each block's own parameter handed its slice of a stacked gradient (``hand_out``), so
parameters, optimizers, ``state_dict`` and the touched-area invariant are as in the block-by-block step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from torchsal.dispatch import Groups, accumulate_gradient, mark_touched


def alike_runs(blocks: Sequence[nn.Module]) -> dict[int, range]:
    """Runs of at least two consecutive blocks of one class with equal, non-None ``stack_key()``, by first index."""
    keys = [(type(b), b.stack_key()) if hasattr(b, "stack_key") else None for b in blocks]
    runs, start = {}, 0
    for i in range(1, len(blocks) + 1):
        if i == len(blocks) or keys[i] is None or keys[i] != keys[start]:
            if i - start >= 2 and keys[start] is not None and keys[start][1] is not None:
                runs[start] = range(start, i)
            start = i
    return runs


# The purpose under which a stack's gradient memory is handed back (dispatch.give_memory), keyed on its first
# parameter, for the next step's backward to write into again (a fresh block per step cost its page faults).
GRADIENT_MEMORY = "stack-gradient"


@torch.no_grad()
def stacked(params: Sequence[nn.Parameter]) -> Tensor:
    """The parameters as one ``(L, ...)`` leaf on their own memory, no copy, requiring a gradient if any of them
    does (nothing hands it to them: the caller's backward does, with ``hand_out``). The first call moves them into one
    block of memory (``p.data`` becomes a view of it; the parameters, their optimizer state and ``state_dict`` stay
    as they were), one at a time so that two copies are never held; so does any later call after something gave
    them memory of their own (``.to()``). A ``torch.stack`` per step instead copied every weight (7 ms of a
    128-layer step, measured)."""
    shape = params[0].shape
    block = back_to_back(params)                     # (addresses only, checked every step)
    if block is None:
        memory = torch.empty((len(params), *shape), dtype=params[0].dtype, device=params[0].device)
        for p, view in zip(params, memory.unbind(0)):
            p.data = view.copy_(p.detach())
        block = back_to_back(params)
    return block.view(len(params), *shape).requires_grad_(any(p.requires_grad for p in params))


def back_to_back(tensors: Sequence[Tensor]) -> Tensor | None:
    """One flat view of ``tensors`` (of one device) if they lie back to back, in this order, in one block of memory;
    else None."""
    first = tensors[0]
    start, size, dtype = first.data_ptr(), first.element_size(), first.dtype
    end = start
    for t in tensors:
        if t.data_ptr() != end or t.dtype != dtype or not t.is_contiguous():
            return None
        end += t.numel() * size
    storage = first.untyped_storage()
    # (live tensors cannot overlap: lying within the first one's storage, they are all views of it)
    if storage.data_ptr() + storage.nbytes() < end:
        return None
    return first.detach().as_strided(((end - start) // size,), (1,))


def hand_out(params: Sequence[nn.Parameter], grad: Tensor, groups: Groups | None = None) -> None:
    """Each parameter's slice of a stacked gradient into its ``.grad`` (accumulating, as autograd does); with
    ``groups``, the areas it touched recorded first (area parameters, torchsal.dispatch)."""
    for p, slice_ in zip(params, grad.unbind(0)):
        if not p.requires_grad:
            continue
        if groups is not None:
            mark_touched(p, groups)
        accumulate_gradient(p, slice_)
