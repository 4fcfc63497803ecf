"""Loaders of the named datasets, on small files in each standard format that the tests write themselves."""

import gzip
import io
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from torchsal.data import load_dataset, make_splits
from torchsal.errors import DataError

RNG = np.random.default_rng(0)


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(folder, n_train=30, n_test=10, side=28, gz=True):
    folder.mkdir(parents=True)
    arrays = {"train-images-idx3-ubyte": RNG.integers(0, 256, (n_train, side, side)),
              "train-labels-idx1-ubyte": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte": RNG.integers(0, 256, (n_test, side, side)),
              "t10k-labels-idx1-ubyte": np.arange(n_test) % 10}
    for name, a in arrays.items():
        data = idx_bytes(a)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "kmnist"])
def test_idx_datasets(tmp_path, name):
    arrays = write_idx_set(tmp_path / name, gz=name != "kmnist")
    ds = load_dataset(name, tmp_path)
    assert ds.x.shape == (30, 784) and ds.x_test.shape == (10, 784) and len(ds.classes) == 10
    assert np.array_equal(ds.x[3], arrays["train-images-idx3-ubyte"][3].reshape(-1))
    assert ds.y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()


def test_data_dir_from_environment(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "mnist")
    monkeypatch.setenv("TORCHSAL_DATA", str(tmp_path))
    assert load_dataset("mnist").x.shape == (30, 784)


def test_missing_dataset_says_what_where_and_how(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHSAL_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"dataset 'mnist' not found: looked for mnist in {tmp_path}.*"
                                        r"get MNIST's four IDX files.*--data-dir DIR or set TORCHSAL_DATA"):
        load_dataset("mnist", tmp_path)


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[:-5], "truncated or corrupt"),
    (lambda b: b"\x01\x02" + b[2:], "bad magic number"),
    (lambda b: b[:6], "truncated IDX header"),
])
def test_damaged_idx_files_are_named(tmp_path, damage, message):
    write_idx_set(tmp_path / "mnist", gz=False)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=f"{path}.*{message}"):
        load_dataset("mnist", tmp_path)


def test_truncated_gzip_is_named(tmp_path):
    write_idx_set(tmp_path / "mnist")
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="unreadable or truncated gzip"):
        load_dataset("mnist", tmp_path)


def image_tree(root_or_tar, sizes=None, fmt="PNG"):
    """Write train/test/<class>/<n>.png for classes b, a (so sorting matters)."""
    files = {}
    for split, n in (("train", 4), ("test", 2)):
        for c, colour in (("b", (0, 0, 255)), ("a", (255, 0, 0))):
            for i in range(n):
                size = (sizes or {}).get((split, c, i), (8, 8))
                buf = io.BytesIO()
                Image.new("RGB", size, colour).save(buf, format=fmt)
                files[f"cifar10/{split}/{c}/{i}.png"] = buf.getvalue()
    if str(root_or_tar).endswith((".tar", ".tar.gz", ".tar.xz")):
        mode = {"r": "w", "z": "w:gz", "xz": "w:xz"}
        with tarfile.open(root_or_tar, mode["xz" if str(root_or_tar).endswith("xz") else "z"
                          if str(root_or_tar).endswith("gz") else "r"]) as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        for name, data in files.items():
            (root_or_tar / name).parent.mkdir(parents=True, exist_ok=True)
            (root_or_tar / name).write_bytes(data)


@pytest.mark.parametrize("layout", ["folder", "cifar10-jpeg.tar.xz", "cifar10.tar.gz"])
def test_cifar10_image_tree_folder_and_archives(tmp_path, monkeypatch, layout):
    monkeypatch.setenv("TORCHSAL_CACHE", str(tmp_path / "cache"))
    image_tree(tmp_path if layout == "folder" else tmp_path / layout)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.classes == ["a", "b"] and ds.x.shape == (8, 8 * 8 * 3) and ds.x_test.shape == (4, 192)
    red = ds.x[ds.y == 0][0].reshape(8, 8, 3)
    assert red[0, 0].tolist() == [255, 0, 0]
    gray = load_dataset("cifar10", tmp_path, grayscale=True)
    assert gray.x.shape == (8, 64)
    assert gray.x[gray.y == 0][0, 0] == pytest.approx(0.299 * 255, abs=1e-3)
    assert any((tmp_path / "cache").iterdir())                  # decoded once, then cached
    again = load_dataset("cifar10", tmp_path)
    assert np.array_equal(again.x, ds.x)


def test_wrong_image_size_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHSAL_CACHE", str(tmp_path / "cache"))
    image_tree(tmp_path, sizes={("train", "a", 1): (9, 8)})
    with pytest.raises(DataError, match="cifar10: image train/a/1.png is 9x8, the others are 8x8"):
        load_dataset("cifar10", tmp_path)


def test_corrupt_image_and_truncated_archive_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHSAL_CACHE", str(tmp_path / "cache"))
    image_tree(tmp_path)
    (tmp_path / "cifar10/train/a/0.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="0.png: not a readable image"):
        load_dataset("cifar10", tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    image_tree(other / "cifar10.tar.gz")
    archive = other / "cifar10.tar.gz"
    archive.write_bytes(archive.read_bytes()[:300])
    with pytest.raises(DataError, match="unreadable or truncated archive"):
        load_dataset("cifar10", other)


def cifar_batch(n, labels_key, n_classes):
    return {b"data": RNG.integers(0, 256, (n, 3072)).astype(np.uint8),
            labels_key.encode(): list(np.arange(n) % n_classes)}


def test_cifar10_and_cifar100_pickles(tmp_path):
    d10 = tmp_path / "cifar-10-batches-py"
    d10.mkdir()
    for i in range(1, 6):
        (d10 / f"data_batch_{i}").write_bytes(pickle.dumps(cifar_batch(4, "labels", 10)))
    (d10 / "test_batch").write_bytes(pickle.dumps(cifar_batch(3, "labels", 10)))
    (d10 / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    ds = load_dataset("cifar10", tmp_path)
    assert ds.x.shape == (20, 3072) and ds.x_test.shape == (3, 3072) and ds.classes[3] == "c3"
    raw = pickle.loads((d10 / "data_batch_1").read_bytes())[b"data"][0]
    assert ds.x[0].reshape(32, 32, 3)[0, 0].tolist() == [raw[0], raw[1024], raw[2048]]   # channel-major -> HWC
    d100 = tmp_path / "cifar-100-python"
    d100.mkdir()
    (d100 / "train").write_bytes(pickle.dumps(cifar_batch(200, "fine_labels", 100)))
    (d100 / "test").write_bytes(pickle.dumps(cifar_batch(100, "fine_labels", 100)))
    (d100 / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}))
    ds = load_dataset("cifar100", tmp_path, grayscale=True)
    assert ds.x.shape == (200, 1024) and len(ds.classes) == 100
    (d100 / "test").write_bytes(pickle.dumps(cifar_batch(100, "fine_labels", 100))[:50])
    with pytest.raises(DataError, match="unreadable or truncated pickle"):
        load_dataset("cifar100", tmp_path)


def test_svhn_mat(tmp_path):
    from scipy.io import savemat

    (tmp_path / "svhn").mkdir()
    for split, n in (("train", 12), ("test", 5)):
        savemat(tmp_path / "svhn" / f"{split}_32x32.mat",
                {"X": RNG.integers(0, 256, (32, 32, 3, n)).astype(np.uint8), "y": (np.arange(n) % 10 + 1)[:, None]})
    ds = load_dataset("svhn", tmp_path)
    assert ds.x.shape == (12, 3072) and ds.x_test.shape == (5, 3072)
    assert ds.y[:3].tolist() == [1, 2, 3] and ds.y[9] == 0          # label 10 is digit 0


def test_semeion_text(tmp_path):
    lines = []
    for i in range(40):
        pixels = " ".join(f"{v:.4f}" for v in RNG.integers(0, 2, 256))
        lines.append(pixels + " " + " ".join("1" if j == i % 10 else "0" for j in range(10)))
    (tmp_path / "semeion.data").write_text("\n".join(lines) + "\n")
    ds = load_dataset("semeion", tmp_path)
    assert ds.x.shape == (40, 256) and ds.y[:3].tolist() == [0, 1, 2] and ds.x_test is None
    assert len(make_splits(ds, 0).y_test) == 8                       # no official split: 20% held out
    (tmp_path / "semeion.data").write_text(lines[0] + "\n" + lines[1][:100] + "\n")
    with pytest.raises(DataError, match="line 2 has .* values, expected 266"):
        load_dataset("semeion", tmp_path)


def test_uci_csv_location(tmp_path):
    (tmp_path / "uci").mkdir()
    rows = "\n".join(f"{i},{i % 3},{'xyz'[i % 3]}" for i in range(30))
    (tmp_path / "uci" / "letter.csv.gz").write_bytes(gzip.compress(("a,b,lettr\n" + rows).encode()))
    ds = load_dataset("letter", tmp_path)
    assert ds.classes == ["x", "y", "z"] and ds.x.shape == (30, 2)


@pytest.mark.parametrize("name,shape,classes", [("digits", (1797, 64), 10), ("wine", (178, 13), 3),
                                                ("breast-cancer", (569, 30), 2)])
def test_sklearn_datasets(name, shape, classes):
    ds = load_dataset(name)
    assert ds.x.shape == shape and len(ds.classes) == classes


def test_mnist1d_is_generated_locally():
    ds = load_dataset("mnist1d")
    assert ds.x.shape == (4000, 40) and ds.x_test.shape == (1000, 40)


def test_images_are_standardised_globally():
    from torchsal.data import Dataset

    x = np.zeros((40, 4), np.float32)
    x[:, 0] = np.arange(40)                                          # one varying pixel, three constant ones
    s = make_splits(Dataset("img", x, np.arange(40) % 2, ["a", "b"], images=True), 0)
    constant = s.x_train[:, 1:]                                      # one mean/std for all pixels:
    assert constant.std() < 1e-6 and constant.abs().min() > 0.1     # constant pixels are not zeroed


def test_union_of_image_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHSAL_CACHE", str(tmp_path / "cache"))
    write_idx_set(tmp_path / "mnist")
    write_idx_set(tmp_path / "fashion-mnist", n_train=20, n_test=6)
    image_tree(tmp_path)                                              # cifar10: 8x8 RGB, classes a, b
    ds = load_dataset("union:mnist,fashion-mnist,cifar10", tmp_path)
    assert ds.x.shape == (30 + 20 + 8, 64)                            # everything brought to 8x8 grayscale
    assert len(ds.classes) == 22 and ds.classes[0] == "mnist/0" and ds.classes[-1] == "cifar10/b"
    assert ds.y[30:50].min() == 10 and ds.y[50:].min() == 20         # labels offset per dataset
    assert ds.x_test.shape == (10 + 6 + 4, 64)
    with pytest.raises(DataError, match="union: 'wine' is not a square grayscale image dataset"):
        load_dataset("union:mnist,wine", tmp_path)
