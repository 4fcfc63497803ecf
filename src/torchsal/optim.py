"""Area-aware optimizers: ``torch.optim``'s SGD, Adam and AdamW, updating only the areas a step touched.

An area layer's weights are one stacked tensor (K, out, in), and its gradient is dense: zeros for the areas no
sample used. A stock optimizer would still move those areas (momentum, Adam's moments, weight decay). These
subclasses keep torch's own update (the same fused kernels, the same hyper-parameters and ``state_dict``), but
hand it, for each area parameter, only the touched areas: one view per run of consecutive touched areas, with
the matching views of the gradient and the state. Untouched areas and their state are neither read nor written.
When every area was touched (large batches), the whole tensor goes as one.

On CPU, parameters stepped whole that lie back to back in one block of memory, with their gradients and state
likewise (a layer stack's: torchsal.stacks), step as one flat tensor: the stock step's cost per tensor is paid
once per block instead of once per parameter; the runs found are kept for the next step while a cheap check finds
them unchanged.

Which areas were touched is recorded on the parameter by the backward pass (``touched_areas``, torchsal.dispatch).
A parameter without that record is an ordinary one and is updated whole. Adam's step count is one per tensor, as
in ``torch.optim.SparseAdam``: an area's bias correction counts the layer's steps, not the area's.

A stock optimizer that would move untouched areas (momentum, weight decay, Adam's moments) is refused at its
step with one clear line, instead of silently breaking that invariant; plain SGD (lr only) is exact either way.
The guard is installed by the first area layer built (importing torchsal changes no optimizer), and looks only at
optimizers that hold area parameters: any other costs one lookup per step.

Usage::

    optimizer = torchsal.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4, fused=True)
"""

from __future__ import annotations

import contextlib
import functools
import operator
import weakref
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from torchsal import compat
from torchsal.dispatch import stepping_in_backward
from torchsal.errors import ConfigError
from torchsal.stacks import back_to_back


def touched_runs(p: Tensor) -> list[tuple[int, int]] | None:
    """Runs ``[start, stop)`` of consecutive touched areas of ``p``; None when the whole tensor is to be updated."""
    touched = getattr(p, "touched_areas", None)
    if touched is None:
        return None
    flags = touched.tolist()
    if all(flags):
        return None
    runs, start = [], None
    for k, on in enumerate([*flags, False]):
        if on and start is None:
            start = k
        elif not on and start is not None:
            runs.append((start, k))
            start = None
    return runs


def _host_reads_free(p: Tensor) -> bool:
    """Reading a touched mask on the host is free on CPU; on a GPU it would stall the stream every step."""
    return p.is_cpu


class _AreaAware:
    """Mixin for a ``torch.optim.Optimizer``: ``step`` sees the touched areas' views in place of area parameters."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        if closure is None and all(p.grad is None for group in self.param_groups for p in group["params"]):
            # nothing to step: every step was taken in place (updates_in_backward), and torch's step
            # over gradient-less parameters changes nothing (its per-call cost was about 5% of a batch-16 step)
            return None
        swapped: list[tuple[dict, list[Tensor]]] = []
        views: list[tuple[Tensor, Tensor, int, int]] = []      # (parameter, view, start, stop)
        masked: list[tuple[Tensor, Tensor, dict[str, Tensor]]] = []   # (parameter, touched mask, saved tensors)
        joined: list[tuple[Tensor, _Run]] = []                         # (flat tensor, its parameters)
        for index, group in enumerate(self.param_groups):
            params, whole = [], []
            for p in group["params"]:
                grad = p.grad                                   # (one read of each attribute: 508 parameters)
                touched = None if grad is None else getattr(p, "touched_areas", None)
                if touched is None:
                    (whole if grad is not None and _host_reads_free(p) else params).append(p)
                    continue
                if not _host_reads_free(p):
                    # No host read of the mask (a GPU sync): step the whole tensor, then put the untouched areas
                    # and their state back. Twice the bytes of the views below, but no stall.
                    saved = {key: value.clone() for key, value in self.state[p].items()
                             if torch.is_tensor(value) and value.dim() > 0}
                    masked.append((p, touched, {**saved, "": p.detach().clone()}))
                    params.append(p)
                    continue
                runs = touched_runs(p)
                if runs is None:
                    whole.append(p)
                    continue
                state = self.state[p]
                for start, stop in runs:
                    view = p[start:stop]
                    view.grad = p.grad[start:stop]
                    self.state[view] = {key: value if key == "step" or not torch.is_tensor(value)
                                        or value.dim() == 0 else value[start:stop]
                                        for key, value in state.items()}
                    if "step" in state:
                        self.state[view]["step"] = state["step"].clone()
                    params.append(view)
                    views.append((p, view, start, stop))
            params.extend(self._join(index, whole, joined))
            swapped.append((group, group["params"]))
            group["params"] = params
        try:
            loss = super().step(closure)
        finally:
            for group, params in swapped:
                group["params"] = params
            for p, view, start, stop in views:
                self._write_back(p, self.state.pop(view), start, stop)
            self._split_state(joined)
            for p, touched, saved in masked:
                self._restore_untouched(p, touched, saved)
        return loss

    def _join(self, index: int, params: list[Tensor], joined: list[tuple[Tensor, _Run]]) -> list[Tensor]:
        """``params`` with each run of them that lies back to back in memory, gradients and state too, replaced by
        one flat tensor (recorded in ``joined``): a 128-layer stack's 508 parameters took 8.0 ms per fused Adam
        step, as four flat tensors 4.7 (measured). The update is elementwise, so it is the same step (to the last
        bit where a fused kernel rounds a tensor's tail in scalar code). CPU only: checking that step counts agree
        reads them on the host, a stall on a GPU, where multi-tensor kernels make the cost per tensor small.

        The runs of parameter group ``index`` are kept (``_JoinedRun``) and taken again while a cheap check finds
        them as they were: finding them anew (sorting by address, checking the layout of every tensor, comparing
        step counts) cost 2.2 ms of a 35 ms 128-layer step, measured."""
        kept = self.__dict__.setdefault("_joined_runs", {})
        key, (kept_key, runs) = tuple(map(id, params)), kept.get(index, (None, None))
        grads = [run.gradient(self.state) for run in runs] if kept_key == key else [None]
        if all(grad is not None for grad in grads):
            taken = {id(p) for run in runs for p in run.params}
            for run, grad in zip(runs, grads):
                run.flat.grad = grad
                self.state[run.flat] = run.state
                joined.append((run.flat, run))
            return [*(p for p in params if id(p) not in taken), *(run.flat for run in runs)]
        kept.pop(index, None)
        out, run, end = [], [], None
        for start, p in [*sorted(((p.data_ptr(), p) for p in params), key=lambda pair: pair[0]), (None, None)]:
            if run and start != end:
                flat = self._flat(run) if len(run) > 1 else None
                if flat is None:
                    out.extend(run)
                else:
                    out.append(flat)
                    joined.append((flat, _NewRun(index, key, run)))
                run = []
            if p is not None:
                run.append(p)
                end = start + p.numel() * p.element_size()
        return out

    def _flat(self, run: list[Tensor]) -> Tensor | None:
        """One tensor for back-to-back parameters, its gradient and state views of theirs; None where their gradients
        are not back to back or their step counts differ. State held apart (as ``load_state_dict`` leaves it) is
        joined into one block, which the parameters' state becomes views of after the step."""
        flat, grad = back_to_back(run), back_to_back([p.grad for p in run])
        states = [self.state[p] for p in run]
        if flat is None or grad is None or any(s.keys() != states[0].keys() for s in states):
            return None
        state = {}
        for key in states[0]:
            values = [s[key] for s in states]
            if torch.is_tensor(values[0]) and values[0].dim() > 0:
                state[key] = back_to_back(values)
                if state[key] is None:
                    state[key] = torch.cat([v.reshape(-1) for v in values])
            elif torch.is_tensor(values[0]):                    # step counts: equal, or the run steps apart
                if not torch.equal(torch.stack(values), values[0].expand(len(values))):
                    return None
                state[key] = values[0].clone()
            elif any(v != values[0] for v in values):
                return None
            else:
                state[key] = values[0]
        flat.grad = grad
        self.state[flat] = state
        return flat

    def _split_state(self, joined: list[tuple[Tensor, _Run]]) -> None:
        """Each parameter's state from the flat tensor's: views of its block, and its step count a view of one
        block of the run's counts (one copy per step for the run); the runs kept for the next step (``_join``)."""
        kept: dict[int, tuple[tuple[int, ...], list[_JoinedRun]]] = self.__dict__.setdefault("_joined_runs", {})
        for flat, run in joined:
            state = self.state.pop(flat)
            flat.grad = None
            if isinstance(run, _JoinedRun):
                run.counted()
                continue
            params, counts = run.params, {}
            for name, value in state.items():
                if torch.is_tensor(value) and value.dim() > 0:
                    first = self.state[params[0]].get(name)
                    if first is None or first.data_ptr() != value.data_ptr():
                        for p, piece in zip(params, value.split([p.numel() for p in params])):
                            self.state[p][name] = piece.view_as(p)
                elif torch.is_tensor(value):
                    counts[name] = value.expand(len(params)).clone()
                    for p, count in zip(params, counts[name].unbind(0)):
                        self.state[p][name] = count
                else:
                    for p in params:
                        self.state[p][name] = value
            # (``_join`` dropped the group's kept runs before finding these: they are its runs now)
            kept.setdefault(run.group, (run.key, []))[1].append(_JoinedRun(flat, params, state, counts, self.state))

    def _restore_untouched(self, p: Tensor, touched: Tensor, saved: dict[str, Tensor]) -> None:
        keep = touched.view(-1, *[1] * (p.dim() - 1))
        p.copy_(torch.where(keep, p, saved[""]))
        for key, value in self.state[p].items():
            if torch.is_tensor(value) and value.dim() > 0:    # state made by this step starts at zero
                value.copy_(torch.where(keep, value, saved[key] if key in saved else torch.zeros_like(value)))

    def _write_back(self, p: Tensor, view_state: dict, start: int, stop: int) -> None:
        """Fold a view's state into the parameter's (state the stock step created for the view is copied in)."""
        state = self.state[p]
        for key, value in view_state.items():
            if key == "step" or not torch.is_tensor(value) or value.dim() == 0:
                state[key] = value
                continue
            full = state.get(key)
            if full is None:
                full = state[key] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            target = full[start:stop]
            if target.data_ptr() != value.data_ptr():
                target.copy_(value)


class _NewRun(NamedTuple):
    """Parameters ``_join`` found back to back at this step, in parameter group ``group`` (whose parameters stepped
    whole have the ids ``key``)."""

    group: int
    key: tuple[int, ...]
    params: list[Tensor]


class _JoinedRun:
    """A run of parameters stepped as one flat tensor, kept for the next steps with what the join relied on: the
    parameters' addresses, their state as views of the flat state, their step counts as views of one block of
    counts equal to the flat's."""

    def __init__(self, flat: Tensor, params: list[Tensor], state: dict, counts: dict[str, Tensor],
                 optimizer_state: dict) -> None:
        self.flat, self.params, self.state, self.counts = flat, params, state, counts
        self.addresses = [p.data_ptr() for p in params]
        self.names = list(optimizer_state[params[0]])
        self.held = [optimizer_state[p].get(name) for p in params for name in self.names]

    def gradient(self, optimizer_state: dict) -> Tensor | None:
        """The flat gradient if the parameters, their gradients and their state lie as they did when the run was
        joined (a few checks per tensor: about 0.3 ms for a 128-layer stack); else None."""
        params, names = self.params, self.names
        grad = back_to_back([p.grad for p in params])
        if grad is None or [p.data_ptr() for p in params] != self.addresses:
            return None
        states = [optimizer_state[p] for p in params]
        if any(len(state) != len(names) for state in states) or \
                not all(map(operator.is_, [state.get(name) for state in states for name in names], self.held)):
            return None
        if not all(torch.equal(counts, self.state[name].expand(len(params))) for name, counts in self.counts.items()):
            return None
        return grad

    def counted(self) -> None:
        """The flat's step counts, just advanced by the step, into the parameters' (one copy per kind)."""
        for name, counts in self.counts.items():
            counts.copy_(self.state[name].expand(len(self.params)))


_Run = _NewRun | _JoinedRun


class SGD(_AreaAware, torch.optim.SGD):
    """``torch.optim.SGD`` (momentum, weight decay, fused) that leaves untouched areas untouched."""


class Adam(_AreaAware, torch.optim.Adam):
    """``torch.optim.Adam`` that leaves untouched areas and their moments untouched."""


class AdamW(_AreaAware, torch.optim.AdamW):
    """``torch.optim.AdamW`` that leaves untouched areas, their moments and their weight decay untouched."""


@contextlib.contextmanager
def updates_in_backward(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Inside this block, an area parameter whose optimizer can step it from its own gradient alone takes its
    update inside its own backward (or a closed-form step's update) and gets no ``.grad``, so ``optimizer.step()``
    has nothing left to do for it:

    - plain SGD (lr only): ``w[k] -= lr * grad_k`` as one in-place product per area, the gradient never written
      (wide regime of benchmarks/speed.py: SAL step 67 -> 57 ms against BP's 50). A learned router's projection
      and a shared weight computed apart step there too (``dispatch.step_or_gradient``).
    - fused Adam and AdamW of this module, once their state exists (from a parameter's second step): each touched
      area's gradient is formed into one area's scratch memory and stepped at once by torch's own fused kernel
      (``_AdamByArea``), so the (K, out, in) gradient is never written out and read back (docs/performance.md).
      Parameters without areas are stepped whole from their gradient, and so are small area parameters (biases, a
      head gathered per row) where every area had rows; elsewhere those keep ``.grad``.

    Exact only where nothing else needs the gradient: not under gradient clipping, hooks, or a data-parallel
    all-reduce (which must see the gradient before anyone steps). Adam's step is the same arithmetic on the same
    values, up to float32 rounding where the areas' gradients are formed apart. Other optimizers (momentum, weight
    decay on SGD; Adam not fused) make this a no-op."""
    updates: dict[int, dict | _AdamByArea] = {}
    for group in optimizer.param_groups:
        plain_sgd = isinstance(optimizer, torch.optim.SGD) and \
            not (group.get("momentum") or group.get("weight_decay") or group.get("maximize"))
        if plain_sgd or _steps_by_area(optimizer, group):
            update = group if plain_sgd else _AdamByArea(optimizer, group)
            updates.update({id(p): update for p in group["params"]})
    with stepping_in_backward(updates):
        yield


def _steps_by_area(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    """An area-aware Adam or AdamW whose group steps with the fused kernel (the one the trainer builds)."""
    return isinstance(optimizer, Adam | AdamW) and group.get("fused") and not group.get("differentiable")


class _AdamByArea:
    """A fused Adam or AdamW group's step of a parameter from gradients formed in cache (``dispatch.AreaStep``):
    of an area parameter, each touched area stepped by torch's fused kernel from its own gradient as that is formed,
    the parameter's step count advanced once, as ``step`` on the touched areas' views does (untouched areas and their
    state are not read); of any other, the whole parameter from its gradient."""

    def __init__(self, optimizer: torch.optim.Optimizer, group: dict) -> None:
        self.state, self.group = optimizer.state, group
        self.decoupled = bool(group.get("decoupled_weight_decay"))

    def ready(self, p: Tensor) -> bool:
        """The parameter's state exists: torch's own first step made it."""
        state = self.state.get(p)
        return bool(state) and "exp_avg" in state and (not self.group["amsgrad"] or "max_exp_avg_sq" in state)

    @torch.no_grad()
    def __call__(self, p: Tensor, gradients: Iterator[tuple[int | None, Tensor]]) -> None:
        state, group = self.state[p], self.group
        step = state["step"]
        step.add_(1)
        # the parameter, its moments (and AMSGrad's maxima); split into areas once, if an area comes
        whole = [p, state["exp_avg"], state["exp_avg_sq"], *([state["max_exp_avg_sq"]] if group["amsgrad"] else [])]
        areas = None
        beta1, beta2 = (float(beta) for beta in group["betas"])
        for k, grad in gradients:
            if k is None:
                views = whole
            else:
                areas = areas or [t.unbind(0) for t in whole]
                views = [t[k] for t in areas]
            compat.adam_step(views[:1], [grad], views[1:2], views[2:3], views[3:], [step], decoupled=self.decoupled,
                             lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                             eps=group["eps"], amsgrad=group["amsgrad"], maximize=group["maximize"])


def _moves_zero_gradients(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a stock optimizer changes a parameter whose gradient is zero."""
    if not isinstance(optimizer, torch.optim.SGD):
        return True
    return any(g.get("momentum", 0) or g.get("weight_decay", 0) for g in optimizer.param_groups)


# optimizer -> (parameters it held when last asked, whether any is an area parameter)
_HOLDS_AREAS: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[int, bool]] = weakref.WeakKeyDictionary()


def _holds_area_parameters(optimizer: torch.optim.Optimizer) -> bool:
    held = sum(len(g["params"]) for g in optimizer.param_groups)
    known = _HOLDS_AREAS.get(optimizer)
    if known is None or known[0] != held:       # new, or a parameter group added since
        known = held, any(hasattr(p, "touched_areas") for g in optimizer.param_groups for p in g["params"])
        _HOLDS_AREAS[optimizer] = known
    return known[1]


def _refuse_stock_optimizers(optimizer: torch.optim.Optimizer, args, kwargs) -> None:  # noqa: ANN001, ARG001
    if isinstance(optimizer, _AreaAware) or not _holds_area_parameters(optimizer):
        return
    partial = any(getattr(p, "touched_areas", None) is not None and p.grad is not None
                  for g in optimizer.param_groups for p in g["params"])
    if partial and _moves_zero_gradients(optimizer):
        name = type(optimizer).__name__
        raise ConfigError(f"torch.optim.{name} would move the areas no sample of this batch used (momentum, weight "
                          f"decay or moments act on their zero gradient); use torchsal.optim.{name} (same "
                          "arguments), which updates only the touched areas")


@functools.cache
def guard_stock_optimizers() -> None:
    """Install the guard against stock optimizers that move untouched areas (once; area layers call it)."""
    register_optimizer_step_pre_hook(_refuse_stock_optimizers)
