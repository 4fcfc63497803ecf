"""Continual learning: a sequence of tasks trained one after another by one model, and what it forgets.

Protocols (van de Ven & Tolias 2019):

- ``split``: the classes of a dataset in consecutive pairs, one task each (split-MNIST: 5 tasks). Evaluated
  *class-incrementally* (argmax over all classes seen) and *task-incrementally* (argmax within the task's own
  classes, i.e. the task identity is given at test time).
- ``split`` with ``domain=True``: the same pairs, labelled by their position in the pair (domain-incremental: one
  two-way problem whose inputs change with each task).
- ``permuted``: the same 10 classes under a fixed random pixel permutation per task (permuted-MNIST: 10 tasks).

Routing never sees the task identity: areas are chosen from the input alone, so any separation of tasks into areas
is learned from the data.

Results: ``accuracy[i][j]`` is the test accuracy on task j after training task i; ``average`` is the mean over
tasks after the last one; ``forgetting`` the mean over all but the last task of (best accuracy ever reached on the
task - its final accuracy).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from torchsal.config import RunConfig
from torchsal.continual_methods import ContinualMethod
from torchsal.data import Splits
from torchsal.errors import ConfigError
from torchsal.evaluation import EVAL_BATCH
from torchsal.train import Trainer


def split_tasks(splits: Splits, classes_per_task: int = 2, domain: bool = False) -> list[tuple[Splits, list[int]]]:
    """One task per consecutive group of classes; labels keep their global index (class- and task-incremental).
    With ``domain`` the labels become the position within the task's group, so every task is the same
    ``classes_per_task``-way problem on new inputs (domain-incremental: "first or second of the pair?")."""
    groups = [list(range(c, min(c + classes_per_task, splits.num_classes)))
              for c in range(0, splits.num_classes, classes_per_task)]
    if not domain:
        return [(_only(splits, g), g) for g in groups]
    positions = list(range(classes_per_task))
    return [(_as_positions(_only(splits, g), g), positions) for g in groups]


def _as_positions(splits: Splits, classes: list[int]) -> Splits:
    index = torch.full((splits.num_classes,), -1, dtype=torch.long)
    index[torch.tensor(classes)] = torch.arange(len(classes))
    parts = {f"y_{part}": index[getattr(splits, f"y_{part}")] for part in ("train", "val", "test")}
    return replace(splits, classes=[f"position {i}" for i in range(len(classes))], **parts)


def _only(splits: Splits, classes: list[int]) -> Splits:
    """The samples of ``classes`` in every part (train, val, test) of ``splits``."""
    parts = {}
    for part in ("train", "val", "test"):
        x, y = getattr(splits, f"x_{part}"), getattr(splits, f"y_{part}")
        keep = torch.isin(y, torch.tensor(classes))
        parts[f"x_{part}"], parts[f"y_{part}"] = x[keep], y[keep]
    return replace(splits, **parts)


def permuted_tasks(splits: Splits, tasks: int, seed: int) -> list[tuple[Splits, list[int]]]:
    """Task 0 is the data itself; task t > 0 permutes the input features with a fixed seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in range(tasks):
        perm = torch.arange(splits.in_features) if t == 0 else torch.randperm(splits.in_features, generator=g)
        out.append((replace(splits, x_train=splits.x_train[:, perm], x_val=splits.x_val[:, perm],
                            x_test=splits.x_test[:, perm]), list(range(splits.num_classes))))
    return out


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: Tensor, y: Tensor, classes: list[int] | None = None) -> float:
    """Accuracy, optionally with the argmax restricted to ``classes`` (task-incremental evaluation)."""
    model.eval()
    correct = 0
    for xb, yb in zip(x.split(EVAL_BATCH), y.split(EVAL_BATCH)):
        logits = model(xb)
        if classes is not None:
            mask = torch.full_like(logits, float("-inf"))
            mask[:, classes] = 0
            logits = logits + mask
        correct += int((logits.argmax(1) == yb).sum())
    model.train()
    return correct / len(y)


def run_sequence(config: RunConfig, tasks: list[tuple[Splits, list[int]]],
                 method: ContinualMethod | None = None, part: str = "test") -> dict[str, Any]:
    """Train ``tasks`` in order with one model (and a continual-learning ``method``, any rule); the accuracy matrix,
    average accuracy and forgetting, for the class-incremental and the task-incremental evaluation, on each task's
    ``part`` ("test", or "val" to choose a method's strength without looking at test data)."""
    if len(tasks) < 2:
        raise ConfigError("a continual-learning sequence needs at least two tasks")
    trainer = Trainer(config, tasks[0][0], method=method)
    matrices: dict[str, list[list[float]]] = {"class_incremental": [], "task_incremental": []}
    for i, (task, _) in enumerate(tasks):
        if i:
            trainer.next_task(task)
        trainer.fit(progress=False)
        if method is not None:
            method.after_task(trainer, task)
        d = trainer.device
        scored = [(getattr(t, f"x_{part}").to(d), getattr(t, f"y_{part}").to(d)) for t, _ in tasks]
        matrices["class_incremental"].append([accuracy(trainer.model, x, y) for x, y in scored])
        matrices["task_incremental"].append([accuracy(trainer.model, x, y, cls)
                                             for (x, y), (_, cls) in zip(scored, tasks, strict=True)])
    return {name: summarise(m) for name, m in matrices.items()}


def summarise(acc: list[list[float]]) -> dict[str, Any]:
    final = acc[-1]
    forgetting = [max(row[j] for row in acc) - final[j] for j in range(len(final) - 1)]
    return {"accuracy": acc, "average": sum(final) / len(final),
            "forgetting": sum(forgetting) / len(forgetting)}
