"""What may train together as replicas, and how many fit in memory at once."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..config import TrainConfig
from ..errors import ConfigError
from ..events import Callback

# Fields every replica of one vectorized pass must share: they fix the shapes and the schedule of
# the computation (batches, steps, evaluation points). The rest (seed, lr, momentum, weight decay,
# betas, schedule and its parameters, warm-up, lr scaling) may differ per replica.
SHARED_FIELDS = (
    "batch_size", "epochs", "max_steps", "optimizer", "nesterov", "shuffle", "drop_last", "device",
    "eval_every", "eval_batch_size", "eval_train", "probe_every", "loss",
)
REPLICA_PROBES = ("grad_norm", "dist_from_init", "update_norm")

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
