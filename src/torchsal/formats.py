"""Readers for standard dataset file formats. Each returns NumPy arrays and raises ``DataError`` naming the file
and the problem when the file is missing, truncated or malformed.

Formats: IDX (MNIST family, optionally gzipped), CSV (header row, label last), NumPy ``.npz``, image-folder trees
``{train,test}/<class>/*.png|jpg`` on disk or inside a tar archive (.tar, .tar.gz, .tar.xz), CIFAR python pickle
batches, SVHN ``.mat`` and Semeion text.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import pickle
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from torchsal.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm")


def open_maybe_gzip(path: Path, mode: str = "rb") -> io.IOBase:
    """Open ``path``, transparently decompressing gzip (detected by its magic bytes, not the name)."""
    check_file(path)
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    if gzipped:
        return gzip.open(path, mode, newline="") if "t" in mode else gzip.open(path, mode)
    return open(path, mode, newline="") if "t" in mode else open(path, mode)  # noqa: SIM115


def check_file(path: Path) -> None:
    if path.is_dir():
        raise DataError(f"cannot read {path}: it is a folder, not a file")
    if not path.is_file():
        raise DataError(f"cannot read {path}: no such file")


# ---------------------------------------------------------------------------------------------------- IDX
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """IDX file (``train-images-idx3-ubyte[.gz]``): magic 0x0000TTDD, DD big-endian sizes, then the data."""
    try:
        with open_maybe_gzip(path) as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: unreadable or truncated gzip ({exc}); download the file again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[data[2]])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise DataError(f"{path}: IDX data is {len(data)} bytes, its header promises {expected} "
                        f"(shape {shape}); the file is truncated or corrupt")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


# ---------------------------------------------------------------------------------------------------- CSV
_MISSING = {"", "na", "nan", "null", "none", "?"}


def read_csv(path: Path) -> tuple[np.ndarray, list[str]]:
    """CSV with a header row, label in the last column; gzip allowed. Returns (features, raw labels);
    numeric feature columns stay numbers, non-numeric ones are one-hot encoded."""
    source = f"csv {path}"
    try:
        with open_maybe_gzip(path, "rt") as f:
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
    features = [_encode_column(col, name, source) for col, name in zip(columns[:-1], header[:-1])]
    return np.concatenate(features, axis=1).astype(np.float32), [v.strip() for v in columns[-1]]


def _encode_column(column: tuple[str, ...], name: str, source: str) -> np.ndarray:
    values = [v.strip() for v in column]
    for row, v in enumerate(values, start=2):
        if v.lower() in _MISSING:
            raise DataError(f"{source}: missing value ({v!r}) in column {name!r}, line {row}; "
                            "clean or impute the file first")
    numbers = as_floats(values)
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


def as_floats(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------------- NPZ
def read_npz(path: Path) -> dict[str, np.ndarray]:
    """NumPy ``.npz`` with arrays ``x`` and ``y`` (optionally ``x_test``, ``y_test``)."""
    source = f"npz {path}"
    check_file(path)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            data = {k: arrays[k] for k in arrays.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{source}: unreadable ({exc})") from None
    missing = [k for k in ("x", "y") if k not in data]
    if missing:
        raise DataError(f"{source}: missing array(s) {', '.join(missing)}; found {', '.join(data) or 'none'}")
    pairs = (("x", "y"), ("x_test", "y_test")) if "x_test" in data and "y_test" in data else (("x", "y"),)
    for xk, yk in pairs:
        if not np.issubdtype(data[xk].dtype, np.number):
            raise DataError(f"{source}: array {xk!r} must be numeric, got {data[xk].dtype}")
        if len(data[xk]) != len(data[yk]):
            raise DataError(f"{source}: {xk} has {len(data[xk])} samples but {yk} has {len(data[yk])}; "
                            "they must have the same length")
        if len(data[xk]) == 0:
            raise DataError(f"{source}: {xk} is empty")
    return {k: data[k] for pair in pairs for k in pair}


# ----------------------------------------------------------------------------------------- image folders
def read_image_tree(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """Image-folder tree ``[top/]{train,test}/<class>/<image>``, as a folder or a tar archive.

    Returns ``{split: (images uint8 (N, H, W, C), labels, class names)}``; classes are the sorted folder names
    of the training split. All images must share one size.
    """
    entries = sorted(_tar_images(path) if path.is_file() else _folder_images(path))
    splits: dict[str, list[tuple[str, str, bytes]]] = {}
    for parts, data in entries:
        if len(parts) >= 3 and parts[-3] in ("train", "test"):
            splits.setdefault(parts[-3], []).append((parts[-2], "/".join(parts), data))
    if "train" not in splits:
        raise DataError(f"{path}: no images under train/<class>/; expected {{train,test}}/<class>/<image> "
                        f"({', '.join(IMAGE_SUFFIXES)})")
    classes = sorted({c for c, _, _ in splits["train"]})
    out = {}
    shape = None
    for split, items in splits.items():
        unknown = sorted({c for c, _, _ in items} - set(classes))
        if unknown:
            raise DataError(f"{path}: {split}/ has class folder {unknown[0]!r} that train/ does not")
        images = []
        for _, name, data in items:
            image = _decode_image(data, f"{path}:{name}")
            if shape is None:
                shape = image.shape
            if image.shape != shape:
                raise DataError(f"{path}: image {name} is {image.shape[1]}x{image.shape[0]}, the others are "
                                f"{shape[1]}x{shape[0]}; all images must have one size")
            images.append(image)
        labels = np.array([classes.index(c) for c, _, _ in items], dtype=np.int64)
        out[split] = (np.stack(images), labels, classes)
    return out


def _folder_images(root: Path) -> Iterator[tuple[tuple[str, ...], bytes]]:
    for p in root.rglob("*"):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            yield p.relative_to(root).parts, p.read_bytes()


def _tar_images(path: Path) -> Iterator[tuple[tuple[str, ...], bytes]]:
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                    yield tuple(Path(member.name).parts), tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{path}: unreadable or truncated archive ({exc}); download it again") from None


def _decode_image(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{name}: not a readable image ({exc})") from None
    return rgb


# ---------------------------------------------------------------------------------------------- CIFAR pickle
def read_cifar_batches(files: list[Path], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR 'python version' batches: dicts with ``data`` (N, 3072 uint8, channel-major) and labels.
    Returns images (N, 32, 32, 3) and labels."""
    xs, ys = [], []
    for f in files:
        batch = _unpickle(f)
        if b"data" not in batch or label_key.encode() not in batch:
            raise DataError(f"{f}: not a CIFAR batch (needs keys 'data' and {label_key!r})")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{f}: CIFAR data must be (N, 3072), got {data.shape}")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(batch[label_key.encode()], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def read_cifar_names(path: Path, key: str) -> list[str]:
    names = _unpickle(path).get(key.encode())
    if names is None:
        raise DataError(f"{path}: no {key!r} in the CIFAR meta file")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _unpickle(path: Path) -> dict:
    check_file(path)
    try:
        with open(path, "rb") as f:
            # NOTE: pickle runs code from the file; CIFAR ships only as pickles. Load files you trust.
            return pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, AttributeError) as exc:
        raise DataError(f"{path}: unreadable or truncated pickle ({exc})") from None


# --------------------------------------------------------------------------------------------- SVHN, Semeion
def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN cropped digits ``*_32x32.mat``: X (32, 32, 3, N), y (N, 1) with 10 standing for digit 0."""
    from scipy.io import loadmat

    check_file(path)
    try:
        mat = loadmat(path)
    except (ValueError, OSError, TypeError) as exc:
        raise DataError(f"{path}: unreadable .mat file ({exc})") from None
    if "X" not in mat or "y" not in mat or mat["X"].ndim != 4:
        raise DataError(f"{path}: expected arrays X (32, 32, 3, N) and y (N, 1)")
    y = mat["y"].reshape(-1).astype(np.int64) % 10
    return mat["X"].transpose(3, 0, 1, 2), y


def read_semeion(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Semeion handwritten digits: each line 256 pixel values (16x16) then 10 one-hot label columns."""
    try:
        with open_maybe_gzip(path, "rt") as f:
            rows = [line.split() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"{path}: unreadable ({exc})") from None
    if not rows:
        raise DataError(f"{path}: the file is empty")
    bad = next((i for i, r in enumerate(rows, start=1) if len(r) != 266), None)
    if bad is not None:
        raise DataError(f"{path}: line {bad} has {len(rows[bad - 1])} values, expected 266 (256 pixels + 10 labels)")
    table = np.array(rows, dtype=np.float32)
    onehot = table[:, 256:]
    if not np.all(onehot.sum(1) == 1):
        raise DataError(f"{path}: label columns must be one-hot (exactly one 1 per line)")
    return table[:, :256], onehot.argmax(1).astype(np.int64)
