"""Typed, validated, frozen configuration.

`TrainConfig` holds everything that decides how one model trains: batch size, epochs, optimizer,
schedule, seed. It is frozen and validated on construction, saved with every run, and its fields
are the command line's flags (``--batch-size 32`` is ``batch_size=32``). `RunSpec` adds what the
command line needs besides: which dataset, which model, which probes. Both read and write TOML.
Configuration is data: it is never executed or unpickled.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any, Literal, Union

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

Optimizer = Literal["sgd", "adam", "adamw", "rmsprop"]
Schedule = Literal["constant", "step", "cosine", "sgdr"]
LrScaling = Literal["none", "linear", "sqrt"]
Device = Literal["cpu", "cuda", "auto"]
Loss = Literal["auto", "cross_entropy", "mse"]
BatchSize = Union[int, Literal["full"]]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class TrainConfig(_Frozen):
    """How one model trains.

    Ownership follows the words of the design: the batch size and shuffling decide the batches of
    an epoch; ``steps_per_epoch`` follows from N and B (ceil(N/B), floor with ``drop_last``); the
    number of epochs (or ``max_steps``, whichever ends first) decides when training stops.

    Args:
        batch_size: samples per update, or ``"full"`` for batch gradient descent (B = N).
        epochs: passes over the training set. Defaults to 10 when ``max_steps`` is not given.
        max_steps: stop after this many updates (may end an epoch early).
        optimizer: ``sgd`` (with ``momentum`` and ``nesterov``), ``adam``, ``adamw`` or ``rmsprop``.
        lr: the base learning rate, before ``lr_scaling`` and the schedule.
        momentum: SGD/RMSprop momentum; Adam's beta1 is ``betas[0]``.
        schedule: ``constant``; ``step`` (times ``gamma`` every ``step_epochs``); ``cosine``
            (to ``min_lr`` at the last step); ``sgdr`` (cosine with warm restarts, Loshchilov &
            Hutter 2017: period ``sgdr_epochs`` multiplied by ``sgdr_mult`` after each restart).
        warmup_steps: linear warm-up from 0 to the scheduled lr over this many steps
            (Goyal et al. 2017); ``warmup_epochs`` says the same in epochs.
        lr_scaling: scale ``lr`` by B / ``reference_batch_size`` (``linear``, Goyal et al. 2017) or by
            its square root (``sqrt``, Hoffer et al. 2017).
        eval_every: ``"epoch"``, or a number of steps between full-pass evaluations (evaluation
            also happens at step 0 and at every epoch end).
        probe_every: probes measure every this many steps.
        loss: ``cross_entropy`` for classification, ``mse`` for regression, ``auto`` by the task.
    """

    batch_size: BatchSize = 32
    epochs: int | None = Field(default=None, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    optimizer: Optimizer = "sgd"
    lr: float = 0.01
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(default=0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Schedule = "constant"
    step_epochs: int = Field(default=30, ge=1)
    gamma: float = Field(default=0.1, gt=0.0)
    sgdr_epochs: int = Field(default=10, ge=1)
    sgdr_mult: int = Field(default=1, ge=1)
    min_lr: float = Field(default=0.0, ge=0.0)
    warmup_steps: int = Field(default=0, ge=0)
    warmup_epochs: float = Field(default=0.0, ge=0.0)
    lr_scaling: LrScaling = "none"
    reference_batch_size: int = Field(default=32, ge=1)
    shuffle: bool = True
    drop_last: bool = False
    seed: int = Field(default=0, ge=0)
    device: Device = "cpu"
    eval_every: int | Literal["epoch"] = "epoch"
    eval_batch_size: int = Field(default=8192, ge=1)
    eval_train: bool = True
    probe_every: int = Field(default=1, ge=1)
    loss: Loss = "auto"

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "full":
            try:
                value = int(value)
            except ValueError:
                raise ValueError("must be a whole number >= 1 or 'full'") from None
        if isinstance(value, bool) or (isinstance(value, int) and value < 1):
            raise ValueError(f"must be a whole number >= 1 or 'full', got {value!r}")
        return value

    @field_validator("eval_every", mode="before")
    @classmethod
    def _eval_every(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "epoch":
            try:
                value = int(value)
            except ValueError:
                raise ValueError("must be 'epoch' or a number of steps >= 1") from None
        if isinstance(value, int) and value < 1:
            raise ValueError(f"must be 'epoch' or a number of steps >= 1, got {value}")
        return value

    @field_validator("lr")
    @classmethod
    def _lr(cls, value: float) -> float:
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"must be a finite number > 0, got {value}")
        return value

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"each beta must be in [0, 1), got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.epochs is None and self.max_steps is None:
            object.__setattr__(self, "epochs", 10)
        if self.nesterov and not (self.optimizer == "sgd" and self.momentum > 0):
            raise ValueError("nesterov needs optimizer 'sgd' with momentum > 0")
        if self.warmup_steps and self.warmup_epochs:
            raise ValueError("give warmup_steps or warmup_epochs, not both")
        return self

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed, validated again."""
        return make_train_config({**self.model_dump(), **changes})


class DatasetSpec(_Frozen):
    """Which data to train on: a built-in name, or a ``.npz``/``.csv`` file.

    Args:
        name: a built-in dataset (``batchlab datasets`` lists them) or a path to a file.
        target: the label column of a CSV file.
        val_fraction: hold out this fraction of the training split for validation (seeded by
            ``split_seed``); ``None`` keeps the dataset's own validation split if it has one.
        standardize: standardize features with statistics of the training split only.
    """

    name: str = "mnist1d"
    target: str | None = None
    val_fraction: float | None = Field(default=None, gt=0.0, lt=1.0)
    split_seed: int = 0
    standardize: bool = False


class RunSpec(_Frozen):
    """A whole run as the command line and TOML files describe it."""

    name: str | None = None
    dataset: DatasetSpec = DatasetSpec()
    model: str = "mlp"
    probes: tuple[str, ...] = ()
    train: TrainConfig = TrainConfig()


def _one_line(error: ValidationError, what: str) -> str:
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or what
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        elif item["type"] == "literal_error":
            message = message.replace("Input should be", "must be")
        parts.append(f"{where}: {message}")
    return f"invalid {what}: " + "; ".join(parts)


def make_train_config(values: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from plain values, turning validation errors into one-line ConfigErrors."""
    try:
        return TrainConfig(**values)
    except ValidationError as error:
        raise ConfigError(_one_line(error, "training config")) from None


def make_run_spec(values: dict[str, Any]) -> RunSpec:
    """Build a RunSpec from plain values (as read from TOML), with one-line errors."""
    try:
        return RunSpec(**values)
    except ValidationError as error:
        raise ConfigError(_one_line(error, "run config")) from None


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file into plain values, with one-line errors for missing or malformed files."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror or error}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"malformed TOML in {path}: {error}") from None


def load_run_spec(path: str | Path) -> RunSpec:
    """Read a run described in TOML (tables ``[dataset]`` and ``[train]``, keys ``model``, ``probes``)."""
    return make_run_spec(read_toml(path))


def to_toml(config: BaseModel) -> str:
    """The config as TOML text (None values are left out, as TOML has no null)."""
    return tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))
