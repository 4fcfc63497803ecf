"""Files a run writes and reads.

Writes are atomic: a crash mid-write leaves the previous file intact (temp file, fsync, rename), and the file gets
the mode the user's umask allows, as ``open()`` would give it. Reads of model and checkpoint files never run code:
they hold only tensors and plain data and load with ``weights_only=True``, so a file from someone else that holds
anything else is refused instead of unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from torchsal.errors import ConfigError


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())                 # mkstemp makes 0600; a plain open() would honour the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_plain(path: Path, what: str, required: Iterable[str]) -> dict[str, Any]:
    """A torchsal file (model or checkpoint) as a dict, loaded without running code; one clear line on a file that
    holds Python objects, is unreadable, or lacks one of the ``required`` fields."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path} holds more than tensors and plain data, so loading it could run code; refused "
                          f"(torchsal writes only plain files; {first})") from None
    except Exception as exc:  # noqa: BLE001  (any reading failure means the same thing to the user)
        raise ConfigError(f"{path} is unreadable as a {what} ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a torchsal {what}")
    missing = [key for key in required if key not in data]
    if missing:
        raise ConfigError(f"{path} is not a complete torchsal {what}: missing {', '.join(missing)}")
    return data
