"""One vectorized pass over a chunk of replicas: the stacked step and the stacked evaluation."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.func import vmap

from .. import schedule
from ..events import Clock
from ..metrics import evaluate_splits, evaluate_stacked, evaluation_splits, loss_function
from ..optim import shared_or_per_replica, stacked_chain
from ..record import StepNumbers
from .stack import _feed_dropout, _per_replica_norm, _Stack, _TensorSlots, draw_masks

if TYPE_CHECKING:
    from ..config import TrainConfig
    from .fit import _Replica


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
        # The update counter (Adam's bias corrections), shared by the eager and the compiled step.
        self.update_counter = [torch.zeros((), dtype=torch.float64, device=device)]
        self._chain_for_stack()
        self.clock = clock  # the run's accounting at the start (batch shapes, total steps)
        self.compiled = None  # a `batchlab.compiled.StackedStep` for unmeasured steps, or None: eager

    def _chain_for_stack(self) -> None:
        """The optimizer chain of the active replicas and its state: the stack's buffers and the counter.

        Called again when replicas leave: their rows, and hyperparameters, leave the stack.
        """
        stack = self.stack
        self.chain = stacked_chain(self.config.optimizer, self.config.nesterov, stack.hyper, self.device)
        names = self.chain.state_names()
        self.optimizer_state = {name: stack.optimizer_state[name] for name in names if name != "step"}
        if "step" in names:
            self.optimizer_state["step"] = self.update_counter

    def choose_compiled(self) -> None:
        """Compile the stacked step or not (the configs' ``compile``), for the stack as it is now.

        The compiled step applies the eager step's chain to the same state (the stack's buffers and
        the update counter, a tensor, so a new step count does not recompile).
        """
        from ..compiled.choose import replicas_step

        config, clock, stack = self.config, self.clock, self.stack
        X, y = self.dataset.train
        n = len(self.active)
        changes = clock.changes or ((0, clock.batch_size),)
        shapes = [((n, b, *X.shape[1:]), (n, b, *y.shape[1:]))
                  for b in schedule.sizes_used(changes, clock.n_train, config.drop_last, clock.total_steps)]
        names = [*stack.param_names, *stack.buffer_names, *(site.key for site in self.sites)]
        self.compiled = replicas_step(config.compile, self.skeleton, names, self.chain, self.loss_fn,
                                      self.classification, shapes, X.dtype, self.device,
                                      clock.total_steps - self.optimizer_step, config.probe_every if self.probes else None)

    def _compiled_step(self, xb: torch.Tensor, yb: torch.Tensor, masks: dict[str, torch.Tensor],
                       lr: np.ndarray) -> StepNumbers:
        """One update of every active replica by the compiled stacked step (no probe measures it)."""
        stack = self.stack
        extras = [*stack.buffers, *(masks[site.key] for site in self.sites)]
        numbers = self.compiled(stack.params, extras, self.optimizer_state, torch.from_numpy(lr).to(self.device),
                                xb, yb)
        if stack.previous is not None:  # update_norm compares with the weights before the next step
            with torch.no_grad():
                torch._foreach_copy_(stack.previous, [p.detach() for p in stack.params])
        return numbers

    def _trial_gradients(self, batch: int) -> tuple[torch.Tensor, ...]:
        """Gradients of one throw-away step (copied buffers, masks of ones): their memory layout."""
        stack, n = self.stack, len(self.active)
        X, y = self.dataset.train
        index = torch.arange(batch, device=X.device).expand(n, batch)  # (R, b)
        masks = [torch.ones((n, batch, *s.shape), device=self.device, dtype=X.dtype) for s in self.sites]
        buffers = [b.clone() for b in stack.buffers]
        losses, _ = self._train_losses((*stack.params, *buffers, *masks), X[index], y[index])
        return torch.autograd.grad(losses.sum(), stack.params)

    def _train_losses(self, tensors: tuple[torch.Tensor, ...], xb, yb) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every replica's mean batch loss (R,) and correct count (R,) (None for regression), from one
        vmapped forward.

        The loss is computed outside vmap on (R·b, K) rows: torch's per-sample loss under vmap
        runs a Python decomposition that cost more than the rest of a small model's step.
        """
        output = self.train_forward(tensors, xb)  # (R, b, K); tensors: weights, buffers, masks
        n, b = output.shape[:2]
        losses = self.loss_fn(output.reshape(n * b, *output.shape[2:]), yb.reshape(n * b, *yb.shape[2:]))
        loss = losses.reshape(n, b).mean(dim=1)  # (R,)
        correct = (output.detach().argmax(dim=2) == yb).sum(dim=1) if self.classification else None  # (R,)
        return loss, correct

    def step(self, index: torch.Tensor, clock: Clock, measuring: bool) -> tuple[StepNumbers, dict[str, torch.Tensor]]:
        """One update of every active replica.

        Args:
            index: (R, b) the sample indices of each replica's batch.
            clock: the run's accounting before the update (its step picks the lrs).
            measuring: whether the probes measure this update (eagerly).

        Returns:
            The batch numbers, (R,) tensors, and beside them each measured probe's (R,) values.
        """
        X, y = self.dataset.train
        stack = self.stack
        b = index.shape[1]
        xb, yb = schedule.gather_batches(X, y, index)  # (R, b, *shape), (R, b)
        masks = draw_masks(self.sites, [r.dropout_generator for r in self.active], b, self.device, X.dtype)
        lr = self.lrs[clock.step][[self.column[r.index] for r in self.active]]  # (R,)
        if self.compiled is not None and not measuring:
            self.optimizer_step += 1
            return self._compiled_step(xb, yb, masks, lr), {}
        tensors = (*stack.params, *stack.buffers, *(masks[site.key] for site in self.sites))
        losses, correct = self._train_losses(tensors, xb, yb)  # (R,), (R,)
        grads = torch.autograd.grad(losses.sum(), stack.params)  # each replica: its own mean-loss gradient
        probed: dict[str, torch.Tensor] = {}
        if measuring and "grad_norm" in self.probes:
            probed["grad_norm"] = _per_replica_norm(grads)
        self.optimizer_step += 1
        with torch.no_grad():
            self.chain.step(stack.params, list(grads), self.optimizer_state, shared_or_per_replica(lr, self.device))
            if stack.previous is not None:
                if measuring:
                    probed["update_norm"] = _per_replica_norm([p - q for p, q in zip(stack.params, stack.previous)])
                for q, p in zip(stack.previous, stack.params):
                    q.copy_(p)
            if measuring and stack.initial is not None:
                probed["dist_from_init"] = _per_replica_norm([p - p0 for p, p0 in zip(stack.params, stack.initial)])
        return StepNumbers(losses.detach(), correct), probed

    def evaluate(self, rows: Sequence[int]) -> list[dict[str, float]]:
        """Full passes over train (if enabled), val and test for the replicas at stack ``rows``.

        On the CPU each replica's module (whose tensors are views of the stack) is evaluated in
        turn with `batchlab.metrics.evaluate_splits`, exactly as `fit` evaluates: measured here, one
        vmapped pass over R replicas streams R times the activations through memory and is slower
        than R cache-friendly passes. On a GPU the vmapped pass (`evaluate_stacked`) is faster and used.
        """
        config = self.config
        splits = evaluation_splits(self.dataset, config.eval_train)
        if self.device.type == "cpu":
            return [evaluate_splits(self.active[row].model, splits, self.loss_fn, self.classification,
                                    config.eval_batch_size) for row in rows]
        stack = self.stack
        index = torch.tensor(list(rows), device=self.device)
        tensors = (*(p.detach().index_select(0, index) for p in stack.params),
                   *(b.index_select(0, index) for b in stack.buffers))
        self.skeleton.eval()
        try:
            return evaluate_stacked(lambda xb: self.eval_forward(tensors, xb), len(rows), splits, self.loss_fn,
                                    self.classification, config.eval_batch_size)
        finally:
            self.skeleton.train()

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
            self._chain_for_stack()
            for row, replica in enumerate(self.active):
                self.stack.attach(replica.model, row)
            if self.compiled is not None:  # a new R: compiled again if it still repays (or cached)
                self.choose_compiled()


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
    # Each step's B in force and the epochs done before it (needed only under a batch-size schedule).
    plan = (schedule.step_plan(clock.changes, clock.n_train, replicas[0].config.drop_last, clock.total_steps)
            if clock.changes else [(clock.batch_size, 0)] * clock.total_steps)
    for column, replica in enumerate(replicas):
        key = replica.config.model_dump_json(exclude={"seed"})
        if key not in computed:
            computed[key] = np.array([schedule.step_lr(replica.config, clock, s, batch, done, replica.base_lr)
                                      for s, (batch, done) in enumerate(plan)])
        table[:, column] = computed[key]
    return table
