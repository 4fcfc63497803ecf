"""Datasets: a registry of named loaders, where their files are found, and seeded splits.

A loader returns a ``Dataset`` of NumPy arrays (with the official test split where the dataset has one);
``make_splits`` turns it into standardised train/validation/test tensors:

- test: the official test split, else a seeded stratified 20% of the data;
- validation: a seeded stratified 10% of the training part (model selection never looks at test);
- standardisation with statistics of the training part alone: per feature for tabular data, one global mean
  and std for images (per-pixel scaling would blow up border pixels that are almost always zero).

Named datasets live in ``datasets.py``; ``csv:PATH`` and ``npz:PATH`` load your own files. Dataset files are
searched in ``--data-dir``, then ``$TORCHSAL_DATA``, then ``./data`` (plus dataset-specific system locations).
Slow-to-decode sets are cached as arrays under ``$TORCHSAL_CACHE`` (default ``~/.cache/torchsal``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from torchsal.errors import DataError
from torchsal.formats import as_floats, read_csv, read_npz
from torchsal.storage import write_bytes_atomic

log = logging.getLogger(__name__)

TEST_FRACTION = 0.2
VAL_FRACTION = 0.1


@dataclass
class Dataset:
    name: str
    x: np.ndarray                       # (N, d) float
    y: np.ndarray                       # (N,) int64 in [0, C)
    classes: list[str]
    x_test: np.ndarray | None = None    # official test split, if the dataset has one
    y_test: np.ndarray | None = None
    images: bool = False                # standardise globally rather than per feature
    # (channels, height, width) of an image; samples are stored flat, channels last (H, W, C), as decoded
    image_shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        for x, y, part in ((self.x, self.y, "data"), (self.x_test, self.y_test, "test data")):
            if x is None:
                continue
            if len(x) != len(y):
                raise DataError(f"dataset {self.name!r}: {part} has {len(x)} samples but {len(y)} labels; "
                                "x and y must have the same length")
            if len(x) == 0:
                raise DataError(f"dataset {self.name!r}: {part} is empty")
            if not np.isfinite(x).all():
                raise DataError(f"dataset {self.name!r}: {part} contains NaN or Inf; clean or impute it first")
            if y.min() < 0 or y.max() >= len(self.classes):
                raise DataError(f"dataset {self.name!r}: labels must lie in [0, {len(self.classes)}), "
                                f"found {int(y.min())}..{int(y.max())}")
        if self.x_test is not None and self.x_test.shape[1:] != self.x.shape[1:]:
            raise DataError(f"dataset {self.name!r}: test samples have {self.x_test.shape[1:]} features, "
                            f"training samples {self.x.shape[1:]}")


@dataclass
class Splits:
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: list[str]
    mean: np.ndarray        # the input scaling, from the training part: x_std = (x - mean) / std
    std: np.ndarray
    image_shape: tuple[int, int, int] | None = None     # (C, H, W) of image data (stored flat, channels last)

    @property
    def in_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class DataRequest:
    """What a named loader gets besides its files: options."""

    grayscale: bool = False


@dataclass(frozen=True)
class DataFiles:
    """Where a dataset's files may be: paths relative to each data folder, tried in order."""

    candidates: tuple[str, ...]
    how_to_get: str
    extra_dirs: tuple[Path, ...] = ()       # system locations searched after the data folders

    def find(self, dirs: tuple[Path, ...]) -> Path | None:
        for d in dirs + self.extra_dirs:
            for c in self.candidates:
                if (d / c).exists():
                    return d / c
        return None

    def missing(self, name: str, dirs: tuple[Path, ...]) -> DataError:
        where = ", ".join(str(d) for d in dirs + self.extra_dirs)
        return DataError(f"dataset {name!r} not found: looked for {' or '.join(self.candidates)} in {where}; "
                         f"{self.how_to_get}, then pass --data-dir DIR or set TORCHSAL_DATA")


def search_dirs(data_dir: str | Path | None) -> tuple[Path, ...]:
    dirs = [Path(data_dir).expanduser()] if data_dir else []
    if os.environ.get("TORCHSAL_DATA"):
        dirs.append(Path(os.environ["TORCHSAL_DATA"]).expanduser())
    dirs.append(Path("data"))
    return tuple(dirs)


def cached_arrays(source: Path, tag: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``build()``'s arrays, cached on disk keyed by the source file's path, size and mtime."""
    stat = source.stat()
    key = hashlib.sha1(f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{tag}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("TORCHSAL_CACHE", Path.home() / ".cache" / "torchsal")) / f"{tag}-{key}.npz"
    if cache.is_file():
        try:
            with np.load(cache) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError):
            log.warning("cache %s is unreadable; rebuilding it", cache)
    arrays = build()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        write_bytes_atomic(cache, buffer.getvalue())
    except OSError as exc:
        log.warning("could not write the cache %s (%s); continuing without it", cache, exc)
    return arrays


Loader = Callable[[DataRequest, Path | None], Dataset]     # (options, located files or None) -> Dataset
DATASETS: dict[str, tuple[Loader, DataFiles | None]] = {}


def register_dataset(name: str, files: DataFiles | None = None) -> Callable[[Loader], Loader]:
    """Register a loader; ``files`` says where its files are (None: it needs no files)."""
    def register(fn: Loader) -> Loader:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = (fn, files)
        return fn
    return register


def locate_dataset(name: str, data_dir: str | Path | None = None) -> Path | None:
    """Where a registered dataset's files are (None when it needs none); DataError when they are missing."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}, "
                        "or csv:PATH / npz:PATH for your own data")
    files = DATASETS[name][1]
    if files is None:
        return None
    dirs = search_dirs(data_dir)
    found = files.find(dirs)
    if found is None:
        raise files.missing(name, dirs)
    return found


def load_dataset(name: str, data_dir: str | Path | None = None, grayscale: bool = False) -> Dataset:
    """Load a dataset by registered name, ``csv:PATH`` / ``npz:PATH``, or ``union:A,B,...`` (several image
    datasets as one classification problem, see ``union``)."""
    kind, _, path = name.partition(":")
    if path and kind in FILE_FORMATS:
        return FILE_FORMATS[kind](Path(path).expanduser())
    if path and kind == "union":
        return union([load_dataset(part, data_dir, grayscale=True) for part in path.split(",") if part])
    source = locate_dataset(name, data_dir)
    return DATASETS[name][0](DataRequest(grayscale), source)


def union(parts: list[Dataset]) -> Dataset:
    """Several grayscale image datasets as one problem with disjoint classes (``mnist/3``, ``cifar10/cat``, ...):
    images brought to the smallest common square size (antialiased), each dataset's official train/test split
    kept. The paper's motivating case: divergent patterns that would otherwise share dense weights."""
    if len(parts) < 2:
        raise DataError("union: name at least two datasets, e.g. union:mnist,fashion-mnist,cifar10")
    for ds in parts:
        side = math.isqrt(ds.x.shape[1])
        if not ds.images or side * side != ds.x.shape[1] or ds.x_test is None:
            raise DataError(f"union: {ds.name!r} is not a square grayscale image dataset with an official test "
                            "split; union takes image datasets such as mnist, fashion-mnist, kmnist, cifar10")
    side = min(math.isqrt(ds.x.shape[1]) for ds in parts)

    def resize(x: np.ndarray) -> np.ndarray:
        s = math.isqrt(x.shape[1])
        if s == side:
            return x
        images = torch.from_numpy(x).view(-1, 1, s, s)
        return torch.nn.functional.interpolate(images, size=(side, side), mode="bilinear", antialias=True,
                                               align_corners=False).reshape(len(x), -1).numpy()

    offsets = np.cumsum([0] + [len(ds.classes) for ds in parts])
    return Dataset("+".join(ds.name for ds in parts),
                   np.concatenate([resize(ds.x) for ds in parts]),
                   np.concatenate([ds.y + o for ds, o in zip(parts, offsets)]),
                   [f"{ds.name}/{c}" for ds in parts for c in ds.classes],
                   np.concatenate([resize(ds.x_test) for ds in parts]),
                   np.concatenate([ds.y_test + o for ds, o in zip(parts, offsets)]), images=True)


def encode_labels(raw: np.ndarray | list, source: str) -> tuple[np.ndarray, list[str]]:
    """Map labels of any type to class indices 0..C-1 (numeric labels in numeric order)."""
    values = [str(v).strip() for v in raw]
    if any(v == "" for v in values):
        raise DataError(f"{source}: the label column has empty values; every row needs a label")
    numbers = as_floats(values)
    if numbers is not None:
        if not all(float(n).is_integer() for n in numbers):
            raise DataError(f"{source}: the last column holds non-integer numbers, not class labels; "
                            "put the class label in the last column")
        values = [str(int(float(v))) for v in values]
        keys = sorted(set(values), key=int)
    else:
        keys = sorted(set(values))
    index = {k: i for i, k in enumerate(keys)}
    return np.array([index[v] for v in values], dtype=np.int64), keys


def load_csv(path: Path) -> Dataset:
    """Your own CSV: header row, label in the last column (any type), gzip allowed."""
    x, labels = read_csv(path)
    y, classes = encode_labels(labels, f"csv {path}")
    return Dataset(path.name, x, y, classes)


def load_npz(path: Path) -> Dataset:
    """Your own NumPy ``.npz``: ``x`` (N, ...) and ``y`` (N,); optional ``x_test``, ``y_test``."""
    data = read_npz(path)
    has_test = "x_test" in data
    labels = np.concatenate([data["y"], data["y_test"]]) if has_test else data["y"]
    y_all, classes = encode_labels(labels.reshape(-1), f"npz {path}")
    n = len(data["y"])

    def flat(a: np.ndarray) -> np.ndarray:
        return a.reshape(len(a), -1).astype(np.float32)

    return Dataset(path.name, flat(data["x"]), y_all[:n], classes,
                   flat(data["x_test"]) if has_test else None, y_all[n:] if has_test else None)


FILE_FORMATS: dict[str, Callable[[Path], Dataset]] = {"csv": load_csv, "npz": load_npz}


def _split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out), stratified by class where every class can be split."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    n_held = math.ceil(fraction * len(y))
    counts = np.bincount(y)
    stratify = y if counts[counts > 0].min() >= 2 and n_held >= (counts > 0).sum() else None
    if stratify is None:
        log.warning("too few samples per class for a stratified split; splitting at random")
    if len(y) < 2 or n_held >= len(y):
        raise DataError(f"dataset has {len(y)} samples: too few to hold out {fraction:.0%} for evaluation")
    keep, held = train_test_split(idx, test_size=n_held, random_state=seed, stratify=stratify)
    return np.sort(keep), np.sort(held)


def make_splits(ds: Dataset, seed: int, scaling: tuple[np.ndarray, np.ndarray] | None = None) -> Splits:
    """Seeded train/validation/test split with features standardised on the training part (or with a saved
    ``scaling`` = (mean, std), as when evaluating a trained model)."""
    if ds.x_test is not None:
        x, y, x_test, y_test = ds.x, ds.y, ds.x_test, ds.y_test
    else:
        keep, test = _split(ds.y, TEST_FRACTION, seed)
        x, y, x_test, y_test = ds.x[keep], ds.y[keep], ds.x[test], ds.y[test]
    train, val = _split(y, VAL_FRACTION, seed)
    if scaling is None:
        axis = None if ds.images else 0
        mean = np.atleast_1d(x[train].mean(axis=axis, dtype=np.float64)).astype(np.float32)
        std = np.atleast_1d(x[train].std(axis=axis, dtype=np.float64)).astype(np.float32)
        std[std < 1e-8] = 1.0
    else:
        mean, std = (np.asarray(a, dtype=np.float32) for a in scaling)
        if mean.size not in (1, x.shape[1]):
            raise DataError(f"dataset {ds.name!r} has {x.shape[1]} features; the model was trained on {mean.size}")

    def tensors(a: np.ndarray, b: np.ndarray) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(((a - mean) / std).astype(np.float32)), torch.from_numpy(b.astype(np.int64))

    return Splits(*tensors(x[train], y[train]), *tensors(x[val], y[val]), *tensors(x_test, y_test), ds.classes,
                  mean, std, ds.image_shape)


def all_rows(ds: Dataset, scaling: tuple[np.ndarray, np.ndarray]) -> tuple[Tensor, Tensor]:
    """Every row of ``ds`` (its test part too), standardised with a model's saved ``scaling``: for scoring a
    trained model on a whole new file."""
    x = ds.x if ds.x_test is None else np.concatenate([ds.x, ds.x_test])
    y = ds.y if ds.y_test is None else np.concatenate([ds.y, ds.y_test])
    mean, std = (np.asarray(a, dtype=np.float32) for a in scaling)
    if mean.size not in (1, x.shape[1]):
        raise DataError(f"dataset {ds.name!r} has {x.shape[1]} features; the model was trained on {mean.size}")
    return torch.from_numpy(((x - mean) / std).astype(np.float32)), torch.from_numpy(y.astype(np.int64))


def to_model_classes(y: Tensor, classes: list[str], model_classes: list[str], name: str) -> Tensor:
    """Labels indexed by a dataset's own ``classes``, re-indexed by a model's: a file may hold only some of the
    model's classes, in any order; a class the model does not know is an error naming it."""
    unknown = [c for c in classes if c not in model_classes]
    if unknown:
        raise DataError(f"dataset {name!r} has classes the model was not trained on: {', '.join(unknown[:10])}"
                        f"{' ...' if len(unknown) > 10 else ''} (the model knows {', '.join(model_classes[:10])}"
                        f"{' ...' if len(model_classes) > 10 else ''})")
    return torch.tensor([model_classes.index(c) for c in classes], dtype=torch.int64)[y]


def crop_flip(x: Tensor, image_shape: tuple[int, int, int], generator: torch.Generator) -> Tensor:
    """CIFAR's augmentation on a batch of flat channels-last images: each padded by 4 pixels (with zeros, the
    standardised mean) and cropped back at a random offset, and flipped left-right with probability 1/2."""
    c, h, w = image_shape
    n = x.shape[0]
    images = torch.nn.functional.pad(x.view(n, h, w, c), (0, 0, 4, 4, 4, 4))
    dy, dx, flip = (torch.randint(0, high, (n,), generator=generator).to(x.device) for high in (9, 9, 2))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None].bool(), cols.flip(1), cols)[:, None, :]
    return images[torch.arange(n, device=x.device)[:, None, None], rows, cols].reshape(n, -1)

