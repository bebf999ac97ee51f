"""The model zoo: logreg, mlp, cnn1d, cnn2d, and user models named as ``package.module:function``.

Every model is a plain ``nn.Sequential`` that maps a batch X (N, *input_shape) to logits
(N, n_classes) for classification or to predictions (N, k) for regression. Dropout and
batch-norm are the standard torch layers, so ``model.train()``/``model.eval()`` mean what they
always mean.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Any, Callable

import torch
from torch import nn

from batchlab.checks import check_arguments
from batchlab.config import check_import_allowed, is_import_reference
from batchlab.data import Dataset
from batchlab.errors import ModelError

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid,
}
_INITS = ("default", "he_uniform", "glorot_uniform", "keras")


# --- option checking ----------------------------------------------------------------------------


def _check_dropout(model: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ModelError(f"{model}: dropout={value!r} must be a number in [0, 1), e.g. dropout=0.1")
    return float(value)


def _check_bool(model: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ModelError(f"{model}: {key}={value!r} must be true or false")
    return value


def _check_positive_int(model: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{model}: {key}={value!r} must be a positive integer, e.g. {key}=32")
    return value


def _check_hidden(value: Any) -> list[int]:
    widths = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(widths, (list, tuple)) or not all(
        isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths
    ):
        raise ModelError(f"mlp: hidden={value!r} must be positive layer widths, e.g. hidden=100x100 (or [100, 100])")
    return list(widths)


def _check_choice(model: str, key: str, value: Any, choices: tuple[str, ...] | list[str]) -> str:
    if value not in choices:
        raise ModelError(f"{model}: {key}={value!r} is not known; use one of {', '.join(choices)}")
    return value


def _with_defaults(model: str, options: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) or "none"
        raise ModelError(f"{model} has no option {', '.join(unknown)}; valid options: {valid}")
    return {**defaults, **options}


def _n_outputs(dataset: Dataset) -> int:
    """n_classes for classification; k for regression targets (N, k) (1 for (N,))."""
    if dataset.n_classes is not None:
        return int(dataset.n_classes)
    y = dataset.train[1]
    return 1 if y.ndim == 1 else int(y[0].numel())


# --- initialisation -------------------------------------------------------------------------------


def he_uniform_(layer: nn.Linear | nn.Conv1d | nn.Conv2d) -> None:
    """Keras' HeUniform: weights ~ U(-sqrt(6 / fan_in), sqrt(6 / fan_in)), bias 0 (He et al. 2015)."""
    fan_in = layer.weight[0].numel()
    bound = math.sqrt(6.0 / fan_in)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound)
        if layer.bias is not None:
            layer.bias.zero_()


def glorot_uniform_(layer: nn.Linear | nn.Conv1d | nn.Conv2d) -> None:
    """Keras' GlorotUniform: U(-sqrt(6 / (fan_in + fan_out)), +), bias 0 (Glorot & Bengio 2010)."""
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _apply_init(linears: list[nn.Linear], init: str) -> None:
    """Initialise an MLP's linear layers; ``keras`` = Dense(he_uniform) hidden + Keras-default output."""
    if init == "default":
        return
    hidden, output = linears[:-1], linears[-1]
    for layer in hidden:
        (glorot_uniform_ if init == "glorot_uniform" else he_uniform_)(layer)
    (he_uniform_ if init == "he_uniform" else glorot_uniform_)(output)


# --- the zoo ------------------------------------------------------------------------------------------


def _logreg(dataset: Dataset, options: dict[str, Any]) -> nn.Module:
    _with_defaults("logreg", options, {})
    n_in = math.prod(dataset.input_shape)
    return nn.Sequential(nn.Flatten(), nn.Linear(n_in, _n_outputs(dataset)))  # (N, F) -> (N, out)


_MLP_DEFAULTS = {"hidden": [100, 100], "activation": "relu", "dropout": 0.0, "batch_norm": False, "init": "default"}


def _mlp(dataset: Dataset, options: dict[str, Any]) -> nn.Module:
    opts = _with_defaults("mlp", options, _MLP_DEFAULTS)
    hidden = _check_hidden(opts["hidden"])
    activation = _check_choice("mlp", "activation", opts["activation"], list(_ACTIVATIONS))
    dropout = _check_dropout("mlp", opts["dropout"])
    batch_norm = _check_bool("mlp", "batch_norm", opts["batch_norm"])
    init = _check_choice("mlp", "init", opts["init"], _INITS)
    layers: list[nn.Module] = [nn.Flatten()]  # (N, *shape) -> (N, F)
    width = math.prod(dataset.input_shape)
    for out in hidden:
        layers.append(nn.Linear(width, out))  # (N, width) -> (N, out)
        if batch_norm:
            layers.append(nn.BatchNorm1d(out))
        layers.append(_ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = out
    layers.append(nn.Linear(width, _n_outputs(dataset)))  # (N, width) -> (N, out)
    _apply_init([m for m in layers if isinstance(m, nn.Linear)], init)
    return nn.Sequential(*layers)


def _conv_out(length: int, kernel: int, stride: int, padding: int) -> int:
    return (length + 2 * padding - kernel) // stride + 1


def _cnn1d(dataset: Dataset, options: dict[str, Any]) -> nn.Module:
    """The small CNN of the MNIST-1D paper (Greydanus 2020): conv k5/k3/k3, stride 2, padding 1."""
    opts = _with_defaults("cnn1d", options, {"channels": 25, "dropout": 0.0, "batch_norm": False})
    channels = _check_positive_int("cnn1d", "channels", opts["channels"])
    dropout = _check_dropout("cnn1d", opts["dropout"])
    batch_norm = _check_bool("cnn1d", "batch_norm", opts["batch_norm"])
    shape = dataset.input_shape
    if len(shape) not in (1, 2):
        raise ModelError(f"cnn1d needs inputs of shape (L,) or (C, L) per sample, this dataset's are {shape}; use cnn2d for images or mlp")
    layers: list[nn.Module] = [nn.Unflatten(1, (1, shape[0]))] if len(shape) == 1 else []  # (N, L) -> (N, 1, L)
    in_channels, length = (1, shape[0]) if len(shape) == 1 else shape
    for kernel in (5, 3, 3):
        length = _conv_out(length, kernel, stride=2, padding=1)
        if length < 1:
            raise ModelError(f"cnn1d: signals of length {shape[-1]} are too short for three stride-2 convolutions; use at least 12 steps, or mlp")
        layers.append(nn.Conv1d(in_channels, channels, kernel, stride=2, padding=1))  # (N, C, L) -> (N, channels, L')
        if batch_norm:
            layers.append(nn.BatchNorm1d(channels))
        layers.append(nn.ReLU())
        in_channels = channels
    layers.append(nn.Flatten())  # (N, channels, L') -> (N, channels * L')
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(channels * length, _n_outputs(dataset)))
    return nn.Sequential(*layers)


def _cnn2d(dataset: Dataset, options: dict[str, Any]) -> nn.Module:
    """Two 3x3 conv + 2x2 max-pool blocks (channels, 2*channels), then a linear layer."""
    opts = _with_defaults("cnn2d", options, {"channels": 16, "dropout": 0.0, "batch_norm": False})
    channels = _check_positive_int("cnn2d", "channels", opts["channels"])
    dropout = _check_dropout("cnn2d", opts["dropout"])
    batch_norm = _check_bool("cnn2d", "batch_norm", opts["batch_norm"])
    shape = dataset.input_shape
    if len(shape) not in (2, 3):
        raise ModelError(f"cnn2d needs image inputs of shape (C, H, W) or (H, W) per sample, this dataset's are {shape}; use mlp or cnn1d")
    layers: list[nn.Module] = [nn.Unflatten(1, (1, *shape))] if len(shape) == 2 else []  # (N, H, W) -> (N, 1, H, W)
    in_channels, height, width = (1, *shape) if len(shape) == 2 else shape
    if height < 4 or width < 4:
        raise ModelError(f"cnn2d: images of {height}x{width} are too small for two 2x2 poolings; use at least 4x4, or mlp")
    for out in (channels, 2 * channels):
        layers.append(nn.Conv2d(in_channels, out, 3, padding=1))  # (N, C, H, W) -> (N, out, H, W)
        if batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers += [nn.ReLU(), nn.MaxPool2d(2)]  # (N, out, H, W) -> (N, out, H/2, W/2)
        in_channels, height, width = out, height // 2, width // 2
    layers.append(nn.Flatten())  # (N, 2*channels, H/4, W/4) -> (N, 2*channels*H/4*W/4)
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(in_channels * height * width, _n_outputs(dataset)))
    return nn.Sequential(*layers)


_ZOO: dict[str, tuple[Callable[[Dataset, dict[str, Any]], nn.Module], str, dict[str, Any]]] = {
    "logreg": (_logreg, "flatten + one linear layer (multinomial logistic regression)", {}),
    "mlp": (_mlp, "fully connected layers with activation, optional dropout and batch-norm; "
            "init=keras reproduces Keras Dense(he_uniform) hidden layers with a glorot_uniform output", _MLP_DEFAULTS),
    "cnn1d": (_cnn1d, "the MNIST-1D paper's CNN: 3 conv1d layers (kernels 5, 3, 3; stride 2; padding 1), relu, linear",
              {"channels": 25, "dropout": 0.0, "batch_norm": False}),
    "cnn2d": (_cnn2d, "two conv2d 3x3 + max-pool blocks (channels, 2*channels), relu, linear; for (C, H, W) images",
              {"channels": 16, "dropout": 0.0, "batch_norm": False}),
}


def list_models() -> list[dict[str, Any]]:
    """Describe the zoo.

    Returns:
        One dict per model: name, description, options (option name -> default).
    """
    return [{"name": name, "description": desc, "options": dict(defaults)} for name, (_, desc, defaults) in _ZOO.items()]


# --- building ---------------------------------------------------------------------------------------


def _import_factory(reference: str) -> Callable[..., Any]:
    """The function named by ``package.module:function``."""
    module_name, _, attr = reference.partition(":")
    if not attr:
        raise ModelError(f"model {reference!r} names a module but no function; write it as package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelError(f"cannot import module {module_name!r} for model {reference!r} ({type(exc).__name__}: {exc}); check that it is on PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"module {module_name!r} has no function {attr!r}; define {attr}(dataset) returning an nn.Module")
    return factory


def _build_custom(reference: str, dataset: Dataset, options: dict[str, Any]) -> nn.Module:
    factory = _import_factory(reference)
    try:
        model = factory(dataset, **options)
    except Exception as exc:  # the user's code: any failure is theirs to fix, say where it came from
        message = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(f"the model factory {reference}(dataset) raised {type(exc).__name__}: {message}; "
                         "fix the factory, or call it yourself to see the traceback") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{reference}(dataset) returned {type(model).__name__}, not a torch.nn.Module; make it return the model")
    return model


def total_memory(device: torch.device) -> int:
    """Bytes of memory of the device: the GPU's, or the host's physical memory (0 if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows): do not guess
        return 0


def _check_fits(name: str, build: Callable[[], nn.Module], device: torch.device) -> None:
    """Refuse a zoo model whose weights alone cannot fit the device, before allocating them.

    The model is built first on the ``meta`` device, which records shapes and allocates nothing;
    training needs its weights at least twice over (weights and gradients).
    """
    try:
        with torch.device("meta"):
            skeleton = build()
    except (RuntimeError, OverflowError) as exc:  # sizes past what a tensor can describe at all
        raise ModelError(f"{name}: its layers are too large to allocate ({str(exc).splitlines()[0]}); "
                         "choose smaller layers") from None
    weight_bytes = sum(t.numel() * t.element_size() for t in [*skeleton.parameters(), *skeleton.buffers()])
    available = total_memory(device)
    if available and 2 * weight_bytes > available:
        raise ModelError(f"{name} would have {weight_bytes / 2**30:.3g} GiB of weights (twice that to train), "
                         f"more than the {available / 2**30:.3g} GiB of memory of {device.type}; choose smaller layers")


def build_model(name: str, dataset: Dataset, *, seed: int | None = None, allow_import: bool = False,
                **options: Any) -> nn.Module:
    """Build a zoo model (or a ``package.module:function`` model) sized for ``dataset``.

    Args:
        name: ``logreg``, ``mlp``, ``cnn1d``, ``cnn2d`` (see `list_models`), or
            ``package.module:function``, called as ``function(dataset, **options)``.
        dataset: fixes the input shape, the output width and the device.
        seed: when given, the initial weights depend on it alone; the caller's global torch RNG
            is left as it was.
        allow_import: accept a ``package.module:function`` name; importing it runs that module's
            code, so it is refused unless asked for.
        **options: the model's options, e.g. ``hidden=[100, 100], dropout=0.1``.

    Returns:
        An ``nn.Module`` on ``dataset.device`` mapping X (N, *input_shape) to (N, n_classes)
        logits, or to (N, k) predictions for regression.
    """
    check_arguments("build_model", name=(name, str), dataset=(dataset, Dataset), seed=(seed, (int, type(None))))
    if seed is not None and not 0 <= seed < 2**63:
        raise ModelError(f"seed={seed} must be >= 0 and < 2**63 (it seeds a torch generator)")
    if is_import_reference(name):
        check_import_allowed(name, allow_import, "build_model", ModelError)
        build = lambda: _build_custom(name, dataset, options)  # noqa: E731
    elif name in _ZOO:
        build = lambda: _ZOO[name][0](dataset, options)  # noqa: E731
        _check_fits(name, build, dataset.device)
    else:
        raise ModelError(f"unknown model {name!r}; use one of {', '.join(_ZOO)}, or package.module:function for your own")
    if seed is None:
        return build().to(dataset.device)
    with torch.random.fork_rng(devices=[]):  # builds on the CPU; the caller's RNG state is restored on exit
        torch.manual_seed(int(seed))
        model = build()
    return model.to(dataset.device)


# --- the --model NAME[:options] spec ---------------------------------------------------------------


def _parse_value(text: str) -> Any:
    """``true``/``false`` -> bool, ``100x100`` -> [100, 100], then int, float, else the string."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if "x" in lowered and all(part.isdigit() for part in lowered.split("x")):
        return [int(part) for part in lowered.split("x")]
    for convert in (int, float):
        try:
            return convert(lowered)
        except ValueError:
            pass
    return text.strip()


def parse_model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``NAME[:key=value,...]`` into the model name and its options.

    ``mlp:hidden=100x100,dropout=0.1,batch_norm=true`` -> ``("mlp", {"hidden": [100, 100],
    "dropout": 0.1, "batch_norm": True})``. A spec whose part before ``:`` contains a dot is a
    ``package.module:function`` reference and is returned whole, with no options.

    Args:
        spec: the ``--model`` argument.

    Returns:
        (name, options).
    """
    spec = spec.strip()
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise ModelError(f"model spec {spec!r} has no model name; write NAME[:key=value,...], e.g. mlp:hidden=100x100")
    if "." in name:
        return spec, {}
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise ModelError(f"model option {item!r} in {spec!r} is not key=value; write e.g. {name}:dropout=0.1")
        if key in options:
            raise ModelError(f"model option {key!r} is given twice in {spec!r}; give it once")
        options[key] = _parse_value(value)
    return name.lower(), options


def model_from_spec(spec: str, dataset: Dataset, seed: int | None = None, *, allow_import: bool = False) -> nn.Module:
    """Parse a ``--model`` spec and build it for ``dataset`` (see `parse_model_spec`, `build_model`)."""
    name, options = parse_model_spec(spec)
    return build_model(name, dataset, seed=seed, allow_import=allow_import, **options)
