"""The compiled step trains exactly as eager PyTorch: oracle = a plain loop with torch.optim.

Compared in float64, where the compiler's reordering of float arithmetic is far below the
tolerance; the model has dropout (masks drawn by torch's RNG in both runs) and batch norm (running
statistics updated by the forward pass in both runs). One small model per test keeps the number of
C++ compilations low.
"""

from __future__ import annotations

import copy
import logging
import math
import os

import pytest
import torch
import torch.nn.functional as F

from batchlab.compiled import CompiledStep, CompileUnsupported

N, B, STEPS = 64, 16, 100  # 4 batches per epoch, all full: one compiled shape
TOLERANCE = 1e-9  # float64; the issue asks 1e-5


def make_model() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Dropout(0.3), torch.nn.Linear(16, 3)).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    X = torch.randn(N, 8, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=generator)
    return X, y


def lr_of(step: int) -> float:
    return 0.05 * (0.5 + 0.5 * math.cos(math.pi * step / STEPS))  # changes every step


def batches():
    X, y = data()
    for step in range(STEPS):
        start = (step * B) % N
        yield step, X[start:start + B], y[start:start + B]


def eager_run(model, optimizer) -> list[tuple[float, int]]:
    """The oracle: the loop a user writes."""
    torch.manual_seed(0)  # dropout masks
    numbers = []
    for step, xb, yb in batches():
        for group in optimizer.param_groups:
            group["lr"] = lr_of(step)
        output = model(xb)
        loss = F.cross_entropy(output, yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        numbers.append((loss.item(), (output.argmax(1) == yb).sum().item()))
    return numbers


def compiled_run(model, optimizer, switch_to_eager_at: int | None = None) -> tuple[list, CompiledStep]:
    """The same with `CompiledStep`; optionally continued by ``optimizer.step()`` from a step on."""
    step_fn = CompiledStep(model, optimizer, F.cross_entropy, classification=True)
    torch.manual_seed(0)
    numbers = []
    for step, xb, yb in batches():
        if switch_to_eager_at is not None and step >= switch_to_eager_at:
            for group in optimizer.param_groups:
                group["lr"] = lr_of(step)
            output = model(xb)
            loss = F.cross_entropy(output, yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            numbers.append((loss.item(), (output.argmax(1) == yb).sum().item()))
            continue
        step_fn.set_lr(lr_of(step))
        loss, correct = step_fn(xb, yb)
        numbers.append((loss.item(), correct.item()))
    return numbers, step_fn


def assert_same_training(eager, compiled, eager_model, compiled_model, eager_opt, compiled_opt) -> None:
    (eager_loss, eager_correct), (compiled_loss, compiled_correct) = zip(*eager), zip(*compiled)
    assert compiled_correct == eager_correct
    assert max(abs(a - b) for a, b in zip(eager_loss, compiled_loss)) < TOLERANCE
    for (name, a), (_, b) in zip(eager_model.state_dict().items(), compiled_model.state_dict().items()):
        assert (a.double() - b.double()).abs().max().item() < TOLERANCE, name  # weights and BN buffers
    eager_state, compiled_state = eager_opt.state_dict()["state"], compiled_opt.state_dict()["state"]
    for index, slot in eager_state.items():
        for key, value in slot.items():
            assert (value.double() - compiled_state[index][key].double()).abs().max().item() < TOLERANCE, key


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda params: torch.optim.Adam(params, lr=0.05, weight_decay=1e-3),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_compiled_training_equals_eager(kind):
    eager_model, compiled_model = make_model(), make_model()
    eager_opt, compiled_opt = OPTIMIZERS[kind](eager_model.parameters()), OPTIMIZERS[kind](compiled_model.parameters())
    counters = torch._dynamo.utils.counters["stats"]
    graphs_before = counters["unique_graphs"]
    eager = eager_run(eager_model, eager_opt)
    compiled, step_fn = compiled_run(compiled_model, compiled_opt, switch_to_eager_at=STEPS - 10)
    assert step_fn.mode == "compiled"
    # one graph for 90 steps whose lr changed every step; the last 10 steps are torch.optim's own,
    # continuing from the compiled step's state: the state is kept in torch.optim's format
    assert counters["unique_graphs"] - graphs_before <= 1
    assert compiled_model[1].num_batches_tracked.item() == STEPS
    assert_same_training(eager, compiled, eager_model, compiled_model, eager_opt, compiled_opt)


class _Printing(torch.nn.Module):
    """A model the compiler cannot capture in one graph: it reads a tensor as a Python number."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 3).double()

    def forward(self, x):
        if x.sum().item() > 1e9:  # data-dependent Python control flow: a graph break
            return x[:, :3]
        return self.linear(x)


def test_uncapturable_model_falls_back_to_eager_with_one_line(caplog):
    torch.manual_seed(3)
    eager_model = _Printing()
    compiled_model = copy.deepcopy(eager_model)
    eager_opt = torch.optim.SGD(eager_model.parameters(), lr=0.05, momentum=0.9)
    compiled_opt = torch.optim.SGD(compiled_model.parameters(), lr=0.05, momentum=0.9)
    with caplog.at_level(logging.WARNING, logger="batchlab.compiled"):
        compiled, step_fn = compiled_run(compiled_model, compiled_opt)
    eager = eager_run(eager_model, eager_opt)
    assert step_fn.mode == "eager" and step_fn.fallback_reason
    messages = [r.getMessage() for r in caplog.records if r.name == "batchlab.compiled"]
    assert len(messages) == 1 and "\n" not in messages[0] and "trains eagerly" in messages[0]
    assert_same_training(eager, compiled, eager_model, compiled_model, eager_opt, compiled_opt)


def test_unsupported_optimizer_option_is_named():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(CompileUnsupported, match="amsgrad"):
        CompiledStep(model, torch.optim.Adam(model.parameters(), amsgrad=True), F.cross_entropy, True)


def fewest_steps(accepts) -> int:
    """The fewest steps a monotone policy accepts, by bisection (10**12 when none up to there)."""
    low, high = 1, 10**12
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if accepts(middle) else (middle + 1, high)
    return low


@pytest.mark.parametrize("batch_size", [1, 7, 32, 300, 1024, 10**6])
def test_should_compile_once_the_run_is_long_enough_to_repay_each_shape(batch_size):
    # The policy's properties, whatever savings it was given (they are measured on one machine and
    # may be re-measured): a threshold in steps, a short last batch (a second shape) costing a second
    # compile, a graph compiled before costing nothing.
    from batchlab.compiled.policy import should_compile

    one, two = (fewest_steps(lambda n: should_compile(n, batch_size, shapes=shapes)) for shapes in (1, 2))
    assert 1 < one < 10**12
    assert all(should_compile(n, batch_size) for n in (one, one + 1, 10 * one))
    assert not should_compile(one - 1, batch_size)
    assert two == pytest.approx(2 * one, abs=1)
    assert should_compile(1, batch_size, compiled_before=True)


@pytest.mark.parametrize("capability, expected", [("default", "-default"), ("AVX2", "-avx2"), (None, "")])
def test_a_process_on_another_kernel_set_compiles_into_a_cache_of_its_own(monkeypatch, capability, expected):
    # Inductor's shared cache does not key kernels by ATEN_CPU_CAPABILITY; one compiled for this CPU's
    # vector width computes wrong numbers when a process on the scalar kernels loads it.
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from batchlab.compiled.step import separate_cache_per_kernel_set

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    if capability is None:
        monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    else:
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    separate_cache_per_kernel_set()
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir() + expected
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # as importing torch._dynamo leaves it
    separate_cache_per_kernel_set()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == default_cache_dir() + expected
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/chosen")  # a folder the user chose is theirs
    separate_cache_per_kernel_set()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/chosen"
