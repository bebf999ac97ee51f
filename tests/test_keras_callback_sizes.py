"""The Keras callback's batch sizes and training-set size: learned from Keras, checked against it.

Keras' History and per-batch logs are the oracle: the callback's stored running means must equal
them whatever the last batch's size, and sizes it is told that contradict Keras are refused.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest

from batchlab.errors import BatchlabError
from batchlab.store import RunStore

keras = pytest.importorskip("keras")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread for the module


@pytest.fixture(scope="module", autouse=True)
def fresh_keras():
    yield
    keras.utils.clear_session()  # a later set_floatx (the float64 equivalence tests) must take effect


def _data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2)).astype("float32")
    y = (X[:, 0] > 0).astype("int64") + (X[:, 1] > 0.5).astype("int64")  # 3 classes
    return X, y


def _model(lr: float = 0.1):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


class _BatchLogs(keras.callbacks.Callback):
    """Keras' own per-batch running means, as any callback sees them."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def on_train_batch_end(self, batch, logs=None):
        self.rows.append((float(logs["loss"]), float(logs["accuracy"])))


def test_short_last_batch_without_n_train_matches_history(tmp_path):
    """300 samples in batches of 32: nine full batches and one of 12, learned without ``n_train``."""
    from batchlab.integrations.keras import BatchlabCallback

    X, y = _data(300)
    path = tmp_path / "k.db"
    logs = _BatchLogs()
    callback = BatchlabCallback(store=path, batch_size=32)
    history = _model().fit(X, y, batch_size=32, epochs=3, shuffle=True, verbose=0, callbacks=[logs, callback])

    with RunStore(path) as store:
        stored = store.load_run(callback.run_id)
    assert stored.status == "finished"
    steps, epochs = stored.steps, stored.epochs
    assert steps["batch_size"].tolist() == ([32] * 9 + [12]) * 3
    assert steps["samples_seen"].tolist()[-1] == 900
    np.testing.assert_allclose(epochs["running_loss"], history.history["loss"], rtol=1e-6)
    np.testing.assert_allclose(epochs["running_acc"], history.history["accuracy"], rtol=1e-6)
    keras_loss, keras_acc = np.array(logs.rows).T
    np.testing.assert_allclose(steps["running_loss"], keras_loss, rtol=1e-6)
    np.testing.assert_allclose(steps["running_acc"], keras_acc, rtol=1e-6)
    # The run learned the training-set size from its first epoch.
    assert callback.run.clock.n_train == 300


def test_short_last_batch_values_are_the_batch_values():
    """At lr 0 and in order, the last (short) batch's loss and correct count are those of its 12 rows."""
    from batchlab.integrations.keras import BatchlabCallback

    X, y = _data(300, seed=1)
    model = _model(lr=0.0)
    callback = BatchlabCallback(batch_size=32)
    model.fit(X, y, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[callback])
    logits = keras.ops.convert_to_numpy(model(X[288:]))
    loss = float(keras.ops.convert_to_numpy(model.loss(y[288:], logits)))
    last = callback.run.steps.iloc[-1]
    assert last["batch_size"] == 12
    assert last["batch_loss"] == pytest.approx(loss, rel=1e-4)
    assert round(last["batch_acc"] * 12) == int((logits.argmax(1) == y[288:]).sum())


@pytest.mark.parametrize("n_train", [-5, 0, 2.5, True, "300"])
def test_n_train_that_is_no_sample_count_is_refused_at_construction(n_train):
    from batchlab.integrations.keras import BatchlabCallback

    with pytest.raises(BatchlabError, match="n_train") as refused:
        BatchlabCallback(batch_size=32, n_train=n_train)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("n_train", [5000, 288, 100])
def test_n_train_that_contradicts_keras_steps_is_refused_at_fit(tmp_path, n_train):
    """300 samples, batch 32: Keras reports 10 steps per epoch, which hold 289 to 320 samples."""
    from batchlab.integrations.keras import BatchlabCallback

    X, y = _data(300)
    path = tmp_path / "k.db"
    callback = BatchlabCallback(store=path, batch_size=32, n_train=n_train)
    with pytest.raises(BatchlabError, match="n_train") as refused:
        _model().fit(X, y, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
    assert "\n" not in str(refused.value) and "10 steps" in str(refused.value)
    assert not path.exists() or RunStore(path).list_runs().empty  # nothing half-written


def test_n_train_that_contradicts_the_batches_is_refused_at_the_epoch_end(tmp_path):
    """n_train=310 fits 10 steps of 32 but the epoch held 300: refused at the last batch, the run failed."""
    from batchlab.integrations.keras import BatchlabCallback

    X, y = _data(300)
    path = tmp_path / "k.db"
    callback = BatchlabCallback(store=path, batch_size=32, n_train=310)
    with pytest.raises(BatchlabError, match="n_train=310") as refused:
        _model().fit(X, y, batch_size=32, epochs=2, verbose=0, callbacks=[callback])
    assert "300" in str(refused.value)
    with RunStore(path) as store:
        stored = store.load_run(callback.run_id)
    assert stored.status == "failed" and "n_train=310" in stored.message
    assert stored.steps["step"].tolist() == list(range(1, 10))  # the contradicting batch is not recorded


@pytest.mark.parametrize("told", [16, 64])
def test_batch_size_that_contradicts_keras_is_refused(told):
    from batchlab.integrations.keras import BatchlabCallback

    X, y = _data(300)
    callback = BatchlabCallback(batch_size=told)
    with pytest.raises(BatchlabError, match=f"batch_size={told}") as refused:
        _model().fit(X, y, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
    assert "32" in str(refused.value) and "\n" not in str(refused.value)
    assert len(callback.run.steps) == 0  # no step was recorded with a size it was not


def test_data_of_unknown_length_is_refused_in_one_line():
    from batchlab.integrations.keras import BatchlabCallback

    X, y = _data(64)
    callback = BatchlabCallback(batch_size=32)
    with pytest.raises(BatchlabError, match="steps_per_epoch"):
        _model().fit(_Endless(X, y), epochs=1, shuffle=False, verbose=0, callbacks=[callback])


class _Endless(keras.utils.PyDataset):
    """Data whose length Keras does not know (``num_batches`` None): an endless stream."""

    def __init__(self, X, y):
        super().__init__()
        self.X, self.y = X, y

    @property
    def num_batches(self):
        return None

    def __getitem__(self, index):
        start = (index % 2) * 32
        return self.X[start:start + 32], self.y[start:start + 32]


def test_lr_is_the_one_each_update_used_under_a_schedule():
    """Keras' optimizer reports the next update's rate once a step is done; a step row holds its own."""
    from batchlab.integrations.keras import BatchlabCallback

    X, y = _data(100)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=schedule),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    callback = BatchlabCallback(batch_size=32)
    model.fit(X, y, batch_size=32, epochs=2, verbose=0, callbacks=[callback])
    steps = callback.run.steps
    np.testing.assert_allclose(steps["lr"], [0.1 * 0.5**i for i in range(8)], rtol=1e-6)  # update t used 0.1·0.5^(t-1)
    assert callback.run.epochs["lr"].tolist() == [steps["lr"].iloc[3], steps["lr"].iloc[7]]


@pytest.mark.parametrize("loss", ["sparse_categorical_crossentropy", keras.losses.sparse_categorical_crossentropy,
                                  keras.losses.SparseCategoricalCrossentropy()])
def test_eval_data_loss_equals_keras_validation_loss_however_the_loss_is_given(loss):
    """eval_data's val_loss and val_acc are Keras' own validation numbers on the same arrays and weights."""
    from batchlab.integrations.keras import BatchlabCallback

    X, y = _data(100)
    Xv, yv = _data(70, seed=2)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss=loss, metrics=["accuracy"])
    callback = BatchlabCallback(batch_size=32, eval_data={"val": (Xv, yv)})
    history = model.fit(X, y, batch_size=32, epochs=2, verbose=0, validation_data=(Xv, yv), callbacks=[callback])
    evals = callback.run.evals.dropna(subset=["val_loss"]).iloc[1:]  # the epoch ends (step 0 is before training)
    np.testing.assert_allclose(evals["val_loss"], history.history["val_loss"], rtol=1e-6)
    np.testing.assert_allclose(evals["val_acc"], history.history["val_accuracy"], rtol=1e-6)


def test_eval_data_with_a_model_of_several_losses_is_refused_before_the_run():
    from batchlab.integrations.keras import BatchlabCallback

    X, y = _data(64)
    model = _model()
    model.loss = {"a": "mse", "b": "mse"}  # as compile leaves it for a model of two named outputs
    callback = BatchlabCallback(batch_size=32, eval_data={"val": (X, y)})
    with pytest.raises(BatchlabError, match="one loss"):
        model.fit(X, y, batch_size=32, epochs=1, verbose=0, callbacks=[callback])
    assert callback.recorder is None
