"""What a trained model does on data: accuracy (of a model in memory, or of a saved run on any split or file), the
area each sample is routed to, the share each area takes, and the parameter counts a run reports."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from torchsal.blocks import BlockNet
from torchsal.data import all_rows, load_dataset, make_splits, to_model_classes
from torchsal.errors import ConfigError
from torchsal.runfiles import load_model

EVAL_BATCH = 4096


@torch.no_grad()
def evaluate(model: BlockNet, x: Tensor, y: Tensor) -> float:
    """Accuracy (fraction in [0, 1]) of ``model`` on (x, y), in eval mode."""
    was_training = model.training
    model.eval()
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(EVAL_BATCH),
                                                                          y.split(EVAL_BATCH)))
    model.train(was_training)
    return correct / len(y)


@torch.no_grad()
def route_all(model: BlockNet, x: Tensor) -> list[Tensor]:
    """The area of every sample of ``x`` (eval mode): one tensor per router (input routing: one; layer routing:
    one per block holding areas)."""
    if not model.routers:
        return [torch.zeros(len(x), dtype=torch.long, device=x.device)]
    was_training = model.training
    model.eval()
    per_batch = [model.trace(xb).areas for xb in x.split(EVAL_BATCH)]
    model.train(was_training)
    return [torch.cat([areas[i] for areas in per_batch]) for i in model.router_blocks]   # (None for blocks without)


def area_shares(model: BlockNet, x: Tensor) -> list[float] | list[list[float]]:
    """Fraction of ``x`` routed to each area: one list (input routing) or one list per layer."""
    k = model.areas
    shares = [(torch.bincount(a, minlength=k) / len(x)).tolist() for a in route_all(model, x)]
    return shares if len(shares) > 1 else shares[0]


def parameter_counts(model: BlockNet, rule: torch.nn.Module) -> dict[str, int]:
    """The model's parameter counts (``BlockNet.parameter_counts``), with a rule's learned local heads in the
    total and on their own line (they train with the model but take no part in inference)."""
    counts = model.parameter_counts()
    heads = sum(p.numel() for p in rule.parameters())
    if heads:
        counts["params_total"] += heads
        counts["params_local_heads"] = heads
    return counts


def evaluate_saved(model_path: str | Path, dataset: str | None = None, split: str = "test",
                   data_dir: str | None = None) -> dict[str, Any]:
    """The accuracy of the model a run saved (``DIR`` or ``DIR/model.pt``) on ``split`` (test, val, train: the
    run's own split of its dataset, or of ``dataset``; all: every row of it), with the run's input scaling and its
    classes. Returns what ``torchsal eval`` prints and writes."""
    model, info = load_model(model_path)
    cfg = info["config"]
    dataset = dataset or cfg["dataset"]
    data = load_dataset(dataset, data_dir or cfg["data_dir"], cfg["grayscale"])
    if data.x.shape[1] != info["in_features"]:
        raise ConfigError(f"dataset {dataset!r} has {data.x.shape[1]} features; the model was trained on "
                          f"{info['in_features']}")
    scaling = (info["mean"].numpy(), info["std"].numpy())
    if split == "all":                   # every row of the file (a new file: no split of it is special)
        x, y = all_rows(data, scaling)
    else:
        splits = make_splits(data, cfg["seed"], scaling=scaling)
        x, y = getattr(splits, f"x_{split}"), getattr(splits, f"y_{split}")
    y = to_model_classes(y, data.classes, list(info["classes"]), dataset)
    return {"model": str(model_path), "dataset": dataset, "split": split, "samples": len(y),
            "classes_present": len(set(y.tolist())), "accuracy": evaluate(model, x, y), "rule": cfg["rule"],
            "classes": len(info["classes"])}
