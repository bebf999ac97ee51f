"""A Keras ``fit`` left by Ctrl-C ends its run ``interrupted`` in the store at once (an error: ``failed``).

Keras 3 calls no callback hook when an exception leaves ``fit``; the run must not stay ``running``
for as long as the process (a notebook) lives. The Ctrl-C is raised by a user callback placed after
batchlab's, so batchlab has recorded the batch before the interruption.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest

from batchlab.store import RunStore

keras = pytest.importorskip("keras")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one torch thread for the module


@pytest.fixture(scope="module", autouse=True)
def fresh_keras():
    yield
    keras.utils.clear_session()


def _data(n: int = 100):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n, 2)).astype("float32")
    return X, (X[:, 0] > 0).astype("int64")


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


class RaiseAt(keras.callbacks.Callback):
    """Raises ``error`` at the end of batch ``batch`` of epoch ``epoch`` (both 0-based)."""

    def __init__(self, epoch: int, batch: int, error: BaseException):
        super().__init__()
        self.epoch, self.batch, self.error, self.current = epoch, batch, error, -1

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.current, batch) == (self.epoch, self.batch):
            raise self.error


def _fit_until(path, error, epoch=1, batch=3, **fit):
    from batchlab.integrations.keras import BatchlabCallback

    X, y = _data()
    callback = BatchlabCallback(store=path, name="stopped by hand", batch_size=16)
    model = _model()
    with pytest.raises(type(error)):
        model.fit(X, y, batch_size=16, epochs=3, verbose=0, callbacks=[callback, RaiseAt(epoch, batch, error)], **fit)
    return callback, model


def test_ctrl_c_in_a_later_callback_ends_the_run_interrupted(tmp_path):
    path = tmp_path / "k.db"
    callback, model = _fit_until(path, KeyboardInterrupt())
    last = 7 + 4  # 7 steps per epoch (100 samples, batch 16); batch 3 of epoch 1 is step 11

    with RunStore(path) as store:
        stored = store.load_run(callback.run_id)
    assert stored.status == "interrupted"
    assert stored.steps["step"].tolist() == list(range(1, last + 1))
    assert f"step {last}" in stored.message and "\n" not in stored.message
    assert len(stored.epochs) == 1
    assert callback.run is not None and callback.run.status == "interrupted"
    # The model is left as Keras' own: a fit after the interruption trains and records a new run.
    model.fit(*_data(), batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    with RunStore(path) as store:
        runs = store.list_runs()
    assert sorted(runs["status"].tolist()) == ["finished", "interrupted"]


def test_ctrl_c_during_the_update_ends_the_run_interrupted(tmp_path):
    """A Ctrl-C while Keras computes a step (the usual moment): the rows end at the last whole step."""
    from batchlab.integrations.keras import BatchlabCallback

    X, y = _data()
    model = _model()
    calls = []
    train_function = model.make_train_function() or model.train_function

    def interrupted_on_ninth(data):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return train_function(data)

    model.train_function = interrupted_on_ninth
    path = tmp_path / "k.db"
    callback = BatchlabCallback(store=path, batch_size=16)
    with pytest.raises(KeyboardInterrupt):
        model.fit(X, y, batch_size=16, epochs=3, verbose=0, callbacks=[callback])
    with RunStore(path) as store:
        stored = store.load_run(callback.run_id)
    assert stored.status == "interrupted" and stored.steps["step"].max() == 8 and "step 8" in stored.message
    assert model.train_function is interrupted_on_ninth  # Keras' step is handed back as it was


def test_an_error_in_a_later_callback_ends_the_run_failed_with_its_message(tmp_path):
    path = tmp_path / "k.db"
    callback, _ = _fit_until(path, ValueError("the user's callback broke\nsecond line"), epoch=0, batch=1)
    with RunStore(path) as store:
        stored = store.load_run(callback.run_id)
    assert stored.status == "failed" and stored.steps["step"].max() == 2
    assert "ValueError: the user's callback broke" in stored.message and "step 2" in stored.message
    assert "\n" not in stored.message


class _InterruptedData(keras.utils.PyDataset):
    """Batches of 16 from arrays; the read after ``stop_at`` reads raises Ctrl-C."""

    def __init__(self, X, y, stop_at: int):
        super().__init__()
        self.X, self.y, self.stop_at, self.reads = X, y, stop_at, 0

    def __len__(self):
        return -(-len(self.X) // 16)

    def __getitem__(self, index):
        self.reads += 1
        if self.reads == self.stop_at + 1:
            raise KeyboardInterrupt
        return self.X[index * 16:(index + 1) * 16], self.y[index * 16:(index + 1) * 16]


def test_ctrl_c_while_keras_reads_a_batch_ends_the_run_at_the_next_fit(tmp_path):
    """Keras reads batches outside any call batchlab sees: the run ends when the callback is next used."""
    from batchlab.integrations.keras import BatchlabCallback

    X, y = _data()
    path = tmp_path / "k.db"
    callback, model = BatchlabCallback(store=path, batch_size=16), _model()
    with pytest.raises(KeyboardInterrupt):
        model.fit(_InterruptedData(X, y, stop_at=5), epochs=2, shuffle=False, verbose=0, callbacks=[callback])
    first = callback.recorder.steps[-1]["step"]
    model.fit(X, y, batch_size=16, epochs=1, verbose=0, callbacks=[callback])
    with RunStore(path) as store:
        runs = store.list_runs().sort_values("id")
        stopped = store.load_run(int(runs["id"].iloc[0]))
    assert runs["status"].tolist() == ["interrupted", "finished"]
    assert first > 0 and stopped.steps["step"].max() == first and stopped.message == f"interrupted at step {first}"


def test_two_callbacks_in_one_fit_each_end_their_run_and_hand_keras_back_its_step(tmp_path):
    from batchlab.integrations.keras import BatchlabCallback

    X, y = _data()
    model = _model()
    first, second = (BatchlabCallback(store=tmp_path / f"{i}.db", batch_size=16) for i in (1, 2))
    with pytest.raises(KeyboardInterrupt):
        model.fit(X, y, batch_size=16, epochs=2, verbose=0, callbacks=[first, second, RaiseAt(0, 2, KeyboardInterrupt())])
    assert first.run.status == second.run.status == "interrupted"
    assert first.run.message == second.run.message == "interrupted at step 3"
    model.fit(X, y, batch_size=16, epochs=1, verbose=0, callbacks=[first, second])
    assert first.run.status == second.run.status == "finished"
    assert not hasattr(model.train_function, "batchlab_guard")  # no wrapper left behind


def test_a_keras_callback_that_stops_training_leaves_the_run_stopped(tmp_path):
    """Keras' EarlyStopping ends fit early: the run is ``stopped`` (not ``finished``) with History's epochs."""
    from batchlab.integrations.keras import BatchlabCallback

    X, y = _data()
    path = tmp_path / "k.db"
    callback = BatchlabCallback(store=path, batch_size=16)
    early = keras.callbacks.EarlyStopping(monitor="loss", min_delta=10.0, patience=1)  # no epoch improves by 10
    history = _model().fit(X, y, batch_size=16, epochs=6, verbose=0, callbacks=[callback, early])
    with RunStore(path) as store:
        stored = store.load_run(callback.run_id)
    assert len(history.history["loss"]) == len(stored.epochs) == 2 < 6
    assert stored.status == "stopped" and "step 14" in stored.message
