"""Optimizers as chains of small transforms over explicit state: optax's design, torch.optim's numbers.

A transform is a pair of functions over explicit state (optax's ``GradientTransformation``):
``init(params) -> state`` and ``update(updates, state, params, lr) -> updates``, which turns the
gradients (or the previous transform's output) into updates. `chain` composes transforms, and
`Chain.step` adds the chain's updates to the parameters. `batchlab.optim.chains` builds SGD
(momentum, dampening, Nesterov), Adam, AdamW and RMSprop from these, equal to torch.optim's
single-tensor algorithms (what torch.optim runs on the CPU).

Every transform works on a list of tensors, one per parameter, and on R stacked replicas (every
tensor (R, *shape)). A hyperparameter is a float (shared), a () tensor (shared, and an input of a
compiled graph, which a new value does not recompile) or an (R,) tensor (one value per replica,
broadcast along the leading dimension). Transforms branch only on Python values fixed when they are
built, never on a tensor's value, so ``torch.compile(fullgraph=True)`` traces a chain into the step's
graph; and each list operation is one ``torch._foreach_*`` call (one dispatch for all parameters; in a compiled loop's body, one
  operation per tensor: `lists`).

Three departures from optax, each for torch:

- State tensors change in place, and a chain's state is one dict keyed by torch.optim's own state
  names (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``, ``square_avg``, ``grad_avg``,
  ``step``), each a list with one tensor per parameter. The same tensors can then be a torch
  optimizer's ``state`` (a run switches between a compiled step and ``optimizer.step()``, and
  ``state_dict()`` checkpoints them), the replicas' stacked state, or a compiled graph's inputs.
- The learning rate is an argument of every update (optax's extra arguments), read by `scale_by_lr`:
  a schedule computes it outside (`batchlab.optim.lr_at`), as the loop, the replicas and the
  analysis all do.
- ``state["step"]`` counts the updates (torch.optim keeps one () tensor per parameter). `Chain`
  advances it once per update before its transforms run, so a transform reads the number of the
  current update (1 for the first); the first counter of the list is read.

A transform never writes into the updates it receives (they may be the caller's gradients or
another transform's state); the updates it returns may be its own state's tensors.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch

Hyperparameter = float | torch.Tensor  # shared: a float or a () tensor; one per replica: an (R,) tensor
State = dict[str, list[torch.Tensor]]  # torch.optim's state name -> one tensor per parameter
Scale = float | list[torch.Tensor]  # a float, or one broadcastable tensor per tensor of a list


class _Functional:
    """``torch._foreach_*`` operations, one out-of-place operation per tensor, for the body of a
    compiled loop (torch's ``scan``, `batchlab.compiled.step.train_scan`), which can hold neither
    foreach operations nor writes into its inputs.

    ``_foreach_add(xs, ys, alpha=a)`` is ``[x.add(y, alpha=a) for ...]``; a list argument gives each
    tensor its own element, any other argument is shared. An in-place operation,
    ``_foreach_add_(xs, ...)``, puts each result into the list ``xs`` in place of its tensor: the
    list, not the tensor, changes, so whoever holds the list (a state dict, the caller's weights)
    sees the new values, as after a write in place.
    """

    def __getattr__(self, name: str):
        in_place = name.endswith("_")
        operation = getattr(torch.Tensor, name.removeprefix("_foreach_").removesuffix("_"))

        def each(*args, **kwargs):
            def pick(value, i):
                return value[i] if isinstance(value, (list, tuple)) else value

            if "alpha" in kwargs:  # x + a·y written out: torch 2.13's compiler gets add(alpha=) wrong here
                alpha = kwargs.pop("alpha")
                args = (args[0], [pick(args[1], i) * alpha for i in range(len(args[0]))], *args[2:])
            out = [operation(*(pick(a, i) for a in args), **{k: pick(v, i) for k, v in kwargs.items()})
                   for i in range(len(args[0]))]
            if not in_place:
                return out
            args[0][:] = out
            return None

        return each


_FUNCTIONAL = _Functional()
_in_loop_body = False  # set by `functional_lists` while a loop's body is traced


def lists():
    """Where the list operations come from: ``torch`` (its ``_foreach_*``, one dispatch for all
    tensors), or `_Functional` in the body of a compiled loop (`functional_lists`)."""
    return _FUNCTIONAL if _in_loop_body else torch


class functional_lists:
    """``with functional_lists():`` the transforms' list operations are `_Functional`: out of place,
    their in-place forms replacing the lists' tensors (the body of `batchlab.compiled.step.train_scan`)."""

    def __enter__(self):
        global _in_loop_body
        _in_loop_body = True

    def __exit__(self, *exc):
        global _in_loop_body
        _in_loop_body = False


class GradientTransformation(Protocol):
    """What a transform offers: the names of its state, their initial values, and the update."""

    def state_names(self) -> tuple[str, ...]: ...

    def init(self, params: list[torch.Tensor]) -> State: ...

    def update(self, updates: list[torch.Tensor], state: State, params: list[torch.Tensor],
               lr: Hyperparameter) -> list[torch.Tensor]: ...


def in_use(value: Hyperparameter) -> bool:
    """Whether a hyperparameter changes anything; decided while tracing, so never by reading a tensor.

    A tensor counts as in use: `batchlab.optim.chains` turns per-replica values that are zero for
    every replica into the float 0.0.
    """
    return isinstance(value, torch.Tensor) or value != 0


def per_tensor(value: Hyperparameter, tensors: list[torch.Tensor]) -> Scale:
    """``value`` ready for elementwise use with each of ``tensors`` in a ``torch._foreach_*`` call.

    Args:
        value: a float, a () tensor, or an (R,) tensor of per-replica values.
        tensors: the list it scales (stacked: each (R, *shape)).

    Returns:
        The float as it is; a tensor cast to the tensors' dtype, one per tensor: a () tensor as it is,
        an (R,) tensor as (R, 1, ..., 1), to broadcast along each tensor's leading dimension.
    """
    if not isinstance(value, torch.Tensor):
        return value
    shaped: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # one cast and reshape per rank and dtype
    out = []
    for t in tensors:
        key = (t.ndim, t.dtype)
        if key not in shaped:
            cast = value.to(dtype=t.dtype)
            shaped[key] = cast if cast.ndim == 0 else cast.reshape(-1, *([1] * (t.ndim - 1)))
        out.append(shaped[key])
    return out


def _scaled_add(targets: list[torch.Tensor], tensors: list[torch.Tensor], scale: Hyperparameter) -> list[torch.Tensor]:
    """targets + scale·tensors, new tensors (torch's ``add(alpha=)``; ``addcmul`` for a tensor scale)."""
    if isinstance(scale, torch.Tensor):
        return lists()._foreach_addcmul(targets, tensors, per_tensor(scale, targets))
    return lists()._foreach_add(targets, tensors, alpha=scale)


def _scaled_add_(targets: list[torch.Tensor], tensors: list[torch.Tensor], scale: Hyperparameter) -> None:
    """targets += scale·tensors, in place."""
    if isinstance(scale, torch.Tensor):
        lists()._foreach_addcmul_(targets, tensors, per_tensor(scale, targets))
    else:
        lists()._foreach_add_(targets, tensors, alpha=scale)


def _average_squares_(averages: list[torch.Tensor], updates: list[torch.Tensor], decay: Hyperparameter) -> None:
    """averages = decay·averages + (1 − decay)·updates², in place (Adam's v, RMSprop's square_avg)."""
    lists()._foreach_mul_(averages, per_tensor(decay, averages))
    if isinstance(decay, torch.Tensor):  # addcmul's ``value`` must be a number
        lists()._foreach_addcmul_(averages, lists()._foreach_mul(updates, per_tensor(1 - decay, updates)), updates)
    else:
        lists()._foreach_addcmul_(averages, updates, updates, value=1 - decay)


def _divide_into(numerators: list[torch.Tensor], denominators: list[torch.Tensor]) -> list[torch.Tensor]:
    """numerators / denominators, written over ``denominators`` (a transform's own temporaries).

    One pass and no new tensor: for stacked replicas the allocation cost more than the division.
    """
    if _in_loop_body:  # no writes in a loop's body: the quotients replace the denominators
        denominators[:] = [torch.div(numerator, denominator) for numerator, denominator in zip(numerators, denominators)]
        return denominators
    for numerator, denominator in zip(numerators, denominators):
        torch.div(numerator, denominator, out=denominator)
    return denominators


def _zeros(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """One zeroed buffer per parameter, in the parameter's memory layout (as torch.optim creates them)."""
    return [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]


def _counters(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """torch.optim's ``step``: one () float counter per parameter (float64 when that is the default dtype)."""
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return [torch.zeros((), dtype=dtype, device=p.device) for p in params]


def _update_number(state: State) -> torch.Tensor:
    """The number of the current update (1 for the first), () float64."""
    return state["step"][0].to(torch.float64)


class AddDecayedWeights(NamedTuple):
    """updates + λ·params: weight decay as L2 regularisation folded into the gradient.

    torch.optim's SGD, Adam and RMSprop ``weight_decay``: g_t ← g_t + λθ_{t−1}. Placed after an
    adaptive scaling it is AdamW's decoupled decay instead (`decoupled_weight_decay`).
    """

    weight_decay: Hyperparameter

    def state_names(self) -> tuple[str, ...]:
        return ()

    def init(self, params: list[torch.Tensor]) -> State:
        return {}

    def update(self, updates, state, params, lr):
        return _scaled_add(updates, params, self.weight_decay)


def add_decayed_weights(weight_decay: Hyperparameter) -> AddDecayedWeights:
    """Weight decay into the gradient, g_t ← g_t + λθ_{t−1} (torch.optim's ``weight_decay``).

    Args:
        weight_decay: λ, shared or per replica.

    Returns:
        A transform without state.
    """
    return AddDecayedWeights(weight_decay)


def decoupled_weight_decay(weight_decay: Hyperparameter) -> AddDecayedWeights:
    """AdamW's weight decay (Loshchilov & Hutter 2019): λθ added after Adam's scaling, before the lr.

    torch.optim.AdamW shrinks the weights first, θ_t ← θ_{t−1} − γλθ_{t−1}, then takes Adam's step;
    the step does not depend on θ, so this is θ_t ← θ_{t−1} − γ(m̂_t/(√v̂_t + ε) + λθ_{t−1}): the
    same transform as `add_decayed_weights`, placed between `scale_by_adam` and `scale_by_lr`.

    Args:
        weight_decay: λ, shared or per replica.

    Returns:
        A transform without state.
    """
    return AddDecayedWeights(weight_decay)


class ScaleByMomentum(NamedTuple):
    """Heavy-ball momentum, with torch.optim.SGD's dampening and Nesterov variant (see `scale_by_momentum`)."""

    momentum: Hyperparameter
    dampening: Hyperparameter = 0.0
    nesterov: bool = False

    def state_names(self) -> tuple[str, ...]:
        return ("momentum_buffer", "step") if in_use(self.dampening) else ("momentum_buffer",)

    def init(self, params: list[torch.Tensor]) -> State:
        state = {"momentum_buffer": _zeros(params)}
        if in_use(self.dampening):
            state["step"] = _counters(params)
        return state

    def update(self, updates, state, params, lr):
        buffers = state["momentum_buffer"]
        lists()._foreach_mul_(buffers, per_tensor(self.momentum, buffers))
        if in_use(self.dampening):
            # torch.optim.SGD starts the buffer as the first gradient, undamped; from a zero buffer
            # that is b_1 = μ·0 + 1·g_1, then b_t = μb_{t−1} + (1 − τ)g_t.
            later = (_update_number(state) > 1).to(torch.float64)
            _scaled_add_(buffers, updates, 1 - later * self.dampening)
        else:
            lists()._foreach_add_(buffers, updates)
        return _scaled_add(updates, buffers, self.momentum) if self.nesterov else buffers


def scale_by_momentum(momentum: Hyperparameter, dampening: Hyperparameter = 0.0,
                      nesterov: bool = False) -> ScaleByMomentum:
    """Momentum as torch.optim.SGD (and RMSprop, on its scaled gradients) applies it.

    torch.optim.SGD's documented update: b_1 ← g_1; b_t ← μb_{t−1} + (1 − τ)g_t; then
    g_t ← g_t + μb_t with Nesterov (Sutskever et al. 2013), else g_t ← b_t. The buffer starts at
    zero, which gives b_1 = g_1 exactly (dampening is then skipped at the first update, as torch does).

    Args:
        momentum: μ, shared or per replica.
        dampening: τ, shared or per replica; nonzero adds ``step`` to the state.
        nesterov: Nesterov's variant, shared.

    Returns:
        A transform keeping ``momentum_buffer`` (torch.optim's name).
    """
    return ScaleByMomentum(momentum, dampening, nesterov)


class ScaleByAdam(NamedTuple):
    """Adam's bias-corrected moment scaling (see `scale_by_adam`)."""

    b1: Hyperparameter = 0.9
    b2: Hyperparameter = 0.999
    eps: Hyperparameter = 1e-8

    def state_names(self) -> tuple[str, ...]:
        return ("step", "exp_avg", "exp_avg_sq")

    def init(self, params: list[torch.Tensor]) -> State:
        return {"step": _counters(params), "exp_avg": _zeros(params), "exp_avg_sq": _zeros(params)}

    def update(self, updates, state, params, lr):
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        lists()._foreach_lerp_(exp_avg, updates, per_tensor(1 - self.b1, updates))  # m = β1·m + (1−β1)·g
        _average_squares_(exp_avg_sq, updates, self.b2)  # v = β2·v + (1−β2)·g²
        # The bias corrections in float64, as torch.optim computes them with Python floats.
        t = _update_number(state)
        bias1 = 1 - torch.pow(self.b1, t)  # () or (R,)
        bias2_sqrt = (1 - torch.pow(self.b2, t)).sqrt()
        denominators = lists()._foreach_sqrt(exp_avg_sq)  # √v/√(1−β2^t) + ε, as torch.optim
        lists()._foreach_div_(denominators, per_tensor(bias2_sqrt, denominators))
        lists()._foreach_add_(denominators, per_tensor(self.eps, denominators))
        lists()._foreach_mul_(denominators, per_tensor(bias1, denominators))  # m̂ = m/(1−β1^t)
        return _divide_into(exp_avg, denominators)


def scale_by_adam(b1: Hyperparameter = 0.9, b2: Hyperparameter = 0.999, eps: Hyperparameter = 1e-8) -> ScaleByAdam:
    """Adam's scaling (Kingma & Ba 2015, Alg. 1), as torch.optim.Adam documents and computes it.

    m_t ← β1m_{t−1} + (1 − β1)g_t; v_t ← β2v_{t−1} + (1 − β2)g_t²; the update is
    m̂_t/(√v̂_t + ε) with m̂_t = m_t/(1 − β1^t) and √v̂_t = √v_t/√(1 − β2^t), the bias corrections
    computed in float64 from the update number t. (amsgrad is not offered.)

    Args:
        b1, b2: β1, β2, shared or per replica.
        eps: ε, added to √v̂_t.

    Returns:
        A transform keeping ``step``, ``exp_avg`` and ``exp_avg_sq`` (torch.optim's names).
    """
    return ScaleByAdam(b1, b2, eps)


class ScaleByRms(NamedTuple):
    """RMSprop's scaling by a running root mean square (see `scale_by_rms`)."""

    alpha: Hyperparameter = 0.99
    eps: Hyperparameter = 1e-8
    centered: bool = False

    def state_names(self) -> tuple[str, ...]:
        return ("step", "square_avg", "grad_avg") if self.centered else ("step", "square_avg")

    def init(self, params: list[torch.Tensor]) -> State:
        state = {"step": _counters(params), "square_avg": _zeros(params)}
        if self.centered:
            state["grad_avg"] = _zeros(params)
        return state

    def update(self, updates, state, params, lr):
        square_avg = state["square_avg"]
        _average_squares_(square_avg, updates, self.alpha)  # v = α·v + (1−α)·g²
        if self.centered:
            grad_avg = state["grad_avg"]
            lists()._foreach_lerp_(grad_avg, updates, per_tensor(1 - self.alpha, updates))
            averages = lists()._foreach_addcmul(square_avg, grad_avg, grad_avg, value=-1)  # v − ḡ²
            lists()._foreach_sqrt_(averages)
        else:
            averages = lists()._foreach_sqrt(square_avg)
        lists()._foreach_add_(averages, per_tensor(self.eps, averages))
        return _divide_into(updates, averages)


def scale_by_rms(alpha: Hyperparameter = 0.99, eps: Hyperparameter = 1e-8, centered: bool = False) -> ScaleByRms:
    """RMSprop's scaling (Hinton's lecture 6e; Graves 2013 for the centered form), as torch.optim.RMSprop.

    v_t ← αv_{t−1} + (1 − α)g_t²; centered: ḡ_t ← αḡ_{t−1} + (1 − α)g_t and ṽ_t ← v_t − ḡ_t²,
    else ṽ_t ← v_t; the update is g_t/(√ṽ_t + ε). torch.optim.RMSprop's momentum is a
    `scale_by_momentum` after this one.

    Args:
        alpha: α, shared or per replica.
        eps: ε, added to the root.
        centered: subtract the square of the running mean gradient, shared.

    Returns:
        A transform keeping ``step`` (counted, as torch.optim does, though unused), ``square_avg``
        and, centered, ``grad_avg``.
    """
    return ScaleByRms(alpha, eps, centered)


class ScaleByLr(NamedTuple):
    """updates·(−lr): the step along the updates, with the learning rate of the update call."""

    def state_names(self) -> tuple[str, ...]:
        return ()

    def init(self, params: list[torch.Tensor]) -> State:
        return {}

    def update(self, updates, state, params, lr):
        return lists()._foreach_mul(updates, per_tensor(-lr, updates))


def scale_by_lr() -> ScaleByLr:
    """The descent step, θ_t ← θ_{t−1} − γ·update, with γ the ``lr`` each update is called with.

    Returns:
        A transform without state; ``lr`` is a float, a () tensor or an (R,) tensor per replica.
    """
    return ScaleByLr()


class Chain(NamedTuple):
    """Transforms applied in turn, with one state dict and one update counter (see `chain`)."""

    transforms: tuple

    def state_names(self) -> tuple[str, ...]:
        """The names of the chain's state, each once, in the order the transforms use them."""
        return tuple(dict.fromkeys(name for t in self.transforms for name in t.state_names()))

    def init(self, params: list[torch.Tensor]) -> State:
        """Every transform's initial state in one dict (``step`` is shared: one counter per update)."""
        state: State = {}
        for transform in self.transforms:
            for name, tensors in transform.init(params).items():
                if name in state and name != "step":
                    raise ValueError(f"two transforms of the chain keep {name!r}")
                state.setdefault(name, tensors)
        return state

    def update(self, updates: list[torch.Tensor], state: State, params: list[torch.Tensor],
               lr: Hyperparameter) -> list[torch.Tensor]:
        """The updates of every transform in turn; ``state`` changes in place (``step`` advances).

        Args:
            updates: the gradients of the loss, one per parameter (stacked: (R, *shape)).
            state: from `init` (or the same names from a torch optimizer's state).
            params: the parameters before this update.
            lr: this update's learning rate: a float, a () tensor, or an (R,) tensor per replica.

        Returns:
            The updates to add to the parameters (`apply_updates`).
        """
        return _run(self.transforms, updates, state, params, lr)

    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor], state: State,
             lr: Hyperparameter) -> None:
        """One optimizer step in place: params ← params + `update` (call under ``torch.no_grad()``).

        A final `scale_by_lr` is folded into the parameter update, params ← params − lr·updates,
        torch.optim's ``param.add_(update, alpha=-lr)``: one pass over the parameters instead of two.
        """
        *head, last = self.transforms or (None,)
        if not isinstance(last, ScaleByLr):
            apply_updates(params, self.update(grads, state, params, lr))
            return
        _scaled_add_(params, _run(head, grads, state, params, lr), -lr)


def _run(transforms, updates: list[torch.Tensor], state: State, params: list[torch.Tensor],
         lr: Hyperparameter) -> list[torch.Tensor]:
    """Advance the update counter (when the state keeps one), then each transform in turn."""
    if "step" in state:
        lists()._foreach_add_(state["step"], 1)
    for transform in transforms:
        updates = transform.update(updates, state, params, lr)
    return updates


def chain(*transforms: GradientTransformation) -> Chain:
    """Compose transforms: each one's updates are the next one's input (optax's ``chain``).

    Args:
        transforms: in the order they apply; a `Chain` among them contributes its transforms.

    Returns:
        A `Chain`, itself a transform, whose state is the union of theirs.

    Example:
        >>> sgd_momentum = chain(add_decayed_weights(5e-4), scale_by_momentum(0.9), scale_by_lr())
        >>> state = sgd_momentum.init(params)
        >>> with torch.no_grad():
        ...     sgd_momentum.step(params, grads, state, lr=0.05)
    """
    flat = []
    for transform in transforms:
        flat.extend(transform.transforms if isinstance(transform, Chain) else (transform,))
    return Chain(tuple(flat))


def apply_updates(params: list[torch.Tensor], updates: list[torch.Tensor]) -> None:
    """params += updates, in place (optax's ``apply_updates``; call under ``torch.no_grad()``)."""
    lists()._foreach_add_(params, updates)


def signature(transform: GradientTransformation) -> tuple:
    """What a compiled graph of ``transform`` is specialised on: its transforms and shared values.

    A tensor hyperparameter is a graph input, so only its being one is part of the signature.
    (Transforms are tuples, which compare equal across types; the signature names the types.)
    """
    if isinstance(transform, Chain):
        return ("Chain", *(signature(t) for t in transform.transforms))
    return (type(transform).__name__, *("tensor" if isinstance(v, torch.Tensor) else v for v in transform))
