"""batchlab's running_* views equal what Keras 3 itself reports, on the same weights and batches.

Keras is the oracle: the same MLP (weights copied), the same batch order (fed as a generator), the
same optimizer. Its per-batch logs (``on_train_batch_end``) are the running means shown in its
progress bar, and ``History`` holds their value at each epoch end.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")
if keras.backend.backend() != "torch":  # pragma: no cover - another backend was chosen before us
    pytest.skip("keras must run on its torch backend for this test", allow_module_level=True)

from batchlab.config import TrainConfig  # noqa: E402
from batchlab.data import Dataset  # noqa: E402
from batchlab.loop import fit  # noqa: E402
from batchlab.schedule import batch_indices, epoch_order  # noqa: E402

# Both sides compute in float64, so no CPU-dependent float32 drift enters the comparison. What is
# left is Keras' own float32 bookkeeping: its metric trackers accumulate the running means in
# float32 and its optimizer keeps hyperparameters in float32 variables. Measured (float64, this
# file's three cases): logged running means within 9e-8 relative, final weights within 2.3e-8;
# the bounds below are four float32 roundings (4 * 2**-24 = 2.4e-7) and 1e-7 absolute. A wrong
# running mean (e.g. not sample-weighted, or reset at another point) is off by >= 1e-3.
TOLERANCE = 4 * 2.0**-24
WEIGHT_TOLERANCE = 1e-7


@pytest.fixture(autouse=True)
def keras_float64():
    """Both sides in float64: float32 kernels round differently from one CPU to the next."""
    floatx = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx(floatx)


def _problem(n: int, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 1).long()  # 3 classes, not separable by one unit
    return Dataset("toy", (X, y), None, None, n_classes=3)


def _torch_mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).double()


def _keras_twin(model: torch.nn.Sequential):
    twin = keras.Sequential([keras.Input((5,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)])
    weights = []
    for layer in (model[0], model[2]):
        weights += [layer.weight.detach().T.numpy().copy(), layer.bias.detach().numpy().copy()]
    twin.set_weights(weights)
    return twin


class _BatchLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rows = []

    def on_train_batch_end(self, batch, logs=None):
        self.rows.append((float(logs["loss"]), float(logs["accuracy"])))


def _keras_run(model, dataset, config: TrainConfig):
    """Train the Keras twin on exactly the batches batchlab draws for this config."""
    X, y = (t.numpy() for t in dataset.train)
    n, b = dataset.n_train, config.batch_size
    generator = torch.Generator().manual_seed(config.seed)
    batches = []
    for _ in range(config.epochs):
        order = epoch_order(n, generator, config.shuffle)
        batches += [idx.numpy() for idx in batch_indices(order, b, config.drop_last)]
    steps_per_epoch = len(batches) // config.epochs
    twin = _keras_twin(model)
    twin.compile(
        optimizer=keras.optimizers.SGD(learning_rate=config.lr, momentum=config.momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    logs = _BatchLogs()
    history = twin.fit(
        ((X[i], y[i]) for i in batches),
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        callbacks=[logs],
        shuffle=False,  # the generator already yields batchlab's shuffled order
        verbose=0,
    )
    return logs.rows, history.history, twin


@pytest.mark.parametrize(
    ("n", "batch_size", "epochs", "momentum"),
    [
        (100, 32, 3, 0.9),  # a partial last batch of 4 samples
        (24, 1, 2, 0.0),  # B = 1: every step is one sample
        (50, 50, 3, 0.0),  # batch gradient descent: running mean = batch value
    ],
)
def test_running_views_equal_keras_history(n, batch_size, epochs, momentum):
    dataset = _problem(n)
    config = TrainConfig(batch_size=batch_size, epochs=epochs, lr=0.1, momentum=momentum, seed=3)
    model = _torch_mlp(seed=1)
    keras_rows, history, twin = _keras_run(model, dataset, config)

    run = fit(model, dataset, config, progress=False)

    steps = run.steps
    assert len(steps) == len(keras_rows)
    keras_loss, keras_acc = np.array(keras_rows).T
    np.testing.assert_allclose(steps["running_loss"], keras_loss, rtol=TOLERANCE)
    np.testing.assert_allclose(steps["running_acc"], keras_acc, rtol=TOLERANCE)
    np.testing.assert_allclose(run.epochs["running_loss"], history["loss"], rtol=TOLERANCE)
    np.testing.assert_allclose(run.epochs["running_acc"], history["accuracy"], rtol=TOLERANCE)
    # The same training happened: final weights agree.
    final = [p.detach().numpy() for p in (model[0].weight.T, model[0].bias, model[2].weight.T, model[2].bias)]
    for ours, theirs in zip(final, twin.get_weights()):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=WEIGHT_TOLERANCE)


def test_running_mean_differs_from_true_metric():
    """The point of the views: the running mean is not the full-pass metric at epoch end."""
    dataset = _problem(200)
    run = fit(_torch_mlp(0), dataset, TrainConfig(batch_size=10, epochs=2, lr=0.2, seed=0), progress=False)
    gap = (run.epochs["running_loss"] - run.epochs["train_loss"]).abs()
    assert (gap > 1e-3).all()
