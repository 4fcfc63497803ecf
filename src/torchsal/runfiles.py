"""A run's files: the checkpoint (everything a bit-identical resume needs), the trained model for ``eval`` and
``load_model``, the per-epoch history as CSV, and the environment recorded with the metrics. Every file is written
atomically and read back without running code (``weights_only``)."""

from __future__ import annotations

import csv
import io
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from torchsal.blocks import BlockNet
from torchsal.config import RunConfig, make_config
from torchsal.data import Splits
from torchsal.errors import ConfigError
from torchsal.models import build_model
from torchsal.storage import load_plain, write_bytes_atomic
from torchsal.version import __version__

CHECKPOINT = "checkpoint.pt"
MODEL = "model.pt"
MODEL_FIELDS = ("format", "config", "model", "in_features", "classes", "mean", "std")
CHECKPOINT_FIELDS = ("config", "model", "rule", "optimizer", "scheduler", "shuffle", "torch_rng", "epoch", "batch",
                     "step", "order", "sums", "history", "elapsed")


def environment() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import sklearn
    return {"torchsal": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "sklearn": sklearn.__version__, "python": platform.python_version(), "git_commit": commit,
            "threads": torch.get_num_threads()}


def read_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """The checkpoint in ``run_dir`` (loaded without running code); one clear line when there is none."""
    path = Path(run_dir) / CHECKPOINT
    for stale in Path(run_dir).glob(f".{CHECKPOINT}.*.tmp"):    # left by a crash in the middle of a write
        stale.unlink()
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no {CHECKPOINT} there; train with --out DIR "
                          "--checkpoint-every N to write one (or interrupt a run with --out: Ctrl-C writes one)")
    return load_plain(path, "checkpoint", CHECKPOINT_FIELDS)


def write_history_csv(path: Path, history: list[dict[str, Any]]) -> None:
    """One row per epoch; the per-layer lists (activation and signal RMS) stay in metrics.json."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, [k for k, v in history[0].items() if not isinstance(v, list)],
                            extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    write_bytes_atomic(path, buffer.getvalue().encode())


# ------------------------------------------------------------------------------------------------ export
def save_model(path: Path, model: BlockNet, config: RunConfig, splits: Splits,
               state: dict[str, Tensor] | None = None) -> None:
    """A trained model for ``torchsal eval`` / ``load_model``: weights (``state``, if given, else the model's),
    config, classes and the input scaling."""
    buffer = io.BytesIO()
    torch.save({"format": "torchsal-model-1", "config": config.to_dict(),
                "model": model.state_dict() if state is None else state,
                "in_features": splits.in_features, "classes": splits.classes, "image_shape": splits.image_shape,
                "mean": torch.as_tensor(splits.mean), "std": torch.as_tensor(splits.std)}, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def load_model(path: str | Path) -> tuple[BlockNet, dict[str, Any]]:
    """Load a model saved by training (``DIR/model.pt`` or ``DIR``). Returns ``(model, info)``; ``info`` has the
    config, classes and the input ``mean``/``std`` to apply to raw features."""
    path = Path(path)
    path = path / MODEL if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"no trained model at {path}; train with --out DIR to write DIR/{MODEL}")
    info = load_plain(path, "model file", MODEL_FIELDS)
    if info["format"] != "torchsal-model-1":
        raise ConfigError(f"{path} is not a torchsal model file (format {info['format']!r})")
    saved = dict(info["config"])
    config = make_config(saved.pop("rule"), **saved)
    shape = info.get("image_shape")
    model = build_model(info["in_features"], len(info["classes"]), config.model,
                        in_shape=None if shape is None else tuple(shape))
    try:
        model.load_state_dict(info["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:200]
        raise ConfigError(f"{path}: the weights do not fit the model its config describes ({first})") from None
    model.eval()
    return model, info
