import gzip

import numpy as np
import pytest

from torchsal.data import load_dataset, make_splits
from torchsal.errors import DataError


def write(path, text, gz=False):
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def test_csv_with_categorical_features_string_labels_and_gzip(tmp_path):
    rows = "\n".join(f"{i},{['red', 'blue'][i % 2]},{['cat', 'dog', 'eel'][i % 3]}" for i in range(30))
    path = write(tmp_path / "a.csv.gz", "size,colour,animal\n" + rows, gz=True)
    ds = load_dataset(f"csv:{path}")
    assert ds.x.shape == (30, 3)                      # one numeric column + one-hot of two colours
    assert ds.classes == ["cat", "dog", "eel"]
    assert ds.y[:3].tolist() == [0, 1, 2]
    assert ds.x[:2, 1:].tolist() == [[0, 1], [1, 0]]   # blue, red sorted: red -> [0, 1]


def test_csv_numeric_labels_sort_numerically(tmp_path):
    rows = "\n".join(f"{i},{[10, 2, 1][i % 3]}" for i in range(9))
    ds = load_dataset(f"csv:{write(tmp_path / 'b.csv', 'f,label' + chr(10) + rows)}")
    assert ds.classes == ["1", "2", "10"]


@pytest.mark.parametrize("text,message", [
    ("only\n1\n2\n", "expected feature columns and a label column"),
    ("a,b\n1.5,0.25\n2.5,0.75\n", "non-integer numbers, not class labels"),
    ("a,b\n1,0\nnan,1\n", "missing value .*'a', line 3"),
    ("a,b\n1,0\n,1\n", "missing value .*'a', line 3"),
    ("a,b\n1,0\n2\n", "line 3 has 1 fields"),
    ("a,b\n", "no data rows"),
    ("", "the file is empty"),
])
def test_bad_csv_files_name_the_problem(tmp_path, text, message):
    with pytest.raises(DataError, match=message):
        load_dataset(f"csv:{write(tmp_path / 'bad.csv', text)}")


def test_npz_and_its_errors(tmp_path):
    np.savez(tmp_path / "ok.npz", x=np.zeros((10, 2, 2)), y=np.arange(10) % 2)
    ds = load_dataset(f"npz:{tmp_path / 'ok.npz'}")
    assert ds.x.shape == (10, 4) and ds.classes == ["0", "1"]
    np.savez(tmp_path / "bad.npz", x=np.zeros((10, 2)), y=np.zeros(9))
    with pytest.raises(DataError, match="x has 10 samples but y has 9"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    np.savez(tmp_path / "nox.npz", y=np.zeros(9))
    with pytest.raises(DataError, match="missing array"):
        load_dataset(f"npz:{tmp_path / 'nox.npz'}")
    with pytest.raises(DataError, match="no such file"):
        load_dataset(f"npz:{tmp_path / 'absent.npz'}")


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(DataError, match="unknown dataset 'nope'; choose one of: breast-cancer, cifar10, cifar100, "
                                        "digits, dna, fashion-mnist, kmnist, letter, mnist, mnist1d, satellite, "
                                        "semeion, svhn, wine"):
        load_dataset("nope")


def test_splits_are_seeded_stratified_and_standardised_on_train():
    ds = load_dataset("digits")
    s = make_splits(ds, seed=0)
    n = len(ds.y)
    assert len(s.y_test) == int(np.ceil(0.2 * n))
    assert len(s.y_val) == int(np.ceil(0.1 * (n - len(s.y_test))))
    assert len(s.y_train) + len(s.y_val) + len(s.y_test) == n
    test_share = np.bincount(s.y_test.numpy(), minlength=10) / len(s.y_test)
    assert np.abs(test_share - np.bincount(ds.y) / n).max() < 0.01          # stratified
    mean, std = s.x_train.mean(0), s.x_train.std(0, unbiased=False)
    assert mean.abs().max() < 1e-5 and ((std - 1).abs() < 1e-4)[std > 0].all()
    assert s.x_val.mean(0).abs().max() > 1e-3                                 # val/test not used for stats
    again, other = make_splits(ds, seed=0), make_splits(ds, seed=1)
    assert (again.y_test == s.y_test).all() and (again.x_train == s.x_train).all()
    assert not (other.x_test.shape == s.x_test.shape and (other.x_test == s.x_test).all())


def test_official_test_split_is_kept(tmp_path):
    np.savez(tmp_path / "t.npz", x=np.random.rand(50, 3), y=np.arange(50) % 5, x_test=np.random.rand(7, 3),
             y_test=np.arange(7) % 5)
    s = make_splits(load_dataset(f"npz:{tmp_path / 't.npz'}"), seed=0)
    assert len(s.y_test) == 7 and len(s.y_train) + len(s.y_val) == 50
