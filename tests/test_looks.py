"""When a run is looked at (`batchlab.looks`), and a compiled run that trains up to each look in one graph.

- `Looks.stretch` against a step-by-step walk that asks, after each update, whether anything looks.
- A compiled ``bl.fit`` whose steps run as one loop per stretch (`train_scan`) gives the eager run's
  tables and weights in float64, through evaluations, probes, a callback's declared steps, a short
  last batch and epoch ends, for SGD with Nesterov momentum and weight decay and for Adam with
  weight decay; at a batch of one (inductor's fused matrix products) too.
- The loop's body updates lists without writing into its inputs (`optim.transforms.functional_lists`):
  each optimizer's chain run that way equals ``torch.optim`` over a whole run.
- A progress display never shortens a stretch: it gets every row, as rows are read back.
"""

from __future__ import annotations

import random

import pandas as pd
import pytest
import torch

import batchlab as bl
from batchlab.callbacks import ProgressBar
from batchlab.compiled import choose
from batchlab.compiled.step import train_scan
from batchlab.compiled.updates import optimizer_as_chain
from batchlab.data import Dataset
from batchlab.events import Callback, Clock, Stop
from batchlab.looks import Looks

# --- the plan --------------------------------------------------------------------------------------


def walked_stretch(looks: Looks, step: int, limit: int) -> int:
    """The stretch by walking: stop after the first update after which something looks."""
    if looks.steps is None or looks.measures(step):
        return 1
    count = 0
    while count < min(limit, looks.window):
        count += 1
        after = step + count
        evaluated = looks.eval_every is not None and after % looks.eval_every == 0
        if evaluated or looks.sees(after) or looks.measures(after):
            break
    return max(count, 1)


def test_a_stretch_ends_at_the_first_look():
    rng = random.Random(4)
    for _ in range(3000):
        looks = Looks(eval_every=rng.choice([None, 1, 3, 7, 50]), probe_every=rng.choice([None, 1, 2, 5, 9]),
                      steps=rng.choice([(), None, tuple(rng.sample(range(200), rng.randint(1, 12)))]),
                      window=rng.choice([1, 4, 16, 256]))
        step, limit = rng.randint(0, 150), rng.randint(1, 80)
        assert looks.stretch(step, limit) == walked_stretch(looks, step, limit), (looks, step, limit)


def test_an_evaluation_is_due_within_an_epoch_only():
    looks = Looks(eval_every=4)
    clock = Clock(n_train=80, batch_size=10, steps_per_epoch=8, total_steps=16, epochs=2)
    due = [s for s in range(1, 17) if looks.evaluates(Clock(**{**clock.__dict__, "step": s,
                                                               "step_in_epoch": (s - 1) % 8 + 1}))]
    assert due == [4, 12]  # 8 and 16 end an epoch, which evaluates there anyway
    assert not Looks().evaluates(clock)


# --- the compiled loop ----------------------------------------------------------------------------

N, B = 100, 16  # 6 full batches and one of 4 per epoch


def dataset() -> Dataset:
    generator = torch.Generator().manual_seed(3)

    def split(n):
        X = torch.randn(n, 8, generator=generator, dtype=torch.float64)
        return X, (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 1).long()

    return Dataset("tiny", split(N), split(32), split(32), n_classes=3)


def model() -> torch.nn.Module:
    return bl.build_model("mlp", dataset(), seed=5, hidden=[16, 12]).double()


CONFIGS = {
    "sgd": dict(optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, schedule="cosine"),
    "adam": dict(optimizer="adam", lr=0.01, weight_decay=1e-3, warmup_steps=4),
}


class Declared(Callback):
    """Looks at the live run after steps 3 and 11 (so a stretch must end there) and keeps the weights' norm."""

    step_end_steps = (3, 11)

    def __init__(self):
        self.norms = {}

    def on_step_end(self, event):
        self.norms[event.clock.step] = float(sum(p.detach().norm() ** 2 for p in event.model.parameters()))


def numbers(table: pd.DataFrame) -> pd.DataFrame:
    return table.drop(columns=[c for c in table.columns if "seconds" in c]).astype(float)


def assert_same_run(compiled: bl.Run, eager: bl.Run, tolerance: float) -> None:
    for table in ("steps", "evals", "epochs"):
        a, b = numbers(getattr(compiled, table)), numbers(getattr(eager, table))
        assert list(a.columns) == list(b.columns) and len(a) == len(b) > 0
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=0, atol=tolerance)
    final = dict(compiled.model.state_dict())
    for name, tensor in eager.model.state_dict().items():
        assert torch.allclose(final[name], tensor, rtol=0, atol=tolerance), name


def fit_both(config: dict, data: Dataset, probes=(), callbacks=()):
    """The eager run and the compiled one, with the compiled step's stretch lengths."""
    steps, lengths = [], []

    class Seen(choose.CompiledStep):
        def __init__(self, *args):
            super().__init__(*args)
            steps.append(self)

        def steps(self, xs, ys, lrs):
            lengths.append(xs.shape[0])
            return super().steps(xs, ys, lrs)

    eager_callbacks, compiled_callbacks = [type(c)() for c in callbacks], [type(c)() for c in callbacks]
    eager = bl.fit(model(), data, bl.TrainConfig(compile="off", **config), probes=list(probes),
                   callbacks=eager_callbacks, progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(choose, "CompiledStep", Seen)
        compiled = bl.fit(model(), data, bl.TrainConfig(compile="on", **config), probes=list(probes),
                          callbacks=compiled_callbacks, progress=False)
    assert len(steps) == 1 and steps[0].scan_reason is None, steps[0].scan_reason
    return eager, compiled, lengths, eager_callbacks, compiled_callbacks


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_a_compiled_run_trains_each_stretch_in_one_loop_and_equals_eager(kind):
    config = dict(batch_size=B, epochs=3, eval_every=7, probe_every=5, seed=7, **CONFIGS[kind])
    eager, compiled, lengths, (seen_eager,), (seen_compiled,) = fit_both(config, dataset(), ["grad_norm"],
                                                                         [Declared()])
    assert_same_run(compiled, eager, 1e-9)
    assert seen_compiled.norms.keys() == {3, 11}
    for step, norm in seen_eager.norms.items():  # the callback saw the weights of its step
        assert seen_compiled.norms[step] == pytest.approx(norm, rel=1e-12)
    # Step 0 is measured (alone, eagerly); steps 1-2 are one loop, ending where the callback looks (3).
    assert lengths[0] == 2 and min(lengths) >= 2 and len(set(lengths)) >= 2
    assert sum(lengths) < len(eager.steps)  # measured steps and stretches of one ran outside a loop


def test_a_batch_of_one_compiles_with_fused_matrix_products_and_equals_eager():
    data = dataset()
    data = Dataset("tiny", (data.train[0][:24], data.train[1][:24]), data.val, data.test, n_classes=3)
    config = dict(batch_size=1, epochs=2, seed=7, **CONFIGS["adam"])
    eager, compiled, lengths, _, _ = fit_both(config, data)
    assert_same_run(compiled, eager, 1e-9)
    assert lengths == [24, 24]  # each epoch one loop: nothing looks inside it


def test_a_progress_bar_never_shortens_a_stretch(monkeypatch):
    class Bar(ProgressBar):  # the real bar's contract, without drawing
        def __init__(self):
            super().__init__()
            self.rows = []

        def on_run_start(self, event):
            return None

        def on_step_end(self, event):
            self.rows.append(event.row["step"])

        def on_epoch_end(self, event):
            return None

        def on_run_end(self, event):
            return None

    config = dict(batch_size=B, epochs=2, seed=7, **CONFIGS["sgd"])
    _, compiled, lengths, _, (bar,) = fit_both(config, dataset(), callbacks=[Bar()])
    assert lengths == [6, 6]  # the epoch's full batches in one loop; its short last batch alone
    assert bar.rows == list(range(1, len(compiled.steps) + 1))


# --- the loop's body: lists updated without writes ------------------------------------------------

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, centered=True, weight_decay=1e-2),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_the_loop_body_equals_torch_optim(kind):
    """`train_scan` run as it is (torch's scan calls the body step by step) against torch.optim."""
    generator = torch.Generator().manual_seed(1)
    xs = torch.randn(12, 5, 6, generator=generator, dtype=torch.float64)
    ys = torch.randint(0, 3, (12, 5), generator=generator)
    lrs = torch.linspace(0.01, 0.05, 12, dtype=torch.float64)
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    theirs = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    theirs.load_state_dict(ours.state_dict())
    chain, state = optimizer_as_chain(OPTIMIZERS[kind](ours.parameters()))
    names = tuple(name for name, _ in ours.named_parameters())
    out = train_scan(ours, names, list(ours.parameters()), state, chain, lrs, xs, ys,
                     torch.nn.functional.cross_entropy, True)
    optimizer = OPTIMIZERS[kind](theirs.parameters())
    losses = []
    for k in range(12):
        for group in optimizer.param_groups:
            group["lr"] = float(lrs[k])
        loss = torch.nn.functional.cross_entropy(theirs(xs[k]), ys[k])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert out.loss.tolist() == pytest.approx(losses, abs=1e-12)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_an_eager_run_reads_its_numbers_once_per_stretch(monkeypatch):
    """Eagerly too, the updates between two looks are made before any of their numbers is read."""
    import batchlab.loop as loop

    lengths = []
    stretch = loop._eager_stretch

    def counted(state, index, lrs):
        lengths.append(len(lrs))
        return stretch(state, index, lrs)

    monkeypatch.setattr(loop, "_eager_stretch", counted)
    data = dataset()
    data = Dataset("tiny", (data.train[0][:96], data.train[1][:96]), data.val, data.test, n_classes=3)
    run = bl.fit(model(), data, bl.TrainConfig(batch_size=16, epochs=2, eval_every=5, seed=7, compile="off",
                                               **CONFIGS["sgd"]),
                 progress=False)
    # 6 batches an epoch: steps 1-5 (an evaluation after 5), 6 (the epoch's end), 7-10 (after 10), 11-12.
    assert lengths == [5, 1, 4, 2]
    assert run.evals["step"].tolist() == [0, 5, 6, 10, 12]


@pytest.mark.parametrize("schedule_options", [dict(), dict(warmup_steps=5), dict(schedule="cosine"),
                                              dict(schedule="step", gamma=0.5, step_epochs=1)])
def test_a_stretchs_learning_rates_are_each_steps(schedule_options):
    from batchlab import schedule

    config = bl.TrainConfig(batch_size=8, epochs=3, lr=0.1, **schedule_options)
    clock = Clock(n_train=80, batch_size=8, steps_per_epoch=10, total_steps=30, epochs=3)
    for step, count in [(0, 10), (3, 4), (5, 5), (12, 8), (29, 1)]:
        done = step // 10
        assert schedule.stretch_lrs(config, clock, step, count, 8, done, 0.1) == [
            schedule.step_lr(config, clock, step + k, 8, done, 0.1) for k in range(count)]


def test_a_row_readers_stop_is_acted_on_after_the_stretch_it_came_in():
    """Every update of a stretch was made, so every one gets its row; a request that a row-reading
    callback makes within the stretch is acted on at its end."""

    class StopAtFour(Callback):
        step_end_live = False

        def on_step_end(self, event):
            return Stop("four") if event.clock.step == 4 else None

    data = dataset()
    data = Dataset("tiny", (data.train[0][:96], data.train[1][:96]), data.val, data.test, n_classes=3)
    run = bl.fit(model(), data, bl.TrainConfig(batch_size=16, epochs=2, eval_every=5, seed=7, compile="off",
                                               **CONFIGS["sgd"]), callbacks=[StopAtFour()], progress=False)
    assert run.status == "stopped" and run.message == "four"
    assert run.steps["step"].tolist() == [1, 2, 3, 4, 5]  # the stretch to the evaluation after step 5
    assert run.evals["step"].tolist() == [0, 5]


def test_only_a_pure_model_trains_its_stretches_as_one_loop():
    """`scannable`: buffers (batch norm) or random numbers in any form (a Dropout module, or
    F.dropout in a forward) keep a model out of the loop; the RNG is where it was after the check."""
    from batchlab.compiled.step import scannable

    class FunctionalDropout(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)

        def forward(self, x):
            return torch.nn.functional.dropout(self.linear(x), 0.5, self.training)

    x = torch.randn(5, 4)
    names = lambda m: tuple(n for n, _ in m.named_parameters())  # noqa: E731
    pure = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    batch_norm = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    dropout = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 3))
    functional = FunctionalDropout()
    state = torch.get_rng_state()
    assert scannable(pure, names(pure), x) is None
    assert "buffers" in scannable(batch_norm, names(batch_norm), x)
    assert "random" in scannable(dropout, names(dropout), x)
    assert "random" in scannable(functional, names(functional), x)
    assert "not one of the model's parameters" in scannable(pure, None, x)
    assert torch.equal(torch.get_rng_state(), state)
