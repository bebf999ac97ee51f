"""Vectorized replicas against their oracle: replica r must reproduce `fit` with config r."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from batchlab.callbacks import EarlyStopping
from batchlab.config import TrainConfig
from batchlab.data import load_dataset
from batchlab.errors import ConfigError
from batchlab.events import Callback, Stop
from batchlab.loop import fit
from batchlab.models import build_model
from batchlab.optim import build_optimizer, init_stacked_state, stacked_chain
from batchlab.replicas import fit_replicas, plan_chunks

PROBES = ["grad_norm", "dist_from_init", "update_norm"]
# Equivalence is checked in float64, where replicas and `fit` agree to ~1e-14 (relative) after 320
# steps whatever the CPU: measured 3e-14 at most on an AMD EPYC, also with torch.backends.mkldnn
# disabled and at 1 or 2 threads. In float32 the two paths drift apart by ~1e-5 after a few hundred
# steps by a CPU-dependent amount (vector width, reduction order), which is no test of meaning.
# A semantic slip (an lr off by one step, a float32 dropout scale) shows as >= 1e-8.
TOLERANCE = 1e-10


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster, and immune to the busy-waiting of a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def blobs():
    return load_dataset("blobs", dtype=torch.float64)


def model_fn(dataset, **options):
    return lambda seed: build_model("mlp", dataset, seed=seed, hidden=[32, 32], **options).double()


def assert_same_table(replica: pd.DataFrame, single: pd.DataFrame, what: str) -> None:
    """Same columns in the same order, same counters exactly, measured values within TOLERANCE."""
    assert list(replica.columns) == list(single.columns), what
    assert replica.shape == single.shape, what
    for column in single.columns:
        if column == "seconds":  # wall time is not reproducible
            continue
        a, b = replica[column].to_numpy(dtype=float), single[column].to_numpy(dtype=float)
        assert np.array_equal(np.isnan(a), np.isnan(b)), f"{what}.{column}: NaN at other places"
        finite = ~np.isnan(b)
        relative = np.abs(a[finite] - b[finite]) / np.maximum(np.abs(b[finite]), 1e-12)
        assert relative.max(initial=0.0) <= TOLERANCE, f"{what}.{column}: relative difference {relative.max():.3g}"


def assert_matches_fit(run, single) -> None:
    assert run.status == single.status
    assert run.clock == single.clock
    for table in ("steps", "evals", "epochs"):
        assert_same_table(getattr(run, table), getattr(single, table), table)


def singles(dataset, configs, make_model, **kwargs):
    return [fit(make_model(c.seed), dataset, c, progress=False, **kwargs) for c in configs]


@pytest.mark.parametrize("optimizer,dropout", [("sgd", 0.0), ("sgd", 0.2), ("adam", 0.0), ("adam", 0.3)])
def test_replica_reproduces_fit(blobs, optimizer, dropout):
    common = dict(batch_size=16, epochs=10, optimizer=optimizer, eval_every=50)  # 320 steps
    if optimizer == "sgd":
        configs = [
            TrainConfig(**common, lr=0.05, momentum=0.9, seed=0),
            TrainConfig(**common, lr=0.1, momentum=0.5, weight_decay=1e-3, seed=1, schedule="cosine", warmup_steps=20),
            TrainConfig(**common, lr=0.02, seed=2, lr_scaling="sqrt"),
        ]
    else:
        configs = [
            TrainConfig(**common, lr=1e-3, seed=0),
            TrainConfig(**common, lr=3e-3, betas=(0.8, 0.99), weight_decay=1e-4, seed=1),
            TrainConfig(**common, lr=1e-2, seed=5, schedule="step", step_epochs=4, gamma=0.5),
        ]
    make_model = model_fn(blobs, dropout=dropout)
    runs = fit_replicas(make_model, blobs, configs, probes=PROBES, progress=False)
    assert len(runs) == 3 and runs.chunks == [3]
    for run, single in zip(runs, singles(blobs, configs, make_model, probes=PROBES)):
        assert run.clock.step == 320
        assert_matches_fit(run, single)
        for mine, theirs in zip(run.model.state_dict().values(), single.model.state_dict().values()):
            torch.testing.assert_close(mine, theirs, rtol=TOLERANCE, atol=1e-12)


def test_batch_norm_replicas_match_fit_and_keep_their_statistics(blobs):
    configs = [TrainConfig(batch_size=32, epochs=8, lr=lr, momentum=0.9, seed=seed)
               for lr, seed in ((0.05, 0), (0.1, 3))]
    make_model = model_fn(blobs, batch_norm=True)
    runs = fit_replicas(make_model, blobs, configs, progress=False)
    for run, single in zip(runs, singles(blobs, configs, make_model)):
        assert_matches_fit(run, single)
        bn, bn_single = run.model[2], single.model[2]  # Flatten, Linear, BatchNorm1d, ...
        torch.testing.assert_close(bn.running_mean, bn_single.running_mean, rtol=TOLERANCE, atol=1e-12)
        torch.testing.assert_close(bn.running_var, bn_single.running_var, rtol=TOLERANCE, atol=1e-12)
        assert int(bn.num_batches_tracked) == int(bn_single.num_batches_tracked) == run.clock.step


def test_diverging_replica_is_masked_and_the_others_carry_on(blobs):
    configs = [TrainConfig(batch_size=16, epochs=4, lr=lr, momentum=0.9, seed=seed)
               for lr, seed in ((0.05, 0), (1e4, 1), (0.02, 2))]
    make_model = model_fn(blobs)
    runs = fit_replicas(make_model, blobs, configs, progress=False)
    expected = singles(blobs, configs, make_model)
    assert [r.status for r in runs] == ["finished", "diverged", "finished"]
    assert expected[1].status == "diverged"
    for run, single in zip(runs, expected):
        assert_matches_fit(run, single)
    assert not math.isfinite(runs[1].steps["batch_loss"].iloc[-1])
    assert runs[1].message == expected[1].message


class StopAtStep(Callback):
    """Stops its run once it has made ``step`` updates (a stand-in for a target condition)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, event):
        return Stop(f"reached step {self.step}") if event.clock.step >= self.step else None


def test_replicas_stop_alone(blobs):
    configs = [TrainConfig(batch_size=16, epochs=6, lr=0.05, momentum=0.9, seed=s) for s in range(3)]
    make_callbacks = {0: lambda: [], 1: lambda: [StopAtStep(45)],
                      2: lambda: [EarlyStopping(monitor="val_loss", patience=0, min_delta=10.0)]}
    make_model = model_fn(blobs)
    runs = fit_replicas(make_model, blobs, configs, callbacks=lambda i, config: make_callbacks[i](), progress=False)
    expected = [fit(make_model(c.seed), blobs, c, callbacks=make_callbacks[i](), progress=False)
                for i, c in enumerate(configs)]
    assert [r.status for r in runs] == ["finished", "stopped", "stopped"]
    assert runs[1].clock.step == 45 and runs[2].clock.epoch == 2  # min_delta 10: no epoch improves
    for run, single in zip(runs, expected):
        assert run.message == single.message
        assert_matches_fit(run, single)


class StopAt(Callback):
    """Stops its run at ``step``, declared (`step_end_steps`): a vectorized pass reads back there alone."""

    def __init__(self, step: int):
        self.step = step
        self.step_end_steps = (step,)

    def on_step_end(self, event):
        return Stop(f"stopped at step {self.step}") if event.clock.step == self.step else None


class Events(Callback):
    """The events a run delivers after its start, as (kind, step); steps as their rows (on_step_end
    is not overridden, so a vectorized pass keeps reading back in bulk)."""

    def __init__(self):
        self.seen: list[tuple[str, int]] = []

    def on_evaluation(self, event):
        self.seen.append(("evaluation", event.clock.step))

    def on_epoch_end(self, event):
        self.seen.append(("epoch_end", event.clock.step))
        self.seen += [("step", row["step"]) for row in event.steps]

    def on_run_end(self, event):
        self.seen.append((f"run_end {event.status}", event.clock.step))
        self.seen += [("step", row["step"]) for row in event.steps]


@pytest.mark.parametrize("stop", [45, 50])  # within epoch 2 (steps 33-64): between evaluations, and at one
def test_a_replica_stopped_mid_epoch_has_the_rows_of_its_fit_while_its_siblings_train_on(blobs, stop):
    """The stopped replica's epoch ends at the stop with an evaluation (unless one was due there) and
    its row, as in fit; its siblings' runs are those of their own fits, which no callback stops."""
    configs = [TrainConfig(batch_size=16, epochs=4, lr=lr, momentum=0.9, eval_every=25, seed=seed)
               for seed, lr in enumerate((0.05, 0.1, 0.02))]  # 500 samples: 32 steps per epoch, 128 in all
    make_model = model_fn(blobs, dropout=0.1)
    events = [Events() for _ in configs]
    runs = fit_replicas(make_model, blobs, configs, probes=PROBES, progress=False,
                        callbacks=lambda i, config: [events[i], *([StopAt(stop)] if i == 1 else [])])
    alone_events = Events()
    alone = fit(make_model(configs[1].seed), blobs, configs[1], probes=PROBES, progress=False,
                callbacks=[alone_events, StopAt(stop)])
    assert runs[1].status == alone.status == "stopped" and runs[1].message == f"stopped at step {stop}"
    assert_matches_fit(runs[1], alone)
    assert events[1].seen == alone_events.seen
    assert runs[1].evals.step.tolist() == [0, 25, 32, stop]  # 45: the stop's own; 50: the one due there
    assert runs[1].epochs.step.tolist() == [32, stop] and runs[1].clock.step_in_epoch == stop - 32
    assert [event for event in events[1].seen if event[0] != "step"][-3:] == [
        ("evaluation", stop), ("epoch_end", stop), ("run_end stopped", stop)]
    siblings = singles(blobs, [configs[0], configs[2]], make_model, probes=PROBES)
    for run, single in zip([runs[0], runs[2]], siblings):
        assert run.status == "finished" and run.clock.step == 128
        assert_matches_fit(run, single)


class InterruptAt(Callback):
    """Ctrl-C (KeyboardInterrupt) at the evaluation of ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_evaluation(self, event):
        if event.clock.step == self.step:
            raise KeyboardInterrupt


def test_an_interrupt_ends_every_replica_still_training_as_interrupted_at_its_step(blobs):
    """As fit: every run still training is ``interrupted at step k``; one stopped before keeps its end."""
    configs = [TrainConfig(batch_size=16, epochs=4, lr=0.05, eval_every=25, seed=seed) for seed in range(3)]
    make_model = model_fn(blobs)
    events = [Events() for _ in configs]
    extra = {0: [StopAt(10)], 1: [InterruptAt(50)], 2: []}
    with pytest.raises(KeyboardInterrupt):
        fit_replicas(make_model, blobs, configs, progress=False, callbacks=lambda i, config: [events[i], *extra[i]])
    ends = [[kind for kind, _ in e.seen if kind.startswith("run_end")] for e in events]
    assert ends == [["run_end stopped"], ["run_end interrupted"], ["run_end interrupted"]]
    assert [next(step for kind, step in e.seen if kind.startswith("run_end")) for e in events] == [10, 50, 50]
    alone = Events()
    with pytest.raises(KeyboardInterrupt):
        fit(make_model(configs[1].seed), blobs, configs[1], progress=False, callbacks=[alone, InterruptAt(50)])
    assert alone.seen == events[1].seen


def test_replicas_of_models_in_eval_mode_train_in_train_mode_as_fit(blobs):
    """fit puts the model in train mode after the step-0 evaluation; the replicas' stacked model too,
    so dropout and batch norm train as in fit whatever mode the models came in."""
    make_model = model_fn(blobs, dropout=0.3, batch_norm=True)

    def in_eval_mode(seed):
        return make_model(seed).eval()

    configs = [TrainConfig(batch_size=32, epochs=2, lr=0.05, seed=seed) for seed in range(2)]
    runs = fit_replicas(in_eval_mode, blobs, configs, progress=False)
    for run, single in zip(runs, singles(blobs, configs, in_eval_mode)):
        assert_matches_fit(run, single)


def test_chunks_follow_the_memory_budget_and_change_nothing(blobs):
    configs = [TrainConfig(batch_size=64, epochs=3, lr=0.05 * (i + 1), seed=i) for i in range(5)]
    make_model = model_fn(blobs)
    whole = fit_replicas(make_model, blobs, configs, progress=False)
    chunked = fit_replicas(make_model, blobs, configs, progress=False,
                           memory_budget=2 * whole.bytes_per_replica + 1)
    assert whole.chunks == [5] and chunked.chunks == [2, 2, 1]
    for a, b in zip(whole, chunked):
        assert_same_table(a.steps, b.steps, "steps")
    assert plan_chunks(10, 100, 350) == [3, 3, 2, 2]
    assert plan_chunks(10, 100, 10_000, chunk_size=4) == [4, 3, 3]


@pytest.mark.parametrize("field,value", [("batch_size", 32), ("optimizer", "adam"), ("epochs", 3)])
def test_configs_that_cannot_share_a_pass_are_refused(blobs, field, value):
    base = TrainConfig(batch_size=16, epochs=2, seed=0)
    with pytest.raises(ConfigError, match=f"replica 1 has {field}="):
        fit_replicas(model_fn(blobs), blobs, [base, base.replace(**{field: value}, seed=1)], progress=False)


def test_unsupported_requests_are_refused_in_one_line(blobs):
    config = TrainConfig(batch_size=16, epochs=1)
    with pytest.raises(ConfigError, match="not available for replicas"):
        fit_replicas(model_fn(blobs), blobs, [config], probes=["noise_scale"], progress=False)
    with pytest.raises(ConfigError, match="one list per replica"):
        fit_replicas(model_fn(blobs), blobs, [config], callbacks=[StopAtStep(3)], progress=False)
    with pytest.raises(ConfigError, match="at least one"):
        fit_replicas(model_fn(blobs), blobs, [], progress=False)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw", "rmsprop"])
def test_stacked_update_is_torch_optim_per_replica(kind):
    """Three replicas with their own hyperparameters against three torch.optim optimizers."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (3,)]
    hyper = [dict(lr=0.1, momentum=0.9, weight_decay=0.01, betas=(0.9, 0.999)),
             dict(lr=0.03, momentum=0.0, weight_decay=0.0, betas=(0.8, 0.99)),
             dict(lr=0.01, momentum=0.5, weight_decay=0.1, betas=(0.5, 0.9))]
    start = [[torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes] for _ in hyper]
    grads = [[[torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes] for _ in hyper] for _ in range(4)]
    references = []
    for h, tensors in zip(hyper, start):
        params = [torch.nn.Parameter(t.clone()) for t in tensors]
        config = TrainConfig(optimizer=kind, lr=h["lr"], momentum=h["momentum"], weight_decay=h["weight_decay"],
                             betas=h["betas"])
        references.append((params, build_optimizer(params, config, h["lr"])))
    stacked = [torch.stack([tensors[i] for tensors in start]) for i in range(len(shapes))]  # each (R, *shape)
    state = {**init_stacked_state(kind, stacked), "step": [torch.zeros((), dtype=torch.float64)]}
    arrays = {"momentum": np.array([h["momentum"] for h in hyper]),
              "weight_decay": np.array([h["weight_decay"] for h in hyper]),
              "beta1": np.array([h["betas"][0] for h in hyper]), "beta2": np.array([h["betas"][1] for h in hyper])}
    for step, step_grads in enumerate(grads, start=1):
        for (params, optimizer), g in zip(references, step_grads):
            for p, gi in zip(params, g):
                p.grad = gi.clone()
            optimizer.step()
        stacked_grads = [torch.stack([g[i] for g in step_grads]) for i in range(len(shapes))]
        stacked_chain(kind, False, arrays).step(stacked, stacked_grads, state,
                                                lr=torch.tensor([h["lr"] for h in hyper], dtype=torch.float64))
    for r, (params, _) in enumerate(references):
        for i, p in enumerate(params):
            torch.testing.assert_close(stacked[i][r], p.detach(), rtol=1e-12, atol=1e-14)


def tied_model_fn(seed: int) -> torch.nn.Module:
    """An MLP whose two hidden 8x8 layers share one weight (a tied parameter, listed once)."""
    torch.manual_seed(seed)
    hidden = torch.nn.Linear(8, 8)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), hidden, torch.nn.ReLU(),
                                torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model[4].weight = hidden.weight
    return model.double()


def test_tied_weights_train_as_in_fit(blobs):
    """Shared weights take the functional_call path, which unties them per replica."""
    configs = [TrainConfig(batch_size=32, epochs=3, lr=lr, momentum=0.9, seed=seed) for lr, seed in ((0.05, 0), (0.1, 1))]
    runs = fit_replicas(tied_model_fn, blobs, configs, progress=False)
    for run, single in zip(runs, singles(blobs, configs, tied_model_fn)):
        assert_matches_fit(run, single)
        assert run.model[4].weight is run.model[2].weight


def test_the_skeleton_keeps_its_own_tensors_after_a_vectorized_step(blobs):
    """The slots swap the stacked tensors in for a call and put the skeleton's own back."""
    from batchlab.loop import plan_run
    from batchlab.replicas.fit import _make_replica
    from batchlab.replicas.vectorized import _Pass

    configs = [TrainConfig(batch_size=16, epochs=1, lr=0.05, seed=s) for s in range(2)]
    clock = plan_run(blobs, configs[0])
    make_model = model_fn(blobs, dropout=0.1)
    replicas = [_make_replica(i, c, make_model(c.seed), [], clock) for i, c in enumerate(configs)]
    state = _Pass(replicas, blobs, clock, [], torch.device("cpu"))
    own = {name: tensor for name, tensor in [*state.skeleton.named_parameters(), *state.skeleton.named_buffers()]}
    state.step(torch.arange(32).reshape(2, 16), clock, measuring=False)
    after = dict([*state.skeleton.named_parameters(), *state.skeleton.named_buffers()])
    assert after.keys() == own.keys()
    assert all(after[name] is tensor for name, tensor in own.items())
    assert all(isinstance(p, torch.nn.Parameter) for _, p in state.skeleton.named_parameters())
