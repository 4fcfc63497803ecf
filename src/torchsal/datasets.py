"""Named datasets. Each registration says where its standard files may be (``DataFiles``); the loader reads the
located files with ``formats``. A missing dataset is one message: which files were expected where, how to get them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from torchsal.data import DataFiles, DataRequest, Dataset, cached_arrays, encode_labels, register_dataset
from torchsal.errors import DataError
from torchsal.formats import (
    read_cifar_batches,
    read_cifar_names,
    read_csv,
    read_idx,
    read_image_tree,
    read_semeion,
    read_svhn_mat,
)

DEBIAN_DATASETS = Path("/usr/share/datasets")
MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]
KMNIST_CLASSES = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float32)


def _gray(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) RGB -> (N, H, W) luma, ITU-R 601-2 (what Pillow's convert("L") computes)."""
    return images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _shape(images: np.ndarray, request: DataRequest) -> tuple[int, int, int]:
    """(C, H, W) of colour images (N, H, W, 3) as ``_color`` stores them."""
    return (1 if request.grayscale else 3, *images.shape[1:3])


def _color(images: np.ndarray, request: DataRequest) -> np.ndarray:
    return _flat(_gray(images) if request.grayscale else images)


# ------------------------------------------------------------------------------------------ scikit-learn
def _sklearn(name: str, fn_name: str) -> None:
    def load(request: DataRequest, source: Path | None) -> Dataset:
        import sklearn.datasets

        bunch = getattr(sklearn.datasets, fn_name)()
        classes = [str(c) for c in bunch.target_names]
        return Dataset(name, bunch.data.astype(np.float32), bunch.target.astype(np.int64), classes)

    load.__doc__ = f"scikit-learn's {fn_name}(): ships with scikit-learn, no files needed."
    register_dataset(name)(load)


_sklearn("digits", "load_digits")
_sklearn("wine", "load_wine")
_sklearn("breast-cancer", "load_breast_cancer")


# --------------------------------------------------------------------------------------------- IDX sets
IDX_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]


def _idx_dataset(name: str, classes: list[str], how_to_get: str, extra_dirs: tuple[Path, ...] = ()) -> None:
    def load(request: DataRequest, folder: Path) -> Dataset:
        paths = []
        for base in IDX_FILES:
            found = [folder / f for f in (base + ".gz", base) if (folder / f).is_file()]
            if not found:
                raise DataError(f"dataset {name!r}: {folder} lacks {base}.gz (expected "
                                f"{', '.join(f + '.gz' for f in IDX_FILES)}); {how_to_get}")
            paths.append(found[0])
        x, y, x_test, y_test = (read_idx(p) for p in paths)
        for images, labels, part in ((x, y, "train"), (x_test, y_test, "t10k")):
            if len(images) != len(labels):
                raise DataError(f"dataset {name!r}: {part} has {len(images)} images but {len(labels)} labels")
        return Dataset(name, _flat(x), y.astype(np.int64), classes, _flat(x_test), y_test.astype(np.int64),
                       images=True, image_shape=(1, *x.shape[1:3]))

    load.__doc__ = f"{name}: the four standard IDX files (gzip or plain) in a folder named {name}/."
    register_dataset(name, DataFiles((name,), how_to_get, extra_dirs))(load)


_idx_dataset("mnist", MNIST_CLASSES, "get MNIST's four IDX files (yann.lecun.com/exdb/mnist) into DIR/mnist/")
_idx_dataset("fashion-mnist", FASHION_CLASSES,
             "run `apt-get install dataset-fashion-mnist` (installs /usr/share/datasets/fashion-mnist/) or get "
             "the IDX files from github.com/zalandoresearch/fashion-mnist into DIR/fashion-mnist/",
             extra_dirs=(DEBIAN_DATASETS,))
_idx_dataset("kmnist", KMNIST_CLASSES, "get KMNIST's IDX files (github.com/rois-codh/kmnist) into DIR/kmnist/")


# ------------------------------------------------------------------------------------------------ CIFAR
CIFAR10_HOW = ("put CIFAR-10 in DIR as an image-folder tree cifar10/{train,test}/<class>/*.png, an archive of "
               "that tree (cifar10-jpeg.tar.xz, cifar10.tar.gz, ...), or the python batches "
               "cifar-10-batches-py/ (www.cs.toronto.edu/~kriz/cifar.html)")


@register_dataset("cifar10", DataFiles(("cifar-10-batches-py", "cifar10", "cifar10-jpeg.tar.xz", "cifar10.tar.xz",
                                        "cifar10.tar.gz", "cifar10.tar"), CIFAR10_HOW))
def load_cifar10(request: DataRequest, source: Path) -> Dataset:
    """CIFAR-10 (50,000/10,000, 32x32 RGB; ``grayscale`` as in the paper): image tree, archive or pickles."""
    if source.name == "cifar-10-batches-py":
        x, y = read_cifar_batches([source / f"data_batch_{i}" for i in range(1, 6)], "labels")
        x_test, y_test = read_cifar_batches([source / "test_batch"], "labels")
        classes = read_cifar_names(source / "batches.meta", "label_names")
    else:
        arrays = cached_arrays(source, "cifar10-tree", lambda: _tree_arrays(source))
        x, y, x_test, y_test = arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"]
        classes = [str(c) for c in arrays["classes"]]
    return Dataset("cifar10", _color(x, request), y, classes, _color(x_test, request), y_test, images=True,
                   image_shape=_shape(x, request))


def _tree_arrays(source: Path) -> dict[str, np.ndarray]:
    splits = read_image_tree(source)
    if "test" not in splits:
        raise DataError(f"{source}: no test/<class>/ images; CIFAR-10 needs its official test split")
    (x, y, classes), (x_test, y_test, _) = splits["train"], splits["test"]
    return {"x": x, "y": y, "x_test": x_test, "y_test": y_test, "classes": np.array(classes)}


@register_dataset("cifar100", DataFiles(("cifar-100-python",), "get cifar-100-python.tar.gz "
                                        "(www.cs.toronto.edu/~kriz/cifar.html) and unpack it in DIR"))
def load_cifar100(request: DataRequest, folder: Path) -> Dataset:
    """CIFAR-100 python batches (``cifar-100-python/{train,test,meta}``), 100 fine classes."""
    x, y = read_cifar_batches([folder / "train"], "fine_labels")
    x_test, y_test = read_cifar_batches([folder / "test"], "fine_labels")
    classes = read_cifar_names(folder / "meta", "fine_label_names")
    return Dataset("cifar100", _color(x, request), y, classes, _color(x_test, request), y_test, images=True,
                   image_shape=_shape(x, request))


@register_dataset("svhn", DataFiles(("svhn",), "get train_32x32.mat and test_32x32.mat "
                                    "(ufldl.stanford.edu/housenumbers) into DIR/svhn/"))
def load_svhn(request: DataRequest, folder: Path) -> Dataset:
    """SVHN cropped digits (``svhn/{train,test}_32x32.mat``); label 10 means digit 0."""
    x, y = read_svhn_mat(folder / "train_32x32.mat")
    x_test, y_test = read_svhn_mat(folder / "test_32x32.mat")
    return Dataset("svhn", _color(x, request), y, MNIST_CLASSES, _color(x_test, request), y_test, images=True,
                   image_shape=_shape(x, request))


@register_dataset("semeion", DataFiles(("semeion/semeion.data", "semeion.data"),
                                       "get semeion.data (archive.ics.uci.edu, Semeion Handwritten Digit) into DIR/"))
def load_semeion(request: DataRequest, path: Path) -> Dataset:
    """Semeion handwritten digits (``semeion.data``: 16x16 binary pixels + one-hot label); no official split."""
    x, y = read_semeion(path)
    return Dataset("semeion", x, y, MNIST_CLASSES, images=True)


# --------------------------------------------------------------------------------------------- UCI csv
def _uci(name: str, how_to_get: str) -> None:
    def load(request: DataRequest, path: Path) -> Dataset:
        x, labels = read_csv(path)
        y, classes = encode_labels(labels, f"csv {path}")
        return Dataset(name, x, y, classes)

    load.__doc__ = f"UCI {name} as CSV (header, label last) in DIR/uci/{name}.csv.gz; no official split."
    candidates = (f"uci/{name}.csv.gz", f"uci/{name}.csv", f"{name}.csv.gz", f"{name}.csv")
    register_dataset(name, DataFiles(candidates, how_to_get))(load)


_uci("letter", "get UCI Letter Recognition as a CSV with the letter last (e.g. R's mlbench LetterRecognition)")
_uci("satellite", "get UCI Statlog Landsat as a CSV with the class last (e.g. R's mlbench Satellite)")
_uci("dna", "get Statlog DNA splice junctions as a CSV with the class last (e.g. R's mlbench DNA)")


# ----------------------------------------------------------------------------------------------- MNIST-1D
@register_dataset("mnist1d")
def load_mnist1d(request: DataRequest, source: None) -> Dataset:
    """MNIST-1D (Greydanus 2020): the standard 4,000/1,000 split, generated locally by the mnist1d package."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise DataError("dataset 'mnist1d' needs the mnist1d package: pip install mnist1d") from None
    data = make_dataset(get_dataset_args())
    return Dataset("mnist1d", data["x"].astype(np.float32), data["y"].astype(np.int64), MNIST_CLASSES,
                   data["x_test"].astype(np.float32), data["y_test"].astype(np.int64))
