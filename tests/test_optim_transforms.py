"""The optimizer chains against torch.optim: every optimizer and option, over whole float64 runs.

The oracle is torch.optim itself. Each case trains a small tanh MLP for 30 updates with a learning
rate that changes at every update; the gradients come from the weights being trained, so a slip in
any update moves the rest of the trajectory. The chains run on the parameters as a list (the chain
built by name with a float learning rate, and the chain read off the torch optimizer with the
learning rate as a () tensor, as the compiled step gives it), and on R = 3 stacked replicas (R, *shape)
whose hyperparameters differ, each replica compared with its own torch.optim run.

Tolerance: both sides run in float64, where a reordered operation differs by ~1e-16 relative.
Over 30 updates the two runs agree to 5e-14 at most (RMSprop, whose steps of about ±lr amplify a
last-bit difference most; SGD is bit-identical), while a real slip (an undamped first buffer, a bias
correction one update off, a decay 1e-4 too large) moves the weights by 1e-6 and more.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from batchlab.config import TrainConfig
from batchlab.optim import (
    UnsupportedOptimizer,
    adam,
    adamw,
    add_decayed_weights,
    build_optimizer,
    chain,
    chain_of,
    config_chain,
    rmsprop,
    scale_by_lr,
    scale_by_momentum,
    scale_by_rms,
    sgd,
    shared_or_per_replica,
    signature,
    torch_state,
)

STEPS, R = 30, 3
TOLERANCE = 1e-12
SHAPES = [(8, 4), (8,), (2, 8), (2,)]  # an MLP 4-8-2: (w1, b1, w2, b2)


def lr_at(step: int) -> float:
    """A learning rate that changes at every update."""
    return 0.05 * (1.0 + 0.5 * math.cos(step))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(16, 4, generator=generator, dtype=torch.float64),
            torch.randn(16, 2, generator=generator, dtype=torch.float64))


X, Y = data()


def loss_of(params) -> torch.Tensor:
    w1, b1, w2, b2 = params
    return ((torch.tanh(X @ w1.T + b1) @ w2.T + b2 - Y) ** 2).mean()


def start(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=generator, dtype=torch.float64) for s in SHAPES]


def torch_params(seed: int) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(t) for t in start(seed)]


def torch_run(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The oracle: ``optimizer.step()`` for STEPS updates, the lr set before each."""
    params = optimizer.param_groups[0]["params"]
    for step in range(STEPS):
        optimizer.param_groups[0]["lr"] = lr_at(step)
        optimizer.zero_grad()
        loss_of(params).backward()
        optimizer.step()
    return [p.detach() for p in params]


def chain_run(optimizer_chain, params: list[torch.Tensor], lr_of=lr_at) -> list[torch.Tensor]:
    """The chain for STEPS updates; params stacked (R, *shape) train every replica on its own loss."""
    params = [p.detach().clone().requires_grad_() for p in params]
    stacked = params[0].ndim == 3
    state = optimizer_chain.init(params)
    for step in range(STEPS):
        if stacked:  # the sum of the replicas' losses: row r of each gradient is replica r's
            loss = sum(loss_of([p[r] for p in params]) for r in range(params[0].shape[0]))
        else:
            loss = loss_of(params)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            optimizer_chain.step(params, list(grads), state, lr_of(step))
    return [p.detach() for p in params]


def assert_equal_runs(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=TOLERANCE, atol=TOLERANCE)


def torch_adam(params, b1=0.9, b2=0.999, **options):
    return torch.optim.Adam(params, betas=(b1, b2), **options)


def torch_adamw(params, b1=0.9, b2=0.999, **options):
    return torch.optim.AdamW(params, betas=(b1, b2), **options)


# name: (the chain by name, the torch optimizer, options shared by all replicas, per-replica options).
# A list with equal values runs the shared (float) path, one with different values the (R,) tensor path.
CASES = {
    "sgd": (sgd, torch.optim.SGD, {}, {}),
    "sgd momentum": (sgd, torch.optim.SGD, {}, {"momentum": [0.9, 0.5, 0.0]}),
    "sgd dampening": (sgd, torch.optim.SGD, {"momentum": 0.9}, {"dampening": [0.1, 0.5, 0.0]}),
    "sgd nesterov": (sgd, torch.optim.SGD, {"nesterov": True}, {"momentum": [0.9, 0.5, 0.7]}),
    "sgd weight_decay": (sgd, torch.optim.SGD, {"momentum": 0.9}, {"weight_decay": [1e-2, 0.1, 0.0]}),
    "sgd nesterov weight_decay": (sgd, torch.optim.SGD, {"nesterov": True, "momentum": 0.8},
                                  {"weight_decay": [0.1, 0.1, 0.1]}),
    "adam": (adam, torch_adam, {}, {}),
    "adam betas eps": (adam, torch_adam, {}, {"b1": [0.8, 0.5, 0.9], "b2": [0.99, 0.9, 0.999],
                                              "eps": [1e-6, 1e-3, 1e-8]}),
    "adam weight_decay": (adam, torch_adam, {}, {"weight_decay": [1e-2, 0.1, 0.0]}),
    "adamw": (adamw, torch_adamw, {}, {}),
    "adamw weight_decay betas": (adamw, torch_adamw, {}, {"weight_decay": [0.1, 0.5, 0.0], "b1": [0.8, 0.9, 0.5]}),
    "rmsprop": (rmsprop, torch.optim.RMSprop, {}, {}),
    "rmsprop alpha eps": (rmsprop, torch.optim.RMSprop, {}, {"alpha": [0.9, 0.8, 0.99], "eps": [1e-6, 1e-4, 1e-8]}),
    "rmsprop centered": (rmsprop, torch.optim.RMSprop, {"centered": True}, {"alpha": [0.9, 0.99, 0.99]}),
    "rmsprop momentum": (rmsprop, torch.optim.RMSprop, {}, {"momentum": [0.9, 0.5, 0.0]}),
    "rmsprop weight_decay": (rmsprop, torch.optim.RMSprop, {}, {"weight_decay": [1e-2, 0.1, 0.0]}),
    "rmsprop centered momentum weight_decay": (rmsprop, torch.optim.RMSprop, {"centered": True, "momentum": 0.5},
                                               {"weight_decay": [1e-2, 0.1, 0.0], "alpha": [0.9, 0.9, 0.9]}),
}


def replica_options(case: str, r: int) -> dict:
    _, _, shared, per_replica = CASES[case]
    return {**shared, **{name: values[r] for name, values in per_replica.items()}}


@pytest.mark.parametrize("case", CASES)
def test_chain_by_name_equals_torch_optim(case):
    make_chain, make_torch, _, _ = CASES[case]
    options = replica_options(case, 0)
    expected = torch_run(make_torch(torch_params(0), **options))
    assert_equal_runs(chain_run(make_chain(**options), start(0)), expected)


@pytest.mark.parametrize("case", CASES)
def test_chain_of_a_torch_optimizer_with_a_tensor_lr_equals_it(case):
    """The compiled step's way: the chain read off the optimizer, the lr a () float64 tensor."""
    _, make_torch, _, _ = CASES[case]
    options = replica_options(case, 1)
    read = chain_of(make_torch(torch_params(1), **options))
    expected = torch_run(make_torch(torch_params(1), **options))
    actual = chain_run(read, start(1), lambda step: torch.tensor(lr_at(step), dtype=torch.float64))
    assert_equal_runs(actual, expected)


@pytest.mark.parametrize("case", CASES)
def test_stacked_replicas_each_equal_their_own_torch_optim_run(case):
    make_chain, make_torch, shared, per_replica = CASES[case]
    values = {name: shared_or_per_replica(np.array(v)) for name, v in per_replica.items()}
    optimizer_chain = make_chain(**shared, **values)
    lrs = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)  # each replica its own lr, changing each update
    stacked = [torch.stack(tensors) for tensors in zip(*(start(r) for r in range(R)))]  # each (R, *shape)
    actual = chain_run(optimizer_chain, stacked, lambda step: lrs * lr_at(step))
    for r in range(R):
        optimizer = make_torch(torch_params(r), **replica_options(case, r))
        params = optimizer.param_groups[0]["params"]
        for step in range(STEPS):
            optimizer.param_groups[0]["lr"] = float(lrs[r]) * lr_at(step)
            optimizer.zero_grad()
            loss_of(params).backward()
            optimizer.step()
        assert_equal_runs([a[r] for a in actual], [p.detach() for p in params])


def test_per_replica_values_become_tensors_only_where_replicas_differ():
    assert shared_or_per_replica(np.array([0.9, 0.9, 0.9])) == 0.9
    per_replica = shared_or_per_replica(np.array([0.9, 0.5, 0.0]))
    assert per_replica.dtype == torch.float64 and per_replica.tolist() == [0.9, 0.5, 0.0]
    # A value shared by every replica and zero drops its transform; one zero among others keeps it.
    assert len(sgd(momentum=shared_or_per_replica(np.zeros(3))).transforms) == 1
    assert len(sgd(momentum=per_replica).transforms) == 2


@pytest.mark.parametrize("kind,options", [("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}),
                                          ("adam", {"betas": (0.8, 0.99), "weight_decay": 1e-2}),
                                          ("adamw", {"weight_decay": 0.1}),
                                          ("rmsprop", {"momentum": 0.5, "weight_decay": 1e-2})])
def test_config_chain_equals_build_optimizer(kind, options):
    config = TrainConfig(optimizer=kind, **options)
    expected = torch_run(build_optimizer(torch_params(2), config, lr=0.1))
    assert_equal_runs(chain_run(config_chain(config), start(2)), expected)


@pytest.mark.parametrize("make", [lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
                                  lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=1e-2),
                                  lambda p: torch.optim.AdamW(p, lr=0.1),
                                  lambda p: torch.optim.RMSprop(p, lr=0.1, momentum=0.5, centered=True)],
                         ids=["sgd", "adam", "adamw", "rmsprop"])
def test_chain_and_optimizer_step_share_torch_state(make):
    """Alternating the chain (on ``optimizer.state``) and ``optimizer.step()`` is one torch.optim run."""
    expected = torch_run(make(torch_params(3)))
    params = torch_params(3)
    optimizer = make(params)
    read = chain_of(optimizer)
    for step in range(STEPS):
        optimizer.param_groups[0]["lr"] = lr_at(step)
        optimizer.zero_grad()
        loss_of(params).backward()
        if step % 3 == 1:
            optimizer.step()
        else:  # the state is re-read each time: the entries torch.optim made are the chain's
            with torch.no_grad():
                read.step(params, [p.grad for p in params], torch_state(optimizer, read), lr_at(step))
    assert_equal_runs([p.detach() for p in params], expected)
    assert all(set(optimizer.state[p]) == set(read.state_names()) for p in params)


@pytest.mark.parametrize("make,named", [
    (lambda p: torch.optim.Adam(p, amsgrad=True), "amsgrad"),
    (lambda p: torch.optim.SGD(p, lr=0.1, maximize=True), "maximize"),
    (lambda p: torch.optim.SGD([{"params": p[:2]}, {"params": p[2:]}], lr=0.1), "several parameter groups"),
    (lambda p: torch.optim.Adagrad(p), "Adagrad"),
])
def test_unsupported_optimizers_are_named(make, named):
    with pytest.raises(UnsupportedOptimizer, match=named):
        chain_of(make(torch_params(0)))


def test_sgd_dampening_cannot_share_torch_state():
    """torch.optim.SGD damps from the buffer's second use on, which it tells by the buffer's absence."""
    optimizer = torch.optim.SGD(torch_params(0), lr=0.1, momentum=0.9, dampening=0.1)
    with pytest.raises(UnsupportedOptimizer, match="dampening"):
        torch_state(optimizer, chain_of(optimizer))


def test_chains_compose_and_refuse_a_state_kept_twice():
    nested = chain(add_decayed_weights(0.1), chain(scale_by_momentum(0.9), scale_by_lr()))
    assert nested == sgd(momentum=0.9, weight_decay=0.1)
    with pytest.raises(ValueError, match="momentum_buffer"):
        chain(scale_by_momentum(0.9), scale_by_momentum(0.5)).init(start(0))


def test_signature_names_transforms_and_only_the_kind_of_tensor_values():
    per_replica = torch.tensor([0.9, 0.5], dtype=torch.float64)
    assert signature(sgd(momentum=per_replica)) == signature(sgd(momentum=per_replica * 0.5))
    assert signature(sgd(momentum=0.9)) != signature(sgd(momentum=0.5))
    assert scale_by_rms(0.9, 0.5) == scale_by_momentum(0.9, 0.5)  # equal as tuples, yet other transforms
    assert signature(scale_by_rms(0.9, 0.5)) != signature(scale_by_momentum(0.9, 0.5))


def test_chain_traces_into_one_graph_that_new_lrs_and_replica_values_reuse():
    """torch.compile(fullgraph=True) captures a stacked Adam chain; the compiled run equals the eager one."""
    graphs = []

    def count_graphs(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def step(optimizer_chain, params, grads, state, lr):
        optimizer_chain.step(params, grads, state, lr)

    compiled = torch.compile(step, fullgraph=True, backend=count_graphs)
    stacked = [torch.stack(tensors) for tensors in zip(*(start(r) for r in range(R)))]
    grads = [torch.randn_like(p) for p in stacked]
    results = []
    for run_step in (step, compiled):
        optimizer_chain = adam(torch.tensor([0.9, 0.8, 0.5], dtype=torch.float64), 0.999,
                               weight_decay=torch.tensor([0.0, 0.1, 1e-2], dtype=torch.float64))
        params = [p.clone() for p in stacked]
        state = optimizer_chain.init(params)
        for k in range(5):
            run_step(optimizer_chain, params, grads, state, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64) / (k + 1))
        results.append(params)
    assert_equal_runs(results[1], results[0])
    assert len(graphs) == 1


def test_compiled_train_step_with_a_chain_read_off_torch_equals_torch_optim():
    """The compiled step's function (forward, autograd.grad, the chain) traced into one graph, on the
    torch optimizer's own state, trains as ``optimizer.step()`` (aot_eager: the trace without inductor's
    C++ compilation; tests/test_compiled.py runs inductor)."""
    from batchlab.compiled.step import train_step
    from batchlab.compiled.updates import optimizer_as_chain

    def make(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
        return model, torch.optim.RMSprop(model.parameters(), lr=0.01, momentum=0.5, centered=True, weight_decay=1e-2)

    def mean_loss(output, target):
        return ((output - target) ** 2).mean()

    model, optimizer = make(0)
    expected = torch_run_of_model(model, optimizer, mean_loss)
    model, optimizer = make(0)
    optimizer_chain, state = optimizer_as_chain(optimizer)
    params = list(model.parameters())
    compiled = torch.compile(train_step, fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for step in range(STEPS):
            lr = torch.tensor(lr_at(step), dtype=torch.float64)
            compiled(model, params, state, optimizer_chain, lr, X, Y, mean_loss, False)
    assert_equal_runs([p.detach() for p in model.parameters()], expected)


def torch_run_of_model(model, optimizer, mean_loss) -> list[torch.Tensor]:
    for step in range(STEPS):
        optimizer.param_groups[0]["lr"] = lr_at(step)
        optimizer.zero_grad()
        mean_loss(model(X), Y).backward()
        optimizer.step()
    return [p.detach() for p in model.parameters()]
