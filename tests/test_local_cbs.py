"""bl.local_cbs: branches are plain PyTorch continuations, the verdict follows the noise scale, B_simple
is the brute-force one, and the user's model and optimizer are only read.

Every numeric comparison runs in float64 against an independent computation: a hand-written
continuation of the user's own (rebuilt) model and optimizer, closed-form per-sample gradients,
scipy's t-test.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

import batchlab as bl
from batchlab.critical_batch import compare_factors, critical_interval, summary_text
from batchlab.errors import BatchlabError

D_IN = 5


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D_IN, generator=g, dtype=torch.float64)
    y = (X[:, :1] * 2.0 - X[:, 1:2]).tanh() + 0.3 * torch.randn(n, 1, generator=g, dtype=torch.float64)  # (n, 1)
    return X, y


def _user_state(optimizer_class, **hyper):
    """The user's model after three steps at B = 8: a small float64 MLP with batch norm, and its
    optimizer with non-trivial state (momentum buffers, Adam moments, step counts)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(),
                                torch.nn.Linear(8, 1)).double()
    optimizer = optimizer_class(model.parameters(), **hyper)
    X, y = _data(64, seed=1)
    for start in range(0, 24, 8):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(X[start:start + 8]), y[start:start + 8]).backward()
        optimizer.step()
    return model, optimizer


OPTIMIZERS = [
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}, lambda k: k),
    (torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.95)}, math.sqrt),
    (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True}, math.sqrt),
    (torch.optim.RMSprop, {"lr": 0.005, "momentum": 0.5, "centered": True}, math.sqrt),
]


def _plain_continuation(optimizer_class, hyper, lr_scale, batch, samples, seed, train, held):
    """The documented branch, written out: rebuild the user's model and optimizer, scale lr, train on
    the seed's stream (epochs of randperm from one seeded generator) in batches, evaluate in eval mode."""
    model, optimizer = _user_state(optimizer_class, **hyper)
    for group in optimizer.param_groups:
        group["lr"] *= lr_scale
    generator = torch.Generator().manual_seed(seed)
    n = train[0].shape[0]
    stream = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-samples // n))])[:samples]
    model.train()
    torch.manual_seed(seed)
    for index in stream.split(batch):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(train[0][index]), train[1][index]).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model(held[0]), held[1]).item(), optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("optimizer_class, hyper, rule", OPTIMIZERS, ids=["SGD", "Adam", "AdamW", "RMSprop"])
def test_each_branch_is_a_plain_continuation_of_the_users_training(optimizer_class, hyper, rule):
    train, held = _data(48, seed=2), _data(30, seed=3)  # 48 samples: the stream spans several epochs
    model, optimizer = _user_state(optimizer_class, **hyper)
    result = bl.local_cbs(model, optimizer, torch.nn.MSELoss(), train, batch_size=4, factors=(1, 3), seeds=[3, 5],
                          samples=72, eval_data=held, noise_samples=8)
    assert len(result.table) == 4
    for row in result.table.itertuples():
        loss, lr = _plain_continuation(optimizer_class, hyper, rule(row.factor), row.batch_size, 72, row.seed,
                                       train, held)
        assert row.batch_size == 4 * row.factor
        assert row.lr == pytest.approx(hyper["lr"] * rule(row.factor), rel=1e-15) and row.lr == lr
        assert row.loss == pytest.approx(loss, rel=1e-10, abs=0)
    losses = result.table.set_index(["factor", "seed"]).loss
    assert losses[(1, 3)] != losses[(3, 3)] and losses[(1, 3)] != losses[(1, 5)]  # the branches differ


def _snapshot(value):
    """A deep, comparable copy of a state_dict (tensors cloned)."""
    return copy.deepcopy(value)


def _bitwise_equal(a, b) -> bool:
    """Equal to the bit: tensors of one dtype and shape with the same bytes; containers item by item."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_bitwise_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_bitwise_equal(x, z) for x, z in zip(a, b))
    return a == b


@pytest.mark.parametrize("optimizer_class, hyper, rule", OPTIMIZERS[:2], ids=["SGD", "Adam"])
def test_the_users_model_optimizer_and_random_state_are_untouched(optimizer_class, hyper, rule):
    model, optimizer = _user_state(optimizer_class, **hyper)
    model.eval()  # a mode the branches do not use
    before_model, before_optimizer = _snapshot(model.state_dict()), _snapshot(optimizer.state_dict())
    params = list(model.parameters())
    grads = [p.grad.clone() for p in params]  # left by the user's last backward
    rng = torch.get_rng_state()
    bl.local_cbs(model, optimizer, torch.nn.MSELoss(), _data(48, seed=2), batch_size=4, factors=(1, 2), seeds=2,
                 samples=16, noise_samples=8)
    assert _bitwise_equal(model.state_dict(), before_model)
    assert _bitwise_equal(optimizer.state_dict(), before_optimizer)
    assert not model.training and all(p is q for p, q in zip(model.parameters(), params))
    assert all(_bitwise_equal(p.grad, grad) for p, grad in zip(params, grads))
    assert optimizer.param_groups[0]["params"][0] is params[0]
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_bitwise_check_sees_a_change():
    # The check above could pass vacuously; one ulp in one optimizer buffer must fail it.
    model, optimizer = _user_state(torch.optim.Adam, lr=0.01)
    before = _snapshot(optimizer.state_dict())
    state = next(iter(optimizer.state.values()))["exp_avg_sq"]
    state.view(-1)[0] = torch.nextafter(state.view(-1)[0], torch.tensor(1.0, dtype=torch.float64))
    assert not _bitwise_equal(optimizer.state_dict(), before)


# --- the verdict on a problem whose noise scale is known -------------------------------------------


def _closed_form_noise(X, y, w):
    """‖G‖² and tr(Σ) (1/(N−1)) of the mean squared error of y ≈ Xw, from g_i = 2 x_i (x_iᵀw − y_i)."""
    per_sample = 2.0 * X * (X @ w - y)  # (N, d)
    mean = per_sample.mean(dim=0)
    trace_cov = ((per_sample - mean) ** 2).sum() / (X.shape[0] - 1)
    return float(mean.square().sum()), float(trace_cov)


def test_the_verdict_follows_the_gradient_noise_scale_on_linear_regression():
    # y = x·w* + noise, x ~ N(0, I_16): the Hessian of the MSE is 2I, so B_simple is the noise scale
    # B_noise of McCandlish et al. 2018 (their eq. 2.8 with H ∝ I), and their optimal SGD rate at
    # batch B is ε_max/(1 + B_noise/B) with ε_max = 1/λ = 1/2. Started there, the linear rule
    # lr·k keeps the per-sample progress of batch B while kB ≪ B_noise and brings lr·k·λ = kB/(B + B_noise)
    # to the edge of stability, 2, as kB nears 2·B_noise: so 8 and 16 ≪ B_noise pass, 256 and 1024 fail.
    d, n, B = 16, 4096, 4
    g = torch.Generator().manual_seed(1)
    w_star = torch.randn(d, 1, generator=g, dtype=torch.float64)

    def draw(size):
        X = torch.randn(size, d, generator=g, dtype=torch.float64)
        return X, X @ w_star + math.sqrt(6.0) * torch.randn(size, 1, generator=g, dtype=torch.float64)

    train, held = draw(n), draw(n)
    w0 = w_star + torch.randn(d, 1, generator=g, dtype=torch.float64) / math.sqrt(d)
    grad_sq, trace_cov = _closed_form_noise(*train, w0)
    b_noise = trace_cov / grad_sq
    model = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w0.T)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5 / (1 + b_noise / B))
    result = bl.local_cbs(model, optimizer, torch.nn.MSELoss(), train, B, factors=(1, 2, 4, 64, 256), seeds=4,
                          samples=1024, eval_data=held, noise_samples=n)
    assert 90 < b_noise < 160 and result.b_simple == pytest.approx(b_noise, rel=1e-9)
    verdicts = dict(zip(result.tests.batch_size, result.tests.verdict))
    assert all(verdicts[b] == "accepted" for b in (8, 16)) and 16 <= b_noise / 4
    assert all(verdicts[b] == "rejected" for b in (256, 1024)) and 256 >= 2 * b_noise
    assert result.local_cbs == 16 and result.interval == (16, 256)
    assert "[16, 256)" in result.text and "\n" not in result.text


def test_branches_that_cannot_improve_the_loss_are_flagged():
    # Started at the training set's least-squares minimum and evaluated on the training set, no branch
    # can lower the loss: every factor then passes a "no worse" test vacuously, and the text must say so.
    X, y = _data(64, seed=4)
    model = torch.nn.Linear(D_IN, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(X, y).solution.T)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    result = bl.local_cbs(model, optimizer, torch.nn.MSELoss(), (X, y), 2, factors=(1, 2), seeds=3, noise_samples=8)
    assert result.tests.mean_loss.iloc[0] > result.start_loss
    assert "a branch that learned nothing would pass too" in result.text
    moving = bl.local_cbs(model, torch.optim.SGD(model.parameters(), lr=1e-3), torch.nn.MSELoss(),
                          (X, y + 1.0), 2, factors=(1, 2), seeds=3, noise_samples=8)  # far from its minimum
    assert "learned nothing" not in moving.text


# --- B_simple ---------------------------------------------------------------------------------------


def _brute_force_per_sample(model, X, y):
    """(N, P) per-sample gradients, one backward per sample, the model in eval mode."""
    work = copy.deepcopy(model).eval()
    rows = []
    for i in range(X.shape[0]):
        work.zero_grad()
        torch.nn.functional.mse_loss(work(X[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in work.parameters()]))
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("noise_samples", [100, 17])
def test_b_simple_is_the_brute_force_noise_scale_at_the_starting_weights(noise_samples):
    model, optimizer = _user_state(torch.optim.SGD, lr=0.05, momentum=0.9)
    X, y = _data(40, seed=5)
    result = bl.local_cbs(model, optimizer, torch.nn.MSELoss(), (X, y), 2, factors=(1, 2), seeds=2,
                          noise_samples=noise_samples)
    n = 40
    if noise_samples >= n:  # the whole training set: exact values
        rows = _brute_force_per_sample(model, X, y)
        count = n
    else:  # the documented subset, with the finite-population correction of sampling without replacement
        index = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:noise_samples]
        rows, count = _brute_force_per_sample(model, X[index], y[index]), noise_samples
    mean = rows.mean(axis=0)
    trace_cov = ((rows - mean) ** 2).sum() / (count - 1)
    grad_sq = (mean ** 2).sum() - trace_cov * (1 / count - 1 / n)
    assert result.noise_samples == count
    assert result.trace_cov == pytest.approx(trace_cov, rel=1e-10)
    assert result.grad_sq == pytest.approx(grad_sq, rel=1e-10)
    assert result.b_simple == pytest.approx(trace_cov / grad_sq, rel=1e-10)


# --- the test and the interval ---------------------------------------------------------------------


def _table(losses: dict[int, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"factor": k, "batch_size": 10 * k, "lr": 0.1, "seed": s, "loss": value}
                         for k, values in losses.items() for s, value in enumerate(values)])


def test_the_decision_is_scipys_paired_one_sided_t_test_on_log_losses_with_the_stated_margin():
    from scipy import stats

    losses = {1: [1.00, 1.10, 0.95, 1.05], 2: [1.01, 1.12, 0.96, 1.05], 4: [1.20, 1.25, 1.10, 1.30]}
    tests = compare_factors(_table(losses), alpha=0.05, tolerance=0.5).set_index("factor")
    ref = np.log(losses[1])
    margin = 0.5 * np.std(ref, ddof=1)
    for k in (2, 4):
        diff = np.log(losses[k]) - ref
        expected = stats.ttest_1samp(diff - margin, 0.0, alternative="greater")
        assert tests.loc[k, "t"] == pytest.approx(expected.statistic, rel=1e-12)
        assert tests.loc[k, "p_value"] == pytest.approx(expected.pvalue, rel=1e-9)
        assert tests.loc[k, "verdict"] == ("rejected" if expected.pvalue < 0.05 else "accepted")
    assert list(tests.verdict) == ["reference", "accepted", "rejected"]
    assert tests.loc[1, "margin"] == pytest.approx(margin, rel=1e-12)


def test_a_diverged_branch_is_rejected_and_a_later_pass_does_not_extend_the_interval():
    losses = {1: [1.0, 1.1, 0.9], 2: [1.0, 1.1, 0.9], 4: [1.0, math.inf, 0.9], 8: [1.0, 1.1, 0.9]}
    tests = compare_factors(_table(losses), alpha=0.05, tolerance=0.5)
    assert list(tests.verdict) == ["reference", "accepted", "rejected", "accepted"]
    assert critical_interval(tests) == (20, 40)
    assert critical_interval(tests.assign(verdict=["reference", "accepted", "accepted", "accepted"])) == (80, None)


def test_the_text_names_a_larger_batch_that_passed_after_a_rejection():
    table = _table({1: [1.0, 1.1, 0.9], 2: [1.0, 1.1, 0.9], 4: [2.0, 2.2, 1.8], 8: [1.0, 1.1, 0.9]})
    tests = compare_factors(table, alpha=0.05, tolerance=0.5)
    result = dict(tests=tests, table=table, batch_size=10, interval=critical_interval(tests), samples=80,
                  lr_rule="linear", alpha=0.05, tolerance=0.5, start_loss=2.0, b_simple=5.0, noise_samples=8)
    text = summary_text(result, n_train=100, n_eval=100, held_out=False)
    assert "[20, 40)" in text and "mean loss ×2" in text and "Larger batches (80) passed again" in text
    assert "learned nothing" not in text and "100 of the 100 training samples" in text


def test_non_positive_losses_are_compared_on_the_loss_itself():
    losses = {1: [-1.0, -1.1, -0.9], 2: [-1.0, -1.1, -0.9]}
    tests = compare_factors(_table(losses), alpha=0.05, tolerance=0.5)
    assert set(tests.scale) == {"loss"} and tests.margin.iloc[0] == pytest.approx(0.05)


# --- refusals ---------------------------------------------------------------------------------------


class _MySGD(torch.optim.SGD):
    pass


def _refusal(**change):
    model, optimizer = _user_state(torch.optim.SGD, lr=0.05)
    call = dict(model=model, optimizer=optimizer, loss_fn=torch.nn.MSELoss(), train_data=_data(40, seed=6),
                batch_size=4, factors=(1, 2))
    call.update(change)
    if callable(call["optimizer"]) and not isinstance(call["optimizer"], torch.optim.Optimizer):
        call["optimizer"] = call["optimizer"](model)
    with pytest.raises(BatchlabError) as error:
        bl.local_cbs(**call)
    return str(error.value)


@pytest.mark.parametrize("change, words", [
    ({"optimizer": lambda m: torch.optim.Adagrad(m.parameters())}, "SGD, Adam, AdamW or RMSprop, got a Adagrad"),
    ({"optimizer": lambda m: _MySGD(m.parameters(), lr=0.1)}, "got a _MySGD"),
    ({"optimizer": lambda m: torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)}, "not the model's"),
    ({"factors": (2, 4)}, "must include 1"),
    ({"factors": (1,)}, "at least one other factor"),
    ({"factors": (1, 2, 2)}, "each once"),
    ({"factors": (1, 2.5)}, "positive whole numbers"),
    ({"factors": (1, 0)}, "positive whole numbers"),
    ({"factors": 4}, "positive whole numbers"),
    ({"batch_size": 16, "factors": (1, 2, 4)}, "largest branch batch 4×16 = 64 exceeds the 40 training samples"),
    ({"batch_size": 0}, "batch_size must be a positive whole number"),
    ({"seeds": 1}, "at least 2"),
    ({"seeds": [0, 0]}, "distinct"),
    ({"samples": 12}, "multiple of 8"),
    ({"lr_rule": "cubic"}, "lr_rule must be one of"),
    ({"alpha": 1.5}, "alpha"),
    ({"tolerance": -1}, "tolerance"),
    ({"train_data": [torch.zeros(3, 5)]}, "train_data must be (X, y) tensors"),
    ({"train_data": (torch.zeros(3, 5), torch.zeros(4, 1))}, "same positive number of samples"),
    ({"model": "mlp"}, "model must be a torch.nn.Module"),
    ({"noise_samples": 1}, "noise_samples"),
    ({"loss_fn": torch.nn.MSELoss(reduction="none")}, "loss_fn must return the batch's mean loss"),
], ids=lambda v: str(v)[:40] if not isinstance(v, str) else "")
def test_a_bad_request_is_one_line_naming_the_problem(change, words):
    message = _refusal(**change)
    assert "\n" not in message and message.startswith("local_cbs: ") and words in message, message


def test_a_dataset_is_its_train_split_and_progress_is_reported():
    X, y = _data(40, seed=7)
    ds = bl.from_arrays(X.float().numpy(), y.float().numpy())
    model = torch.nn.Linear(D_IN, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    seen = []
    result = bl.local_cbs(model, optimizer, torch.nn.MSELoss(), ds, 2, factors=(1, 2, 4), seeds=2, noise_samples=8,
                          progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 6) for i in range(1, 7)]
    assert result.samples == 8 * 4 * 2 and result.lr_rule == "sqrt"
    assert list(result.table.columns) == ["factor", "batch_size", "lr", "seed", "loss"]


def test_bl_local_cbs_stays_the_function_after_its_module_is_imported():
    import batchlab.critical_batch

    assert bl.local_cbs is batchlab.critical_batch.local_cbs and callable(bl.local_cbs)


def test_a_rate_already_at_the_edge_of_stability_leaves_no_room_to_grow_the_batch():
    # lr = 0.6 on x ~ N(0, I_5): lr·λ ≈ 1.2-1.4 at batch 32 (the Hessian of the MSE is about 2I), stable;
    # lr × 2 at batch 64 pushes lr·λ past 2 and the branches diverge.
    X, y = _data(256, seed=8)
    model = torch.nn.Linear(D_IN, 1, bias=False).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.6)
    result = bl.local_cbs(model, optimizer, torch.nn.MSELoss(), (X, y), 32, factors=(1, 2, 4), seeds=3, noise_samples=8)
    assert result.local_cbs == 32 and result.interval == (32, 64)
    assert list(result.tests.verdict) == ["reference", "rejected", "rejected"]
    assert result.tests.mean_loss.iloc[0] < result.start_loss < result.tests.mean_loss.iloc[1]
    assert "No larger batch was no worse than 32" in result.text and "[32, 64): raising the batch to 64" in result.text


def test_the_documented_example_runs_as_written():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "advise.md").read_text(encoding="utf-8")
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code.replace("print(cbs.text)", "cbs.text"), "docs/advise.md", "exec"), namespace)
    cbs = namespace["cbs"]
    assert len(cbs.table) == 15 and cbs.samples == 8 * 16 * 16
    assert cbs.interval[0] == cbs.local_cbs and cbs.local_cbs in {16, 32, 64, 128, 256}
    assert set(cbs.tests.verdict) <= {"reference", "accepted", "rejected"} and math.isfinite(cbs.b_simple)
    assert "Branched from the current weights at batch 16" in cbs.text


def test_branches_keep_the_users_hooks_and_drop_the_probes():
    """A deep copy keeps a module's hooks; a probe's hook writes into the live run's probe state, so
    branches drop batchlab's hooks (else B_simple's torch.func pass fails) and keep the user's."""
    from batchlab.probes import LinearTaps

    model, optimizer = _user_state(torch.optim.SGD, lr=0.05)
    X, y = _data(64, seed=1)
    calls = []
    model[0].register_forward_hook(lambda module, args, output: calls.append(output.shape[0]))
    linears = [(m, True, True) for m in model if isinstance(m, torch.nn.Linear)]
    taps = LinearTaps(model, linears)  # the noise_scale probe's hooks on the live model
    taps.every_step = True
    result = bl.local_cbs(model, optimizer, torch.nn.functional.mse_loss, (X, y), 8, factors=(1, 2), seeds=2,
                          samples=32)
    assert math.isfinite(result.b_simple)
    assert calls.count(8) == 2 * 4 and calls.count(16) == 2 * 2  # the user's hook ran in every branch step
    assert all(z is None for z in taps.outputs)  # the probe recorded nothing of the branches
