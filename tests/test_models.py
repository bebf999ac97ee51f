"""The model zoo: output shapes, seeded initialisation, Keras initialisers, specs and errors."""

from __future__ import annotations

import math
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from batchlab.data import from_arrays, load_dataset
from batchlab.errors import ModelError
from batchlab.models import build_model, list_models, model_from_spec, parse_model_spec


@pytest.fixture(scope="module")
def datasets():
    return {name: load_dataset(name) for name in ("blobs", "digits", "mnist1d")}


def _raises_one_line(fn, *mentions: str) -> str:
    with pytest.raises(ModelError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for mention in mentions:
        assert mention in message, (mention, message)
    return message


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


COMPATIBLE = [
    ("logreg", "blobs"), ("logreg", "digits"), ("logreg", "mnist1d"),
    ("mlp", "blobs"), ("mlp", "digits"), ("mlp", "mnist1d"),
    ("cnn1d", "mnist1d"), ("cnn2d", "digits"),
]


WITH_OPTIONS = [(name, data, {"dropout": 0.2, "batch_norm": True}) for name, data in COMPATIBLE if name != "logreg"]


@pytest.mark.parametrize("name,data,extras", [(n, d, {}) for n, d in COMPATIBLE] + WITH_OPTIONS)
def test_output_shape(datasets, name, data, extras):
    ds = datasets[data]
    model = build_model(name, ds, seed=0, **extras)
    X = ds.train[0][:7]  # (7, *input_shape)
    model.train()
    assert model(X).shape == (7, ds.n_classes)
    model.eval()
    assert model(X).shape == (7, ds.n_classes)


def test_cnn1d_is_the_mnist1d_paper_cnn(datasets):
    model = build_model("cnn1d", datasets["mnist1d"])
    convs = [m for m in model if isinstance(m, nn.Conv1d)]
    assert [(c.kernel_size[0], c.stride[0], c.padding[0], c.out_channels) for c in convs] == [
        (5, 2, 1, 25), (3, 2, 1, 25), (3, 2, 1, 25)]
    assert model[-1].in_features == 125  # 40 -> 19 -> 10 -> 5 steps of 25 channels, as in the paper


def test_cnn1d_accepts_channel_inputs():
    X = torch.randn(6, 3, 32)  # (N, C, L)
    ds = from_arrays(X, np.arange(6) % 2)
    assert build_model("cnn1d", ds, channels=8)(ds.train[0]).shape == (6, 2)


def test_regression_output_width():
    X = np.random.default_rng(0).normal(size=(8, 5))
    one = from_arrays(X, np.linspace(0, 1, 8))
    two = from_arrays(X, np.ones((8, 2)))
    assert build_model("mlp", one, hidden=[4])(one.train[0]).shape == (8, 1)
    assert build_model("logreg", two)(two.train[0]).shape == (8, 2)


@pytest.mark.parametrize("name,data", COMPATIBLE)
def test_seed_fixes_init_and_leaves_global_rng(datasets, name, data):
    ds = datasets[data]
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    a = _params(build_model(name, ds, seed=7))
    assert torch.equal(torch.rand(3), expected_next)  # the caller's RNG stream is untouched
    b = _params(build_model(name, ds, seed=7))
    c = _params(build_model(name, ds, seed=8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_he_uniform_and_keras_init(datasets):
    ds = datasets["blobs"]
    model = build_model("mlp", ds, hidden=[2000], init="keras", seed=0)
    hidden, output = [m for m in model if isinstance(m, nn.Linear)]
    he_bound = math.sqrt(6 / 2)  # fan_in = 2 features
    assert hidden.weight.abs().max() <= he_bound and hidden.weight.abs().max() > 0.95 * he_bound
    assert float(hidden.weight.detach().var()) == pytest.approx(he_bound**2 / 3, rel=0.1)  # var of U(-b, b)
    glorot_bound = math.sqrt(6 / (2000 + 3))
    assert output.weight.abs().max() <= glorot_bound and output.weight.abs().max() > 0.95 * glorot_bound
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in (hidden, output))
    he_all = [m for m in build_model("mlp", ds, hidden=[50], init="he_uniform", seed=0) if isinstance(m, nn.Linear)]
    assert he_all[1].weight.abs().max() <= math.sqrt(6 / 50)


def test_mlp_layers_follow_options(datasets):
    model = build_model("mlp", datasets["blobs"], hidden=[8, 4], activation="tanh", dropout=0.5, batch_norm=True)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Flatten", "Linear", "BatchNorm1d", "Tanh", "Dropout",
                     "Linear", "BatchNorm1d", "Tanh", "Dropout", "Linear"]


@pytest.mark.parametrize("spec,expected", [
    ("mlp", ("mlp", {})),
    ("mlp:", ("mlp", {})),
    ("mlp:hidden=100x100,dropout=0.1,batch_norm=true", ("mlp", {"hidden": [100, 100], "dropout": 0.1, "batch_norm": True})),
    ("mlp:hidden=50,init=keras", ("mlp", {"hidden": 50, "init": "keras"})),
    ("cnn1d:channels=32", ("cnn1d", {"channels": 32})),
    ("MLP: activation = tanh , batch_norm=False", ("mlp", {"activation": "tanh", "batch_norm": False})),
    ("my.pkg:make", ("my.pkg:make", {})),
])
def test_parse_model_spec(spec, expected):
    assert parse_model_spec(spec) == expected


@pytest.mark.parametrize("spec,mention", [
    ("mlp:hidden", "hidden"), ("mlp:dropout=0.1,dropout=0.2", "twice"), (":x=1", "no model name"),
])
def test_parse_model_spec_errors(spec, mention):
    _raises_one_line(lambda: parse_model_spec(spec), mention)


def test_model_from_spec_builds_the_zoo(datasets):
    model = model_from_spec("mlp:hidden=50,init=keras", datasets["blobs"], seed=0)
    assert [m.out_features for m in model if isinstance(m, nn.Linear)] == [50, 3]


def test_custom_model_from_module(tmp_path, monkeypatch, datasets):
    package = tmp_path / "usermodels"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(textwrap.dedent("""
        import torch.nn as nn
        def tiny(dataset, width=3):
            return nn.Sequential(nn.Flatten(), nn.Linear(dataset.input_shape[0], width), nn.Linear(width, dataset.n_classes))
        def not_a_model(dataset):
            return 42
        def broken(dataset):
            raise KeyError("no such layer")
        value = 5
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    ds = datasets["blobs"]
    a = model_from_spec("usermodels.nets:tiny", ds, seed=3, allow_import=True)
    b = model_from_spec("usermodels.nets:tiny", ds, seed=3, allow_import=True)
    assert a(ds.train[0][:4]).shape == (4, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert build_model("usermodels.nets:tiny", ds, width=9, allow_import=True)[1].out_features == 9
    user = lambda name: model_from_spec(name, ds, allow_import=True)  # noqa: E731
    _raises_one_line(lambda: user("usermodels.nets:not_a_model"), "int", "nn.Module")
    _raises_one_line(lambda: user("usermodels.nets:broken"), "usermodels.nets:broken", "KeyError", "no such layer")
    _raises_one_line(lambda: user("usermodels.nets:missing"), "missing")
    _raises_one_line(lambda: user("usermodels.nets:value"), "value")
    _raises_one_line(lambda: user("usermodels.absent:tiny"), "usermodels.absent")
    sys.modules.pop("usermodels.nets", None)
    sys.modules.pop("usermodels", None)


def test_user_code_is_not_imported_without_opt_in(tmp_path, monkeypatch, datasets):
    """Naming a module runs its code on import: without allow_import it is never imported."""
    (tmp_path / "sideeffect.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\ndef net(dataset): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for call in (lambda: build_model("sideeffect.x:net", datasets["blobs"]),
                 lambda: model_from_spec("sideeffect.x:net", datasets["blobs"])):
        message = _raises_one_line(call, "sideeffect.x:net", "allow_import=True", "--allow-import")
        assert "import" in message
    assert not (tmp_path / "ran").exists()
    assert "sideeffect" not in sys.modules


def test_impossible_sizes_are_refused_before_allocating(datasets):
    """A layer whose weights alone exceed the machine's memory is one line, checked on the meta device."""
    from batchlab.models import total_memory

    memory = total_memory(torch.device("cpu"))
    if not memory:
        pytest.skip("the host's memory size is not known here")
    width = memory // (4 * 2) + 1  # one hidden layer: 2 inputs x width float32 weights > memory / 2
    message = _raises_one_line(lambda: build_model("mlp", datasets["blobs"], hidden=[width]), "GiB", "smaller layers")
    assert "mlp" in message
    _raises_one_line(lambda: build_model("cnn1d", datasets["mnist1d"], channels=10**12), "cnn1d", "smaller layers")


def test_model_errors(datasets):
    blobs, digits = datasets["blobs"], datasets["digits"]
    _raises_one_line(lambda: build_model("resnet", blobs), "resnet", "logreg, mlp, cnn1d, cnn2d")
    _raises_one_line(lambda: build_model("mlp", blobs, width=3), "width", "hidden")
    _raises_one_line(lambda: build_model("logreg", blobs, dropout=0.1), "dropout")
    _raises_one_line(lambda: build_model("cnn2d", blobs), "cnn2d", "(2,)")
    _raises_one_line(lambda: build_model("cnn1d", digits), "cnn1d", "(1, 8, 8)")
    _raises_one_line(lambda: build_model("mlp", blobs, dropout=1.0), "dropout")
    _raises_one_line(lambda: build_model("mlp", blobs, hidden=[0]), "hidden")
    _raises_one_line(lambda: build_model("mlp", blobs, activation="swish"), "swish", "relu")
    _raises_one_line(lambda: build_model("mlp", blobs, init="lecun"), "lecun", "keras")
    _raises_one_line(lambda: build_model("mlp", blobs, batch_norm="yes"), "batch_norm")
    _raises_one_line(lambda: build_model("cnn1d", datasets["mnist1d"], channels=0), "channels")
    short = from_arrays(np.zeros((4, 2)), np.arange(4) % 2)  # 2 steps: nothing left after the first conv
    _raises_one_line(lambda: build_model("cnn1d", short), "too short")


def test_list_models():
    rows = {row["name"]: row for row in list_models()}
    assert set(rows) == {"logreg", "mlp", "cnn1d", "cnn2d"}
    assert rows["mlp"]["options"]["hidden"] == [100, 100] and rows["cnn1d"]["options"]["channels"] == 25
    assert all(row["description"] for row in rows.values())
