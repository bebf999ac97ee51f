"""Datasets as in-memory tensors: loading, checking and splitting them.

A `Dataset` holds ``train``, ``val`` and ``test`` as ``(X, y)`` tensor pairs on one device.
Batches are slices of a seeded index permutation, never a DataLoader (`batchlab.schedule` cuts
them): for data that fits in memory that is the fastest way, and it makes the epoch order
explicit and reproducible.
"""

from __future__ import annotations

import io
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from batchlab.checks import check_arguments
from batchlab.errors import DataError
from batchlab.files import read_text

Split = tuple[torch.Tensor, torch.Tensor]  # (X: (N, *features), y: (N,) int64 labels or (N, k) targets)


@dataclass(frozen=True)
class Dataset:
    """A training set with optional validation and test sets, as tensors.

    Attributes:
        name: short name (``mnist1d``) or the file it came from.
        train, val, test: ``(X, y)`` pairs; ``val``/``test`` may be None.
        n_classes: number of classes for classification; None for regression.
        origin: where the data comes from, in words (shown by ``batchlab datasets``).
    """

    name: str
    train: Split
    val: Split | None = None
    test: Split | None = None
    n_classes: int | None = None
    origin: str = ""

    @property
    def task(self) -> str:
        return "regression" if self.n_classes is None else "classification"

    @property
    def n_train(self) -> int:
        return int(self.train[0].shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train[0].shape[1:])

    @property
    def device(self) -> torch.device:
        return self.train[0].device

    def to(self, device: str | torch.device) -> "Dataset":
        """The same dataset with every tensor on ``device``."""
        move = lambda split: None if split is None else (split[0].to(device), split[1].to(device))  # noqa: E731
        return replace(self, train=move(self.train), val=move(self.val), test=move(self.test))


# ---------------------------------------------------------------------------------------------
# Loading: built-in datasets, user arrays and files, splits, standardization.
# ---------------------------------------------------------------------------------------------

Arrays = tuple[np.ndarray, np.ndarray]  # (X, y) before conversion to tensors

_MNIST1D_ORIGIN = (
    "MNIST-1D (Greydanus 2020), generated offline by mnist1d.data.make_dataset(get_dataset_args()) "
    "with seed 42: 4000 train, 1000 validation (the package's own test half, the split the "
    "paper's accuracies refer to); with val_fraction, validation is carved from train and the "
    "1000 become test"
)

# Static descriptions: `list_datasets` must not have to generate anything.
DATASETS: dict[str, dict[str, Any]] = {
    "blobs": dict(
        n_train=500, n_val=500, n_test=0, input_shape=(2,), n_classes=3,
        origin="scikit-learn make_blobs(n_samples=1000, centers=3, n_features=2, cluster_std=2, "
        "random_state=2); first 500 train, last 500 validation (Brownlee's batch-size tutorial)",
    ),
    "moons": dict(
        n_train=700, n_val=300, n_test=0, input_shape=(2,), n_classes=2,
        origin="scikit-learn make_moons(n_samples=1000, noise=0.2, random_state=0), already "
        "shuffled; first 700 train, last 300 validation",
    ),
    "circles": dict(
        n_train=700, n_val=300, n_test=0, input_shape=(2,), n_classes=2,
        origin="scikit-learn make_circles(n_samples=1000, noise=0.1, factor=0.5, random_state=0), "
        "already shuffled; first 700 train, last 300 validation",
    ),
    "digits": dict(
        n_train=1077, n_val=360, n_test=360, input_shape=(1, 8, 8), n_classes=10,
        origin="scikit-learn load_digits() (bundled, 1797 8x8 images), pixels divided by 16 to "
        "[0, 1]; stratified split 1077 train / 360 validation / 360 test with random_state=0",
    ),
    "mnist1d": dict(
        n_train=4000, n_val=1000, n_test=0, input_shape=(40,), n_classes=10, origin=_MNIST1D_ORIGIN,
    ),
}


def list_datasets() -> list[dict[str, Any]]:
    """Describe the built-in datasets without generating them.

    Returns:
        One dict per dataset: name, n_train, n_val, n_test, input_shape, n_features, n_classes, origin.
    """
    rows = []
    for name, info in DATASETS.items():
        row = {"name": name, **info}
        row["n_features"] = int(np.prod(info["input_shape"]))
        rows.append(row)
    return rows


# --- built-in generators (numpy in, numpy out) -------------------------------------------------


def _blobs() -> tuple[Arrays, Arrays | None, Arrays | None]:
    from sklearn.datasets import make_blobs

    X, y = make_blobs(n_samples=1000, centers=3, n_features=2, cluster_std=2, random_state=2)
    return (X[:500], y[:500]), (X[500:], y[500:]), None


def _moons() -> tuple[Arrays, Arrays | None, Arrays | None]:
    from sklearn.datasets import make_moons

    X, y = make_moons(n_samples=1000, noise=0.2, random_state=0)
    return (X[:700], y[:700]), (X[700:], y[700:]), None


def _circles() -> tuple[Arrays, Arrays | None, Arrays | None]:
    from sklearn.datasets import make_circles

    X, y = make_circles(n_samples=1000, noise=0.1, factor=0.5, random_state=0)
    return (X[:700], y[:700]), (X[700:], y[700:]), None


def _digits() -> tuple[Arrays, Arrays | None, Arrays | None]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    X = bunch.images[:, None, :, :] / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = bunch.target
    X_rest, X_test, y_rest, y_test = train_test_split(X, y, test_size=360, stratify=y, random_state=0)
    X_train, X_val, y_train, y_val = train_test_split(
        X_rest, y_rest, test_size=360, stratify=y_rest, random_state=0
    )
    return (X_train, y_train), (X_val, y_val), (X_test, y_test)


_MEMORY_CACHE: dict[str, dict[str, np.ndarray]] = {}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "batchlab"


def _generate_mnist1d() -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds the global `random` and numpy RNGs; give the caller theirs back.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())  # never get_dataset(): it downloads
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}


def _read_disk_cache(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in ("x", "y", "x_test", "y_test")}
    except Exception:  # missing, partial or foreign file: regenerate
        return None


def _write_disk_cache(path: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    except OSError:
        pass  # an unwritable cache only costs a regeneration next time


def _mnist1d_arrays() -> dict[str, np.ndarray]:
    """The MNIST-1D arrays, generated once per process (and cached on disk when possible)."""
    if "mnist1d" not in _MEMORY_CACHE:
        from importlib.metadata import version

        path = _cache_dir() / f"mnist1d-{version('mnist1d')}-seed42.npz"  # a new generator, a new file
        arrays = _read_disk_cache(path)
        if arrays is None:
            arrays = _generate_mnist1d()
            _write_disk_cache(path, arrays)
        _MEMORY_CACHE["mnist1d"] = arrays
    return _MEMORY_CACHE["mnist1d"]


def _mnist1d() -> tuple[Arrays, Arrays | None, Arrays | None]:
    a = _mnist1d_arrays()
    return (a["x"], a["y"]), (a["x_test"], a["y_test"]), None  # x: (4000, 40), x_test: (1000, 40)


_GENERATORS: dict[str, Callable[[], tuple[Arrays, Arrays | None, Arrays | None]]] = {
    "blobs": _blobs, "moons": _moons, "circles": _circles, "digits": _digits, "mnist1d": _mnist1d,
}


# --- entry points -------------------------------------------------------------------------------


def load_dataset(
    name_or_path: str | os.PathLike,
    *,
    target: str | None = None,
    val_fraction: float | None = None,
    split_seed: int = 0,
    standardize: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Load a built-in dataset by name, or a ``.npz``/``.csv`` file, as tensors on ``device``.

    Built-ins (see `list_datasets`): blobs, moons, circles, digits, mnist1d. All are generated
    offline or shipped by installed packages; nothing is downloaded. ``mnist1d`` gives 4000 train
    and its 1000 held-out samples as ``val`` (``test`` is None); with ``val_fraction`` the
    validation set is carved from the 4000 and the 1000 become ``test``. In general, a built-in
    ``val`` displaced by ``val_fraction`` becomes ``test`` when the dataset has no test split.

    Args:
        name_or_path: a built-in name, or a path to a ``.npz`` (keys ``X``/``y``, optional
            ``X_val``/``y_val``/``X_test``/``y_test``) or ``.csv`` file.
        target: the label column of a ``.csv`` file (required for csv, rejected otherwise).
        val_fraction: hold out this fraction of the training split as validation, replacing any
            given validation split.
        split_seed: seed of the ``val_fraction`` split.
        standardize: scale each feature by the training split's mean and std (std 0: centred only).
        device: ``cpu``, ``cuda``, ``auto`` or a torch device.
        dtype: floating dtype of the features (and of regression targets).

    Returns:
        A `Dataset`; X is float (N, *features), y int64 labels (N,) or float targets (N, k).
    """
    _check_options("load_dataset", name_or_path=(name_or_path, (str, os.PathLike)), target=(target, (str, type(None))),
                   split_seed=split_seed, standardize=standardize, dtype=dtype)
    path = _as_path(name_or_path)
    if path is not None:
        return _load_file(path, target=target, val_fraction=val_fraction, split_seed=split_seed,
                          standardize=standardize, device=device, dtype=dtype)
    name = str(name_or_path).strip().lower()
    if name not in _GENERATORS:
        known = ", ".join(DATASETS)
        raise DataError(
            f"unknown dataset {str(name_or_path)!r}; use one of {known}, or a path to a .npz or .csv file"
        )
    if target is not None:
        raise DataError(f"target={target!r} applies only to .csv files; drop it for the built-in {name!r}")
    train, val, test = _GENERATORS[name]()
    info = DATASETS[name]
    origin = info["origin"]
    return _assemble(name, train, val, test, n_classes=info["n_classes"], origin=origin,
                     val_fraction=val_fraction, split_seed=split_seed, standardize=standardize,
                     device=device, dtype=dtype)


def from_arrays(
    X: Any,
    y: Any,
    *,
    X_val: Any = None,
    y_val: Any = None,
    X_test: Any = None,
    y_test: Any = None,
    name: str = "arrays",
    task: str = "auto",
    n_classes: int | None = None,
    val_fraction: float | None = None,
    split_seed: int = 0,
    standardize: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    origin: str = "arrays given in Python",
) -> Dataset:
    """Build a `Dataset` from numpy arrays or tensors.

    Args:
        X, y: training features (N, *features) and labels (N,) or regression targets (N,) / (N, k).
        X_val, y_val, X_test, y_test: optional held-out splits, given in pairs.
        name: the dataset's name.
        task: ``auto`` (integer y: classification; float y: regression), ``classification``
            or ``regression``.
        n_classes: number of classes; default max label + 1 over all splits.
        val_fraction, split_seed, standardize, device, dtype: as in `load_dataset`.
        origin: where the data comes from, in words.

    Returns:
        A `Dataset`. Classification labels must be integers 0..n_classes-1; regression targets
        of shape (N,) become (N, 1).
    """
    _check_options("from_arrays", name=(name, str), task=(task, str), n_classes=(n_classes, (int, type(None))),
                   origin=(origin, str), split_seed=split_seed, standardize=standardize, dtype=dtype)
    if n_classes is not None and not 1 <= n_classes < 2**63:
        raise DataError(f"n_classes={n_classes} must be a whole number >= 1")
    if task not in ("auto", "classification", "regression"):
        raise DataError(f"task={task!r} is not known; use auto, classification or regression")
    pairs = {"train": (X, y), "validation": (X_val, y_val), "test": (X_test, y_test)}
    splits = {split: _pair_to_numpy(split, *pair) for split, pair in pairs.items()}
    train = splits["train"]
    if train is None:
        raise DataError("no training data given; pass X and y")
    if task == "auto":
        task = "classification" if _is_integer_array(train[1]) else "regression"
    if task == "classification":
        n_classes = _check_labels(splits, n_classes)
    elif n_classes is not None:
        raise DataError(f"n_classes={n_classes} was given for a regression task; drop it or set task='classification'")
    return _assemble(name, train, splits["validation"], splits["test"], n_classes=n_classes,
                     origin=origin, val_fraction=val_fraction, split_seed=split_seed,
                     standardize=standardize, device=device, dtype=dtype)


def _check_options(function: str, *, split_seed: Any, standardize: Any, dtype: Any, **named: Any) -> None:
    """The argument checks `load_dataset` and `from_arrays` share, then theirs (``**named``)."""
    check_arguments(function, split_seed=(split_seed, int), standardize=(standardize, bool),
                    dtype=(dtype, torch.dtype), **named)
    if not 0 <= split_seed < 2**63:
        raise DataError(f"split_seed={split_seed} must be >= 0 and < 2**63 (it seeds a torch generator)")


# --- files ---------------------------------------------------------------------------------------


def _as_path(name_or_path: str | os.PathLike) -> Path | None:
    """The file meant by ``name_or_path``, or None when it names a built-in dataset."""
    if isinstance(name_or_path, os.PathLike):
        return Path(name_or_path)
    text = str(name_or_path)
    if text.lower().endswith((".npz", ".csv")) or os.sep in text or (text not in _GENERATORS and os.path.exists(text)):
        return Path(text)
    return None


def _load_file(path: Path, *, target: str | None, **kwargs: Any) -> Dataset:
    if not path.is_file():
        raise DataError(f"dataset file {str(path)!r} does not exist; check the path, or use a built-in name ({', '.join(DATASETS)})")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        if target is not None:
            raise DataError(f"target={target!r} applies only to .csv files; a .npz file holds X and y arrays")
        return _load_npz(path, **kwargs)
    if suffix == ".csv":
        return _load_csv(path, target, **kwargs)
    raise DataError(f"cannot read {str(path)!r}: unsupported file type {suffix or '(none)'!r}; save it as .npz (X, y) or .csv")


def _load_npz(path: Path, **kwargs: Any) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {key: f[key] for key in f.files}
    except Exception as exc:
        raise DataError(f"cannot read {str(path)!r} as .npz ({type(exc).__name__}: {exc}); write it with numpy.savez(path, X=..., y=...)") from None

    def get(*keys: str) -> np.ndarray | None:
        return next((arrays[k] for k in keys if k in arrays), None)

    X, y = get("X", "x"), get("y", "Y")
    if X is None or y is None:
        found = ", ".join(sorted(arrays)) or "none"
        raise DataError(f"{str(path)!r} has no 'X' and 'y' arrays (keys found: {found}); save it with numpy.savez(path, X=..., y=...)")
    return from_arrays(X, y, X_val=get("X_val", "x_val"), y_val=get("y_val"), X_test=get("X_test", "x_test"),
                       y_test=get("y_test"), name=str(path), origin=f"arrays from {path}", **kwargs)


def _load_csv(path: Path, target: str | None, **kwargs: Any) -> Dataset:
    import pandas as pd

    text = read_text(path, "data file", DataError)
    try:
        frame = pd.read_csv(io.StringIO(text))
    except Exception as exc:
        raise DataError(f"cannot read {str(path)!r} as csv ({type(exc).__name__}: {exc}); check that it is a comma-separated file with a header row") from None
    columns = [str(c) for c in frame.columns]
    if target is None:
        raise DataError(f"a .csv file needs target=COLUMN naming the label column; columns are: {', '.join(columns)}")
    if target not in frame.columns:
        raise DataError(f"target column {target!r} is not in {str(path)!r}; columns are: {', '.join(columns)}")
    features = frame.drop(columns=[target])
    if features.shape[1] == 0:
        raise DataError(f"{str(path)!r} has no feature columns besides the target {target!r}; add feature columns")
    non_numeric = [str(c) for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if non_numeric:
        raise DataError(f"feature columns {', '.join(non_numeric)} of {str(path)!r} are not numeric; encode them as numbers or drop them")
    labels = frame[target]
    origin = f"csv file {path}, target column {target!r}"
    if not pd.api.types.is_numeric_dtype(labels):
        if labels.isna().any():
            raise DataError(f"target column {target!r} of {str(path)!r} has {int(labels.isna().sum())} empty values; fill or drop those rows")
        classes = sorted(labels.astype(str).unique())
        labels = labels.astype(str).map({c: i for i, c in enumerate(classes)})
        origin += f", labels {', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''} mapped to 0..{len(classes) - 1} in sorted order"
    return from_arrays(features.to_numpy(dtype=np.float64), labels.to_numpy(), name=str(path), origin=origin, **kwargs)


# --- checks ----------------------------------------------------------------------------------------


def _to_numpy(split: str, label: str, value: Any) -> np.ndarray:
    """An array (or tensor, or nested lists) as a numpy array; ragged lists are one DataError."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise DataError(f"the {split} split's {label} is not a rectangular array ({exc}); "
                        "give every sample the same number of features") from None


def _pair_to_numpy(split: str, X: Any, y: Any) -> Arrays | None:
    """Check one (X, y) pair: both or neither, same length, not empty, numeric."""
    if X is None and y is None:
        return None
    if X is None or y is None:
        given, missing = ("X", "y") if y is None else ("y", "X")
        raise DataError(f"the {split} split has {given} but no {missing}; give both or neither")
    X, y = _to_numpy(split, "X", X), _to_numpy(split, "y", y)
    if X.ndim == 0 or y.ndim == 0:
        raise DataError(f"the {split} split's X and y must be arrays with one row per sample, got shapes {X.shape} and {y.shape}")
    if len(X) != len(y):
        raise DataError(f"the {split} split has {len(X)} rows of X but {len(y)} labels; give one label per sample")
    if len(X) == 0:
        raise DataError(f"the {split} split is empty (0 samples); give at least one sample")
    for label, array in (("X", X), ("y", y)):
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise DataError(f"the {split} split's {label} has dtype {array.dtype}, not numbers; convert it to a numeric array")
        if np.iscomplexobj(array):
            raise DataError(f"the {split} split's {label} holds complex numbers ({array.dtype}); "
                            "give real numbers, e.g. the real and imaginary parts as separate features")
    if 0 in X.shape[1:]:
        raise DataError(f"the {split} split's X has shape {X.shape}: no features per sample; give at least one feature")
    return X, y


def _is_integer_array(array: np.ndarray) -> bool:
    return np.issubdtype(array.dtype, np.integer) or array.dtype == bool


def _bad_values(values: np.ndarray) -> str:
    shown = ", ".join(str(v) for v in np.unique(values)[:5].tolist())
    return shown + (", ..." if np.unique(values).size > 5 else "")


def _check_labels(splits: dict[str, Arrays | None], n_classes: int | None) -> int:
    """Check that every split's labels are integers 0..K-1 and return K."""
    for split, pair in splits.items():
        if pair is None:
            continue
        y = pair[1]
        if y.ndim != 1:
            raise DataError(f"classification labels must have shape (N,), the {split} split's have shape {y.shape}; pass one integer label per sample")
        if not _is_integer_array(y):
            if not np.all(np.isfinite(y)):
                raise DataError(f"the {split} split's labels contain NaN or inf; labels must be integers 0..K-1")
            fractional = y[y != np.round(y)]
            if fractional.size:
                raise DataError(f"the {split} split's labels include non-integer values ({_bad_values(fractional)}); labels must be integers 0..K-1, or use task='regression'")
        negative = y[y < 0]
        if negative.size:
            raise DataError(f"the {split} split's labels include negative values ({_bad_values(negative)}); labels must be integers 0..K-1, so remap them")
    top = max(int(pair[1].max()) for pair in splits.values() if pair is not None)
    if n_classes is None:
        _check_label_range(splits, top)
        return top + 1
    if top >= n_classes:
        bad = np.concatenate([p[1][p[1] >= n_classes] for p in splits.values() if p is not None])
        raise DataError(f"labels {_bad_values(bad)} are outside 0..{n_classes - 1} for n_classes={n_classes}; raise n_classes or remap the labels")
    return int(n_classes)


# Inferred class counts above both the sample count and this are taken for a labelling mistake.
_MAX_SPARE_CLASSES = 1000


def _check_label_range(splits: dict[str, Arrays | None], top: int) -> None:
    """Refuse labels that imply far more classes than samples (ids such as 1000000 used as labels):
    the model would get an output per class, almost all of them for classes that never occur."""
    n_samples = sum(len(pair[1]) for pair in splits.values() if pair is not None)
    if top + 1 > max(n_samples, _MAX_SPARE_CLASSES):
        raise DataError(f"labels go up to {top} but there are only {n_samples} samples, so most of the {top + 1} "
                        "classes would have none; remap the labels to 0..K-1, or pass n_classes to confirm")


def _check_finite(split: str, X: torch.Tensor, y: torch.Tensor) -> None:
    for label, t in (("features", X), ("targets", y)):
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise DataError(f"the {split} split's {label} hold {bad} NaN or inf values (or numbers too large "
                                f"for {t.dtype}); fill or drop them before loading")


# --- assembly ----------------------------------------------------------------------------------------


def _resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise DataError(f"device {device!r} is not known; use cpu, cuda or auto") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"device {device!r} was asked for but CUDA is not available; use --device cpu or auto")
    return resolved


def _to_tensors(pair: Arrays | None, classification: bool, dtype: torch.dtype) -> Split | None:
    if pair is None:
        return None
    X, y = pair
    X_t = torch.tensor(np.asarray(X)).to(dtype)
    if X_t.ndim == 1:
        X_t = X_t[:, None]  # (N,) -> (N, 1): one feature per sample
    if classification:
        y_t = torch.tensor(np.asarray(y)).to(torch.int64)  # (N,)
    else:
        y_t = torch.tensor(np.asarray(y)).to(dtype)
        if y_t.ndim == 1:
            y_t = y_t[:, None]  # (N,) -> (N, 1): the model's output shape, so MSE never broadcasts
    return X_t, y_t


def _hold_out(train: Split, val_fraction: float, split_seed: int) -> tuple[Split, Split]:
    """Split ``train`` into (train, val), the val indices drawn by a generator seeded with split_seed."""
    if isinstance(val_fraction, bool) or not (0.0 < float(val_fraction) < 1.0):
        raise DataError(f"val_fraction={val_fraction!r} must be a number between 0 and 1 (exclusive), e.g. 0.2")
    X, y = train
    n = X.shape[0]
    n_val = int(round(n * float(val_fraction)))
    if n_val < 1 or n_val >= n:
        raise DataError(f"val_fraction={val_fraction} of {n} training samples leaves {n_val} for validation and {n - n_val} for training; choose a fraction that keeps both non-empty")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(split_seed)))
    # Sorted, so both parts keep the samples' original relative order.
    val_idx, train_idx = order[:n_val].sort().values, order[n_val:].sort().values
    return (X[train_idx], y[train_idx]), (X[val_idx], y[val_idx])


def _standardize(splits: list[Split | None]) -> list[Split | None]:
    """Scale every split by the training split's per-feature mean and std (std 0: centred only)."""
    X_train = splits[0][0]  # (N, *features)
    mean = X_train.mean(dim=0, keepdim=True)  # (1, *features)
    std = X_train.std(dim=0, unbiased=False, keepdim=True)  # (1, *features)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return [None if s is None else ((s[0] - mean) / std, s[1]) for s in splits]


def _assemble(
    name: str,
    train: Arrays,
    val: Arrays | None,
    test: Arrays | None,
    *,
    n_classes: int | None,
    origin: str,
    val_fraction: float | None,
    split_seed: int,
    standardize: bool,
    device: str | torch.device,
    dtype: torch.dtype,
) -> Dataset:
    """numpy splits -> checked tensors, with held-out validation and standardization, on device."""
    if not dtype.is_floating_point:
        raise DataError(f"dtype {dtype} is not a floating type; use torch.float32 or torch.float64")
    target_device = _resolve_device(device)
    classification = n_classes is not None
    splits = [_to_tensors(p, classification, dtype) for p in (train, val, test)]
    if val_fraction is not None:
        new_train, new_val = _hold_out(splits[0], val_fraction, split_seed)
        old_val, old_test = splits[1], splits[2]
        splits = [new_train, new_val, old_test if old_test is not None else old_val]
        origin += f"; validation = {val_fraction:g} of train held out with split_seed={split_seed}"
    for split, pair in zip(("train", "validation", "test"), splits):
        if pair is not None:
            _check_finite(split, *pair)
            if pair[0].shape[1:] != splits[0][0].shape[1:]:
                raise DataError(f"the {split} split's samples have shape {tuple(pair[0].shape[1:])} but training samples {tuple(splits[0][0].shape[1:])}; give every split the same features")
    if standardize:
        splits = _standardize(splits)
        origin += "; standardized with the training split's per-feature mean and std"
    dataset = Dataset(name=name, train=splits[0], val=splits[1], test=splits[2], n_classes=n_classes, origin=origin)
    return dataset.to(target_device)
