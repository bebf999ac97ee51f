"""An adaptive batch size: the run grows its batch when a measurement says a larger one loses nothing.

``TrainConfig(batch_size=bl.Adaptive(start=16, max=1024, signal="local_cbs"))`` (``--batch-size
adaptive``) trains at ``start`` and decides at the run's evaluations: at its first (step 0), then at
the first evaluation at or after every ``every`` samples (by default at every evaluation: each
epoch's end, or every ``eval_every`` steps):

- ``signal="local_cbs"``: branch from the live weights and optimizer state at 1, 2 and 4 times the
  current batch B (`batchlab.local_cbs`, a paired test over ``seeds`` seeds; Merrill et al. 2025,
  "Critical batch size revisited"). The local critical batch size is the largest branch batch no
  worse than B's.
- ``signal="b_simple"``: B_simple = tr(Σ)/‖G‖² at the live weights, from per-sample gradients
  (McCandlish et al. 2018); the batch the noise scale says still buys nearly full progress per
  sample. A proxy that assumes SGD: under Adam it underestimates the critical batch.

**The rule.** When the signal is at least 2B, the batch becomes the largest power-of-two multiple
of B not above the signal, nor above ``max`` and the training-set size; otherwise it stays. It never
shrinks. The change takes effect at the next batch. The learning rate follows from ``start``:
lr(B) = lr · (B/start) (``linear``, SGD; Goyal et al. 2017) or lr · √(B/start) (``sqrt``, Adam and
the other adaptive methods; Malladi et al. 2022). Adam's β₂ is held at a fixed half-life in samples
(Marek et al. 2025, "Small batch size training for language models"): a step at batch B averages
B samples, so β₂ becomes β₂^(B/start), whose half-life start·ln ½ / ln β₂ samples does not change.

**The record.** Every decision is a row of the evals table with its evidence: ``adaptive_signal``
(the measured local CBS or B_simple), ``adaptive_batch_size`` (the batch size from there on) and,
for ``local_cbs``, ``adaptive_upper`` (the smallest branch batch found worse, +inf if none) and
``adaptive_samples`` (the training samples its branches took: what the decision cost). Once
the batch is at its largest allowed size nothing is measured. The step table holds each batch's size
and lr. A measurement that fails leaves the batch as it is, with NaN
evidence and one warning; training goes on.
"""

from __future__ import annotations

import math
import warnings

import torch

from .config import Adaptive, TrainConfig
from .errors import error_line
from .events import Callback, Evaluation, RunStart, SetBatchSize
from .optim import scaling_factor

FACTORS = (1, 2, 4)  # the local-CBS branches of one decision: the batch may grow 2× or 4× at once


def lr_rule(adaptive: Adaptive, optimizer: str) -> str:
    """The rule the lr follows: the stated one, or for ``auto`` linear for SGD, sqrt otherwise."""
    if adaptive.lr_rule != "auto":
        return adaptive.lr_rule
    return "linear" if optimizer == "sgd" else "sqrt"


def adaptive_lr(config: TrainConfig, batch_size: int) -> float:
    """The base learning rate at ``batch_size`` of a run with an adaptive batch size."""
    adaptive = config.batch_size
    return config.lr * scaling_factor(lr_rule(adaptive, config.optimizer), batch_size / adaptive.start)


def adaptive_betas(config: TrainConfig, batch_size: int) -> tuple[float, float]:
    """Adam's (β₁, β₂) at ``batch_size``: β₂^(B/start) when its half-life in samples is held."""
    beta1, beta2 = config.betas
    if config.batch_size.beta2_half_life:
        beta2 = beta2 ** (batch_size / config.batch_size.start)
    return beta1, beta2


def grown(batch_size: int, signal: float, largest: int) -> int:
    """The batch after one decision: the largest power-of-two multiple of ``batch_size`` not above
    ``signal`` nor ``largest``, when that is at least twice the batch; else the batch itself."""
    limit = min(signal, largest) if signal == signal else math.nan  # NaN (no measurement) decides nothing
    if not limit >= 2 * batch_size:
        return batch_size
    return batch_size * 2 ** int(math.floor(math.log2(limit / batch_size)))


class AdaptiveBatch(Callback):
    """The decisions of an `Adaptive` batch size, made at the run's evaluations (`batchlab.fit` adds it).

    Args:
        adaptive: the run's `Adaptive` settings.
        largest: the largest batch allowed: ``min(adaptive.max, N)``.
    """

    def __init__(self, adaptive: Adaptive, largest: int):
        self.adaptive, self.largest = adaptive, largest

    def on_run_start(self, event: RunStart):
        from .metrics import mean_loss_function

        self.warned = False
        self.optimizer, self.data = event.optimizer, event.data
        self.loss_fn = mean_loss_function(event.config.loss, event.data.task)
        self.next_due = event.clock.samples_seen  # the first evaluation decides (step 0's, in a fresh run)
        return None

    def on_evaluation(self, event: Evaluation):
        clock = event.clock
        if clock.samples_seen < self.next_due:
            return None  # (at the run's last evaluation it still decides: a resumed run goes on from there)
        every = self.adaptive.every
        self.next_due = clock.samples_seen + 1 if every is None else (clock.samples_seen // every + 1) * every
        batch = clock.batch_size
        if grown(batch, math.inf, self.largest) == batch:
            return None  # no larger batch is allowed: nothing to measure, nothing to decide
        signal, upper, samples = self._measure(event.model, batch, clock.step)
        after = grown(batch, signal, self.largest)
        evidence = {"adaptive_signal": signal, "adaptive_batch_size": float(after)}
        if self.adaptive.signal == "local_cbs":
            evidence.update(adaptive_upper=upper, adaptive_samples=float(samples))
        return SetBatchSize(after, evidence)

    def _measure(self, model: torch.nn.Module, batch: int, step: int) -> tuple[float, float, int]:
        """(signal, upper, training samples the branches took) at the live weights; (NaN, NaN, 0)
        and one warning per run if it fails."""
        from .critical_batch import local_cbs, simple_noise_stats

        try:
            with torch.enable_grad():
                if self.adaptive.signal == "b_simple":
                    X, y = self.data.train
                    grad_sq, trace_cov, _ = simple_noise_stats(model, self.loss_fn, X, y, 512)
                    return (trace_cov / grad_sq if grad_sq > 0 else math.inf), math.nan, 0
                factors = tuple(k for k in FACTORS if k * batch <= self.data.n_train)
                if len(factors) < 2:
                    return math.nan, math.nan, 0  # no larger batch fits the data: nothing to test
                result = local_cbs(model, self.optimizer, self.loss_fn, self.data.train, batch, factors=factors,
                                   seeds=self.adaptive.seeds, eval_samples=2048)
            upper = result.interval[1]
            spent = result.samples * len(result.table)  # every branch trained on the same number of samples
            return float(result.local_cbs), (math.inf if upper is None else float(upper)), spent
        except Exception as error:  # a measurement never stops training
            if not self.warned:
                self.warned = True
                warnings.warn(f"adaptive batch size: no measurement at step {step} ({error_line(error)}); the batch "
                              f"stays {batch}", RuntimeWarning, stacklevel=2)
            return math.nan, math.nan, 0


class AdaptiveBatchSampler:
    """A ``DataLoader(batch_sampler=...)`` whose batch grows as your run's measured noise scale allows.

    For your own loop (`batchlab.track` with ``probes=["noise_scale"]``) or any object whose
    ``steps`` table has a ``noise_scale`` column (B_simple, smoothed; `batchlab.probes`). Each epoch
    is a fresh seeded permutation of the N samples cut into batches of the current size. At each
    epoch's start, and every ``every`` samples if given, it reads the latest measured B_simple and
    applies the rule of `grown`: the batch becomes the largest power-of-two multiple of itself not
    above B_simple nor ``max``, when that is at least twice the batch. With ``optimizer``, it also
    scales every parameter group's lr by the ``lr_rule`` for the growth (linear for SGD, square
    root otherwise) and, for Adam and AdamW, moves β₂ to β₂^(B'/B) (a fixed half-life in samples).

    Args:
        n: the number of samples of the dataset.
        start: the first batch size.
        max: the largest batch size.
        run: the measurements, e.g. the handle ``bl.track(...)`` returns.
        optimizer: a ``torch.optim`` optimizer whose lr (and β₂) follow the batch; ``"run"``: the
            optimizer ``run`` trains with, when it decides (a Lightning callback's, created by the
            trainer); or None: the sampler changes only the batch.
        lr_rule: ``auto``, ``linear``, ``sqrt`` or ``none``.
        every: samples between decisions inside an epoch, or None: at each epoch's start only.
        seed: seeds the permutations.
        drop_last: leave out an epoch's last batch when it is short.

    Attributes:
        batch_size: the current batch size.
        decisions: one dict per decision: ``samples_seen, signal, batch_size`` (the evidence and
            the batch from there on).
    """

    def __init__(self, n: int, start: int, max: int, run, *, optimizer: torch.optim.Optimizer | str | None = None,
                 lr_rule: str = "auto", every: int | None = None, seed: int = 0, drop_last: bool = False):
        from .checks import is_count
        from .errors import ConfigError

        for name, value in (("n", n), ("start", start), ("max", max)):
            if not is_count(value):
                raise ConfigError(f"AdaptiveBatchSampler: {name} must be a whole number >= 1, got {value!r}")
        if max < start or start > n:
            raise ConfigError(f"AdaptiveBatchSampler: need start <= max and start <= n, got start={start}, max={max}, "
                              f"n={n}")
        if every is not None and not is_count(every):
            raise ConfigError(f"AdaptiveBatchSampler: every must be a whole number of samples >= 1 or None, "
                              f"got {every!r}")
        if lr_rule not in ("auto", "linear", "sqrt", "none"):
            raise ConfigError(f"AdaptiveBatchSampler: lr_rule must be auto, linear, sqrt or none, got {lr_rule!r}")
        self.n, self.batch_size, self.largest, self.run = n, start, min(max, n), run
        self.optimizer, self.every, self.drop_last = optimizer, every, drop_last
        if isinstance(optimizer, str) and optimizer != "run":
            raise ConfigError(f"AdaptiveBatchSampler: optimizer must be a torch optimizer, 'run' or None, "
                              f"got {optimizer!r}")
        self.lr_rule = lr_rule
        self.generator = torch.Generator().manual_seed(seed)
        self.samples_seen, self.decisions = 0, []

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator)
        at, since = 0, 0
        self._decide()
        while at < self.n:
            if self.every is not None and since >= self.every:
                self._decide()
                since = 0
            size = min(self.batch_size, self.n - at)
            if size < self.batch_size and self.drop_last:
                break
            yield order[at:at + size].tolist()
            at, since, self.samples_seen = at + size, since + size, self.samples_seen + size

    def __len__(self) -> int:
        """Batches of an epoch at the current batch size (an estimate when it grows mid-epoch)."""
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def latest_signal(self) -> float:
        """The latest measured B_simple (``noise_scale``) of the run, NaN before the first."""
        steps = getattr(self.run, "steps", None)
        if steps is None or "noise_scale" not in steps:
            return math.nan
        measured = steps["noise_scale"].dropna()
        return float(measured.iloc[-1]) if len(measured) else math.nan

    def _decide(self) -> None:
        signal = self.latest_signal()
        after = grown(self.batch_size, signal, self.largest)
        self.decisions.append({"samples_seen": self.samples_seen, "signal": signal, "batch_size": after})
        if after == self.batch_size:
            return
        optimizer = getattr(self.run, "optimizer", None) if self.optimizer == "run" else self.optimizer
        if optimizer is not None:
            rule = self.lr_rule if self.lr_rule != "auto" else (
                "linear" if type(optimizer) is torch.optim.SGD else "sqrt")
            factor = scaling_factor(rule, after / self.batch_size)
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * factor
                if "betas" in group and type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
                    beta1, beta2 = group["betas"]
                    group["betas"] = (beta1, beta2 ** (after / self.batch_size))
        self.batch_size = after
