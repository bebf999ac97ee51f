"""R replicas trained in one vectorized pass.

A batch-size study trains the same small model many times (learning rates × seeds at each batch
size); at small batch sizes each update is mostly per-step overhead. `fit_replicas` computes R
trainings as one: the replicas' weights, buffers and optimizer states are stacked along a leading
replica dimension (`stack`), one ``torch.func.vmap`` of a call of the model's private copy with the
stacked tensors in its slots does every replica's forward pass on its own batch, autograd on the
stacked weights gives every replica's own gradient, and an optimizer chain
(`batchlab.optim.stacked_chain`) updates them all with per-replica hyperparameters
(`vectorized`).

Replica r reproduces ``fit(model_fn(seed_r), dataset, config_r)``: the same initial weights, data
order (a generator seeded with seed_r, one ``randperm`` per epoch), dropout masks (drawn from a
generator seeded with seed_r, in forward order, with the very call ``F.dropout`` makes on the CPU,
outside vmap, and fed in), learning rate per step (`lr_at`), and the same measurement core
(`batchlab.record.Recorder`): metric views, evaluations, probes, events and tables. Each
replica's result is a plain `batchlab.record.Run`.

A replica whose batch loss becomes NaN/inf is recorded as diverged and dropped from the stack; one
whose callbacks ask to stop (`EarlyStopping`, a target reached) stops alone; the others carry on.
Replicas write no checkpoints: a `Checkpoint` callback is refused before training.

Modules: `plan` (which configs share a pass, memory and chunks), `stack` (stacked tensors,
dropout masks, calling the skeleton), `vectorized` (the stacked step and evaluation), `fit`
(`fit_replicas`; the replicas as a group that `batchlab.drive.drive` runs through `fit`'s epoch
skeleton: their orders, the stacked steps read back in bulk, their evaluation).
"""

from .fit import ReplicaRuns, fit_replicas
from .plan import REPLICA_PROBES, SHARED_FIELDS, check_replica_configs, default_memory_budget, plan_chunks, replica_bytes
from .stack import DropoutSite, FedDropout, draw_masks

__all__ = [
    "REPLICA_PROBES", "SHARED_FIELDS", "DropoutSite", "FedDropout", "ReplicaRuns", "check_replica_configs",
    "default_memory_budget", "draw_masks", "fit_replicas", "plan_chunks", "replica_bytes",
]
