"""The gradient-norm and distance experiments of the batch-size literature.

Gradient norm vs batch size (Shen 2018, "Effect of batch size on training dynamics"): train a model
to chosen points, then at each point draw many random batches of every batch size and measure
‖g_B‖, the gradient norm of the batch's *mean* loss, and ‖Σ_{i∈B} g_i‖ = B‖g_B‖, that of its
*summed* loss. The two conventions give opposite trends: for the mean loss
E‖g_B‖² = ‖G‖² + tr(Σ)/B falls with B (McCandlish et al. 2018, eq. 2.3); for the summed loss
B²‖G‖² + B·tr(Σ) grows about linearly in B while B‖G‖² ≪ tr(Σ).

It is fast because it is exact: the per-sample gradients of the whole training set are computed
once per point (``torch.func``: ``vmap(grad(...))``), as an (N, P) matrix M; their Gram matrix
K = M Mᵀ (N, N) then gives every batch's squared norm as ‖g_B‖² = w_Bᵀ K w_B, w_B = 1/B on the
batch's samples, so thousands of trials cost a gather or a matrix product each.

Distance from the initial weights (Shen's second figure): ‖θ_t − θ_0‖ over training, for batch sizes ×
learning rates, all runs seeing the same number of samples.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from .callbacks import progress_wanted
from .config import TrainConfig
from .data import Dataset
from .errors import ConfigError
from .events import Callback, EpochEnd
from .metrics import loss_function
from .probes import per_sample_estimates

MAX_GRAM_SAMPLES = 20_000  # an (N, N) float32 Gram matrix of 1.6 GB; beyond that, subsample the data


# --- exact gradient statistics at fixed weights --------------------------------------------------


@dataclass(frozen=True)
class GradientStats:
    """‖G‖² and tr(Σ) of a training set at fixed weights, from every per-sample gradient.

    G = (1/N) Σ_i g_i is the full-data gradient of the mean loss; ``trace_cov`` is tr(S) with
    S = (1/(N−1)) Σ_i (g_i − G)(g_i − G)ᵀ, the per-sample gradient covariance normalised by
    1/(N−1). ``noise_scale`` = tr(S)/‖G‖² is B_simple (McCandlish et al. 2018).
    """

    n: int
    grad_sq: float
    trace_cov: float

    @property
    def noise_scale(self) -> float:
        return self.trace_cov / self.grad_sq if self.grad_sq > 0 else math.nan

    def expected_sq_norm(self, batch_size: float, replacement: bool = False) -> float:
        """E‖g_B‖² for the mean loss of B samples drawn from the training set.

        Without replacement (the batches of an epoch): ‖G‖² + tr(S)(1/B − 1/N). With replacement
        (the i.i.d. setting of McCandlish et al. 2018, eq. 2.3): ‖G‖² + tr(Σ)/B with
        Σ = S(N−1)/N the covariance normalised by 1/N.
        """
        if replacement:
            return self.grad_sq + self.trace_cov * (self.n - 1) / self.n / batch_size
        return self.grad_sq + self.trace_cov * (1.0 / batch_size - 1.0 / self.n)


def per_sample_gradients(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, loss_fn, chunk_size: int = 512) -> torch.Tensor:
    """Every sample's loss gradient at the model's weights, as an (N, P) float32 matrix.

    ``torch.func.vmap(torch.func.grad(...))`` over samples, in chunks, with the model in eval
    mode (dropout off, batch norm on its running statistics), so that a batch's gradient is
    exactly the mean of its samples' rows. Columns follow ``model.parameters()`` flattened.
    """
    from torch.func import functional_call, grad, vmap

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def sample_loss(parameters, x, target):
        output = functional_call(model, (parameters, buffers), (x.unsqueeze(0),))  # (1, K)
        return loss_fn(output, target.unsqueeze(0)).sum()

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for start in range(0, X.shape[0], chunk_size):
            grads = per_sample_grad(params, X[start:start + chunk_size], y[start:start + chunk_size])
            chunks.append(torch.cat([grads[n].reshape(grads[n].shape[0], -1) for n in names], dim=1))  # (n, P)
    finally:
        model.train(was_training)
    return torch.cat(chunks)  # (N, P)


def gradient_stats(per_sample: torch.Tensor) -> GradientStats:
    """Exact ‖G‖² and tr(S) (S normalised by 1/(N−1)) from the (N, P) per-sample gradients of the
    whole training set: `batchlab.probes.per_sample_estimates` with the batch being all N samples
    (its finite-population correction then vanishes and ‖G‖² is the squared norm of the mean)."""
    n = per_sample.shape[0]
    grad_sq, trace_cov = per_sample_estimates(per_sample, float(n))
    return GradientStats(n=n, grad_sq=float(grad_sq), trace_cov=float(trace_cov))


def batch_sq_norms(gram: torch.Tensor, batches: torch.Tensor) -> torch.Tensor:
    """‖g_B‖² of the mean loss of each batch, from the Gram matrix of per-sample gradients.

    Args:
        gram: K = M Mᵀ, (N, N), K_ij = ⟨g_i, g_j⟩.
        batches: (T, B) sample indices, each row one batch (without repeats).

    Returns:
        (T,) float64: w_Bᵀ K w_B = (1/B²) Σ_{i,j∈B} K_ij for each row.
    """
    trials, size = batches.shape
    n = gram.shape[0]
    if size * size * 300 < n * n:  # a small batch: gather its B×B block of K (T·B² reads)
        rows_per_chunk = max(1, 2**25 // (size * size))
        sums = [gram[chunk[:, :, None], chunk[:, None, :]].double().sum(dim=(1, 2))
                for chunk in batches.split(rows_per_chunk)]  # each (t,)
        return torch.cat(sums) / size**2
    # A large batch: one dense product, (T, N) @ (N, N), is cheaper than T·B² gathers.
    weights = torch.zeros(trials, n, dtype=gram.dtype, device=gram.device)
    weights.scatter_(1, batches, 1.0 / size)  # (T, N): w_B
    return ((weights @ gram) * weights).double().sum(dim=1)  # (T,)


def _summary(values: np.ndarray) -> tuple[float, float, float]:
    std = float(values.std(ddof=1)) if values.size > 1 else math.nan
    return float(values.mean()), std, std / math.sqrt(values.size)


def norms_by_batch_size(
    per_sample: torch.Tensor, batch_sizes: Sequence[int], trials: int, generator: torch.Generator, progress=None
) -> pd.DataFrame:
    """Measure ‖g_B‖ (mean loss) and ‖Σ_{i∈B} g_i‖ = B‖g_B‖ (summed loss) over random batches.

    Each trial is a fresh random permutation of the N samples; the batch of size B is its first B
    entries, so samples within a batch are distinct (drawn without replacement) and, for one
    trial, the batches of different sizes are nested (common random numbers across B).

    Returns:
        One row per batch size: ``batch_size, trials``, then mean, ``_std`` (over trials) and
        ``_se`` (standard error of the mean) of ``grad_norm`` (mean loss), ``sq_norm`` (its
        square) and ``sum_norm`` (summed loss); ``sq_norm_lo/_hi`` and ``grad_norm_lo/_hi`` are
        the mean ± 2 standard errors.
    """
    n = per_sample.shape[0]
    gram = per_sample @ per_sample.T  # (N, N): K_ij = ⟨g_i, g_j⟩
    orders = torch.rand(trials, n, generator=generator).argsort(dim=1).to(per_sample.device)  # (T, N) permutations
    rows = []
    for size in batch_sizes:
        sq = batch_sq_norms(gram, orders[:, :size]).clamp_min(0).cpu().numpy()  # (T,)
        norm = np.sqrt(sq)
        row = {"batch_size": int(size), "trials": trials}
        for name, values in (("grad_norm", norm), ("sq_norm", sq), ("sum_norm", size * norm)):
            mean, std, se = _summary(values)
            row.update({f"{name}_mean": mean, f"{name}_std": std, f"{name}_se": se})
        for name in ("grad_norm", "sq_norm"):
            row[f"{name}_lo"] = row[f"{name}_mean"] - 2 * row[f"{name}_se"]
            row[f"{name}_hi"] = row[f"{name}_mean"] + 2 * row[f"{name}_se"]
        rows.append(row)
        if progress is not None:
            progress()
    return pd.DataFrame(rows)


# --- the gradient-norm experiment ----------------------------------------------------------------


@dataclass(frozen=True)
class GradNormResult:
    """The gradient-norm experiment's result.

    Attributes:
        table: one row per (point, batch size): ``point`` (``epoch 2``), ``epoch``, ``batch_size``,
            the columns of `norms_by_batch_size`, and the theory: ``theory_sq_norm`` (without
            replacement, what the trials estimate), ``theory_sq_norm_iid`` (McCandlish's
            ‖G‖² + tr(Σ)/B), ``theory_grad_norm`` = √theory_sq_norm.
        stats: ``{point: GradientStats}`` at each point's weights.
        training: the training run's epoch table (``train_*``, ``val_*`` at every epoch).
    """

    table: pd.DataFrame
    stats: dict[str, GradientStats]
    training: pd.DataFrame = field(repr=False)
    config: TrainConfig | None = None


class _Snapshots(Callback):
    """Copies the weights at the end of chosen epochs (the loop's model is only read)."""

    def __init__(self, epochs: Sequence[int]):
        self.epochs = set(epochs)
        self.weights: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch_end(self, event: EpochEnd):
        if event.clock.epoch in self.epochs:
            self.weights[event.clock.epoch] = copy.deepcopy(event.model.state_dict())
        return None


def default_batch_sizes(n_train: int, largest: int = 1024) -> list[int]:
    """Powers of 2 from 1 to ``largest`` (or the largest power below N)."""
    sizes, b = [], 1
    while b <= min(largest, n_train):
        sizes.append(b)
        b *= 2
    return sizes


def check_batch_sizes(batch_sizes: Sequence[int], n_train: int) -> list[int]:
    sizes = sorted(set(int(b) for b in batch_sizes))
    if not sizes or sizes[0] < 1 or sizes[-1] > n_train:
        raise ConfigError(f"batch sizes {list(batch_sizes)} must be whole numbers in 1..{n_train} (the training set's size)")
    return sizes


def gradnorm_experiment(
    model: torch.nn.Module,
    dataset: Dataset,
    config: TrainConfig,
    at_epochs: Sequence[int] = (2, 30),
    batch_sizes: Sequence[int] | None = None,
    trials: int = 1000,
    seed: int = 0,
    callbacks: Sequence[Callback] = (),
    progress: bool | None = None,
) -> GradNormResult:
    """Train ``model`` and, after each epoch in ``at_epochs``, measure gradient norms vs batch size.

    Args:
        model: the model to train (trained in place).
        dataset: its data; the trials draw batches from the training split.
        config: how to train; ``epochs`` is replaced by ``max(at_epochs)``.
        at_epochs: the points of training (epochs completed) where gradients are measured; 0
            means the initial weights.
        batch_sizes: the batch sizes to measure (default: powers of 2 up to 1024).
        trials: random batches per batch size (Shen 2018 used 1000).
        seed: seed of the trials' batches.
        callbacks: more callbacks for the training run (a store recorder).
        progress: show progress bars (default: when stderr is a terminal).

    Returns:
        A `GradNormResult`.
    """
    from .loop import fit

    at = sorted(set(int(e) for e in at_epochs))
    if not at or at[0] < 0:
        raise ConfigError(f"--at {list(at_epochs)} must be epochs >= 0 (0 is the initial weights), e.g. 2,30")
    if trials < 2:
        raise ConfigError(f"trials {trials} must be at least 2 to give a standard deviation")
    n = dataset.n_train
    if n > MAX_GRAM_SAMPLES:
        raise ConfigError(f"the training set has {n} samples; the exact experiment handles up to {MAX_GRAM_SAMPLES}: use --val-fraction or a smaller dataset")
    sizes = check_batch_sizes(batch_sizes or default_batch_sizes(n), n)
    if progress is None:
        progress = progress_wanted()
    initial = copy.deepcopy(model.state_dict())
    snapshots = _Snapshots(at)
    training = pd.DataFrame()
    last = max(at)
    if last > 0:
        config = config.replace(epochs=last, max_steps=None)
        run = fit(model, dataset, config, callbacks=[snapshots, *callbacks], progress=progress)
        training = run.epochs
    snapshots.weights[0] = initial
    missing = [e for e in at if e not in snapshots.weights]
    if missing:
        raise ConfigError(f"training stopped before epoch {missing[0]}; the points {missing} were not reached")

    X, y = dataset.to(dataset.device).train
    loss_fn = loss_function(config.loss, dataset.task)
    probe_model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    tables, stats = [], {}
    with _progress_bar(progress) as bar:
        task = bar.add_task("gradient norms", total=len(at) * (len(sizes) + 1)) if bar else None
        advance = (lambda: bar.advance(task)) if bar else None
        for epoch in at:
            point = f"epoch {epoch}"
            probe_model.load_state_dict(snapshots.weights[epoch])
            per_sample = per_sample_gradients(probe_model, X, y, loss_fn)  # (N, P)
            stats[point] = gradient_stats(per_sample)
            if advance:
                advance()
            table = norms_by_batch_size(per_sample, sizes, trials, generator, advance)
            del per_sample
            table.insert(0, "epoch", epoch)
            table.insert(0, "point", point)
            tables.append(_with_theory(table, stats[point]))
    return GradNormResult(pd.concat(tables, ignore_index=True), stats, training, config)


def _with_theory(table: pd.DataFrame, stats: GradientStats) -> pd.DataFrame:
    sizes = table["batch_size"].to_numpy(float)
    table["theory_sq_norm"] = [stats.expected_sq_norm(b) for b in sizes]
    table["theory_sq_norm_iid"] = [stats.expected_sq_norm(b, replacement=True) for b in sizes]
    table["theory_grad_norm"] = np.sqrt(table["theory_sq_norm"])
    table["grad_sq"], table["trace_cov"], table["noise_scale"] = stats.grad_sq, stats.trace_cov, stats.noise_scale
    return table


def _progress_bar(enabled: bool):
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                    transient=True)  # fmt: skip


# --- the distance experiment ---------------------------------------------------------------------


@dataclass(frozen=True)
class DistanceResult:
    """Distance from the initial weights for batch sizes × learning rates.

    Attributes:
        curves: one row per measured step of each run: ``batch_size, lr, step, epoch,
            samples_seen, dist_from_init``.
        final: one row per run: ``batch_size, lr, steps, samples_seen, dist_from_init`` (after the
            same number of samples seen for every run), ``train_loss``, ``train_acc``, ``val_*``
            at the end, and ``status``.
    """

    curves: pd.DataFrame
    final: pd.DataFrame


def distance_experiment(
    make_model: Callable[[], torch.nn.Module],
    dataset: Dataset,
    config: TrainConfig,
    batch_sizes: Sequence[int] = (16, 64, 256, 1024),
    lrs: Sequence[float] = (0.01, 0.1),
    points_per_run: int = 200,
    callbacks_for: Callable[[int, float], Sequence[Callback]] | None = None,
    progress: bool | None = None,
) -> DistanceResult:
    """Train one model per (batch size, lr) for ``config.epochs`` epochs and record ‖θ_t − θ_0‖.

    Every run trains for the same number of epochs, hence sees the same number of samples, from the
    same initial weights (``make_model`` is called afresh per run; give it a seed) with the same
    data-order seed. The ``dist_from_init`` probe measures about ``points_per_run`` times per run.

    Args:
        make_model: builds the initial model (the same weights every call).
        dataset: the data.
        config: the base training config; ``batch_size`` and ``lr`` are replaced per run.
        batch_sizes, lrs: the grid.
        points_per_run: measurements of the distance per run (``probe_every`` follows from it).
        callbacks_for: extra callbacks for the run with (batch size, lr), e.g. a store recorder.
        progress: show a progress bar per run.

    Returns:
        A `DistanceResult`.
    """
    from .loop import fit, plan_run

    sizes = check_batch_sizes(batch_sizes, dataset.n_train)
    if not lrs or any(not (lr > 0) for lr in lrs):
        raise ConfigError(f"learning rates {list(lrs)} must be numbers > 0, e.g. 0.01,0.1")
    curves, finals = [], []
    for lr in lrs:
        for size in sizes:
            run_config = config.replace(batch_size=size, lr=float(lr), probe_every=1)
            total = plan_run(dataset, run_config).total_steps
            run_config = run_config.replace(probe_every=max(1, total // max(1, points_per_run)))
            extra = list(callbacks_for(size, lr)) if callbacks_for else []
            model = make_model()
            initial = [p.detach().clone() for p in model.parameters()]
            run = fit(model, dataset, run_config, probes=["dist_from_init"], callbacks=extra, progress=progress)
            # The end point exactly, whether or not the probe measured the last step.
            distance = math.sqrt(sum(float((p.detach() - p0).double().square().sum()) for p, p0 in zip(model.parameters(), initial)))
            measured = run.steps.dropna(subset=["dist_from_init"])
            start = pd.DataFrame([{"step": 0, "epoch": 0, "samples_seen": 0, "dist_from_init": 0.0}])  # θ_0 itself
            curve = pd.concat([start, measured[["step", "epoch", "samples_seen", "dist_from_init"]]], ignore_index=True)
            if not len(curve) or int(curve["step"].iloc[-1]) != run.clock.step:
                end = {"step": run.clock.step, "epoch": run.clock.epoch, "samples_seen": run.clock.samples_seen, "dist_from_init": distance}
                curve = pd.concat([curve, pd.DataFrame([end])], ignore_index=True)
            curve.insert(0, "lr", float(lr))
            curve.insert(0, "batch_size", size)
            curves.append(curve)
            final = {"batch_size": size, "lr": float(lr), "steps": run.clock.step, "samples_seen": run.clock.samples_seen,
                     "dist_from_init": distance,
                     "status": run.status}
            final.update({k: v for k, v in run.summary.items() if k.startswith("final_")})
            finals.append(final)
    return DistanceResult(pd.concat(curves, ignore_index=True), pd.DataFrame(finals))
