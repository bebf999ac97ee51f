"""R replicas trained in one vectorized pass.

A batch-size study trains the same small model many times (learning rates × seeds at each batch
size); at small batch sizes each update is mostly per-step overhead. `fit_replicas` computes R
trainings as one: the replicas' weights, buffers and optimizer states are stacked along a leading
replica dimension, one ``torch.func.vmap`` of a call of the model's private copy with the stacked
tensors in its slots (`_TensorSlots`) does every replica's forward pass on its own batch, autograd on the stacked weights gives every replica's own gradient, and a
functional optimizer (`batchlab.optim.stacked_update`) updates them all with per-replica
hyperparameters.

Replica r reproduces ``fit(model_fn(seed_r), dataset, config_r)``: the same initial weights, data
order (a generator seeded with seed_r, one ``randperm`` per epoch), dropout masks (drawn from a
generator seeded with seed_r, in forward order, with the very call ``F.dropout`` makes on the CPU,
outside vmap, and fed in), learning rate per step (`lr_at`), metric views, evaluations, probes,
events and tables. Each replica's result is a plain `batchlab.loop.Run`.

A replica whose batch loss becomes NaN/inf is recorded as diverged and dropped from the stack; one
whose callbacks ask to stop (`EarlyStopping`, a target reached) stops alone; the others carry on.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.func import functional_call, vmap

from . import data as data_lib
from .config import TrainConfig
from .errors import ConfigError
from .events import AddMetrics, Callback, Clock, EpochEnd, Evaluation, RestoreWeights, RunEnd, RunStart, Save, StepEnd, Stop
from .loop import Run, check_model, plan_run, resolve_device
from .metrics import evaluate, loss_function
from .optim import init_stacked_state, lr_at, scaled_lr, stacked_update

log = logging.getLogger("batchlab.ensemble")

# Fields every replica of one vectorized pass must share: they fix the shapes and the schedule of
# the computation (batches, steps, evaluation points). The rest (seed, lr, momentum, weight decay,
# betas, schedule and its parameters, warm-up, lr scaling) may differ per replica.
SHARED_FIELDS = (
    "batch_size", "epochs", "max_steps", "optimizer", "nesterov", "shuffle", "drop_last", "device",
    "eval_every", "eval_batch_size", "eval_train", "probe_every", "loss",
)
REPLICA_PROBES = ("grad_norm", "dist_from_init", "update_norm")
SYNC_EVERY = 256  # steps between reads of the batch losses when nothing needs them sooner

CallbackFactory = Callable[[int, TrainConfig], Sequence[Callback]]


# --- configs, memory and chunks ---------------------------------------------------------------


def check_replica_configs(configs: Sequence[TrainConfig]) -> list[TrainConfig]:
    """Check that the configs can train as replicas of one vectorized pass.

    Raises:
        ConfigError: no configs, or a field of `SHARED_FIELDS` that differs, named with both values.
    """
    configs = list(configs)
    if not configs:
        raise ConfigError("fit_replicas needs at least one TrainConfig")
    first = configs[0]
    for index, config in enumerate(configs[1:], start=1):
        if not isinstance(config, TrainConfig):
            raise ConfigError(f"replica {index} is a {type(config).__name__}, not a TrainConfig")
        for name in SHARED_FIELDS:
            if getattr(config, name) != getattr(first, name):
                raise ConfigError(
                    f"replica {index} has {name}={getattr(config, name)!r} but replica 0 has "
                    f"{getattr(first, name)!r}; replicas must share {name}: train such configs in separate groups"
                )
    return configs


def default_memory_budget(device: torch.device) -> int:
    """Half the free memory of the device: free GPU memory, or MemAvailable of the host."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return 4 * 2**30  # no way to ask: assume 8 GiB free


def replica_bytes(n_params: int, n_buffers: int, state_copies: int, activations_per_sample: int,
                  batch_size: int, eval_rows: int, element_bytes: int = 4) -> int:
    """Estimated memory of one replica in the vectorized pass.

    Args:
        n_params: trainable parameters of one model.
        n_buffers: buffer elements of one model (batch-norm statistics).
        state_copies: copies of the weights kept besides the weights themselves: the gradient,
            optimizer state (1 for SGD momentum, 2 for Adam) and probe states (θ_0, θ_{t-1}).
        activations_per_sample: elements of all layers' outputs for one sample.
        batch_size: B; the training step keeps its activations and their gradients (×3 with
            temporaries).
        eval_rows: samples per evaluation chunk (forward only, ×2 for the layer in and out).

    Returns:
        Bytes.
    """
    weights = n_params * (1 + state_copies) + n_buffers
    activations = activations_per_sample * (3 * batch_size + 2 * eval_rows)
    return element_bytes * (weights + activations)


def plan_chunks(n_replicas: int, bytes_per_replica: int, budget: int, chunk_size: int | None = None) -> list[int]:
    """Split R replicas into as few chunks as fit ``budget`` bytes (or ``chunk_size`` each), evenly.

    Returns:
        The number of replicas of each chunk, e.g. ``[22, 21, 21]``.
    """
    fits = chunk_size or max(1, budget // max(bytes_per_replica, 1))
    n_chunks = math.ceil(n_replicas / fits)
    base, extra = divmod(n_replicas, n_chunks)
    return [base + (1 if i < extra else 0) for i in range(n_chunks)]


# --- the result ---------------------------------------------------------------------------------


@dataclass
class ReplicaRuns(Sequence):
    """The runs of `fit_replicas`, one `Run` per replica in the order of the configs.

    Attributes:
        runs: replica r's `Run`, with the same tables as `fit` gives.
        chunks: how many replicas each vectorized pass held (one pass unless memory was short).
        bytes_per_replica: the memory estimate that decided the chunks.
        memory_budget: the budget in bytes.
        seconds: wall time of the whole ensemble, evaluations included.
    """

    runs: list[Run]
    chunks: list[int]
    bytes_per_replica: int
    memory_budget: int
    seconds: float = 0.0

    def __getitem__(self, index):
        return self.runs[index]

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs)

    @property
    def summary(self) -> pd.DataFrame:
        """One row per replica: its seed, lr and the headline numbers of its `Run.summary`."""
        rows = [{"replica": i, "seed": run.config.seed, "lr": run.config.lr, **run.summary}
                for i, run in enumerate(self.runs)]
        return pd.DataFrame(rows)


# --- dropout masks drawn outside vmap -------------------------------------------------------------


class FedDropout(nn.Module):
    """``nn.Dropout`` whose scaled mask is given (buffer ``mask``) instead of drawn.

    Torch's global RNG cannot serve R replicas inside vmap. The masks are drawn outside, per
    replica, with the exact call ``F.dropout`` makes on the CPU (``bernoulli_(1-p)`` then
    ``div_(1-p)``), and multiplied in here as ``F.dropout`` does.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.register_buffer("mask", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * self.mask  # (b, *shape) * (b, *shape)


@dataclass(frozen=True)
class DropoutSite:
    """One dropout layer: its mask's name for functional_call, its rate and per-sample shape."""

    key: str
    p: float
    shape: tuple[int, ...]


def _feed_dropout(skeleton: nn.Module, example_model: nn.Module, x: torch.Tensor) -> list[DropoutSite]:
    """Replace every ``nn.Dropout`` of ``skeleton`` by `FedDropout`; return the sites in call order."""
    names = [name for name, m in skeleton.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    unsupported = [n for n in names if type(skeleton.get_submodule(n)) is not nn.Dropout]
    if unsupported:
        kind = type(skeleton.get_submodule(unsupported[0])).__name__
        raise ConfigError(f"replicas support nn.Dropout only, the model has {kind} at {unsupported[0]!r}; "
                          "train this model with fit")
    calls: list[tuple[str, tuple[int, ...]]] = []
    probe = copy.deepcopy(example_model)
    hooks = [probe.get_submodule(n).register_forward_hook(
        lambda m, inputs, out, n=n: calls.append((n, tuple(inputs[0].shape[1:])))) for n in names]
    probe.train()
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        probe(x)
    for hook in hooks:
        hook.remove()
    if sorted(n for n, _ in calls) != sorted(names):
        raise ConfigError("replicas need every dropout layer called exactly once per forward pass; "
                          "train this model with fit")
    sites = []
    for name, shape in calls:
        p = skeleton.get_submodule(name).p
        parent, _, child = name.rpartition(".")
        setattr(skeleton.get_submodule(parent) if parent else skeleton, child, FedDropout(p))
        sites.append(DropoutSite(f"{name}.mask", p, shape))
    return sites


def draw_masks(sites: Sequence[DropoutSite], generators: Sequence[torch.Generator], batch: int,
               device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Each replica's dropout masks for one step, drawn from its own generator in forward order.

    ``dtype`` is the activations' dtype: ``F.dropout`` draws and scales its mask in that dtype, so
    a float32 mask would round 1/(1-p) differently from a float64 run's.

    Returns:
        ``{site.key: (R, batch, *site.shape)}`` scaled masks (0 or 1/(1-p)).
    """
    masks = {}
    for site in sites:
        keep = 1.0 - site.p
        mask = torch.empty((len(generators), batch, *site.shape), device=device, dtype=dtype)  # (R, b, *shape)
        if keep == 0.0:
            mask.zero_()
        else:
            for row, generator in zip(mask, generators):
                row.bernoulli_(keep, generator=generator)
            mask.div_(keep)
        masks[site.key] = mask
    return masks


# --- calling the skeleton with given tensors ------------------------------------------------------


class _TensorSlots:
    """Calls a module with given tensors in place of named parameters and buffers, cheaply.

    ``torch.func.functional_call`` re-resolves every name, checks for tied weights and flattens
    pytrees on every call: about 0.3 ms per step here, where the whole update of a small model
    takes less. The skeleton is private to the pass, so its slots (module, name) are resolved once
    and each call assigns the tensors into them and puts the originals back. A model with tied
    weights keeps ``functional_call``, which unties them.
    """

    def __init__(self, module: nn.Module, names: Sequence[str]):
        self.module, self.names = module, list(names)
        shared = (len(list(module.named_parameters(remove_duplicate=False))) != len(list(module.named_parameters()))
                  or len(list(module.named_buffers(remove_duplicate=False))) != len(list(module.named_buffers())))
        self.slots: list[dict[str, Any]] | None = None
        self.keys: list[str] = []
        if not shared:
            self.slots, self.keys = [], []
            for name in self.names:
                parent, _, leaf = name.rpartition(".")
                owner = module.get_submodule(parent) if parent else module
                self.slots.append(owner._parameters if leaf in owner._parameters else owner._buffers)
                self.keys.append(leaf)

    def __call__(self, tensors: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.slots is None:
            return functional_call(self.module, dict(zip(self.names, tensors)), (x,))
        originals = [slot[key] for slot, key in zip(self.slots, self.keys)]
        try:
            for slot, key, tensor in zip(self.slots, self.keys, tensors):
                slot[key] = tensor
            return self.module(x)
        finally:
            for slot, key, tensor in zip(self.slots, self.keys, originals):
                slot[key] = tensor


# --- the stacked state ---------------------------------------------------------------------------


def _per_replica_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each replica's global L2 norm over a list of stacked tensors (R, ...) -> (R,).

    The same reduction as `batchlab.probes.global_norm`: the norm of the per-tensor norms.
    """
    norms = [torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1) for t in tensors]  # each (R,)
    return torch.linalg.vector_norm(torch.stack(norms, dim=1), dim=1)


@dataclass(eq=False)
class _Replica:
    """One replica's bookkeeping: what `fit`'s loop keeps for one run."""

    index: int
    config: TrainConfig
    model: nn.Module  # the replica's module; while training its tensors are views of the stack
    callbacks: list[Callback]
    base_lr: float
    data_generator: torch.Generator
    dropout_generator: torch.Generator
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    epochs: list[dict] = field(default_factory=list)
    loss_total: float = 0.0  # the running mean's totals since the epoch began (RunningMean)
    correct: int = 0
    count: int = 0
    seconds: float = 0.0
    eval_seconds: float = 0.0
    delivered_steps: int = 0
    delivered_evals: int = 0
    status: str = "finished"
    message: str | None = None
    clock: Clock | None = None
    requests: list = field(default_factory=list)

    def dispatch(self, method: str, event) -> None:
        for callback in self.callbacks:
            request = getattr(callback, method)(event)
            if request is not None:
                self.requests.append(request)

    @property
    def per_step(self) -> bool:
        return any(type(c).on_step_end is not Callback.on_step_end for c in self.callbacks)


class _Stack:
    """The active replicas' weights, buffers and optimizer state, stacked along dimension 0."""

    def __init__(self, models: Sequence[nn.Module], config: TrainConfig, probes: Sequence[str], device):
        self.param_names = [n for n, p in models[0].named_parameters() if p.requires_grad]
        self.buffer_names = [n for n, _ in models[0].named_buffers()]
        with torch.no_grad():
            self.params = [torch.stack([m.get_parameter(n).detach() for m in models]).to(device).requires_grad_()
                           for n in self.param_names]  # each (R, *shape), a leaf
            self.buffers = [torch.stack([m.get_buffer(n) for m in models]).to(device) for n in self.buffer_names]
        self.optimizer_state = init_stacked_state(config.optimizer, self.params)
        self.initial = [p.detach().clone() for p in self.params] if "dist_from_init" in probes else None
        self.previous = [p.detach().clone() for p in self.params] if "update_norm" in probes else None
        self.hyper: dict[str, np.ndarray] = {}

    def relayout(self, gradients: Sequence[torch.Tensor]) -> None:
        """Store every parameter (and its optimizer state) in the memory layout of its gradient.

        Under vmap a linear layer's weight gradient comes out transposed, (R, in, out) in memory.
        Weights stored the same way make the update's elementwise passes run on aligned strides
        (measured: the SGD update 2-3x faster at R=64) and the forward's batched matmul read the
        weight without a transpose.
        """
        with torch.no_grad():
            self.params = [torch.empty_like(g).copy_(p).requires_grad_() for p, g in zip(self.params, gradients)]
        self.optimizer_state = {k: [torch.empty_like(p).copy_(t) for p, t in zip(self.params, v)]
                                for k, v in self.optimizer_state.items()}
        for name in ("initial", "previous"):
            if getattr(self, name) is not None:
                setattr(self, name, [torch.empty_like(p).copy_(t) for p, t in zip(self.params, getattr(self, name))])

    def keep(self, rows: Sequence[int]) -> None:
        """Drop every replica but ``rows`` (positions in the stack), keeping each tensor's layout."""
        index = torch.tensor(list(rows), device=self.params[0].device)

        def select(t: torch.Tensor) -> torch.Tensor:
            return torch.empty_like(t[: len(rows)]).copy_(t.index_select(0, index))

        with torch.no_grad():
            self.params = [select(p.detach()).requires_grad_() for p in self.params]
            self.buffers = [select(b) for b in self.buffers]
            self.optimizer_state = {k: [select(t) for t in v] for k, v in self.optimizer_state.items()}
            if self.initial is not None:
                self.initial = [select(t) for t in self.initial]
            if self.previous is not None:
                self.previous = [select(t) for t in self.previous]
        self.hyper = {k: v[list(rows)] for k, v in self.hyper.items()}

    def attach(self, model: nn.Module, row: int) -> None:
        """Make ``model``'s parameters and buffers views of stack row ``row`` (live weights)."""
        with torch.no_grad():
            for name, stacked in zip(self.param_names, self.params):
                model.get_parameter(name).data = stacked.detach()[row]
            for name, stacked in zip(self.buffer_names, self.buffers):
                model.get_buffer(name).data = stacked[row]

    @staticmethod
    def detach(model: nn.Module) -> None:
        """Give ``model`` its own copy of its weights (before the stack changes)."""
        with torch.no_grad():
            for tensor in (*model.parameters(), *model.buffers()):
                tensor.data = tensor.data.clone()



# --- training ------------------------------------------------------------------------------------


def fit_replicas(
    model_fn: Callable[[int], nn.Module],
    dataset: data_lib.Dataset,
    configs: Sequence[TrainConfig],
    *,
    probes: Sequence[str] = (),
    callbacks: CallbackFactory | Sequence[Sequence[Callback]] | None = None,
    memory_budget: int | None = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
) -> ReplicaRuns:
    """Train one replica per config in one vectorized pass; replica r reproduces ``fit`` with config r.

    Args:
        model_fn: ``seed -> nn.Module``, e.g. ``lambda seed: build_model("mlp", ds, seed=seed)``;
            called once per replica with its config's seed. All models must share one architecture.
        dataset: a `batchlab.data.Dataset`.
        configs: one `TrainConfig` per replica. They must share `SHARED_FIELDS` (batch size,
            epochs/max_steps, optimizer kind, evaluation points, ...) and may differ in seed, lr,
            momentum, weight decay, betas, schedule and its parameters, warm-up and lr scaling.
        probes: names among ``grad_norm``, ``dist_from_init``, ``update_norm``, measured per replica
            with the meaning they have in `fit`.
        callbacks: per-replica callbacks, as a function ``(replica index, config) -> [callbacks]``
            or one list per replica. A replica stops alone when its callbacks return `Stop`.
        memory_budget: bytes the stacked training may use; default half the free memory. Replicas
            that do not fit are trained in further chunks, one after another.
        chunk_size: replicas per vectorized pass, overriding the memory estimate.
        progress: show a progress bar; default: when stderr is a terminal.

    Returns:
        A `ReplicaRuns`: a sequence of `Run` in the order of ``configs``, with ``.chunks``.

    Example:
        >>> configs = [bl.TrainConfig(batch_size=32, epochs=5, lr=lr, seed=s) for lr in (0.01, 0.1) for s in range(4)]
        >>> runs = bl.fit_replicas(lambda seed: bl.build_model("mlp", ds, seed=seed), ds, configs)
        >>> [run.summary["final_val_acc"] for run in runs]
    """
    from .checks import check_arguments, check_items

    check_arguments("fit_replicas", model_fn=(model_fn, Callable), dataset=(dataset, data_lib.Dataset))
    check_items("fit_replicas", "configs", configs, TrainConfig)
    started = time.perf_counter()
    configs = check_replica_configs(configs)
    unknown = [p for p in probes if not isinstance(p, str) or p not in REPLICA_PROBES]
    if unknown:
        raise ConfigError(f"probe {unknown[0]!r} is not available for replicas; choose from "
                          f"{', '.join(REPLICA_PROBES)}, or train with fit")
    factory = _callback_factory(callbacks, len(configs))
    clock = plan_run(dataset, configs[0])
    device = resolve_device(configs[0].device)
    dataset = dataset.to(device)
    models = [model_fn(config.seed).to(device) for config in configs]
    check_model(models[0], dataset)
    shapes = [[(n, p.shape) for n, p in m.state_dict().items()] for m in models]
    for index, described in enumerate(shapes[1:], start=1):
        if described != shapes[0]:
            raise ConfigError(f"model_fn gave replica {index} another architecture than replica 0; "
                              "replicas must share the architecture")
    budget = memory_budget or default_memory_budget(device)
    per_replica = _estimate_bytes(models[0], dataset, configs[0], clock, probes)
    chunks = plan_chunks(len(configs), per_replica, budget, chunk_size)
    log.info("%d replicas, about %.1f MiB each, budget %.1f MiB -> %d chunk(s) of %s replicas",
             len(configs), per_replica / 2**20, budget / 2**20, len(chunks), "/".join(map(str, chunks)))
    if progress is None:
        progress = _ProgressDisplay.wanted()
    display = _ProgressDisplay(len(configs), clock.total_steps * len(chunks)) if progress else None
    runs: list[Run] = []
    try:
        start = 0
        for size in chunks:
            indices = range(start, start + size)
            replicas = [_make_replica(i, configs[i], models[i], factory(i, configs[i]), clock) for i in indices]
            runs += _train_chunk(replicas, dataset, clock, list(probes), device, display)
            start += size
    finally:
        if display is not None:
            display.close()
    return ReplicaRuns(runs, chunks, per_replica, budget, time.perf_counter() - started)


def _callback_factory(callbacks, n: int) -> CallbackFactory:
    if callbacks is None:
        return lambda index, config: []
    if callable(callbacks):
        return lambda index, config: list(callbacks(index, config))
    callbacks = list(callbacks)
    if len(callbacks) != n or any(isinstance(c, Callback) for c in callbacks):
        raise ConfigError("give replica callbacks as a function (index, config) -> [callbacks], "
                          f"or one list per replica ({n} lists)")
    return lambda index, config: list(callbacks[index])


def _make_replica(index: int, config: TrainConfig, model: nn.Module, callbacks, clock: Clock) -> _Replica:
    return _Replica(
        index=index, config=config, model=model, callbacks=list(callbacks),
        base_lr=scaled_lr(config, clock.batch_size),
        data_generator=torch.Generator().manual_seed(config.seed),
        dropout_generator=torch.Generator(device=next(model.parameters()).device).manual_seed(config.seed),
    )


def _estimate_bytes(model: nn.Module, dataset, config: TrainConfig, clock: Clock, probes) -> int:
    """`replica_bytes` for this model: counts its tensors and measures its activations on 2 samples."""
    sizes: list[int] = []
    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(lambda m, i, out: sizes.append(out[0].numel())) for m in leaves]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(dataset.train[0][:1])
    model.train(was_training)
    for hook in hooks:
        hook.remove()
    copies = 1 + {"sgd": 1, "adam": 2, "adamw": 2, "rmsprop": 2}[config.optimizer] + len(probes)
    return replica_bytes(
        n_params=sum(p.numel() for p in model.parameters()),
        n_buffers=sum(b.numel() for b in model.buffers()),
        state_copies=copies,
        activations_per_sample=sum(sizes) + dataset.train[0][0].numel(),
        batch_size=clock.batch_size,
        eval_rows=min(config.eval_batch_size, clock.n_train),
        element_bytes=dataset.train[0].element_size(),
    )


class _Pass:
    """One vectorized pass over a chunk of replicas: the stack, the compute and the bookkeeping."""

    def __init__(self, replicas: list[_Replica], dataset, clock: Clock, probes: list[str], device):
        config = replicas[0].config
        self.config, self.dataset, self.device, self.probes = config, dataset, device, probes
        self.active = list(replicas)  # replica i is row i of the stack
        self.classification = dataset.n_classes is not None
        self.loss_fn = loss_function(config.loss, dataset.task)  # per sample
        self.skeleton = copy.deepcopy(replicas[0].model)
        self.sites = _feed_dropout(self.skeleton, replicas[0].model, dataset.train[0][:2])
        self.stack = _Stack([r.model for r in replicas], config, probes, device)
        self.stack.hyper = _hyperparameters([r.config for r in replicas])
        for row, replica in enumerate(replicas):
            self.stack.attach(replica.model, row)
        self.lrs = _lr_table(replicas, clock)  # (total_steps, R) float64
        self.column = {r.index: column for column, r in enumerate(replicas)}  # replica -> lr column
        self.rows_before_drop = list(replicas)  # whose rows the epoch's orders hold
        self.per_step = any(r.per_step for r in replicas)  # some callback wants every StepEnd
        mask_names = [site.key for site in self.sites]
        # Flat tuples through vmap (its pytree work grows with nesting): weights, buffers, masks.
        self.train_call = _TensorSlots(self.skeleton, [*self.stack.param_names, *self.stack.buffer_names, *mask_names])
        self.eval_call = _TensorSlots(self.skeleton, [*self.stack.param_names, *self.stack.buffer_names])
        self.train_forward = vmap(self.train_call, in_dims=(0, 0))
        self.eval_forward = vmap(self.eval_call, in_dims=(0, None))
        self.optimizer_step = 0
        self.stack.relayout(self._trial_gradients(clock.batch_size))
        for row, replica in enumerate(replicas):
            self.stack.attach(replica.model, row)

    def _trial_gradients(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Gradients of one throw-away step (copied buffers, masks of ones): their memory layout."""
        stack, n = self.stack, len(self.active)
        X, y = self.dataset.train
        index = torch.arange(batch, device=X.device).expand(n, batch)  # (R, b)
        masks = [torch.ones((n, batch, *s.shape), device=self.device, dtype=X.dtype) for s in self.sites]
        buffers = [b.clone() for b in stack.buffers]
        losses, _ = self._train_losses((*stack.params, *buffers, *masks), X[index], y[index])
        return torch.autograd.grad(losses.sum(), stack.params)

    def _train_losses(self, tensors: tuple[torch.Tensor, ...], xb, yb) -> tuple[torch.Tensor, torch.Tensor]:
        """Every replica's mean batch loss (R,) and correct count (R,), from one vmapped forward.

        The loss is computed outside vmap on (R·b, K) rows: torch's per-sample loss under vmap
        runs a Python decomposition that cost more than the rest of a small model's step.
        """
        output = self.train_forward(tensors, xb)  # (R, b, K); tensors: weights, buffers, masks
        n, b = output.shape[:2]
        losses = self.loss_fn(output.reshape(n * b, *output.shape[2:]), yb.reshape(n * b, *yb.shape[2:]))
        loss = losses.reshape(n, b).mean(dim=1)  # (R,)
        if self.classification:
            correct = (output.detach().argmax(dim=2) == yb).sum(dim=1)  # (R,)
        else:
            correct = loss.detach()
        return loss, correct

    def step(self, index: torch.Tensor, clock: Clock, measuring: bool) -> dict[str, torch.Tensor]:
        """One update of every active replica; ``index`` (R, b) are their batches' sample indices."""
        X, y = self.dataset.train
        stack = self.stack
        b = index.shape[1]
        flat = index.reshape(-1)  # (R·b,); index_select is a plain row copy, cheaper than X[index]
        xb = X.index_select(0, flat).reshape(*index.shape, *X.shape[1:])  # (R, b, *shape)
        yb = y.index_select(0, flat).reshape(*index.shape, *y.shape[1:])  # (R, b)
        masks = draw_masks(self.sites, [r.dropout_generator for r in self.active], b, self.device, X.dtype)
        tensors = (*stack.params, *stack.buffers, *(masks[site.key] for site in self.sites))
        losses, correct = self._train_losses(tensors, xb, yb)  # (R,), (R,)
        grads = torch.autograd.grad(losses.sum(), stack.params)  # each replica: its own mean-loss gradient
        out = {"loss": losses.detach(), "correct": correct}
        if measuring and "grad_norm" in self.probes:
            out["grad_norm"] = _per_replica_norm(grads)
        self.optimizer_step += 1
        lr = self.lrs[clock.step][[self.column[r.index] for r in self.active]]  # (R,)
        with torch.no_grad():
            stacked_update(self.config.optimizer, stack.params, grads, stack.optimizer_state,
                           step=self.optimizer_step, lr=lr, hyper=stack.hyper, nesterov=self.config.nesterov)
            if stack.previous is not None:
                if measuring:
                    out["update_norm"] = _per_replica_norm([p - q for p, q in zip(stack.params, stack.previous)])
                for q, p in zip(stack.previous, stack.params):
                    q.copy_(p)
            if measuring and stack.initial is not None:
                out["dist_from_init"] = _per_replica_norm([p - p0 for p, p0 in zip(stack.params, stack.initial)])
        return out

    def evaluate(self, rows: Sequence[int]) -> list[dict[str, float]]:
        """Full passes over train (if enabled), val and test for the replicas at stack ``rows``.

        On the CPU each replica's module (whose tensors are views of the stack) is evaluated in
        turn with `batchlab.metrics.evaluate`, exactly as `fit` evaluates: measured here, one
        vmapped pass over R replicas streams R times the activations through memory and is slower
        than R cache-friendly passes. On a GPU the vmapped pass is faster and used.
        """
        config, dataset = self.config, self.dataset
        splits = {"train": dataset.train if config.eval_train else None, "val": dataset.val, "test": dataset.test}
        if self.device.type == "cpu":
            results = []
            for row in rows:
                metrics: dict[str, float] = {}
                for name, split in splits.items():
                    if split is not None:
                        loss, acc = evaluate(self.active[row].model, split, self.loss_fn, self.classification,
                                             config.eval_batch_size)
                        metrics[f"{name}_loss"] = loss
                        if self.classification:
                            metrics[f"{name}_acc"] = acc
                results.append(metrics)
            return results
        stack = self.stack
        index = torch.tensor(list(rows), device=self.device)
        tensors = (*(p.detach().index_select(0, index) for p in stack.params),
                   *(b.index_select(0, index) for b in stack.buffers))
        results: list[dict[str, float]] = [{} for _ in rows]
        self.skeleton.eval()
        with torch.no_grad():
            for name, split in splits.items():
                if split is None:
                    continue
                X, y = split
                loss_sum = torch.zeros(len(rows), dtype=torch.float64, device=self.device)
                correct = torch.zeros(len(rows), dtype=torch.int64, device=self.device)
                for start in range(0, X.shape[0], config.eval_batch_size):
                    xb, yb = X[start:start + config.eval_batch_size], y[start:start + config.eval_batch_size]
                    output = self.eval_forward(tensors, xb)  # (R, n, K)
                    n = xb.shape[0]
                    losses = self.loss_fn(output.reshape(len(rows) * n, *output.shape[2:]),
                                          yb.repeat(len(rows), *([1] * (yb.ndim - 1))))  # (R·n,)
                    loss_sum += losses.reshape(len(rows), n).sum(dim=1, dtype=torch.float64)
                    if self.classification:
                        correct += (output.argmax(dim=2) == yb).sum(dim=1)
                losses_cpu, correct_cpu = (loss_sum / X.shape[0]).tolist(), correct.tolist()
                for result, loss, right in zip(results, losses_cpu, correct_cpu):
                    result[f"{name}_loss"] = loss
                    if self.classification:
                        result[f"{name}_acc"] = right / X.shape[0]
        self.skeleton.train()
        return results

    def drop(self, finished: Sequence[_Replica]) -> None:
        """Remove finished replicas from the stack; the others' modules point at the new stack."""
        if not finished:
            return
        for replica in finished:
            _Stack.detach(replica.model)
        keep = [row for row, r in enumerate(self.active) if all(r is not f for f in finished)]
        self.active = [self.active[row] for row in keep]
        if self.active:
            self.stack.keep(keep)
            for row, replica in enumerate(self.active):
                self.stack.attach(replica.model, row)


def _hyperparameters(configs: Sequence[TrainConfig]) -> dict[str, np.ndarray]:
    """Per-replica optimizer hyperparameters as (R,) float64 arrays."""
    return {
        "momentum": np.array([c.momentum for c in configs], dtype=np.float64),
        "weight_decay": np.array([c.weight_decay for c in configs], dtype=np.float64),
        "beta1": np.array([c.betas[0] for c in configs], dtype=np.float64),
        "beta2": np.array([c.betas[1] for c in configs], dtype=np.float64),
    }


def _lr_table(replicas: Sequence[_Replica], clock: Clock) -> np.ndarray:
    """``lr_at`` for every step and replica (total_steps, R); replicas differing only in seed share a column."""
    table = np.empty((clock.total_steps, len(replicas)), dtype=np.float64)
    computed: dict[str, np.ndarray] = {}
    for column, replica in enumerate(replicas):
        key = replica.config.model_dump_json(exclude={"seed"})
        if key not in computed:
            computed[key] = np.array([lr_at(s, replica.config, replica.base_lr, clock.steps_per_epoch, clock.total_steps)
                                      for s in range(clock.total_steps)])
        table[:, column] = computed[key]
    return table


def _train_chunk(replicas: list[_Replica], dataset, clock: Clock, probes: list[str], device, display) -> list[Run]:
    """Train one chunk of replicas together and return their runs in order."""
    state = _Pass(replicas, dataset, clock, probes, device)
    try:
        _run_pass(state, clock, display)
    except KeyboardInterrupt:
        for replica in list(state.active):
            replica.status, replica.message = "interrupted", f"interrupted at step {replica.clock.step}"
            _finish(replica, state)
        state.drop(list(state.active))
        raise
    return [_as_run(r, dataset) for r in replicas]


def _run_pass(state: _Pass, clock: Clock, display) -> None:
    """`fit`'s loop, for every active replica at once; finished replicas leave the stack."""
    config, X = state.config, state.dataset.train[0]
    eval_every = None if config.eval_every == "epoch" else config.eval_every
    for replica in state.active:
        replica.clock = clock
        replica.dispatch("on_run_start", RunStart(replica.config, state.dataset.name, clock, replica.model,
                                                  tuple(state.probes)))
    _evaluate(state, state.active, clock)
    last_eval_step = 0
    _end_runs(state, [r for r in list(state.active) if _apply_requests(r)])  # stopped before training
    while state.active and clock.step < clock.total_steps:
        clock = replace(clock, epoch=clock.epoch + 1, step_in_epoch=0)
        for replica in state.active:
            replica.loss_total, replica.correct, replica.count = 0.0, 0, 0  # Keras resets per epoch
        orders = torch.stack([data_lib.epoch_order(clock.n_train, r.data_generator, config.shuffle)
                              for r in state.active]).to(X.device)  # (R, N)
        state.rows_before_drop = list(state.active)
        n_batches = data_lib.steps_per_epoch(clock.n_train, clock.batch_size, config.drop_last)
        pending: list[_Pending] = []
        for batch in range(n_batches):
            if clock.step >= clock.total_steps or not state.active:
                break
            if len(orders) != len(state.active):  # replicas left the stack: keep the others' orders
                orders = orders[[state.rows_before_drop.index(r) for r in state.active]]
                state.rows_before_drop = list(state.active)
            index = orders[:, batch * clock.batch_size:(batch + 1) * clock.batch_size]  # (R, b)
            measuring = bool(state.probes) and clock.step % config.probe_every == 0
            started = time.perf_counter()
            out = state.step(index, clock, measuring)
            lrs = state.lrs[clock.step]
            clock = replace(clock, step=clock.step + 1, step_in_epoch=clock.step_in_epoch + 1,
                            samples_seen=clock.samples_seen + index.shape[1])
            pending.append(_Pending(clock, out, lrs, time.perf_counter() - started, index.shape[1]))
            evaluating = (eval_every is not None and clock.step % eval_every == 0
                          and clock.step_in_epoch < clock.steps_per_epoch)
            if evaluating or len(pending) >= SYNC_EVERY or state.per_step:
                _flush(state, pending)
                pending = []
                if evaluating and state.active:
                    _evaluate(state, state.active, clock)
                    last_eval_step = clock.step
                stopping = [r for r in list(state.active) if _apply_requests(r)]
                if stopping:  # as fit: a stop within an epoch still ends the epoch (evaluation, row)
                    if last_eval_step != clock.step:
                        _evaluate(state, stopping, clock)
                    for replica in stopping:
                        _end_epoch(replica, clock, state.classification)
                        _apply_requests(replica)
                    _end_runs(state, stopping)
                if display is not None:
                    display.update(state, clock)
        _flush(state, pending)
        if not state.active:
            break
        if last_eval_step != clock.step:
            _evaluate(state, state.active, clock)
            last_eval_step = clock.step
        for replica in state.active:
            _end_epoch(replica, clock, state.classification)
        _end_runs(state, [r for r in list(state.active) if _apply_requests(r)])
        if display is not None:
            display.update(state, clock)
    _end_runs(state, list(state.active))


@dataclass(frozen=True)
class _Pending:
    """A step whose numbers are still tensors: read in bulk by `_flush` (one synchronisation)."""

    clock: Clock
    out: dict[str, torch.Tensor]
    lrs: np.ndarray  # (R_chunk,) the lr of every replica of the chunk at this step
    seconds: float
    batch_size: int


def _flush(state: _Pass, pending: list[_Pending]) -> None:
    """Turn the pending steps into every active replica's step rows; end the diverged replicas."""
    if not pending:
        return
    classification = state.classification
    losses = torch.stack([p.out["loss"] for p in pending]).cpu().numpy()  # (S, R), one sync
    corrects = torch.stack([p.out["correct"] for p in pending]).cpu().numpy() if classification else None
    probe_values: dict[str, dict[int, np.ndarray]] = {}
    for name in REPLICA_PROBES:
        measured = [k for k, p in enumerate(pending) if name in p.out]
        if measured:
            values = torch.stack([pending[k].out[name] for k in measured]).cpu().numpy()  # (S', R)
            probe_values[name] = dict(zip(measured, values))
    n_active = len(state.active)
    diverged = []
    for row, replica in enumerate(state.active):
        column = state.column[replica.index]
        for k, p in enumerate(pending):
            b, clock = p.batch_size, p.clock
            batch_loss = float(losses[k, row])
            batch_correct = int(corrects[k, row]) if classification else 0
            replica.seconds += p.seconds / n_active  # the replica's share of the vectorized step
            replica.loss_total += batch_loss * b
            replica.correct += batch_correct
            replica.count += b
            lr = float(p.lrs[column])
            step_row = {"step": clock.step, "epoch": clock.epoch, "samples_seen": clock.samples_seen,
                        "batch_size": b, "lr": lr, "batch_loss": batch_loss}
            if classification:
                step_row["batch_acc"] = batch_correct / b
            step_row["running_loss"] = replica.loss_total / replica.count
            if classification:
                step_row["running_acc"] = replica.correct / replica.count
            step_row["seconds"] = replica.seconds
            for name, values in probe_values.items():
                if k in values:
                    step_row[name] = float(values[k][row])
            replica.steps.append(step_row)
            replica.clock = clock
            if replica.per_step:
                replica.dispatch("on_step_end", StepEnd(clock, step_row, replica.model))
            if not math.isfinite(batch_loss):
                replica.status = "diverged"
                replica.message = (f"loss became {batch_loss} at step {clock.step} (epoch {clock.epoch}) with lr "
                                   f"{lr:g}; lower the learning rate or check the data")
                diverged.append(replica)
                break
    _end_runs(state, diverged)


def _evaluate(state: _Pass, replicas: Sequence[_Replica], clock: Clock) -> None:
    """Evaluate ``replicas`` (active ones) and record the rows, as `fit`'s ``_run_evaluation``."""
    rows = [state.active.index(r) for r in replicas]
    started = time.perf_counter()
    results = state.evaluate(rows)
    seconds = (time.perf_counter() - started) / max(len(rows), 1)
    for replica, metrics in zip(replicas, results):
        replica.eval_seconds += seconds
        row = {"step": clock.step, "epoch": clock.epoch, "samples_seen": clock.samples_seen,
               "seconds": replica.seconds, **metrics}
        replica.evals.append(row)
        before = len(replica.requests)
        replica.dispatch("on_evaluation", Evaluation(clock, metrics, replica.seconds, replica.model))
        # Callbacks may add metrics measured at these weights (AddMetrics), never overwrite ours.
        added = [r for r in replica.requests[before:] if isinstance(r, AddMetrics)]
        for request in added:
            row.update({k: v for k, v in request.values.items() if k not in row})
        replica.requests = [r for r in replica.requests if not isinstance(r, AddMetrics)]


def _apply_requests(replica: _Replica) -> bool:
    """Act on a replica's callback requests (as `fit`'s ``_handle``); True when it was asked to stop."""
    for request in replica.requests:
        if isinstance(request, RestoreWeights):
            replica.model.load_state_dict(request.state_dict)  # its live weights: rows of the stack
        elif isinstance(request, Save):
            log.warning("replica %d: checkpoints are not supported for replicas; Save(%s) ignored",
                        replica.index, request.path)
        elif isinstance(request, Stop) and replica.status == "finished":
            replica.status, replica.message = "stopped", request.reason
    replica.requests = []
    return replica.status == "stopped"


def _end_epoch(replica: _Replica, clock: Clock, classification: bool) -> None:
    """The epoch row and `EpochEnd` event of one replica (its last evaluation is at this step)."""
    metrics = {k: v for k, v in replica.evals[-1].items() if k.endswith(("_loss", "_acc"))}
    count = replica.count
    epoch_row = {"epoch": clock.epoch, "step": clock.step, "samples_seen": clock.samples_seen,
                 "lr": replica.steps[-1]["lr"] if replica.steps else float("nan"),
                 "running_loss": replica.loss_total / count if count else float("nan")}
    if classification:
        epoch_row["running_acc"] = replica.correct / count if count else float("nan")
    epoch_row.update(metrics)
    epoch_row["seconds"] = replica.seconds
    replica.epochs.append(epoch_row)
    event = EpochEnd(clock, epoch_row, tuple(replica.steps[replica.delivered_steps:]),
                     tuple(replica.evals[replica.delivered_evals:]), replica.model)
    replica.delivered_steps, replica.delivered_evals = len(replica.steps), len(replica.evals)
    replica.dispatch("on_epoch_end", event)


def _end_runs(state: _Pass, replicas: Sequence[_Replica]) -> None:
    """Finish these replicas and take them out of the stack."""
    for replica in replicas:
        _finish(replica, state)
    state.drop(replicas)


def _finish(replica: _Replica, state: _Pass) -> None:
    """The replica's `RunEnd` event and its answer (`RestoreWeights`), as `fit`'s ``_finish``."""
    replica.requests = []
    summary = _as_run(replica, state.dataset).summary
    event = RunEnd(replica.clock, replica.status, replica.message, summary,
                   tuple(replica.steps[replica.delivered_steps:]), tuple(replica.evals[replica.delivered_evals:]),
                   replica.model)
    replica.dispatch("on_run_end", event)
    for request in replica.requests:
        if isinstance(request, RestoreWeights):
            replica.model.load_state_dict(request.state_dict)
    replica.requests = []


def _as_run(replica: _Replica, dataset) -> Run:
    return Run(
        config=replica.config, dataset=dataset.name, clock=replica.clock, status=replica.status,
        message=replica.message, model=replica.model, seconds=replica.seconds,
        eval_seconds=replica.eval_seconds, step_rows=replica.steps, eval_rows=replica.evals,
        epoch_rows=replica.epochs,
    )


class _ProgressDisplay:
    """A rich progress bar over all replicas' steps: active replicas and their best running loss."""

    @staticmethod
    def wanted() -> bool:
        import sys

        return sys.stderr.isatty() and not os.environ.get("CI")

    def __init__(self, n_replicas: int, total_steps: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.n_replicas = n_replicas
        self.done_before = 0
        self.progress = Progress(TextColumn("replicas"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.fields[values]}"), console=Console(stderr=True), transient=True)
        self.progress.start()
        self.task = self.progress.add_task("steps", total=total_steps, values="")
        self.last_draw = 0.0

    def update(self, state: _Pass, clock: Clock) -> None:
        now = time.monotonic()
        if now - self.last_draw < 0.1:
            return
        self.last_draw = now
        running = [r.steps[-1]["running_loss"] for r in state.active if r.steps]
        best = f"  best running_loss {min(running):.4f}" if running else ""
        self.progress.update(self.task, completed=clock.step, values=f"active {len(state.active)}{best}")

    def close(self) -> None:
        self.progress.stop()
