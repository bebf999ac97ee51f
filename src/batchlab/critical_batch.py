"""The local critical batch size, measured by branching short runs from the current weights.

B_simple = tr(Σ)/‖G‖² (McCandlish et al. 2018, "An empirical model of large-batch training") is a
proxy for the critical batch size that Merrill et al. 2025 ("Critical batch size revisited") found
to underestimate it under Adam by orders of magnitude. They measure it directly instead: from a
checkpoint trained at batch B, branch short runs at k·B with the learning rate scaled by k (SGD) or
√k (Adam), train every branch on the same number of samples, and take the largest k·B whose loss
is no worse than the batch-B branch's. `local_cbs` does that on the user's own model, optimizer and
data, decides "no worse" with a paired one-sided t-test over seeds, and reports B_simple measured
at the same weights beside it.

Each branch is a plain PyTorch loop on deep copies; the user's model and optimizer are only read.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .checks import is_count, is_whole_number
from .data import Dataset
from .errors import ArgumentError, ConfigError, DataError, ModelError, error_line
from .events import AddMetrics, Callback, Evaluation, RunStart
from .optim import scaling_factor

# The optimizers whose hyperparameters and state a branch can copy, and the learning-rate rule
# "auto" applies to each: linear for SGD (Goyal et al. 2017), square root for the adaptive ones
# (Malladi et al. 2022, "On the SDEs and scaling rules for adaptive gradient algorithms", derive it
# for RMSprop and Adam; Merrill et al. 2025 branch Adam with it).
AUTO_RULES = {torch.optim.SGD: "linear", torch.optim.Adam: "sqrt", torch.optim.AdamW: "sqrt",
              torch.optim.RMSprop: "sqrt"}
LR_RULES = ("auto", "linear", "sqrt", "none")
STEPS_AT_LARGEST = 8  # default budget: this many steps of the largest branch batch
Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LocalCBSResult:
    """What `local_cbs` measured.

    Attributes:
        local_cbs: the largest branch batch size k·B such that it and every smaller factor's branch
            reached a loss not significantly worse than the batch-B branch's (B itself at least).
        interval: ``(largest accepted, smallest rejected)`` batch sizes, the second None when no
            factor was rejected. The local critical batch size lies in [first, second) on the tested
            grid, as far as a test at level ``alpha`` can tell (see `compare_factors`).
        b_simple: B_simple = tr(Σ)/‖G‖² at the starting weights (McCandlish et al. 2018), with
            ``grad_sq`` = ‖G‖² and ``trace_cov`` = tr(Σ) estimated from ``noise_samples`` samples
            (`simple_noise_stats`).
        batch_size: B, the starting batch size.
        samples: training samples each branch used (the same for every branch).
        alpha, tolerance: the test's level and margin (in seed standard deviations).
        lr_rule: the rule applied: ``linear``, ``sqrt`` or ``none``.
        start_loss: the evaluation loss at the starting weights.
        table: one row per branch: ``factor, batch_size, lr, seed, loss`` (``lr`` of the first
            parameter group; ``loss`` the mean evaluation loss after the branch, inf if it diverged).
        tests: one row per factor: ``factor, batch_size, mean_loss, scale, mean_diff, sd_diff,
            margin, t, p_value, verdict`` (``reference``, ``accepted`` or ``rejected``), from
            `compare_factors`.
        text: one paragraph saying what was measured, the verdict and its uncertainty.
    """

    local_cbs: int
    interval: tuple[int, int | None]
    b_simple: float
    grad_sq: float
    trace_cov: float
    noise_samples: int
    batch_size: int
    samples: int
    alpha: float
    tolerance: float
    lr_rule: str
    start_loss: float
    table: pd.DataFrame
    tests: pd.DataFrame
    text: str


def local_cbs(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    train_data: Pair | Dataset,
    batch_size: int,
    factors: Sequence[int] = (1, 2, 4, 8, 16),
    seeds: int | Sequence[int] = 3,
    samples: int | None = None,
    eval_data: Pair | None = None,
    lr_rule: str = "auto",
    alpha: float = 0.05,
    tolerance: float = 0.5,
    eval_samples: int = 8192,
    noise_samples: int = 512,
    progress: Callable[[int, int], None] | None = None,
) -> LocalCBSResult:
    """Measure the local critical batch size at the model's current weights by branching.

    For every seed s and factor k, a branch deep-copies the model and the optimizer (its
    hyperparameters and its state: momentum buffers, Adam moments, step counts), sets every
    parameter group's lr to lr·scale(k), and trains in train mode on batches of k·B samples
    until it has used ``samples`` samples. Seed s fixes one stream of samples — epochs of
    ``torch.randperm(N, generator=torch.Generator().manual_seed(s))`` concatenated — and every
    branch of that seed consumes its first ``samples`` samples in consecutive batches of k·B (a
    batch may span two epochs), so branches of one seed differ only in how the same samples are
    grouped; seed s also seeds dropout. After training, a branch's loss is the mean of
    ``loss_fn`` over ``eval_data`` (or a fixed subset of the training data), in eval mode.
    Then `compare_factors` decides which factors are no worse than k = 1.

    Args:
        model: the model at the point to measure; only read.
        optimizer: its ``torch.optim`` SGD, Adam, AdamW or RMSprop, holding the state of the
            training so far; only read. Its current lr is held constant in the branches.
        loss_fn: the training loss, ``(output, target) -> mean over the batch`` (as
            ``torch.nn.CrossEntropyLoss()`` with its default ``reduction="mean"``).
        train_data: ``(X, y)`` tensors or a ``bl.Dataset`` (its train split).
        batch_size: B, the batch size the model is being trained at.
        factors: the integer factors k to branch at; must include 1, the reference.
        seeds: a number of seeds (0, 1, ...) or the seeds themselves; at least 2.
        samples: training samples per branch; a multiple of every k·B. Default
            ``STEPS_AT_LARGEST`` (8) steps of the largest branch: 8·max(k)·B.
        eval_data: held-out ``(X, y)`` to compare the branches on; default the training data, or
            a fixed random subset of ``eval_samples`` of it when it is larger.
        lr_rule: ``linear`` (lr·k), ``sqrt`` (lr·√k), ``none`` (lr), or ``auto``: linear for
            SGD, sqrt for Adam, AdamW and RMSprop.
        alpha: the one-sided test's level.
        tolerance: "no worse" allows the mean loss to exceed the reference's by up to
            ``tolerance`` × the standard deviation of the reference branches' losses over seeds.
        eval_samples: the size of the training subset used for evaluation without ``eval_data``.
        noise_samples: training samples (a fixed random subset) whose per-sample gradients
            give B_simple; all of them when the training set is no larger.
        progress: called as ``progress(done, total)`` after every branch.

    Returns:
        A `LocalCBSResult`.

    Raises:
        ArgumentError, ConfigError, DataError, ModelError: one line, before any training.
    """
    X, y = _training_pair(train_data)
    n = X.shape[0]
    rule = _lr_rule(optimizer, lr_rule)
    factors, seeds = _check_factors(factors, batch_size, n), _check_seeds(seeds)
    samples = _branch_samples(samples, factors, batch_size)
    _check_test(alpha, tolerance)
    if not is_count(noise_samples) or noise_samples < 2:
        raise ConfigError(f"local_cbs: noise_samples must be a whole number ≥ 2, got {noise_samples!r}")
    evaluation = _evaluation_pair(eval_data, X, y, eval_samples)
    start = _branch_point(model, optimizer)
    start_loss = mean_loss(start.model, loss_fn, evaluation)
    rows: list[dict[str, float]] = []
    for seed in seeds:
        stream = sample_stream(n, samples, seed)
        for k in factors:
            branch_model, branch_optimizer = branch(start, float(scaling_factor(rule, k)))
            train_branch(branch_model, branch_optimizer, loss_fn, (X, y), stream, k * batch_size, seed)
            rows.append({"factor": k, "batch_size": k * batch_size, "lr": float(branch_optimizer.param_groups[0]["lr"]),
                         "seed": seed, "loss": mean_loss(branch_model, loss_fn, evaluation)})
            if progress is not None:
                progress(len(rows), len(seeds) * len(factors))
    table = pd.DataFrame(rows, columns=["factor", "batch_size", "lr", "seed", "loss"])
    tests = compare_factors(table, alpha, tolerance)
    lower, upper = critical_interval(tests)
    grad_sq, trace_cov, used = simple_noise_stats(start.model, loss_fn, X, y, noise_samples)
    b_simple = trace_cov / grad_sq if grad_sq > 0 else math.inf
    result = dict(local_cbs=lower, interval=(lower, upper), b_simple=b_simple, grad_sq=grad_sq, trace_cov=trace_cov,
                  noise_samples=used, batch_size=batch_size, samples=samples, alpha=alpha, tolerance=tolerance,
                  lr_rule=rule, start_loss=start_loss, table=table, tests=tests)
    return LocalCBSResult(**result, text=summary_text(result, n, evaluation[0].shape[0], eval_data is not None))


# --- checking the request ------------------------------------------------------------------------


def _training_pair(train_data: Pair | Dataset) -> Pair:
    if isinstance(train_data, Dataset):
        return train_data.train
    if (isinstance(train_data, (tuple, list)) and len(train_data) == 2
            and all(isinstance(t, torch.Tensor) for t in train_data)):
        X, y = train_data
        if X.shape[0] != y.shape[0] or X.shape[0] == 0:
            raise DataError(f"local_cbs: train_data's X and y must hold the same positive number of samples, "
                            f"got {X.shape[0]} and {y.shape[0]}")
        return X, y
    raise ArgumentError("local_cbs: train_data must be (X, y) tensors or a bl.Dataset, "
                        f"got a {type(train_data).__name__}")


def _lr_rule(optimizer: torch.optim.Optimizer, lr_rule: str) -> str:
    if type(optimizer) not in AUTO_RULES:  # a subclass may update differently from what a branch copies
        raise ArgumentError(f"local_cbs: optimizer must be a torch.optim SGD, Adam, AdamW or RMSprop, "
                            f"got a {type(optimizer).__name__}")
    if lr_rule not in LR_RULES:
        raise ConfigError(f"local_cbs: lr_rule must be one of {', '.join(LR_RULES)}, got {lr_rule!r}")
    return AUTO_RULES[type(optimizer)] if lr_rule == "auto" else lr_rule


def check_branch_settings(factors: Sequence[int], seeds: int | Sequence[int], lr_rule: str, alpha: float,
                          tolerance: float, samples: int | None = None, eval_samples: int = 1,
                          noise_samples: int = 2) -> tuple[list[int], list[int]]:
    """The checks of `local_cbs` that need neither the model nor the data (for `batchlab.LocalCBS`,
    which refuses bad settings when it is made rather than at every measurement).

    Returns:
        The factors, ascending, and the seeds.

    Raises:
        ConfigError: one line, as `local_cbs` would.
    """
    if lr_rule not in LR_RULES:
        raise ConfigError(f"local_cbs: lr_rule must be one of {', '.join(LR_RULES)}, got {lr_rule!r}")
    _check_test(alpha, tolerance)
    for name, value, least in (("samples", samples, 1), ("eval_samples", eval_samples, 1),
                               ("noise_samples", noise_samples, 2)):
        if value is not None and not (is_count(value) and value >= least):
            raise ConfigError(f"local_cbs: {name} must be a whole number ≥ {least}, got {value!r}")
    return _factor_list(factors), _check_seeds(seeds)


def _check_factors(factors: Sequence[int], batch_size: int, n: int) -> list[int]:
    if not is_count(batch_size):
        raise ConfigError(f"local_cbs: batch_size must be a positive whole number, got {batch_size!r}")
    values = _factor_list(factors)
    if max(values) * batch_size > n:
        raise DataError(f"local_cbs: the largest branch batch {max(values)}×{batch_size} = "
                        f"{max(values) * batch_size} exceeds the {n} training samples; lower batch_size or factors")
    return values


def _factor_list(factors: Sequence[int]) -> list[int]:
    values = list(factors) if isinstance(factors, (list, tuple)) else None
    if values is None or not all(is_count(k) for k in values):
        raise ConfigError(f"local_cbs: factors must be a list of positive whole numbers such as (1, 2, 4, 8), "
                          f"got {factors!r}")
    if 1 not in values or len(set(values)) != len(values) or len(values) < 2:
        raise ConfigError(f"local_cbs: factors must include 1 (the reference) and at least one other factor, "
                          f"each once, got {tuple(values)}")
    return sorted(int(k) for k in values)


def _check_seeds(seeds: int | Sequence[int]) -> list[int]:
    values = (list(range(int(seeds))) if is_count(seeds)
              else list(seeds) if isinstance(seeds, (list, tuple)) else None)
    if (values is None or len(values) < 2 or len(set(values)) != len(values)
            or not all(is_whole_number(s) and s >= 0 for s in values)):
        raise ConfigError(f"local_cbs: seeds must be a number of seeds (at least 2, for a test over seeds) "
                          f"or a list of distinct non-negative whole numbers, got {seeds!r}")
    return [int(s) for s in values]


def _branch_samples(samples: int | None, factors: list[int], batch_size: int) -> int:
    unit = math.lcm(*factors) * batch_size
    if samples is None:  # STEPS_AT_LARGEST steps of the largest batch, rounded up to a multiple of every batch
        return -(-STEPS_AT_LARGEST * max(factors) * batch_size // unit) * unit
    if not is_count(samples) or samples % unit:
        raise ConfigError(f"local_cbs: samples must be a positive multiple of every branch batch "
                          f"(a multiple of {unit}), got {samples!r}")
    return int(samples)


def _check_test(alpha: float, tolerance: float) -> None:
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise ConfigError(f"local_cbs: alpha must be a level between 0 and 1 such as 0.05, got {alpha!r}")
    if not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ConfigError(f"local_cbs: tolerance must be a number ≥ 0 (in seed standard deviations), "
                          f"got {tolerance!r}")


def _evaluation_pair(eval_data: Pair | None, X: torch.Tensor, y: torch.Tensor, eval_samples: int) -> Pair:
    """The data every branch is evaluated on: ``eval_data``, else the training data or a fixed subset."""
    if eval_data is not None:
        return _training_pair(eval_data)
    if not is_count(eval_samples):
        raise ConfigError(f"local_cbs: eval_samples must be a positive whole number, got {eval_samples!r}")
    if X.shape[0] <= eval_samples:
        return X, y
    index = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))[:eval_samples].to(X.device)
    return X[index], y[index]


# --- branches ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BranchPoint:
    """Everything a branch starts from, detached from the user's objects: a deep copy of the model,
    of the optimizer's state dict (hyperparameters and state), its class, and each parameter group's
    parameters as positions in ``model.parameters()``."""

    model: torch.nn.Module
    optimizer_state: dict
    optimizer_class: Callable[..., torch.optim.Optimizer]  # SGD, Adam, AdamW or RMSprop
    groups: list[list[int]]


def _branch_point(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> BranchPoint:
    """The `BranchPoint` of the user's model and optimizer; they are only read."""
    if not isinstance(model, torch.nn.Module):
        raise ArgumentError(f"local_cbs: model must be a torch.nn.Module, got a {type(model).__name__}")
    position = {id(p): i for i, p in enumerate(model.parameters())}
    groups = [[position.get(id(p), -1) for p in group["params"]] for group in optimizer.param_groups]
    if any(i < 0 for group in groups for i in group):
        raise ModelError("local_cbs: the optimizer updates tensors that are not the model's parameters; "
                         "pass the optimizer built on model.parameters()")
    try:
        copied = copy.deepcopy(model)
        state = copy.deepcopy(optimizer.state_dict())
    except Exception as error:  # a model holding an uncopyable object (a lock, a file handle)
        raise ModelError(f"local_cbs: the model or optimizer cannot be deep-copied ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from None
    return BranchPoint(_without_probe_hooks(copied), state, type(optimizer), groups)


def _without_probe_hooks(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (a copy) without the forward hooks batchlab's probes put on the live model.

    A deep copy keeps a module's hooks, and a probe's hook is a closure over the live run's probe
    state (copied by reference): in a branch it would record the branch's activations into the
    run's probe and keep their gradients (which `torch.func` refuses). The user's own hooks stay.
    """
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [key for key, hook in hooks.items()
                        if getattr(hook, "__module__", "").startswith("batchlab.")]:
                del hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
    return model


def branch(start: BranchPoint, lr_scale: float) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A fresh copy of the starting model and optimizer (same hyperparameters and state), every
    parameter group's lr multiplied by ``lr_scale``."""
    model = copy.deepcopy(start.model)
    params = list(model.parameters())
    settings = [{key: value for key, value in group.items() if key != "params"}
                for group in start.optimizer_state["param_groups"]]
    optimizer = start.optimizer_class([{**setting, "params": [params[i] for i in group]}
                                       for setting, group in zip(settings, start.groups)])
    optimizer.load_state_dict(copy.deepcopy(start.optimizer_state))  # a copy: loading may alias its tensors
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * lr_scale
    return model, optimizer


def sample_stream(n: int, samples: int, seed: int) -> torch.Tensor:
    """The first ``samples`` sample indices of seed ``seed``'s stream: epochs of
    ``torch.randperm(n)`` from one generator seeded with ``seed``, concatenated. (samples,) int64."""
    generator = torch.Generator().manual_seed(seed)
    epochs = [torch.randperm(n, generator=generator) for _ in range(-(-samples // n))]
    return torch.cat(epochs)[:samples]


def train_branch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn, data: Pair,
                 stream: torch.Tensor, batch: int, seed: int) -> None:
    """Train in place on ``stream`` in consecutive batches of ``batch`` samples, dropout seeded by
    ``seed`` (the caller's random state is left as it was). A diverging branch is not stopped: its
    non-finite gradients make the weights NaN, and its evaluation loss counts as +inf (`mean_loss`);
    not testing every loss spares a device synchronisation per step."""
    X, y = data
    devices = [X.device] if X.device.type == "cuda" else []
    model.train()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for index in stream.to(X.device).split(batch):  # (batch,) each
            loss = loss_fn(model(X[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def mean_loss(model: torch.nn.Module, loss_fn, data: Pair) -> float:
    """The mean of ``loss_fn`` over ``data`` in eval mode (`metrics.evaluate`, the one full-split
    evaluation); +inf where it is not finite, so that a diverged branch counts as worse."""
    from .metrics import evaluate

    def summed(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # evaluate sums a per-sample loss; the batch's mean loss times its size is that sum.
        value = loss_fn(output, target)
        if not isinstance(value, torch.Tensor) or value.ndim != 0:
            raise ArgumentError("local_cbs: loss_fn must return the batch's mean loss as a 0-d tensor, as "
                                "torch.nn.MSELoss() or torch.nn.CrossEntropyLoss() do with reduction='mean'")
        return value * output.shape[0]

    loss, _ = evaluate(model, data, summed, False)
    return loss if math.isfinite(loss) else math.inf


# --- the decision --------------------------------------------------------------------------------


def compare_factors(table: pd.DataFrame, alpha: float, tolerance: float) -> pd.DataFrame:
    """For each factor k, whether its branches' losses are significantly worse than k = 1's.

    The test runs on the log of the loss when every loss is positive (so that "worse" is relative
    and one diverged seed, 1000 times worse, cannot hide behind its own spread), else on the loss.
    Branches of one seed share their samples, so it is paired: d_s = f(loss(k, s)) − f(loss(1, s)),
    f = log or the identity. With margin δ = ``tolerance`` × sd_s f(loss(1, s)), H0: E[d] ≤ δ
    ("no worse") is tested against H1: E[d] > δ by the one-sided t statistic
    t = (mean d − δ)/(sd d/√S) with S − 1 degrees of freedom; k is rejected when p < ``alpha``, or
    when any of its branches diverged (a non-finite loss) while the reference's did not. With
    sd d = 0, k is rejected iff mean d > δ.

    Returns:
        One row per factor, ascending: factor, batch_size, mean_loss (the plain mean over seeds),
        scale (``log`` or ``loss``), mean_diff and sd_diff (of d), margin, t, p_value, verdict.
    """
    from scipy.special import stdtr  # Student's t CDF; lighter to import than scipy.stats

    losses = table.pivot(index="seed", columns="factor", values="loss")  # (S, K)
    scale = "log" if bool((losses.to_numpy() > 0).all()) else "loss"
    compared = np.log(losses.to_numpy()) if scale == "log" else losses.to_numpy()  # (S, K)
    reference = compared[:, 0]  # factors ascend, 1 first
    margin = tolerance * float(np.std(reference, ddof=1)) if np.all(np.isfinite(reference)) else math.inf
    rows = []
    for column, k in enumerate(losses.columns):
        with np.errstate(invalid="ignore"):  # inf − inf (both branches diverged) is NaN: not finite, rejected
            diff = compared[:, column] - reference
        finite = bool(np.all(np.isfinite(diff)))
        mean, sd = (float(diff.mean()), float(diff.std(ddof=1))) if finite else (math.inf, math.nan)
        if not finite:
            t, p = math.inf, 0.0
        elif sd > 0:
            t = (mean - margin) / (sd / math.sqrt(diff.size))
            p = float(stdtr(diff.size - 1, -t))  # P(T > t)
        else:
            t, p = (math.inf, 0.0) if mean > margin else (-math.inf, 1.0)
        verdict = "reference" if k == 1 else "rejected" if p < alpha else "accepted"
        rows.append({"factor": int(k), "batch_size": int(table.loc[table.factor == k, "batch_size"].iloc[0]),
                     "mean_loss": float(losses[k].mean()), "scale": scale, "mean_diff": mean, "sd_diff": sd,
                     "margin": margin, "t": t, "p_value": p, "verdict": verdict})
    return pd.DataFrame(rows)


def critical_interval(tests: pd.DataFrame) -> tuple[int, int | None]:
    """(largest batch accepted with every smaller factor, the first rejected batch or None)."""
    lower = int(tests.batch_size.iloc[0])
    for row in tests.itertuples():
        if row.verdict == "rejected":
            return lower, int(row.batch_size)
        lower = int(row.batch_size)
    return lower, None


# --- B_simple at the same weights ----------------------------------------------------------------


def simple_noise_stats(model: torch.nn.Module, loss_fn, X: torch.Tensor, y: torch.Tensor,
                       noise_samples: int) -> tuple[float, float, int]:
    """‖G‖², tr(Σ) and the samples used, from the per-sample gradients (eval mode, ``torch.func``)
    of a fixed random subset of ``noise_samples`` training samples (all of them if N is no larger):
    `batchlab.probes.per_sample_estimates`, unbiased for the whole training set's values, with Σ
    normalised by 1/(N−1); B_simple = tr(Σ)/‖G‖² (McCandlish et al. 2018)."""
    from .gradnorm import per_sample_gradients
    from .probes import per_sample_estimates

    n = X.shape[0]
    index = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:noise_samples].to(X.device)
    if noise_samples >= n:
        index = torch.arange(n, device=X.device)
    per_sample = per_sample_gradients(model, X[index], y[index], loss_fn, chunk_size=64)  # (S, P)
    grad_sq, trace_cov = per_sample_estimates(per_sample, float(n))
    return float(grad_sq), float(trace_cov), int(index.numel())


# --- the paragraph -------------------------------------------------------------------------------


def _improvement(start_loss: float, reference: pd.Series, scale: str) -> float:
    """How far the reference branches lowered the loss, on the test's scale (mean over seeds)."""
    if scale == "log":
        return math.log(start_loss) - float(np.log(reference).mean()) if start_loss > 0 else -math.inf
    return start_loss - float(reference.mean())


def _setup_sentence(result: dict, n_train: int, n_eval: int, held_out: bool) -> str:
    tests, seeds = result["tests"], result["table"].seed.nunique()
    rule = {"linear": "lr × k", "sqrt": "lr × √k", "none": "lr unchanged"}[result["lr_rule"]]
    where = f"{n_eval} held-out samples" if held_out else f"{n_eval} of the {n_train} training samples"
    return (f"Branched from the current weights at batch {result['batch_size']}: batch sizes "
            f"{', '.join(str(b) for b in tests.batch_size)} × {seeds} seeds, each trained on {result['samples']} "
            f"samples ({rule}), then evaluated on {where}.")


def _verdict_sentence(result: dict) -> str:
    tests, B = result["tests"], result["batch_size"]
    (lower, upper), reference = result["interval"], tests.iloc[0]
    allowed = (f"{math.expm1(reference.margin):.2%} of the loss" if reference.scale == "log"
               else f"{reference.margin:.3g} in loss")
    verdict = (f"{f'Batches up to {lower} were' if lower > B else 'No larger batch was'} no worse than {B} "
               f"(paired one-sided t-test over seeds"
               f"{' on the log loss' if reference.scale == 'log' else ''}, α = {result['alpha']:g}, tolerating "
               f"{result['tolerance']:g} × the seed spread: {allowed})")
    if upper is None:
        return (f"{verdict}, and none was worse: the local critical batch size is at least {lower}; branch at "
                f"larger factors to find where it ends.")
    worse = tests[tests.batch_size == upper].iloc[0]
    by = ("a branch diverged" if not math.isfinite(worse.mean_diff)
          else f"mean loss ×{math.exp(worse.mean_diff):.3g}" if worse.scale == "log"
          else f"mean loss {worse.mean_diff:+.3g}")
    then = (f"from here, batch {lower} with the lr rule above reaches batch {B}'s loss (within the tolerance) from "
            f"the same samples in {lower // B}× fewer steps." if lower > B else
            f"raising the batch to {upper} here (with the lr rule above) already costs loss at equal samples; stay "
            f"at {B}.")
    return (f"{verdict}; {upper} was worse ({by}, p = {worse.p_value:.2g}). So the local critical batch size is in "
            f"[{lower}, {upper}): {then}")


def _caveats(result: dict) -> list[str]:
    tests, table, B = result["tests"], result["table"], result["batch_size"]
    upper, reference = result["interval"][1], result["tests"].iloc[0]
    caveats = []
    later = [int(b) for b, verdict in zip(tests.batch_size, tests.verdict)
             if upper is not None and b > upper and verdict == "accepted"]
    if later:
        caveats.append(f"Larger batches ({', '.join(map(str, later))}) passed again, so the verdict near {upper} is "
                       f"noisy; more seeds would settle it.")
    if _improvement(result["start_loss"], table.loss[table.factor == 1], reference.scale) <= reference.margin:
        caveats.append(f"But the batch-{B} branches lowered the loss (from {result['start_loss']:.4g} to "
                       f"{reference.mean_loss:.4g}) by no more than the tolerance, so a branch that learned nothing "
                       f"would pass too: give the branches more samples.")
    return caveats


def summary_text(result: dict, n_train: int, n_eval: int, held_out: bool) -> str:
    """One paragraph: what was measured, the verdict, its uncertainty, and what to do."""
    noise = (f"B_simple = tr(Σ)/‖G‖² at the same weights is {result['b_simple']:.3g} (from "
             f"{result['noise_samples']} samples), a cheaper proxy that can sit far below the critical batch "
             f"(Merrill et al. 2025). Both hold for this point of training only; measure again later.")
    parts = [_setup_sentence(result, n_train, n_eval, held_out), _verdict_sentence(result), *_caveats(result), noise]
    return " ".join(parts)


# --- from measurements along a run to a batch size -----------------------------------------------

# How the learning rate follows the batch, by optimizer name (TrainConfig's): the rule `local_cbs`
# branches with under lr_rule="auto".
RULE_BY_OPTIMIZER = {kind.__name__.lower(): rule for kind, rule in AUTO_RULES.items()}  # "sgd" -> "linear", ...
PREDICTION_MODEL = ("steps to a given loss S(B) = S_min·(1 + B_crit/B) (McCandlish et al. 2018), with B_crit taken "
                    "as the local critical batch size measured at the start of each range")


@dataclass(frozen=True)
class BatchAdvice:
    """A batch size (or a ramp of them) and its learning rate, from local CBS measured along a run.

    Attributes:
        batch_size, lr, lr_rule: the run's batch size B, its base learning rate at B, and the rule
            the lr follows the batch by (``linear`` or ``sqrt``).
        points: one row per measurement: ``step, samples_seen, local_cbs, local_cbs_upper`` (inf
            when no tested batch was worse), ``b_simple``.
        ramp: one dict per range of samples seen: ``from_samples, to_samples`` (None for the last,
            open range), ``batch_size, lr``. One range: a constant batch size.
        run_steps, run_samples: the run's steps and samples over the measured span (first to last
            measurement).
        predicted_steps, predicted_samples: the estimate of `PREDICTION_MODEL` for the ramp over
            the same span, reaching the same loss.
        text: the recommendation in words.
    """

    batch_size: int
    lr: float
    lr_rule: str
    points: pd.DataFrame
    ramp: list[dict]
    run_steps: int
    run_samples: int
    predicted_steps: float
    predicted_samples: float
    text: str


def advise_batch_size(evals: pd.DataFrame, batch_size: int, lr: float, optimizer: str) -> BatchAdvice:
    """Turn the ``local_cbs`` columns of a run's evaluation rows (`batchlab.LocalCBS`) into advice.

    From each measurement on, the batch is the smallest local CBS measured from there to the end
    (a ramp never goes above a later measurement, so one noisy high point does not raise it); where
    that is the same everywhere, it is one batch size. Each batch's lr is ``lr`` scaled from B by
    the optimizer's rule (linear for SGD, square root for Adam, AdamW and RMSprop). The saving is
    predicted over the run's measured span with `PREDICTION_MODEL`: a range the run trained in
    S steps at B needs S' = S·(1 + B_crit/B')/(1 + B_crit/B) steps at B', and the samples it saw
    times S'·B'/(S·B) — an estimate, not a measurement.

    Args:
        evals: the run's evals table with ``step, samples_seen, local_cbs, local_cbs_upper,
            b_simple_at_branch``; rows without a measurement are skipped.
        batch_size, lr: the run's batch size and its base learning rate at that batch size.
        optimizer: ``sgd``, ``adam``, ``adamw`` or ``rmsprop``.

    Raises:
        DataError: no evaluation row holds a measurement.
    """
    if "local_cbs" not in evals or not evals.local_cbs.notna().any():
        raise DataError("advise: no local critical batch size was measured in this run; nothing to advise from")
    rows = evals[evals.local_cbs.notna()].sort_values("step")
    points = pd.DataFrame({"step": rows.step.astype(int), "samples_seen": rows.samples_seen.astype(int),
                           "local_cbs": rows.local_cbs.astype(int), "local_cbs_upper": rows.local_cbs_upper,
                           "b_simple": rows.b_simple_at_branch}).reset_index(drop=True)
    rule = RULE_BY_OPTIMIZER[optimizer]
    chosen = points.local_cbs[::-1].cummin()[::-1].astype(int)  # the smallest from each point on
    ramp = _ramp(points.samples_seen, chosen, batch_size, lr, rule)
    run_steps, predicted_steps, predicted_samples = _predicted(points, chosen, batch_size)
    run_samples = int(points.samples_seen.iloc[-1] - points.samples_seen.iloc[0])
    advice = dict(batch_size=batch_size, lr=lr, lr_rule=rule, points=points, ramp=ramp, run_steps=run_steps,
                  run_samples=run_samples, predicted_steps=predicted_steps, predicted_samples=predicted_samples)
    return BatchAdvice(**advice, text=advice_text(advice))


def _ramp(samples_seen: pd.Series, chosen: pd.Series, batch_size: int, lr: float, rule: str) -> list[dict]:
    """Consecutive measurements with the same batch merged into one range of samples seen."""
    rows: list[dict] = []
    for start, batch in zip(samples_seen, chosen):
        if rows and rows[-1]["batch_size"] == batch:
            continue
        if rows:
            rows[-1]["to_samples"] = int(start)
        rows.append({"from_samples": int(start), "to_samples": None, "batch_size": int(batch),
                     "lr": lr * scaling_factor(rule, batch / batch_size)})
    return rows


def _predicted(points: pd.DataFrame, chosen: pd.Series, batch_size: int) -> tuple[int, float, float]:
    """(run's steps, predicted steps, predicted samples) between the first and last measurement."""
    run_steps, steps, samples = 0, 0.0, 0.0
    for i in range(len(points) - 1):
        span = int(points.step[i + 1] - points.step[i])  # steps the run took at B over this range
        seen = float(points.samples_seen[i + 1] - points.samples_seen[i])  # less than span·B after a short batch
        critical, batch = float(points.local_cbs[i]), float(chosen[i])
        at_batch = span * (1 + critical / batch) / (1 + critical / batch_size)
        # Samples scale as steps × batch: E'/E = (S'·B')/(S·B).
        run_steps, steps = run_steps + span, steps + at_batch
        samples += seen * (at_batch * batch) / (span * batch_size) if span else 0.0
    return run_steps, steps, samples


def advice_text(advice: dict) -> str:
    """The recommendation a person can act on: batch(es), lr, what was measured, the estimate."""
    B, ramp, points = advice["batch_size"], advice["ramp"], advice["points"]
    rule = "lr × B'/B" if advice["lr_rule"] == "linear" else "lr × √(B'/B)"
    if len(ramp) == 1:
        row = ramp[0]
        what = (f"Keep batch {B} (lr {advice['lr']:.3g}): at the last measurement no larger batch was shown no worse."
                if row["batch_size"] == B
                else f"Use batch {row['batch_size']} with lr {row['lr']:.3g} ({rule} from batch {B}).")
    else:
        steps = "; ".join(f"batch {r['batch_size']}, lr {r['lr']:.3g} from {r['from_samples']} samples seen"
                          + (f" to {r['to_samples']}" if r["to_samples"] is not None else " on")
                          for r in ramp)
        what = f"Ramp the batch as the local critical batch size grows ({rule} from batch {B}): {steps}."
    measured = "; ".join(f"at {p.samples_seen} samples {_interval(p.local_cbs, p.local_cbs_upper)}, "
                         f"B_simple {p.b_simple:.3g}" for p in points.itertuples())
    saving = ""
    if advice["run_steps"] > 0:
        fewer = 1 - advice["predicted_steps"] / advice["run_steps"]
        extra = advice["predicted_samples"] / advice["run_samples"] - 1
        saving = (f" Estimated over the run's {advice['run_samples']} samples ({advice['run_steps']} steps at batch "
                  f"{B}): {advice['predicted_steps']:.0f} steps ({fewer:.0%} fewer) for "
                  f"{advice['predicted_samples']:.0f} samples ({extra:+.0%}), to the same loss, if {PREDICTION_MODEL}."
                  f" This is a model's estimate, not a measurement.")
    return f"{what} Measured local critical batch size: {measured}.{saving}"


def _interval(lower: float, upper: float) -> str:
    return f"≥ {int(lower)} (none worse)" if not math.isfinite(upper) else f"in [{int(lower)}, {int(upper)})"


class LocalCBS(Callback):
    """Measure the local critical batch size (`batchlab.local_cbs`) along a run, at its evaluations.

    At the run's first evaluation (step 0, unless ``at_start=False``) and then at the first
    evaluation at or after every multiple of ``every`` steps (every evaluation when ``every`` is
    None; by default a run evaluates at each epoch's end), it calls `local_cbs` on the live model
    and optimizer, with the run's training split, batch size and loss, and adds to that evaluation's
    row (`AddMetrics`, hence to the evals table, the step table, the epoch row and the store):

    - ``local_cbs``: the largest branch batch no worse than the run's batch B (on the tested grid);
    - ``local_cbs_upper``: the smallest branch batch found worse, +inf when none was;
    - ``b_simple_at_branch``: B_simple = tr(Σ)/‖G‖² at the same weights.

    The branches train deep copies with their own random streams, so the run's rows are exactly
    those of the same run without this callback. Each branch holds the lr the optimizer has at the
    evaluation (after a schedule's latest step). A measurement that fails (e.g. max(k)·B larger than
    the training set) gives NaN in the three columns and one warning per run; training goes on.
    Only drivers that hand their optimizer and data to callbacks (`batchlab.fit`) can be measured.

    Args:
        every: steps between measurements (at the next evaluation), or None: at every evaluation.
        factors, seeds, samples, lr_rule, alpha, tolerance, eval_samples, noise_samples: as
            `batchlab.local_cbs` takes them (``eval_samples`` training samples evaluate a branch).
        at_start: also measure at step 0's evaluation (from the initial weights).

    Attributes:
        results: ``(step, LocalCBSResult)`` of each successful measurement of the latest run,
            with the branch tables and tests behind each verdict.
    """

    COLUMNS = ("local_cbs", "local_cbs_upper", "b_simple_at_branch")

    def __init__(self, every: int | None = None, *, factors=(1, 2, 4, 8), seeds=3, samples: int | None = None,
                 lr_rule: str = "auto", alpha: float = 0.05, tolerance: float = 0.5, eval_samples: int = 2048,
                 noise_samples: int = 512, at_start: bool = True):
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ConfigError(f"LocalCBS every must be a whole number of steps ≥ 1 or None, got {every!r}")
        factors, seeds = check_branch_settings(factors, seeds, lr_rule, alpha, tolerance, samples, eval_samples,
                                               noise_samples)
        self.every, self.at_start = every, at_start
        self.settings = dict(factors=factors, seeds=seeds, samples=samples, lr_rule=lr_rule, alpha=alpha,
                             tolerance=tolerance, eval_samples=eval_samples, noise_samples=noise_samples)
        self.results: list = []

    def on_run_start(self, event: RunStart):
        from .metrics import mean_loss_function

        self.results, self.warned = [], False
        self.optimizer, self.data, self.batch_size = event.optimizer, event.data, event.clock.batch_size
        self.loss_fn = (mean_loss_function(event.config.loss, event.data.task)
                        if event.data is not None and hasattr(event.config, "loss") else None)
        # The first step due: the run's current step when it measures from the start (a resumed
        # run starts past 0), else the next multiple of `every`.
        self.next_due = event.clock.step if self.at_start else self._after(event.clock.step)
        return None

    def _after(self, step: int) -> int:
        """The first step after ``step`` at which a measurement is due."""
        return step + 1 if self.every is None else (step // self.every + 1) * self.every

    def on_evaluation(self, event: Evaluation):
        step = event.clock.step
        if step < self.next_due:
            return None
        self.next_due = self._after(step)
        return AddMetrics(self._measure(event.model, step))

    def _measure(self, model, step: int) -> dict[str, float]:
        """The three columns at the current weights; NaN and one warning per run if it fails."""
        try:
            if self.optimizer is None or self.loss_fn is None:
                raise ConfigError("this training driver does not hand its optimizer and data to callbacks; "
                                  "use batchlab.fit, or call batchlab.local_cbs yourself")
            with torch.enable_grad():  # branches train, whatever mode the driver evaluates in
                result = local_cbs(model, self.optimizer, self.loss_fn, self.data.train, self.batch_size,
                                   **self.settings)
        except Exception as error:  # a measurement never stops training
            if not self.warned:
                self.warned = True
                warnings.warn(f"LocalCBS: no measurement at step {step} ({error_line(error)}); its columns are NaN",
                              RuntimeWarning, stacklevel=2)
            return dict.fromkeys(self.COLUMNS, math.nan)
        self.results.append((step, result))
        upper = result.interval[1]
        return {"local_cbs": float(result.local_cbs), "local_cbs_upper": math.inf if upper is None else float(upper),
                "b_simple_at_branch": float(result.b_simple)}
