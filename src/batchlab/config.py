"""Typed, validated, frozen configuration.

`TrainConfig` holds everything that decides how one model trains: batch size, epochs, optimizer,
schedule, seed. It is frozen and validated on construction, saved with every run, and its fields
are the command line's flags (``--batch-size 32`` is ``batch_size=32``). `RunSpec` adds what the
command line needs besides: which dataset, which model, which probes. Both are read from TOML.
Configuration is data: it is never executed or unpickled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Union

import tomllib
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import BatchlabError, ConfigError
from .files import read_text

Optimizer = Literal["sgd", "adam", "adamw", "rmsprop"]
Schedule = Literal["constant", "step", "cosine", "sgdr"]
LrScaling = Literal["none", "linear", "sqrt"]
Device = Literal["cpu", "cuda", "auto"]
Loss = Literal["auto", "cross_entropy", "mse"]
Compile = Literal["auto", "on", "off"]
BatchSize = Union[int, Literal["full"]]
# A batch-size schedule: (samples seen, B) pairs, the first at 0 (`batchlab.schedule`).
BatchSchedule = tuple[tuple[int, BatchSize], ...]


# Whole numbers end up in torch (seeds, step counters, sizes): they must fit a signed 64-bit integer.
INT64_LIMIT = 2**63
# Learning rates and weight decay meet float32 weights: past ~3e38 (or less, after lr scaling by
# B / reference) torch cannot even store them. No rate above this trains anything.
LARGEST_RATE = 1e12


class _Frozen(BaseModel):
    """A frozen, validated model whose construction fails with one `ConfigError` line.

    ``allow_inf_nan=False``: every float field must be finite (an infinite weight decay or gamma
    is a typo, never a setting).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False)
    _what: ClassVar[str] = "config"  # how the one-line error names this kind of config

    if not TYPE_CHECKING:  # type checkers keep pydantic's field-by-field signature

        def __init__(self, **values: Any) -> None:
            try:
                super().__init__(**values)
            except ValidationError as error:
                raise ConfigError(one_line(error, self._what)) from None

        # Marks this __init__ as pydantic's own, so that a nested config (RunSpec.train) is
        # validated by pydantic directly and its errors keep their full path (train.gamma).
        __init__.__pydantic_base_init__ = True


def whole_number_or(value: Any, word: str, expected: str) -> Any:
    """A count given as a number or text (``"32"``, ``32.0``), or the one word allowed instead.

    Args:
        value: what was given.
        word: the one non-number accepted (``"full"``, ``"epoch"``).
        expected: the accepted forms, in words, for the error.

    Returns:
        ``word`` or an int in [1, 2**63).

    Raises:
        ValueError: one line naming the accepted forms and what was given.
    """
    if value == word:
        return value
    number = value
    if isinstance(value, str):
        try:
            number = int(value)
        except ValueError:
            number = None
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number < INT64_LIMIT:
        raise ValueError(f"must be {expected}, got {value!r}")
    return number


def parse_schedule(value: Any, whole_number: Any) -> Any:
    """A config's ``batch_size`` as given (an int, ``"full"``, text, or pairs) in its checked form.

    Args:
        value: what was given: ``32``, ``"full"``, ``"32,20000:64"``, ``[(0, 32), (20000, 64)]``.
        whole_number: checks one batch size (an int ≥ 1 or ``"full"``) and returns it.

    Returns:
        An int or ``"full"`` for a constant batch; for a schedule, a tuple of ``(samples, B)``
        pairs, the first at 0 samples, samples strictly increasing, no two neighbours equal in B.
        A schedule of one pair is its batch size.

    Raises:
        ValueError: one line naming the accepted forms.
    """
    if isinstance(value, str) and ("," in value or ":" in value):
        value = [_text_pair(part, index) for index, part in enumerate(value.split(","))]
    if not isinstance(value, (list, tuple)):
        return whole_number(value)
    pairs = [_pair(item, whole_number) for item in value]
    if not pairs:
        raise ValueError("a batch-size schedule needs at least one (samples, batch size) pair")
    if pairs[0][0] != 0:
        raise ValueError(f"a batch-size schedule starts at 0 samples seen, got {pairs[0][0]}")
    for (before, _), (after, _) in zip(pairs, pairs[1:]):
        if after <= before:
            raise ValueError(f"a batch-size schedule's samples must increase, got {before} then {after}")
    merged = [pairs[0]] + [p for previous, p in zip(pairs, pairs[1:]) if p[1] != previous[1]]
    return merged[0][1] if len(merged) == 1 else tuple(merged)


def _text_pair(part: str, index: int) -> tuple[str, str]:
    """``"20000:64"`` -> ("20000", "64"); the first part may be a bare B (from 0 samples)."""
    part = part.strip()
    if ":" not in part:
        if index == 0:
            return "0", part
        raise ValueError(f"after the first batch size, each change reads SAMPLES:B (e.g. 20000:64), got {part!r}")
    samples, batch = part.split(":", 1)
    return samples.strip(), batch.strip()


def _pair(item: Any, whole_number: Any) -> tuple[int, Any]:
    if not isinstance(item, (list, tuple)) or len(item) != 2:
        raise ValueError(f"each step of a batch-size schedule is (samples seen, batch size), got {item!r}")
    samples = item[0]
    if isinstance(samples, str):
        try:
            samples = int(samples)
        except ValueError:
            pass
    elif isinstance(samples, float) and samples.is_integer():
        samples = int(samples)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"a batch-size schedule's samples seen must be a whole number >= 0, got {item[0]!r}")
    return samples, whole_number(item[1])


def is_schedule(batch_size: Any) -> bool:
    """Whether a config's ``batch_size`` is a schedule rather than one batch size."""
    return isinstance(batch_size, tuple)


def format_schedule(batch_size: Any) -> str:
    """A config's batch size as the command line writes it: ``32``, ``full``, ``32,20000:64``,
    ``adaptive:start=16,max=1024,signal=local_cbs``."""
    if isinstance(batch_size, Adaptive):
        given = batch_size.model_dump(exclude_defaults=True)
        options = {"start": batch_size.start, "max": batch_size.max, **given}  # the range, always
        return "adaptive:" + ",".join(f"{k}={v}" for k, v in options.items())
    if not is_schedule(batch_size):
        return str(batch_size)
    return ",".join([str(batch_size[0][1]), *(f"{s}:{b}" for s, b in batch_size[1:])])


def batch_size_text(value: Any) -> str:
    """A stored config's batch size as the command line writes it (``32``, ``full``, ``32,600:64``,
    ``adaptive:start=8,max=128``); a value that is none of these, as it is."""
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        return str(value)
    try:
        return format_schedule(TrainConfig(batch_size=value).batch_size)
    except ConfigError:
        return str(value)


class Adaptive(_Frozen):
    """A batch size that grows during the run when a measurement says a larger batch loses nothing.

    At the run's first evaluation and then the first one at or after every ``every`` samples, the
    signal is measured at the live weights; when it says a batch at least twice the current one is no worse,
    the batch grows to the largest such power-of-two multiple, up to ``max`` (and the training-set
    size); it never shrinks. See `batchlab.adaptive` for the rule and docs/adaptive.md for its evidence.

    Args:
        start: the first batch size.
        max: the largest batch size allowed.
        signal: ``local_cbs`` (branches at 1, 2 and 4 times the batch, `batchlab.local_cbs`) or
            ``b_simple`` (the gradient noise scale tr(Σ)/‖G‖² at the same weights, from per-sample
            gradients; cheaper, but a proxy that assumes SGD).
        every: samples between decisions (each at the next evaluation), or None: at every evaluation.
        lr_rule: how the lr follows the batch from ``start`` (the config's ``lr`` is the lr at
            ``start``): ``linear`` (SGD), ``sqrt`` (Adam-like), ``none``, or ``auto`` (linear for
            SGD, sqrt otherwise).
        seeds: seeds of the ``local_cbs`` branches (at least 2).
        beta2_half_life: hold Adam's β₂ at a fixed half-life in samples (Marek et al. 2025): at
            batch B, β₂ becomes β₂^(B/start).
    """

    start: int = Field(default=16, ge=1, lt=INT64_LIMIT)
    max: int = Field(default=1024, ge=1, lt=INT64_LIMIT)
    signal: Literal["local_cbs", "b_simple"] = "local_cbs"
    every: int | None = Field(default=None, ge=1, lt=INT64_LIMIT)
    lr_rule: Literal["auto", "linear", "sqrt", "none"] = "auto"
    seeds: int = Field(default=3, ge=2, le=100)
    beta2_half_life: bool = True
    _what: ClassVar[str] = "adaptive batch size"

    @model_validator(mode="after")
    def _ordered(self) -> "Adaptive":
        if self.max < self.start:
            raise ValueError(f"max ({self.max}) must be at least start ({self.start})")
        return self


def parse_adaptive(value: Any) -> Any:
    """``"adaptive"`` or ``"adaptive:start=16,max=512,signal=b_simple"`` (the command line's form) or a
    mapping of `Adaptive`'s fields (TOML, JSON) as an `Adaptive`; anything else as it is."""
    if isinstance(value, str) and (value == "adaptive" or value.startswith("adaptive:")):
        options = [part for part in value.removeprefix("adaptive").removeprefix(":").split(",") if part.strip()]
        if any("=" not in part for part in options):
            raise ValueError(f"an adaptive batch size reads adaptive:start=16,max=1024,signal=local_cbs, got {value!r}")
        fields = {k.strip(): v.strip() for k, v in (part.split("=", 1) for part in options)}
        value = {k: (None if v.lower() == "none" else v) for k, v in fields.items()}
    if isinstance(value, dict):
        try:
            return Adaptive(**value)
        except ConfigError as error:
            raise ValueError(str(error).removeprefix("invalid adaptive batch size: ")) from None
    return value



class TrainConfig(_Frozen):
    """How one model trains.

    Ownership follows the words of the design: the batch size and shuffling decide the batches of
    an epoch; ``steps_per_epoch`` follows from N and B (ceil(N/B), floor with ``drop_last``); the
    number of epochs (or ``max_steps``, whichever ends first) decides when training stops.

    Args:
        batch_size: samples per update, ``"full"`` for batch gradient descent (B = N), or a
            schedule of (samples seen, B) pairs, the first at 0: ``((0, 32), (20000, 64))``, on
            the command line ``32,20000:64``. A change takes effect at the next batch; the
            learning rate follows each B through ``lr_scaling`` (`batchlab.schedule`). Or an
            `Adaptive` batch size that grows as measurements allow (``--batch-size adaptive``).
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
        compile: run each update as one compiled graph (``on``), eagerly (``off``), or compiled
            when the run is long enough to repay the compile time (``auto``; docs/compile.md).
            The numbers are the same either way (within float rounding).
    """

    batch_size: Union[BatchSize, BatchSchedule, Adaptive] = 32
    epochs: int | None = Field(default=None, ge=1, lt=INT64_LIMIT)
    max_steps: int | None = Field(default=None, ge=1, lt=INT64_LIMIT)
    optimizer: Optimizer = "sgd"
    lr: float = 0.01
    momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(default=0.0, ge=0.0, le=LARGEST_RATE)
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Schedule = "constant"
    step_epochs: int = Field(default=30, ge=1, lt=INT64_LIMIT)
    gamma: float = Field(default=0.1, gt=0.0, le=1.0)  # > 1 would overflow the lr
    sgdr_epochs: int = Field(default=10, ge=1, lt=INT64_LIMIT)
    sgdr_mult: int = Field(default=1, ge=1, le=1000)
    min_lr: float = Field(default=0.0, ge=0.0, le=LARGEST_RATE)
    warmup_steps: int = Field(default=0, ge=0, lt=INT64_LIMIT)
    warmup_epochs: float = Field(default=0.0, ge=0.0, le=1e9)  # x steps/epoch must stay an int64
    lr_scaling: LrScaling = "none"
    reference_batch_size: int = Field(default=32, ge=1, lt=INT64_LIMIT)
    shuffle: bool = True
    drop_last: bool = False
    seed: int = Field(default=0, ge=0, lt=INT64_LIMIT)  # torch generators take 0 <= seed < 2**63
    device: Device = "cpu"
    eval_every: int | Literal["epoch"] = "epoch"
    eval_batch_size: int = Field(default=8192, ge=1, lt=INT64_LIMIT)
    eval_train: bool = True
    probe_every: int = Field(default=1, ge=1, lt=INT64_LIMIT)
    loss: Loss = "auto"
    compile: Compile = "auto"
    _what: ClassVar[str] = "training config"

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, value: Any) -> Any:
        value = parse_adaptive(value)
        if isinstance(value, Adaptive):
            return value
        return parse_schedule(value, lambda b: whole_number_or(b, "full", "a whole number >= 1 or 'full'"))

    @field_validator("eval_every", mode="before")
    @classmethod
    def _eval_every(cls, value: Any) -> Any:
        return whole_number_or(value, "epoch", "'epoch' or a number of steps >= 1")

    @field_validator("lr")
    @classmethod
    def _lr(cls, value: float) -> float:
        if not 0 < value <= LARGEST_RATE:
            raise ValueError(f"must be a number > 0 and <= {LARGEST_RATE:g}, got {value}")
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
        if isinstance(self.batch_size, Adaptive) and (self.lr_scaling != "none" or self.schedule in ("cosine", "sgdr")
                                                      or self.warmup_epochs):
            # Its lr follows its own lr_rule from start; its length in steps is known only as it goes.
            raise ValueError("an adaptive batch size scales the lr by its own lr_rule (keep lr_scaling 'none') and "
                             "changes the run's steps as it goes: use a constant or step lr schedule, warm-up in "
                             "warmup_steps")
        if is_schedule(self.batch_size) and (self.warmup_epochs or self.schedule == "sgdr"):
            # Both count epochs in steps, and an epoch's steps change with the batch size.
            raise ValueError("with a batch-size schedule, give warm-up in warmup_steps, and use a constant, "
                             "step or cosine lr schedule (sgdr counts its periods in steps of one batch size)")
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
    split_seed: int = Field(default=0, ge=0, lt=INT64_LIMIT)
    standardize: bool = False
    _what: ClassVar[str] = "dataset spec"


class RunSpec(_Frozen):
    """A whole run as the command line and TOML files describe it."""

    name: str | None = None
    dataset: DatasetSpec = DatasetSpec()
    model: str = "mlp"
    probes: tuple[str, ...] = ()
    train: TrainConfig = TrainConfig()
    _what: ClassVar[str] = "run config"


def _field_path(loc: tuple[Any, ...]) -> str:
    """``("train", "batch_size", "int")`` -> ``"train.batch_size"``: pydantic adds union members to
    the location (``int``, ``literal['full']``, ``tuple[float, ...]``); they are not fields."""
    fields = [str(p) for p in loc if isinstance(p, int) or str(p).isidentifier() and str(p) not in _TYPE_TAGS]
    return ".".join(fields)


_TYPE_TAGS = {"int", "float", "str", "bool", "tuple", "list", "dict", "none"}


def _message(item: Any) -> str:
    """pydantic's sentence for one error, in this project's words (``must be ...``)."""
    if item["type"] == "extra_forbidden":
        return "unknown field; check its spelling"
    message = item["msg"].removeprefix("Value error, ").replace("Input should be", "must be")
    message = message.replace(str(INT64_LIMIT), "2**63 (it must fit a 64-bit integer)")
    if item["type"] not in ("value_error", "assertion_error") and "input" in item:
        given = repr(item["input"])
        message += f", got {given if len(given) <= 40 else given[:37] + '...'}"
    return message


def one_line(error: ValidationError, what: str) -> str:
    """A pydantic ValidationError as one line: ``invalid <what>: field: must be ...; field2: ...``.

    Errors of one field (several union members failing) are joined with ``or``.
    """
    by_field: dict[str, list[str]] = {}
    for item in error.errors():
        messages = by_field.setdefault(_field_path(item["loc"]), [])
        if _message(item) not in messages:
            messages.append(_message(item))
    parts = [(f"{where}: " if where else "") + " or ".join(messages) for where, messages in by_field.items()]
    return f"invalid {what}: " + "; ".join(parts)


def make_train_config(values: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig from plain values (flags, TOML); a bad value is one `ConfigError` line."""
    return TrainConfig(**values)


def make_run_spec(values: dict[str, Any]) -> RunSpec:
    """Build a RunSpec from plain values (as read from TOML); a bad value is one `ConfigError` line."""
    return RunSpec(**values)


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file (UTF-8) into plain values, with one-line errors for unreadable or malformed files."""
    path = Path(path)
    text = read_text(path, "config file", ConfigError)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"malformed TOML in {path}: {error}") from None


def check_import_allowed(model: str, allow_import: bool, source: str,
                         error: type[BatchlabError] = ConfigError) -> None:
    """Refuse a ``package.module:function`` model unless the caller opted in.

    Importing a module runs its code, so a model named in a file someone sent must not be imported
    by merely reading the file.

    Args:
        model: the model name or spec.
        allow_import: the caller's opt-in.
        source: where the name came from, for the error (``run.toml``, ``build_model``).
        error: the kind of error to raise.

    Raises:
        error: the model is an import reference and ``allow_import`` is false.
    """
    if is_import_reference(model) and not allow_import:
        raise error(f"{source} names the model {model!r}, which would import and run Python code; "
                          "pass allow_import=True (on the command line --allow-import) if you trust it")


def is_import_reference(model: str) -> bool:
    """Whether a model spec names user code, ``package.module:function`` (a dot before any colon)."""
    return "." in str(model).partition(":")[0]


def merge_values(base: Mapping[str, Any], given: Mapping[str, Any], tables: tuple[str, ...]) -> dict[str, Any]:
    """``given`` over ``base``: the ``tables`` merged key by key, every other key replaced.

    Args:
        base: the values underneath (a file's, a preset's).
        given: the values that win (flags, a caller's overrides).
        tables: keys whose values are tables (``train``, ``dataset``); a table given as a mapping
            over a mapping changes only the keys it names, anything else replaces the value whole.

    Returns:
        A new dict; neither argument is changed.
    """
    merged = dict(base)
    for key, value in given.items():
        if key in tables and isinstance(value, Mapping):
            under = merged.get(key, {})
            value = {**under, **value} if isinstance(under, Mapping) else dict(value)
        merged[key] = value
    return merged


def _check_tables(values: Mapping[str, Any], tables: tuple[str, ...], what: str) -> None:
    """Refuse a file whose ``[train]`` (or ``[dataset]``) is a plain value: merging flags into it
    key by key would be meaningless, and pydantic's own message would not name the file."""
    if any(not isinstance(values.get(table, {}), Mapping) for table in tables):
        raise ConfigError(f"in the config file, {what}")


def _import_source(path: str | Path | None, source: str | None) -> str:
    """Who names the model in a refused import: the caller's words, else the file, else the values."""
    return source if source is not None else str(path) if path is not None else "the config"


RUN_TABLES = ("train", "dataset")


def load_run_spec(path: str | Path | None = None, *, overrides: Mapping[str, Any] | None = None,
                  defaults: Mapping[str, Any] | None = None, allow_import: bool = False,
                  source: str | None = None) -> RunSpec:
    """A run from a TOML file (tables ``[dataset]`` and ``[train]``, keys ``model``, ``probes``, ``name``)
    with values given over it: what ``batchlab fit --config FILE --lr 0.1`` and the Python API read.

    Args:
        path: the TOML file, or None for a run of ``defaults`` alone.
        overrides: values in the file's shape that win over it (``{"train": {"lr": 0.1}}``); the
            ``train`` and ``dataset`` tables are merged key by key, other keys replaced.
        defaults: values used instead of a file when ``path`` is None (a command's own defaults);
            ignored when a file is given: its values, and the fields' own defaults, apply instead.
        allow_import: accept a ``package.module:function`` model (importing it runs its code).
        source: who named the model, for the error refusing an import (default: the file).

    Returns:
        The validated `RunSpec`.

    Raises:
        ConfigError: an unreadable or malformed file, ``[train]`` or ``[dataset]`` not a table,
            an invalid value, or a model import without ``allow_import``; one line.
    """
    if path is not None:
        base = read_toml(path)
        _check_tables(base, RUN_TABLES, "[train] and [dataset] must be tables")
    else:
        base = dict(defaults or {})
    spec = make_run_spec(merge_values(base, overrides or {}, RUN_TABLES))
    check_import_allowed(spec.model, allow_import, _import_source(path, source))
    return spec


# --- the batch-size study ------------------------------------------------------------------------

TARGET_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc")
TARGET_OPERATORS = (">=", "<=", ">", "<")
# Fields of a trial's TrainConfig that the study decides; the `train` table must leave them alone.
STUDY_OWNED_TRAIN_FIELDS = ("batch_size", "lr", "seed", "epochs", "max_steps", "eval_every", "lr_scaling")


class Target(_Frozen):
    """A condition on a full-pass metric, such as ``val_acc>=0.8``: the study's finish line.

    Steps-to-target is the first evaluated step at which the condition holds (Shallue et al. 2019).
    """

    metric: str
    operator: Literal[">=", "<=", ">", "<"]
    value: float
    _what: ClassVar[str] = "target"

    def met(self, metrics: dict[str, float]) -> bool:
        """Whether the condition holds for these metrics (NaN or a missing metric: never)."""
        value = metrics.get(self.metric)
        if value is None or not math.isfinite(value):
            return False
        return {">=": value >= self.value, "<=": value <= self.value,
                ">": value > self.value, "<": value < self.value}[self.operator]  # fmt: skip

    def __str__(self) -> str:
        return f"{self.metric}{self.operator}{self.value:g}"


def parse_target(text: str) -> Target:
    """``"val_acc>=0.8"`` -> Target(val_acc, >=, 0.8).

    Raises:
        ValueError: with one line naming what is wrong (pydantic turns it into a ConfigError line).
    """
    spec = str(text).replace(" ", "")
    hint = ("write METRIC>=VALUE or METRIC<=VALUE, e.g. val_acc>=0.8 or train_loss<=0.05, with METRIC one of "
            + ", ".join(TARGET_METRICS))
    for operator in TARGET_OPERATORS:  # two-character operators first
        metric, found, number = spec.partition(operator)
        if found:
            break
    else:
        raise ValueError(f"{text!r} has no comparison; {hint}")
    if metric not in TARGET_METRICS:
        raise ValueError(f"{text!r}: unknown metric {metric!r}; {hint}")
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r}: {number!r} is not a number; {hint}") from None
    if not math.isfinite(value):
        raise ValueError(f"{text!r}: the value must be finite; {hint}")
    return Target(metric=metric, operator=operator, value=value)


# The default study: MNIST-1D's MLP reaches val_acc 0.5 comfortably (it ends near 0.65) at every
# batch size, in ~750 steps at B = 16 down to ~40 at B = 1024, so steps-to-target falls with B,
# flattens past B_crit (~100) and the two ends differ ~20-fold, far above the spread over seeds.
DEFAULT_STUDY_BATCH_SIZES = (16, 32, 64, 128, 256, 512, 1024)


class StudyConfig(_Frozen):
    """A batch-size study: batch sizes × learning rates × seeds, each trained to a target.

    Every trial is one `TrainConfig`: the ``train`` table (optimizer, momentum, schedule, ...) with
    the study's batch size, learning rate, seed and budget filled in.

    Args:
        name: a label for the study in the store (not part of its identity).
        dataset: a built-in name or a file, or a `DatasetSpec` table.
        model: a model spec, ``NAME[:key=value,...]`` (``mlp:hidden=50,init=keras``).
        batch_sizes: the batch sizes (whole numbers and ``"full"``); default 16 … 1024 by powers of
            two; ``None``: powers of two from 1 up to the training-set size, and ``full``.
        lrs: ``"auto"`` (a log-spaced grid around ``lr_rule`` applied to ``reference_lr`` at
            ``reference_batch_size``, extended when the best lr lies at its edge) or a list of
            learning rates tried at every batch size.
        lr_rule: how the auto grid's centre moves with B: ``linear`` (Goyal et al. 2017), ``sqrt``
            (Hoffer et al. 2017) or ``none``.
        lr_grid_size: learning rates per batch size in the auto grid.
        lr_grid_factor: ratio of neighbouring learning rates in the auto grid.
        lr_extensions: how many times the auto grid of one batch size may be extended.
        seeds: how many seeds (0, 1, ...) or which seeds.
        target: the finish line, ``METRIC>=VALUE`` or ``METRIC<=VALUE`` (``val_acc>=0.8``).
        epochs, max_steps: the budget of every trial (whichever ends first).
        stop_at_target: end a trial when it reaches the target (its final metrics are then those at
            the target); ``false`` trains every trial for the whole budget.
        resolution: steps-to-target is measured to within this fraction of its value.
        noise_scale: measure the gradient noise scale B_simple (McCandlish et al. 2018) while
            training, at every batch size.
        adaptive: also train one run per seed with an `Adaptive` batch size, to the same target,
            reported beside the fixed batch sizes (`batchlab.study.adaptive`); the analysis is not
            changed by it. ``True`` (on the command line ``--adaptive``) starts at the grid's
            smallest batch size and grows up to its largest; an `Adaptive` table sets any of its
            fields, those not given (start, max included) as ``True`` sets them. Not part of the
            study's identity: adding it to a stored study trains the adaptive runs only.
        train: the rest of the training config; the study sets its batch size, lr, seed and budget.
    """

    name: str | None = None
    dataset: DatasetSpec = DatasetSpec(name="mnist1d")
    model: str = "mlp"
    batch_sizes: tuple[BatchSize, ...] | None = DEFAULT_STUDY_BATCH_SIZES
    lrs: Union[Literal["auto"], tuple[float, ...]] = "auto"
    lr_rule: LrScaling = "sqrt"
    reference_lr: float = Field(default=0.1, gt=0.0, le=LARGEST_RATE)
    reference_batch_size: int = Field(default=64, ge=1, lt=INT64_LIMIT)
    lr_grid_size: int = Field(default=5, ge=1, le=50)
    lr_grid_factor: float = Field(default=2.0, gt=1.0, le=100.0)  # factor ** index must stay a float
    lr_extensions: int = Field(default=2, ge=0, le=100)
    seeds: Union[int, tuple[int, ...]] = 3
    target: str = "val_acc>=0.5"
    epochs: int | None = Field(default=None, ge=1, lt=INT64_LIMIT)
    max_steps: int | None = Field(default=1200, ge=1, lt=INT64_LIMIT)
    stop_at_target: bool = True
    resolution: float = Field(default=0.05, ge=0.001, lt=1.0)  # ~ln(steps)/resolution evaluations
    noise_scale: bool = True
    adaptive: Union[bool, Adaptive] = False
    train: TrainConfig = TrainConfig(momentum=0.9)
    _what: ClassVar[str] = "study config"

    @field_validator("dataset", mode="before")
    @classmethod
    def _dataset(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, (str, Path)) else value

    @field_validator("batch_sizes", mode="before")
    @classmethod
    def _batch_sizes(cls, value: Any) -> Any:
        if value is None or value == "auto":
            return None
        if isinstance(value, (str, int)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"must be a list of batch sizes (whole numbers >= 1 or 'full'), got {value!r}")
        sizes = [whole_number_or(item, "full", "a whole number >= 1 or 'full'") for item in value]
        if not sizes:
            raise ValueError("give at least one batch size, or leave it out for powers of two up to the data size")
        return tuple(sizes)

    @field_validator("lrs", mode="before")
    @classmethod
    def _lrs(cls, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, str) and value != "auto":
            raise ValueError(f"must be 'auto' or a list of learning rates, got {value!r}")
        if not isinstance(value, str):
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"must be 'auto' or a list of learning rates, got {value!r}")
            value = tuple(value)
            if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                    and 0 < v <= LARGEST_RATE for v in value):
                raise ValueError(f"must be 'auto' or a non-empty list of learning rates > 0 and <= {LARGEST_RATE:g}, "
                                 f"got {value!r}")
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: Any) -> Any:
        if isinstance(value, int) and not 1 <= value <= 10_000:
            raise ValueError(f"must be a number of seeds in 1..10000 or a list of seeds, got {value}")
        if isinstance(value, tuple) and (not value or len(set(value)) != len(value)
                                         or min(value) < 0 or max(value) >= INT64_LIMIT):
            raise ValueError("a list of seeds must be non-empty, distinct, >= 0 and < 2**63")
        return value

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        return str(parse_target(value))

    @field_validator("adaptive", mode="before")
    @classmethod
    def _adaptive(cls, value: Any) -> Any:
        # "adaptive:signal=b_simple" (the command line's form, as --batch-size takes it) or a table.
        if isinstance(value, (bool, Adaptive)):
            return value
        if isinstance(value, (str, dict)):
            try:
                parsed = parse_adaptive(value)
            except ValueError as error:
                if "must be at least start" not in str(error):
                    raise
                # Start and max left out come from the grid when the study is planned, but a table is
                # checked now, against Adaptive's own default start.
                raise ValueError(f"{error}; give start too when max is below "
                                 f"{Adaptive.model_fields['start'].default}, e.g. start=4,max=8") from None
            if isinstance(parsed, Adaptive):
                return parsed
        raise ValueError(f"must be true, false, or adaptive batch-size settings such as "
                         f"{{signal = \"b_simple\"}} (start, max, signal, every, lr_rule, seeds, beta2_half_life); "
                         f"got {value!r}")

    @model_validator(mode="after")
    def _consistent(self) -> "StudyConfig":
        owned = sorted(set(STUDY_OWNED_TRAIN_FIELDS) & self.train.model_fields_set)
        if owned:
            raise ValueError(f"train.{owned[0]} is set by the study (batch_sizes, lrs, seeds, epochs, max_steps); "
                             "remove it from the train table")
        if self.epochs is None and self.max_steps is None:
            raise ValueError("give a budget: epochs or max_steps (or both; whichever ends first)")
        if self.adaptive is not False and not self.stop_at_target:
            raise ValueError("adaptive compares steps and samples to the target, so it needs a study that trains "
                             "to its target; remove stop_at_target=false (--no-stop-at-target) or adaptive")
        return self

    @property
    def parsed_target(self) -> Target:
        return parse_target(self.target)

    @property
    def seed_list(self) -> tuple[int, ...]:
        return tuple(range(self.seeds)) if isinstance(self.seeds, int) else tuple(self.seeds)

    def replace(self, **changes: Any) -> "StudyConfig":
        """A copy with some fields changed, validated again."""
        return make_study_config({**self.model_dump(exclude_unset=True), **changes})


def make_study_config(values: dict[str, Any]) -> StudyConfig:
    """Build a StudyConfig from plain values (TOML, flags); a bad value is one `ConfigError` line."""
    return StudyConfig(**values)


def default_study_train() -> dict[str, Any]:
    """The train table the default study sets itself (momentum 0.9), as plain values: a preset,
    a file or a flag changes it field by field, so that it stays unless something overrides it."""
    train = StudyConfig().train
    return train.model_dump(include=set(train.model_fields_set))


def load_study_config(path: str | Path | None = None, *, preset: Mapping[str, Any] | None = None,
                      overrides: Mapping[str, Any] | None = None, allow_import: bool = False,
                      source: str | None = None) -> StudyConfig:
    """A study from the default study's train table, a preset, a TOML file and values given over
    them, each over the last: what ``batchlab study --preset P --config FILE --seeds 5`` and the
    Python API read.

    The ``train`` table is merged field by field at every layer (the default study's momentum 0.9
    stays unless one of them sets it); every other key replaces the one beneath, ``dataset`` included.

    Args:
        path: the TOML file (keys of `StudyConfig`; tables ``[dataset]`` and ``[train]``), or None.
        preset: a preset's values (`batchlab.study.preset_values`), beneath the file.
        overrides: values in the file's shape that win over it (``{"seeds": 5, "train": {...}}``).
        allow_import: accept a ``package.module:function`` model (importing it runs its code).
        source: who named the model, for the error refusing an import (default: the file).

    Returns:
        The validated `StudyConfig`.

    Raises:
        ConfigError: an unreadable or malformed file, ``[train]`` not a table, an invalid value, or
            a model import without ``allow_import``; one line.
    """
    values = merge_values({"train": default_study_train()}, preset or {}, ("train",))
    if path is not None:
        from_file = read_toml(path)
        _check_tables(from_file, ("train",), "[train] must be a table")  # dataset may be a name
        values = merge_values(values, from_file, ("train",))
    config = make_study_config(merge_values(values, overrides or {}, ("train",)))
    check_import_allowed(config.model, allow_import, _import_source(path, source))
    return config
