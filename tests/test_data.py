"""Datasets: built-ins against their sources, user files round-trip, splits, standardization, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from batchlab.data import DATASETS, from_arrays, list_datasets, load_dataset
from batchlab.errors import DataError


def _np(t: torch.Tensor) -> np.ndarray:
    return t.cpu().numpy()


def _raises_one_line(fn, *mentions: str) -> str:
    with pytest.raises(DataError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for mention in mentions:
        assert mention in message, (mention, message)
    return message


# --- built-ins against their sources ---------------------------------------------------------------


def test_blobs_is_make_blobs_split_500_500():
    from sklearn.datasets import make_blobs

    X, y = make_blobs(n_samples=1000, centers=3, n_features=2, cluster_std=2, random_state=2)
    ds = load_dataset("blobs")
    np.testing.assert_array_equal(_np(ds.train[0]), X[:500].astype(np.float32))
    np.testing.assert_array_equal(_np(ds.train[1]), y[:500])
    np.testing.assert_array_equal(_np(ds.val[0]), X[500:].astype(np.float32))
    np.testing.assert_array_equal(_np(ds.val[1]), y[500:])
    assert ds.test is None and ds.n_classes == 3 and ds.task == "classification"
    assert ds.train[0].dtype == torch.float32 and ds.train[1].dtype == torch.int64


def test_digits_is_load_digits_over_16_split_disjointly():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ds = load_dataset("digits")
    assert ds.input_shape == (1, 8, 8) and ds.n_classes == 10
    splits = [ds.train, ds.val, ds.test]
    assert [len(s[1]) for s in splits] == [1077, 360, 360]
    X_all = _np(torch.cat([s[0] for s in splits]).reshape(-1, 64)).astype(np.float64)  # (1797, 64)
    y_all = _np(torch.cat([s[1] for s in splits]))
    np.testing.assert_array_equal(X_all * 16, np.round(X_all * 16))  # exactly pixel / 16
    # Every (image, label) row of load_digits appears exactly once across the three splits.
    ours = np.column_stack([np.round(X_all * 16), y_all])  # (1797, 65)
    source = np.column_stack([bunch.data, bunch.target])  # (1797, 65)
    sort_rows = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_array_equal(sort_rows(ours), sort_rows(source))
    assert X_all.min() == 0.0 and X_all.max() == 1.0


def test_mnist1d_matches_make_dataset_and_keeps_global_rng():
    from mnist1d.data import get_dataset_args, make_dataset

    np.random.seed(123)
    ds = load_dataset("mnist1d")
    after = np.random.rand()
    np.random.seed(123)
    assert after == np.random.rand()  # loading did not reseed numpy's global RNG
    ref = make_dataset(get_dataset_args())
    assert ds.input_shape == (40,) and ds.n_classes == 10
    assert ds.n_train == 4000 and len(ds.val[1]) == 1000 and ds.test is None
    np.testing.assert_allclose(_np(ds.train[0]), ref["x"].astype(np.float32))
    np.testing.assert_array_equal(_np(ds.train[1]), ref["y"])
    np.testing.assert_allclose(_np(ds.val[0]), ref["x_test"].astype(np.float32))
    np.testing.assert_array_equal(_np(ds.val[1]), ref["y_test"])


def test_mnist1d_val_fraction_moves_heldout_to_test():
    ds = load_dataset("mnist1d", val_fraction=0.25, split_seed=3)
    assert (ds.n_train, len(ds.val[1]), len(ds.test[1])) == (3000, 1000, 1000)
    full = load_dataset("mnist1d")
    torch.testing.assert_close(ds.test[0], full.val[0])


@pytest.mark.parametrize("name", ["moons", "circles"])
def test_moons_circles_shapes(name):
    ds = load_dataset(name)
    assert (ds.n_train, len(ds.val[1]), ds.input_shape, ds.n_classes) == (700, 300, (2,), 2)
    assert set(_np(ds.train[1]).tolist()) == {0, 1}


def test_registry_matches_loaded_sizes_without_loading():
    rows = {row["name"]: row for row in list_datasets()}
    assert set(rows) == set(DATASETS) == {"blobs", "moons", "circles", "digits", "mnist1d"}
    for name, row in rows.items():
        ds = load_dataset(name)
        n_val = 0 if ds.val is None else len(ds.val[1])
        n_test = 0 if ds.test is None else len(ds.test[1])
        assert (row["n_train"], row["n_val"], row["n_test"]) == (ds.n_train, n_val, n_test)
        assert tuple(row["input_shape"]) == ds.input_shape and row["n_classes"] == ds.n_classes
        assert row["n_features"] == int(np.prod(ds.input_shape)) and row["origin"]


# --- splits and standardization ------------------------------------------------------------------------


def test_val_fraction_is_seeded_and_disjoint():
    X = np.arange(200, dtype=np.float64).reshape(100, 2)  # row i holds 2i, 2i+1: identifies the sample
    y = np.arange(100) % 4
    a = from_arrays(X, y, val_fraction=0.2, split_seed=1)
    b = from_arrays(X, y, val_fraction=0.2, split_seed=1)
    c = from_arrays(X, y, val_fraction=0.2, split_seed=2)
    ids = lambda split: set((_np(split[0][:, 0]) // 2).astype(int).tolist())  # noqa: E731
    assert len(ids(a.val)) == 20 and len(ids(a.train)) == 80
    assert ids(a.val).isdisjoint(ids(a.train)) and ids(a.val) | ids(a.train) == set(range(100))
    assert ids(a.val) == ids(b.val) and ids(a.val) != ids(c.val)
    np.testing.assert_array_equal(_np(a.train[1]), y[sorted(ids(a.train))])  # labels follow samples


def test_val_fraction_displaces_builtin_val_to_test():
    ds = load_dataset("blobs", val_fraction=0.2)
    full = load_dataset("blobs")
    assert (ds.n_train, len(ds.val[1])) == (400, 100)
    torch.testing.assert_close(ds.test[0], full.val[0])


def test_standardize_uses_train_statistics_only():
    rng = np.random.default_rng(0)
    X = rng.normal([5.0, -3.0, 0.0], [2.0, 0.5, 1.0], size=(300, 3))
    X[:, 2] = 7.0  # constant feature: std 0, left unscaled
    X_val = rng.normal(50.0, 10.0, size=(100, 3))
    y, y_val = np.zeros(300, int), np.zeros(100, int)
    ds = from_arrays(X, y, X_val=X_val, y_val=y_val, standardize=True, dtype=torch.float64)
    train = _np(ds.train[0])
    np.testing.assert_allclose(train.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(train[:, :2].std(0), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(train[:, 2], 0.0)
    mean, std = X.mean(0), X.std(0)
    expected_val = (X_val[:, :2] - mean[:2]) / std[:2]
    np.testing.assert_allclose(_np(ds.val[0])[:, :2], expected_val, rtol=1e-12)
    assert abs(_np(ds.val[0])[:, 0].mean()) > 5  # val was not standardized on its own statistics


# --- user arrays and files ----------------------------------------------------------------------------


def test_from_arrays_task_detection():
    X = np.random.default_rng(0).normal(size=(10, 3))
    cls = from_arrays(X, np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 4]))
    assert cls.task == "classification" and cls.n_classes == 5
    reg = from_arrays(torch.as_tensor(X), torch.linspace(0, 1, 10))
    assert reg.task == "regression" and reg.n_classes is None
    assert reg.train[1].shape == (10, 1) and reg.train[1].dtype == torch.float32
    reg2 = from_arrays(X, np.ones((10, 2)))
    assert reg2.train[1].shape == (10, 2)
    forced = from_arrays(X, np.arange(10) % 3 * 1.0, task="classification")
    assert forced.n_classes == 3 and forced.train[1].dtype == torch.int64


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    arrays = dict(X=rng.normal(size=(30, 4)), y=rng.integers(0, 3, 30),
                  X_val=rng.normal(size=(10, 4)), y_val=rng.integers(0, 3, 10))
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    ds = load_dataset(str(path))
    np.testing.assert_allclose(_np(ds.train[0]), arrays["X"].astype(np.float32))
    np.testing.assert_array_equal(_np(ds.train[1]), arrays["y"])
    np.testing.assert_array_equal(_np(ds.val[1]), arrays["y_val"])
    assert ds.test is None and ds.n_classes == int(max(arrays["y"].max(), arrays["y_val"].max())) + 1
    lower = tmp_path / "lower.npz"
    np.savez(lower, x=arrays["X"], y=arrays["y"])
    np.testing.assert_allclose(_np(load_dataset(lower).train[0]), arrays["X"].astype(np.float32))


def test_csv_round_trip_with_string_labels(tmp_path):
    rng = np.random.default_rng(2)
    frame = pd.DataFrame({"a": rng.normal(size=20), "b": rng.integers(0, 9, 20),
                          "kind": rng.choice(["pear", "apple", "fig"], 20)})
    path = tmp_path / "fruit.csv"
    frame.to_csv(path, index=False)
    ds = load_dataset(path, target="kind")
    np.testing.assert_allclose(_np(ds.train[0]), frame[["a", "b"]].to_numpy(np.float32))
    expected = frame["kind"].map({"apple": 0, "fig": 1, "pear": 2}).to_numpy()
    np.testing.assert_array_equal(_np(ds.train[1]), expected)
    assert ds.n_classes == 3 and ds.val is None


def test_csv_numeric_regression_target(tmp_path):
    frame = pd.DataFrame({"x": [0.0, 1.0, 2.0], "price": [1.5, 2.5, 3.5]})
    path = tmp_path / "r.csv"
    frame.to_csv(path, index=False)
    ds = load_dataset(path, target="price")
    assert ds.task == "regression"
    np.testing.assert_allclose(_np(ds.train[1])[:, 0], frame["price"].to_numpy())


# --- errors ------------------------------------------------------------------------------------------------


def test_unknown_name():
    msg = _raises_one_line(lambda: load_dataset("cifar"), "cifar", "mnist1d", ".npz")
    assert ".csv" in msg


def test_missing_and_unreadable_files(tmp_path):
    _raises_one_line(lambda: load_dataset(tmp_path / "nope.npz"), "nope.npz", "does not exist")
    bad = tmp_path / "bad.npz"
    bad.write_text("not a zip")
    _raises_one_line(lambda: load_dataset(bad), "bad.npz")
    odd = tmp_path / "data.json"
    odd.write_text("{}")
    _raises_one_line(lambda: load_dataset(odd), ".json")
    wrong_keys = tmp_path / "keys.npz"
    np.savez(wrong_keys, features=np.zeros((2, 2)))
    _raises_one_line(lambda: load_dataset(wrong_keys), "features")


def test_csv_errors(tmp_path):
    path = tmp_path / "t.csv"
    pd.DataFrame({"a": [1.0, 2.0], "colour": ["red", "blue"], "label": [0, 1]}).to_csv(path, index=False)
    _raises_one_line(lambda: load_dataset(path), "target", "label")
    _raises_one_line(lambda: load_dataset(path, target="y"), "'y'", "a, colour, label")
    _raises_one_line(lambda: load_dataset(path, target="label"), "colour", "not numeric")


def test_nan_and_inf_are_counted_per_split():
    X = np.zeros((5, 2))
    X_val = np.zeros((3, 2))
    X_val[0, 0], X_val[2, 1] = np.nan, np.inf
    y = np.zeros(5, int)
    _raises_one_line(lambda: from_arrays(X, y, X_val=X_val, y_val=np.zeros(3, int)), "validation", "2 NaN or inf")


def test_bad_shapes_and_labels():
    X = np.zeros((4, 2))
    _raises_one_line(lambda: from_arrays(X, np.zeros(3, int)), "4 rows", "3 labels")
    _raises_one_line(lambda: from_arrays(np.zeros((0, 2)), np.zeros(0, int)), "empty")
    _raises_one_line(lambda: from_arrays(X, np.array([0, -1, 1, -3])), "-3, -1", "0..K-1")
    _raises_one_line(lambda: from_arrays(X, np.array([0, 1.5, 1, 0]), task="classification"), "1.5")
    _raises_one_line(lambda: from_arrays(X, np.array([0, 1, 2, 7]), n_classes=3), "7", "0..2")
    _raises_one_line(lambda: from_arrays(X, np.zeros(4, int), X_val=X), "no y")


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.1, 0.001])
def test_bad_val_fraction(fraction):
    _raises_one_line(lambda: load_dataset("blobs", val_fraction=fraction), "val_fraction")


def test_target_with_builtin_and_bad_device():
    _raises_one_line(lambda: load_dataset("blobs", target="y"), "target")
    _raises_one_line(lambda: load_dataset("blobs", device="tpu9"), "tpu9")
