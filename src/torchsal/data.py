"""Datasets: a registry of named loaders, loaders for standard file formats, and seeded splits.

A loader returns a ``Dataset`` of NumPy arrays (with the official test split where the dataset has one);
``make_splits`` turns it into standardised train/validation/test tensors:

- test: the official test split, else a seeded stratified 20% of the data;
- validation: a seeded stratified 10% of the training part (model selection never looks at test);
- features standardised with the mean and std of the training part alone.

Datasets by name: ``digits`` (scikit-learn, ships with it), ``csv:PATH`` and ``npz:PATH`` for your own data.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from torchsal.errors import DataError

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


@dataclass
class Splits:
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: list[str]

    @property
    def in_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


Loader = Callable[[Path | None], Dataset]
DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    def register(fn: Loader) -> Loader:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is registered twice")
        DATASETS[name] = fn
        return fn
    return register


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load a dataset by registered name, or ``csv:PATH`` / ``npz:PATH``."""
    kind, _, path = name.partition(":")
    if path and kind in FILE_FORMATS:
        return FILE_FORMATS[kind](Path(path).expanduser())
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}, "
                        "or csv:PATH / npz:PATH for your own data")
    return DATASETS[name](Path(data_dir) if data_dir else None)


@register_dataset("digits")
def load_digits(data_dir: Path | None = None) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 samples, 10 classes); ships with scikit-learn, no files needed."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    return Dataset("digits", bunch.data.astype(np.float32), bunch.target.astype(np.int64),
                   [str(c) for c in bunch.target_names])


def encode_labels(raw: np.ndarray, source: str) -> tuple[np.ndarray, list[str]]:
    """Map labels of any type to class indices 0..C-1 (numeric labels in numeric order)."""
    values = [str(v).strip() for v in raw]
    if any(v == "" for v in values):
        raise DataError(f"{source}: the label column has empty values; every row needs a label")
    numbers = _as_floats(values)
    if numbers is not None:
        if not all(float(n).is_integer() for n in numbers):
            raise DataError(f"{source}: the last column holds non-integer numbers, not class labels; "
                            "put the class label in the last column")
        keys = sorted(set(values), key=float)
    else:
        keys = sorted(set(values))
    index = {k: i for i, k in enumerate(keys)}
    return np.array([index[v] for v in values], dtype=np.int64), keys


def _as_floats(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _open_text(path: Path) -> io.TextIOBase:
    if not path.is_file():
        raise DataError(f"cannot read {path}: no such file")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", newline="") if gzipped else open(path, newline="")  # noqa: SIM115


def load_csv(path: Path) -> Dataset:
    """CSV with a header row, the label in the last column; gzip allowed; non-numeric features one-hot."""
    source = f"csv {path}"
    try:
        with _open_text(path) as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, EOFError, csv.Error) as exc:
        raise DataError(f"{source}: unreadable ({exc})") from None
    if not rows:
        raise DataError(f"{source}: the file is empty; expected a header row, then one row per sample")
    header, body = rows[0], [r for r in rows[1:] if r]
    if len(header) < 2:
        raise DataError(f"{source}: found {len(header)} column; expected feature columns and a label column "
                        "(the last)")
    if not body:
        raise DataError(f"{source}: no data rows after the header")
    for i, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(f"{source}: line {i} has {len(row)} fields, the header has {len(header)}")
    columns = list(zip(*body))
    y, classes = encode_labels(np.array(columns[-1]), source)
    features = [_encode_column(col, name, source) for col, name in zip(columns[:-1], header[:-1])]
    return Dataset(path.name, np.concatenate(features, axis=1).astype(np.float32), y, classes)


_MISSING = {"", "na", "nan", "null", "none", "?"}


def _encode_column(column: tuple[str, ...], name: str, source: str) -> np.ndarray:
    values = [v.strip() for v in column]
    for row, v in enumerate(values, start=2):
        if v.lower() in _MISSING:
            raise DataError(f"{source}: missing value ({v!r}) in column {name!r}, line {row}; "
                            "clean or impute the file first")
    numbers = _as_floats(values)
    if numbers is not None:
        bad = next((r for r, n in enumerate(numbers, start=2) if not math.isfinite(n)), None)
        if bad is not None:
            raise DataError(f"{source}: non-finite value in column {name!r}, line {bad}")
        return np.array(numbers, dtype=np.float64)[:, None]
    categories = sorted(set(values))        # one-hot, one column per category
    index = {c: i for i, c in enumerate(categories)}
    onehot = np.zeros((len(values), len(categories)))
    onehot[np.arange(len(values)), [index[v] for v in values]] = 1.0
    return onehot


def load_npz(path: Path) -> Dataset:
    """NumPy ``.npz`` with arrays ``x`` (N, ...) and ``y`` (N,); optional ``x_test``, ``y_test``."""
    source = f"npz {path}"
    if not path.is_file():
        raise DataError(f"cannot read {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            data = {k: arrays[k] for k in arrays.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{source}: unreadable ({exc})") from None
    missing = [k for k in ("x", "y") if k not in data]
    if missing:
        raise DataError(f"{source}: missing array(s) {', '.join(missing)}; found {', '.join(data) or 'none'}")
    has_test = "x_test" in data and "y_test" in data
    for k in ("x", "x_test") if has_test else ("x",):
        if not np.issubdtype(data[k].dtype, np.number):
            raise DataError(f"{source}: array {k!r} must be numeric, got {data[k].dtype}")
    for xk, yk in (("x", "y"), ("x_test", "y_test")) if has_test else (("x", "y"),):
        if len(data[xk]) != len(data[yk]):
            raise DataError(f"{source}: {xk} has {len(data[xk])} samples but {yk} has {len(data[yk])}; "
                            "they must have the same length")
    labels = np.concatenate([data["y"], data["y_test"]]) if has_test else data["y"]
    y_all, classes = encode_labels(labels.reshape(-1), source)
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


def make_splits(ds: Dataset, seed: int) -> Splits:
    """Seeded train/validation/test split with features standardised on the training part."""
    if ds.x_test is not None:
        x, y, x_test, y_test = ds.x, ds.y, ds.x_test, ds.y_test
    else:
        keep, test = _split(ds.y, TEST_FRACTION, seed)
        x, y, x_test, y_test = ds.x[keep], ds.y[keep], ds.x[test], ds.y[test]
    train, val = _split(y, VAL_FRACTION, seed)
    mean = x[train].mean(axis=0)
    std = x[train].std(axis=0)
    std[std < 1e-8] = 1.0

    def tensors(a: np.ndarray, b: np.ndarray) -> tuple[Tensor, Tensor]:
        return torch.from_numpy(((a - mean) / std).astype(np.float32)), torch.from_numpy(b.astype(np.int64))

    return Splits(*tensors(x[train], y[train]), *tensors(x[val], y[val]), *tensors(x_test, y_test), ds.classes)
