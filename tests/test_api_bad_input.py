"""The Python API's bad-input corpus: every call below is a mistake a person can make, and each
must fail with one `BatchlabError` line of the right kind that names what was wrong.

Each case is (id, call, error kind, words the message must hold). The calls run for real: the
configs are constructed, the datasets loaded from files written here, the models built.
"""

from __future__ import annotations

import codecs
import math

import numpy as np
import pytest
import torch

import batchlab as bl
from batchlab.config import load_run_spec, load_study_config
from batchlab.errors import ArgumentError, BatchlabError, ConfigError, DataError, ModelError

INF, NAN = math.inf, math.nan


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """A small dataset, a model, a config, and a folder for bad files."""
    ds = bl.load_dataset("blobs")
    folder = tmp_path_factory.mktemp("bad")
    return {"ds": ds, "model": bl.build_model("logreg", ds), "cfg": bl.TrainConfig(max_steps=1), "dir": folder}


def _npz(ctx, name, **arrays):
    path = ctx["dir"] / f"{name}.npz"
    np.savez(path, **arrays)
    return path


def _file(ctx, name, data: bytes):
    path = ctx["dir"] / name
    path.write_bytes(data)
    return path


X4 = np.arange(8.0).reshape(4, 2)  # (4, 2)
Y4 = np.array([0, 1, 0, 1])
CSV = "a,b,label\n1,2,0\n3,4,1\n"
TOML = '# Größe\nmodel = "mlp"\n[train]\nbatch_size = 8\n'

TRAIN = [  # TrainConfig(**kwargs): field, bad value, words expected
    ("batch_size", 32.5, "whole number"), ("batch_size", 0, "batch_size"), ("batch_size", "abc", "'full'"),
    ("batch_size", True, "batch_size"), ("batch_size", 2**63, "batch_size"), ("batch_size", INF, "batch_size"),
    ("epochs", 0, "greater than or equal to 1"), ("epochs", 2**63, "2**63"), ("max_steps", -1, "max_steps"),
    ("lr", 0, "lr"), ("lr", INF, "finite"), ("lr", NAN, "finite"), ("lr", "abc", "number"), ("lr", 1e300, "1e+12"),
    ("momentum", 1.0, "less than 1"), ("momentum", NAN, "finite"),
    ("weight_decay", INF, "finite"), ("weight_decay", -1, "weight_decay"), ("weight_decay", NAN, "finite"),
    ("weight_decay", 1e300, "weight_decay"),
    ("gamma", INF, "finite"), ("gamma", 0, "gamma"), ("gamma", 2, "less than or equal to 1"),
    ("min_lr", INF, "finite"), ("min_lr", -1, "min_lr"), ("min_lr", 1e300, "min_lr"),
    ("warmup_epochs", INF, "finite"), ("warmup_epochs", 1e300, "warmup_epochs"), ("warmup_steps", 2**64, "2**63"),
    ("seed", -1, "seed"), ("seed", 2**63, "2**63"), ("seed", 2**64, "2**63"), ("seed", 1.5, "integer"),
    ("betas", (0.9, INF), "finite"), ("betas", (1.0, 0.9), "beta"), ("betas", "fast", "betas"),
    ("eval_every", 0, "'epoch'"), ("eval_every", "sometimes", "'epoch'"), ("eval_every", INF, "eval_every"),
    ("eval_batch_size", 0, "eval_batch_size"), ("eval_batch_size", 2**63, "2**63"), ("probe_every", 0, "probe_every"),
    ("reference_batch_size", 0, "reference_batch_size"), ("sgdr_mult", 10**6, "sgdr_mult"), ("step_epochs", 0, "step_epochs"),
    ("sgdr_epochs", NAN, "sgdr_epochs"), ("optimizer", "sgdd", "'adam'"), ("schedule", "linear", "'cosine'"),
    ("device", "tpu", "'cuda'"), ("loss", "hinge", "'mse'"), ("shuffle", "maybe", "boolean"), ("nosuch", 1, "unknown field"),
]

STUDY = [  # StudyConfig(**kwargs)
    ("batch_sizes", [0], "whole number"), ("batch_sizes", [], "at least one"), ("batch_sizes", [1.5], "whole number"),
    ("batch_sizes", [2**63], "batch_sizes"), ("batch_sizes", {"a": 1}, "list of batch sizes"),
    ("lrs", [0.1, NAN], "learning rates"), ("lrs", [], "non-empty"), ("lrs", "fast", "'auto'"), ("lrs", [-1], "> 0"),
    ("lrs", [INF], "learning rates"), ("lrs", [1e300], "1e+12"), ("reference_lr", 1e300, "reference_lr"), ("lrs", [True], "learning rates"),
    ("lr_grid_factor", INF, "finite"), ("lr_grid_factor", 1.0, "greater than 1"), ("lr_grid_factor", 1e300, "lr_grid_factor"),
    ("lr_grid_size", 0, "lr_grid_size"), ("lr_grid_size", 1000, "lr_grid_size"), ("lr_extensions", -1, "lr_extensions"),
    ("reference_lr", INF, "finite"), ("reference_lr", 0, "reference_lr"), ("reference_batch_size", 2**64, "2**63"),
    ("seeds", 0, "seeds"), ("seeds", [1, 1], "distinct"), ("seeds", [-1], ">= 0"), ("seeds", 10**9, "10000"),
    ("seeds", [2**63], "2**63"),
    ("target", "foo", "no comparison"), ("target", "val_acc>=inf", "finite"), ("target", "val_acc>=nan", "finite"),
    ("target", "speed>=1", "unknown metric"),
    ("resolution", 0, "resolution"), ("resolution", 1, "resolution"), ("resolution", NAN, "finite"),
    ("resolution", 1e-9, "resolution"), ("max_steps", 2**63, "2**63"), ("epochs", -1, "epochs"),
    ("train", {"batch_size": 8}, "train.batch_size"), ("train", {"gamma": INF}, "train.gamma"),
    ("train", {"nosuch": 1}, "train.nosuch"), ("dataset", {"val_fraction": 2}, "dataset.val_fraction"),
    ("dataset", {"val_fraction": NAN}, "dataset.val_fraction"), ("dataset", {"split_seed": -1}, "dataset.split_seed"),
    ("dataset", {"split_seed": 2**64}, "2**63"), ("noise_scale", "often", "noise_scale"),
]

OTHER_CONFIGS = [  # (id, call, words)
    ("study-no-budget", lambda c: bl.StudyConfig(max_steps=None), "budget"),
    ("train-nesterov", lambda c: bl.TrainConfig(nesterov=True), "nesterov"),
    ("train-two-warmups", lambda c: bl.TrainConfig(warmup_steps=2, warmup_epochs=1), "warmup"),
    ("train-replace", lambda c: c["cfg"].replace(lr=INF), "lr"),
    ("runspec-train-lr", lambda c: bl.RunSpec(train={"lr": INF}), "train.lr"),
    ("runspec-val-fraction", lambda c: bl.RunSpec(dataset={"val_fraction": 1.0}), "dataset.val_fraction"),
    ("runspec-model-number", lambda c: bl.RunSpec(model=5), "model"),
    ("runspec-unknown", lambda c: bl.RunSpec(modle="mlp"), "modle"),
    ("datasetspec-inf", lambda c: bl.DatasetSpec(val_fraction=INF), "val_fraction"),
    ("datasetspec-seed", lambda c: bl.DatasetSpec(split_seed=2**64), "split_seed"),
]

def _track(c, **options):
    """bl.track on the corpus' model with a plain SGD optimizer and the given options."""
    return bl.track(c["model"], torch.optim.SGD(c["model"].parameters(), lr=0.1), **options)


ENTRY_POINTS = [  # (id, call, kind, words)
    ("track-store-number", lambda c: _track(c, store=123), ArgumentError, ("store", "int")),
    ("track-probe-every-zero", lambda c: _track(c, probe_every=0), ConfigError, ("probe_every",)),
    ("track-loss-fn-name", lambda c: _track(c, loss_fn="ce"), ArgumentError, ("loss_fn", "function")),
    ("track-eval-data-text", lambda c: _track(c, eval_data="xy", loss_fn=torch.nn.functional.cross_entropy), ArgumentError, ("eval_data",)),
    ("track-probes-text", lambda c: _track(c, probes="grad_norm"), ArgumentError, ("probes", "list")),
    ("track-probe-unknown", lambda c: _track(c, probes=["grad_nrom"]), ConfigError, ("grad_nrom", "grad_norm")),
    ("track-optimizer-missing", lambda c: bl.track(c["model"], None), ArgumentError, ("optimizer",)),
    ("fit-dict-config", lambda c: bl.fit(c["model"], c["ds"], {"batch_size": 32}), ArgumentError, ("config", "TrainConfig", "dict")),
    ("fit-split-for-dataset", lambda c: bl.fit(c["model"], c["ds"].train, c["cfg"]), ArgumentError, ("dataset", "ds.train", "tuple")),
    ("fit-swapped", lambda c: bl.fit(c["ds"], c["model"], c["cfg"]), ArgumentError, ("model", "nn.Module")),
    ("fit-callback-object", lambda c: bl.fit(c["model"], c["ds"], c["cfg"], callbacks=[object()]), ArgumentError, ("callbacks[0]", "Callback")),
    ("fit-callback-not-list", lambda c: bl.fit(c["model"], c["ds"], c["cfg"], callbacks=bl.EarlyStopping()), ArgumentError, ("list of",)),
    ("fit-callback-class", lambda c: bl.fit(c["model"], c["ds"], c["cfg"], callbacks=[bl.EarlyStopping]), ArgumentError, ("callbacks[0]", "type")),
    ("replicas-dict-configs", lambda c: bl.fit_replicas(lambda s: bl.build_model("logreg", c["ds"]), c["ds"], [{"lr": 0.1}]), ArgumentError, ("configs[0]", "TrainConfig")),
    ("replicas-split", lambda c: bl.fit_replicas(lambda s: bl.build_model("logreg", c["ds"]), c["ds"].train, [c["cfg"]]), ArgumentError, ("dataset",)),
    ("replicas-name-for-fn", lambda c: bl.fit_replicas("mlp", c["ds"], [c["cfg"]]), ArgumentError, ("model_fn", "function")),
    ("replicas-one-config", lambda c: bl.fit_replicas(lambda s: bl.build_model("logreg", c["ds"]), c["ds"], c["cfg"]), ArgumentError, ("list of",)),
    ("study-dict", lambda c: bl.run_study({"batch_sizes": [1]}), ArgumentError, ("config", "StudyConfig")),
    ("build-split", lambda c: bl.build_model("mlp", c["ds"].train), ArgumentError, ("dataset",)),
    ("build-module-for-name", lambda c: bl.build_model(torch.nn.Linear(2, 2), c["ds"]), ArgumentError, ("name", "string")),
    ("build-seed-negative", lambda c: bl.build_model("mlp", c["ds"], seed=-1), ModelError, ("seed",)),
    ("build-seed-huge", lambda c: bl.build_model("mlp", c["ds"], seed=2**64), ModelError, ("2**63",)),
    ("build-seed-text", lambda c: bl.build_model("mlp", c["ds"], seed="1"), ArgumentError, ("seed",)),
    ("build-huge-hidden", lambda c: bl.build_model("mlp", c["ds"], hidden=[10**12]), ModelError, ("mlp", "smaller layers")),
    ("build-huge-channels", lambda c: bl.build_model("cnn2d", bl.load_dataset("digits"), channels=10**9), ModelError, ("cnn2d", "smaller layers")),
    ("build-import", lambda c: bl.build_model("os.path:join", c["ds"]), ModelError, ("allow_import=True",)),
    ("build-import-raises", lambda c: bl.build_model("json.decoder:JSONDecoder", c["ds"], allow_import=True), ModelError, ("json.decoder:JSONDecoder", "raised TypeError")),
    ("build-import-not-module", lambda c: bl.build_model("unittest.mock:Mock", c["ds"], allow_import=True), ModelError, ("unittest.mock:Mock", "Mock", "nn.Module")),
    ("load-dtype-text", lambda c: bl.load_dataset("blobs", dtype="float32"), ArgumentError, ("dtype", "torch.float32")),
    ("load-dtype-int", lambda c: bl.load_dataset("blobs", dtype=torch.int64), DataError, ("floating",)),
    ("load-split-seed-negative", lambda c: bl.load_dataset("blobs", split_seed=-1), DataError, ("split_seed",)),
    ("load-split-seed-huge", lambda c: bl.load_dataset("blobs", val_fraction=0.2, split_seed=2**64), DataError, ("split_seed",)),
    ("load-val-fraction-nan", lambda c: bl.load_dataset("blobs", val_fraction=NAN), DataError, ("val_fraction",)),
    ("load-val-fraction-inf", lambda c: bl.load_dataset("blobs", val_fraction=INF), DataError, ("val_fraction",)),
    ("load-name-number", lambda c: bl.load_dataset(123), ArgumentError, ("name_or_path",)),
    ("load-standardize-text", lambda c: bl.load_dataset("blobs", standardize="yes"), ArgumentError, ("standardize",)),
    ("arrays-complex", lambda c: bl.from_arrays(X4 + 1j, Y4), DataError, ("complex",)),
    ("arrays-complex-tensor", lambda c: bl.from_arrays(torch.tensor(X4) * 1j, Y4), DataError, ("complex",)),
    ("arrays-complex-labels", lambda c: bl.from_arrays(X4, Y4 + 0j), DataError, ("complex", "y")),
    ("arrays-zero-features", lambda c: bl.from_arrays(np.zeros((4, 0)), Y4), DataError, ("no features",)),
    ("arrays-text", lambda c: bl.from_arrays(np.array([["a", "b"]] * 4), Y4), DataError, ("not numbers",)),
    ("arrays-objects", lambda c: bl.from_arrays(X4, np.array([object()] * 4)), DataError, ("not numbers",)),
    ("arrays-ragged", lambda c: bl.from_arrays([[1.0, 2.0], [3.0]], [0, 1]), DataError, ("rectangular",)),
    ("arrays-huge-labels", lambda c: bl.from_arrays(X4, np.array([0, 1, 10**9, 2])), DataError, ("1000000000", "remap")),
    ("arrays-uint64-labels", lambda c: bl.from_arrays(X4, np.array([0, 1, 2**64 - 1, 2], dtype=np.uint64)), DataError, ("remap",)),
    ("arrays-huge-float-labels", lambda c: bl.from_arrays(X4, np.array([0, 1, 1e30, 2]), task="classification"), DataError, ("remap",)),
    ("arrays-negative-labels", lambda c: bl.from_arrays(X4, np.array([0, -1, 1, 0])), DataError, ("negative",)),
    ("arrays-nan-features", lambda c: bl.from_arrays(np.where(X4 > 5, NAN, X4), Y4), DataError, ("NaN",)),
    ("arrays-inf-features", lambda c: bl.from_arrays(np.where(X4 > 5, INF, X4), Y4), DataError, ("inf",)),
    ("arrays-float32-overflow", lambda c: bl.from_arrays(X4 * 1e300, Y4), DataError, ("too large",)),
    ("arrays-nan-targets", lambda c: bl.from_arrays(X4, np.array([0.5, NAN, 1.0, 2.0])), DataError, ("targets",)),
    ("arrays-n-classes-zero", lambda c: bl.from_arrays(X4, Y4, n_classes=0), DataError, ("n_classes",)),
    ("arrays-n-classes-float", lambda c: bl.from_arrays(X4, Y4, n_classes=2.5), ArgumentError, ("n_classes",)),
    ("arrays-task", lambda c: bl.from_arrays(X4, Y4, task="clustering"), DataError, ("clustering",)),
    ("arrays-name", lambda c: bl.from_arrays(X4, Y4, name=None), ArgumentError, ("name",)),
    ("npz-complex", lambda c: bl.load_dataset(_npz(c, "complex", X=X4 * 1j, y=Y4)), DataError, ("complex",)),
    ("npz-zero-features", lambda c: bl.load_dataset(_npz(c, "empty", X=np.zeros((4, 0)), y=Y4)), DataError, ("no features",)),
    ("npz-huge-labels", lambda c: bl.load_dataset(_npz(c, "labels", X=X4, y=np.array([0, 5, 2**40, 1]))), DataError, ("remap",)),
    ("npz-nan", lambda c: bl.load_dataset(_npz(c, "nan", X=X4 * NAN, y=Y4)), DataError, ("NaN",)),
    ("npz-objects", lambda c: bl.load_dataset(_npz(c, "objects", X=np.array([object()] * 4), y=Y4)), DataError, ("cannot read",)),
    ("csv-latin1", lambda c: bl.load_dataset(_file(c, "latin1.csv", ("é" + CSV).encode("latin-1")), target="label"), DataError, ("not UTF-8", "save it as UTF-8")),
    ("csv-utf16", lambda c: bl.load_dataset(_file(c, "utf16.csv", CSV.encode("utf-16")), target="label"), DataError, ("UTF-16", "save it as UTF-8")),
    ("csv-text-features", lambda c: bl.load_dataset(_file(c, "text.csv", b"a,label\nx,0\ny,1\n"), target="label"), DataError, ("not numeric",)),
    ("csv-inf", lambda c: bl.load_dataset(_file(c, "inf.csv", b"a,label\ninf,0\n1,1\n"), target="label"), DataError, ("inf",)),
    ("csv-only-target", lambda c: bl.load_dataset(_file(c, "target.csv", b"label\n0\n1\n"), target="label"), DataError, ("no feature",)),
    ("csv-complex", lambda c: bl.load_dataset(_file(c, "complex.csv", b"a,label\n1+2j,0\n3,1\n"), target="label"), DataError, ("not numeric",)),
    ("toml-latin1", lambda c: load_run_spec(_file(c, "latin1.toml", TOML.encode("latin-1"))), ConfigError, ("not UTF-8", "line 1", "save it as UTF-8")),
    ("toml-utf16", lambda c: load_run_spec(_file(c, "utf16.toml", TOML.encode("utf-16"))), ConfigError, ("UTF-16", "save it as UTF-8")),
    ("toml-utf16-be", lambda c: load_run_spec(_file(c, "utf16be.toml", codecs.BOM_UTF16_BE + TOML.encode("utf-16-be"))), ConfigError, ("UTF-16",)),
    ("toml-utf32", lambda c: load_study_config(_file(c, "utf32.toml", TOML.encode("utf-32"))), ConfigError, ("UTF-32",)),
    ("toml-binary", lambda c: load_run_spec(_file(c, "binary.toml", bytes(range(256)))), ConfigError, ("not UTF-8",)),
    ("toml-directory", lambda c: load_run_spec(c["dir"]), ConfigError, ("cannot read config file",)),
    ("toml-import", lambda c: load_run_spec(_file(c, "import.toml", b'model = "os.path:join"\n')), ConfigError, ("allow_import=True", "--allow-import")),
    ("study-toml-import", lambda c: load_study_config(_file(c, "simport.toml", b'model = "os.path:join"\n')), ConfigError, ("allow_import=True",)),
    ("toml-bad-number", lambda c: load_run_spec(_file(c, "inf.toml", b"[train]\nweight_decay = inf\n")), ConfigError, ("train.weight_decay", "finite")),
]

CASES = (
    [pytest.param(lambda c, f=f, v=v: bl.TrainConfig(**{f: v}), ConfigError, (f, w), id=f"train-{f}-{v!r}"[:60])
     for f, v, w in TRAIN]
    + [pytest.param(lambda c, f=f, v=v: bl.StudyConfig(**{f: v}), ConfigError, (f, w), id=f"study-{f}-{v!r}"[:60])
       for f, v, w in STUDY]
    + [pytest.param(call, ConfigError, (w,), id=name) for name, call, w in OTHER_CONFIGS]
    + [pytest.param(call, kind, words, id=name) for name, call, kind, words in ENTRY_POINTS]
)


@pytest.mark.parametrize("call, kind, words", CASES)
def test_bad_input_is_one_batchlab_error_line(ctx, call, kind, words):
    with pytest.raises(BatchlabError) as info:
        call(ctx)
    message = str(info.value)
    assert isinstance(info.value, kind), (type(info.value).__name__, message)
    assert "\n" not in message and message.strip() == message and message
    for word in words:
        assert word in message, (word, message)


def test_corpus_size():
    """The corpus the closing note counts; it only grows."""
    assert len(CASES) >= 150, len(CASES)
