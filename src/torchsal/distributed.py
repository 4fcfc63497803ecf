"""Data-parallel training on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Launch the same command on every process, e.g. ``torchrun --nproc-per-node 2 -m torchsal train ...``. Each
optimizer step consumes one *global* batch of ``--batch-size`` rows, split into contiguous shards, one per rank.
After the backward pass ``sync_gradients`` makes every rank hold the gradient a single process would have computed
on the global batch, so weights stay identical on all ranks:

    grad = sum over ranks of (local rows / global rows) * local batch-mean gradient

The per-area touched marks are summed in the same all-reduce, so every rank's area-aware optimizer updates the areas
some rank used and no other: the untouched-area invariant holds across processes. The only
batch-coupled computation, the routing objective's balanced (Sinkhorn) assignment, gathers the routing scores of the
whole global batch (``all_gather_rows``). Only rank 0 writes files.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torchsal.dispatch import Groups, group_by_area, grouped_linear, host_counts
from torchsal.errors import ConfigError, DistributedError

if TYPE_CHECKING:
    from torchsal.blocks import BlockNet

# Bytes this process has sent, per kind of collective (its own contribution; benchmarks and tests read it).
TRAFFIC: Counter[str] = Counter()


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str = "cpu", timeout_s: float = 120.0) -> Context:
    """Join the process group described by torchrun's environment (WORLD_SIZE, RANK, MASTER_ADDR, ...).

    ``timeout_s`` bounds how long a collective waits for a rank that died: the survivors then stop with an error
    instead of hanging.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Context()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        # torch.optim loads torch._dynamo on first use; loaded after the group is joined, it keeps a reference to
        # the group that destroy_process_group cannot drop, so gloo's threads outlive the interpreter and a rank
        # can abort at exit ("terminate called without an active exception"). Loaded first, it does not.
        import torch._dynamo  # noqa: F401
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"could not join the process group ({exc}); launch with torchrun") from None
        # Leave the group (joining gloo's threads) while the interpreter is still whole.
        atexit.register(dist.destroy_process_group)
    return Context(dist.get_rank(), dist.get_world_size())


def current() -> Context:
    return Context(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else Context()


def device_for(device: str, ctx: Context) -> torch.device:
    """``cuda`` under torchrun means this process's own GPU (LOCAL_RANK); everything else is taken as given."""
    if device == "cuda" and ctx.world > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", ctx.rank)))
    return torch.device(device)


def shard(batch: Tensor, ctx: Context) -> Tensor:
    """This rank's contiguous share of a global batch of indices."""
    return batch.tensor_split(ctx.world)[ctx.rank] if ctx.world > 1 else batch


def all_gather_rows(t: Tensor) -> tuple[Tensor, int]:
    """Concatenate the rows of ``t`` from every rank in rank order (shards may differ in length by one row).
    Returns ``(all rows, offset of this rank's rows)``."""
    ctx = current()
    if ctx.world == 1:
        return t, 0
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(ctx.world)]
    _collective(dist.all_gather, sizes, torch.tensor([t.shape[0]]))
    sizes = [int(s) for s in sizes]
    padded = t.new_zeros(max(sizes), *t.shape[1:])
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(ctx.world)]
    _collective(dist.all_gather, parts, padded)
    TRAFFIC["all_gather"] += padded.numel() * padded.element_size()
    rows = torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])
    return rows, sum(sizes[: ctx.rank])


def sync_gradients(model: BlockNet, local_rows: int, global_rows: int, extra: Iterable[Tensor] = ()) -> None:
    """Make every rank's ``.grad`` of the model's replicated parameters (all but area-parallel areas) and of
    ``extra`` ones (a rule's local heads) the global-batch gradient (module docstring)."""
    ctx = current()
    if ctx.world == 1:
        return
    params = [p for p in [*model.replicated_parameters(), *extra] if p.requires_grad]
    # Per parameter one mark (has a gradient); per area of an area parameter one mark (some row used it).
    areas = {id(p) for layer in model.area_layers() if layer.areas > 1 for p in (layer.weight, layer.bias)}
    marks = [_touched_marks(p, id(p) in areas) for p in params]
    touched = torch.cat(marks)
    _collective(dist.all_reduce, touched)
    active = []
    for p, mark in zip(params, touched.split([m.numel() for m in marks]), strict=True):
        if mark.sum() > 0:
            active.append(p)
            if id(p) in areas:
                p.touched_areas = (mark > 0).to(p.device)
    scale = local_rows / global_rows
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in active]) * scale
    _collective(dist.all_reduce, flat)
    TRAFFIC["all_reduce"] += touched.numel() * touched.element_size() + flat.numel() * flat.element_size()
    offset = 0
    for p in active:
        n = p.numel()
        p.grad = flat[offset: offset + n].view_as(p).clone()
        offset += n


def _touched_marks(p: Tensor, per_area: bool) -> Tensor:
    if not per_area:
        return torch.tensor([float(p.grad is not None)])
    if p.grad is None:
        return torch.zeros(p.shape[0])
    touched = getattr(p, "touched_areas", None)
    return torch.ones(p.shape[0]) if touched is None else touched.float().cpu()


def all_reduce_sums(values: list[float]) -> list[float]:
    ctx = current()
    if ctx.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    _collective(dist.all_reduce, t)
    return t.tolist()


def _collective(fn, *args) -> None:  # noqa: ANN001
    """Run a collective; a dead or unreachable peer becomes one clear error instead of a gloo traceback."""
    try:
        fn(*args)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DistributedError(f"rank {current().rank}: a peer process stopped or is unreachable ({first[:160]}); "
                               "the run stops. Continue from the last checkpoint with --resume DIR (any number "
                               "of processes)") from None


# ------------------------------------------------------------------------------------------------ area parallel
def owned_areas(areas: int, ctx: Context) -> range:
    """The contiguous block of areas rank ``ctx.rank`` holds: K / N of them (K divisible by N)."""
    per = areas // ctx.world
    return range(ctx.rank * per, (ctx.rank + 1) * per)


class _Exchange(torch.autograd.Function):
    """Differentiable all-to-all of rows: forward sends ``send[r]`` rows to rank r; backward returns the rows'
    gradients along the reverse route. ``scale_sent`` / ``scale_received`` rescale the backward message before it
    leaves / after it arrives on this rank (they turn per-rank batch means into the global batch mean)."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], receive: list[int], scale_sent: float,  # noqa: ANN001
                scale_received: float) -> Tensor:
        ctx.route, ctx.scales = (send, receive), (scale_sent, scale_received)
        return _all_to_all(x, send, receive)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None, None]:  # noqa: ANN001
        send, receive = ctx.route
        scale_sent, scale_received = ctx.scales
        return _all_to_all(grad.contiguous() * scale_sent, receive, send) * scale_received, None, None, None, None


def _all_to_all(x: Tensor, send: list[int], receive: list[int]) -> Tensor:
    out = x.new_empty(sum(receive), *x.shape[1:])
    _collective(dist.all_to_all_single, out, x.contiguous(), receive, send)
    row = x[0].numel() * x.element_size() if x.dim() > 1 else x.element_size()
    TRAFFIC["all_to_all"] += row * (sum(send) - send[current().rank])      # rows that leave this rank
    return out


def area_parallel_linear(rows: Tensor, groups: Groups, weight: Tensor, bias: Tensor, areas: int) -> Tensor:
    """``grouped_linear`` when each rank holds only its own block of areas (``owned_areas``).

    Grouped rows are already sorted by area, hence by owner: one all-to-all sends each block to its owner, which
    runs its areas' grouped matmul over the rows every rank sent, and a second all-to-all returns the outputs in
    the same grouped order. Backward retraces the route: output gradients go to the owner (which forms its areas'
    weight gradients over the whole global batch) and input gradients, where needed, come back. Only per-area row
    counts are gathered from everyone.
    """
    ctx = current()
    parts = [torch.tensor(host_counts(groups)) for _ in range(ctx.world)]
    if ctx.world > 1:
        _collective(dist.all_gather, parts, parts[ctx.rank])
        TRAFFIC["all_gather"] += parts[0].numel() * parts[0].element_size()
    every = torch.stack(parts)                                      # (N, K) rows per (source rank, area)
    mine = owned_areas(areas, ctx)
    send = every[ctx.rank].view(ctx.world, -1).sum(1).tolist()       # rows to each owner
    receive = every[:, mine.start: mine.stop].sum(1).tolist()        # rows from each source
    share = rows.shape[0] / max(int(every.sum()), 1)                 # this rank's part of the global batch
    received = _Exchange.apply(rows, send, receive, 1.0, 1 / share)
    local = torch.arange(len(mine)).repeat(ctx.world).repeat_interleave(every[:, mine.start: mine.stop].reshape(-1))
    mine_groups = group_by_area(local.to(rows.device), len(mine))
    out = grouped_linear(received[mine_groups.order], mine_groups, weight, bias)[mine_groups.inverse]
    return _Exchange.apply(out, receive, send, share, 1.0)


def gather_state_dict(model: nn.Module) -> dict[str, Tensor] | None:
    """The full (unsharded) state dict on rank 0, None elsewhere: every rank's areas are sent to rank 0."""
    ctx = current()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if ctx.world == 1:
        return state
    sharded = {f"{name}.{p}" for name, m in model.named_modules() if getattr(m, "sharded", False)
               for p in ("weight", "bias")}
    parts: list[dict[str, Tensor] | None] = [None] * ctx.world if ctx.is_main else None
    dist.gather_object(state, parts, dst=0)
    if not ctx.is_main:
        return None
    # A sharded layer's areas are stacked along dim 0 in area order, and ranks hold consecutive blocks.
    return {k: torch.cat([part[k] for part in parts]) if k in sharded else v for k, v in parts[0].items()}
