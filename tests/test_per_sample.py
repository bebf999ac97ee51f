"""Per-sample gradient squared norms read by the layer taps, against brute force (float64).

The oracle runs the batch forward once and takes, for each sample i, the gradient of ℓ_i/B (its
share of the batch's mean loss) with torch.autograd.grad, summing the squares over the covered
parameters: what `LayerTaps.take` claims to return, computed without any of its formulas.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from batchlab.probes import per_sample
from batchlab.probes.per_sample import LayerTaps, TapError, per_sample_layers

DTYPE = torch.float64


def sample_losses(out: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """ℓ_i for each sample: a smooth, non-linear function of its whole output (every position)."""
    return (torch.sin(out) * weights + 0.5 * out.square()).flatten(1).sum(1)  # (B,)


def brute_force(model: nn.Module, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """Σ_params ‖∇(ℓ_i/B)‖² per sample, one autograd.grad per sample."""
    out = model(x)
    weights = torch.linspace(-1.0, 2.0, out[0].numel(), dtype=DTYPE).view(out.shape[1:])
    losses = sample_losses(out, weights)
    batch = losses.shape[0]
    rows = []
    for i in range(batch):
        grads = torch.autograd.grad(losses[i] / batch, params, retain_graph=True, allow_unused=True)
        rows.append(sum(g.square().sum() for g in grads if g is not None))
    return torch.stack(rows)


def tapped(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The taps' numbers for one step: forward, backward of the batch's mean loss, take."""
    coverage = per_sample_layers(model)
    with LayerTaps(coverage) as taps:
        out = model(x)
        weights = torch.linspace(-1.0, 2.0, out[0].numel(), dtype=DTYPE).view(out.shape[1:])
        model.zero_grad()
        sample_losses(out, weights).mean().backward()
        return taps.take(batch_size=x.shape[0])


def covered_params(model: nn.Module) -> list[torch.Tensor]:
    coverage = per_sample_layers(model)
    return [getattr(layer.module, name) for layer in coverage.layers
            for name, used in (("weight", layer.weight), ("bias", layer.bias)) if used]


def assert_matches(model: nn.Module, x: torch.Tensor) -> None:
    """The taps equal brute force to 1e-10 relative (to the largest sample's norm), sample by sample."""
    model = model.to(DTYPE)
    want = brute_force(model, x, covered_params(model))  # before the taps exist: no hook sees these passes
    got = tapped(model, x)
    assert got.shape == want.shape and got.dtype == DTYPE
    assert want.max() > 0
    assert torch.allclose(got, want, rtol=0, atol=1e-10 * want.max().item()), (got, want)


def data(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(params=["gram", "materialise"])
def path(request, monkeypatch):
    """Both ways of computing ‖Σ_t δ_t a_tᵀ‖², whatever the shapes would choose."""
    monkeypatch.setattr(per_sample, "_gram_is_cheaper", lambda *_: request.param == "gram")
    return request.param


# --- nn.Linear ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_linear_on_vectors(bias):
    assert_matches(nn.Sequential(nn.Linear(5, 7, bias=bias), nn.Tanh(), nn.Linear(7, 3)), data(6, 5))


@pytest.mark.parametrize("shape", [(4, 3, 5), (3, 2, 4, 5), (4, 1, 5)])
def test_linear_on_sequences(shape, path):
    assert_matches(nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 2)), data(*shape))


def test_linear_chooses_both_paths_by_cost():
    assert per_sample._gram_is_cheaper(3, 8, 8) and not per_sample._gram_is_cheaper(20, 4, 4)


def test_frozen_weight_leaves_its_norm_out():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).to(DTYPE)
    model[0].weight.requires_grad_(False)
    coverage = per_sample_layers(model)
    assert [(layer.name, layer.weight, layer.bias) for layer in coverage.layers] == [("0", False, True), ("2", True, True)]
    assert coverage.complete
    assert_matches(model, data(5, 5))


# --- convolutions ---------------------------------------------------------------------------------

CONV1D = [
    dict(kernel_size=3),
    dict(kernel_size=3, stride=2, padding=1, dilation=2, groups=2),
    dict(kernel_size=4, padding="same", padding_mode="reflect", bias=False),
    dict(kernel_size=2, stride=3, padding=2, padding_mode="circular", groups=4),
]


@pytest.mark.parametrize("options", CONV1D)
def test_conv1d(options, path):
    model = nn.Sequential(nn.Conv1d(4, 8, **options), nn.ReLU(inplace=True), nn.Conv1d(8, 2, 1))
    assert_matches(model, data(3, 4, 11))


CONV2D = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=3),
    dict(kernel_size=(4, 3), padding="same", padding_mode="replicate"),
    dict(kernel_size=2, stride=2, groups=6, bias=False),  # depthwise
]


@pytest.mark.parametrize("options", CONV2D)
def test_conv2d(options, path):
    # An in-place activation right after the layer: the gradient kept is its output's, not the activation's.
    model = nn.Sequential(nn.Conv2d(6, 6, **options), nn.ReLU(inplace=True), nn.Conv2d(6, 2, 2, stride=2))
    assert_matches(model, data(3, 6, 7, 8))


def test_conv3d(path):
    model = nn.Sequential(nn.Conv3d(2, 4, kernel_size=(2, 3, 2), stride=(1, 2, 1), padding=1, groups=2), nn.Tanh())
    assert_matches(model, data(2, 2, 4, 5, 3))


# --- nn.Embedding ---------------------------------------------------------------------------------


class Bag(nn.Module):
    """Token embeddings through a linear layer, as a text model's input does."""

    def __init__(self, **options):
        super().__init__()
        self.embed = nn.Embedding(6, 4, **options)
        self.out = nn.Linear(4, 3)

    def forward(self, ids):
        return self.out(torch.tanh(self.embed(ids)))


def token_ids(*shape: int, vocabulary: int = 6) -> torch.Tensor:
    return torch.randint(vocabulary, shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("options", [{}, {"padding_idx": 0}, {"padding_idx": 2, "max_norm": 1.0}])
def test_embedding_with_repeated_ids(options):
    ids = token_ids(5, 9)  # 9 ids from 6: repeats in every sample
    ids[0] = 3  # one sample repeating one id throughout
    ids[1, :4] = 0  # padding rows (padding_idx 0) get no gradient
    assert all(len(row.unique()) < len(row) for row in ids)
    assert_matches(Bag(**options), ids)


def test_embedding_sample_of_padding_only_has_norm_of_its_other_layers():
    ids = token_ids(3, 4)
    ids[2] = 0
    assert_matches(Bag(padding_idx=0), ids)


def test_embedding_one_id_per_sample():
    assert_matches(Bag(), token_ids(7))


def test_embedding_long_sequences_use_segment_sums(monkeypatch):
    monkeypatch.setattr(per_sample, "EMBEDDING_GRAM_MAX_IDS", 3)
    ids = token_ids(4, 10)
    ids[1, :5] = 1
    assert_matches(Bag(padding_idx=1), ids)


# --- normalisation layers -------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "normalized"), [((5, 6), (6,)), ((3, 4, 6), (6,)), ((3, 4, 2, 3), (2, 3))])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm(shape, normalized, bias):
    model = nn.Sequential(nn.Linear(shape[-1], shape[-1]), nn.LayerNorm(normalized, bias=bias), nn.SiLU())
    assert_matches(model, data(*shape))


def test_group_norm():
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.GroupNorm(3, 6), nn.ReLU())
    assert_matches(model, data(3, 2, 5, 5))


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="nn.RMSNorm is torch >= 2.4")
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_rms_norm(eps):
    model = nn.Sequential(nn.Linear(5, 4), nn.RMSNorm(4, eps=eps), nn.Tanh())
    assert_matches(model, data(3, 2, 5))


# --- whole models ---------------------------------------------------------------------------------


class Text(nn.Module):
    """A nested subclass with functional activations: embedding, layer norm, a 1d convolution over the
    sequence, linear layers on (B, T, D) and (B, D)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 6, padding_idx=0)
        self.block = nn.ModuleDict({"norm": nn.LayerNorm(6), "mix": nn.Linear(6, 6)})
        self.conv = nn.Conv1d(6, 4, 3, padding=1, groups=2)
        self.head = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, ids):
        h = self.embed(ids)  # (B, T, 6)
        h = h + F.relu(self.block["mix"](self.block["norm"](h)))
        h = F.relu(self.conv(h.mT))  # (B, 4, T)
        return self.head(h.mean(-1))


class Wrapped(nn.Module):
    """A LightningModule's shape: an nn.Sequential held by a module with its own forward."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))

    def forward(self, x):
        return self.model(x)


def test_nested_subclass_with_functional_activations():
    model = Text()
    assert per_sample_layers(model).complete
    assert_matches(model, token_ids(4, 8, vocabulary=7))


def test_module_wrapping_a_sequential():
    model = Wrapped()
    assert [layer.name for layer in per_sample_layers(model).layers] == ["model.0", "model.3"]
    assert_matches(model, data(3, 1, 6, 6))


def test_batch_norm_is_reported_and_layers_after_it_are_exact():
    model = nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2)).to(DTYPE)
    coverage = per_sample_layers(model)
    assert [u.name for u in coverage.uncovered] == ["0.weight", "0.bias"]
    assert "BatchNorm1d" in coverage.uncovered[0].reason
    assert coverage.mixing == ("0",) and not coverage.complete
    assert [layer.name for layer in coverage.layers] == ["1", "3"]
    assert_matches(model, data(6, 5))  # the oracle differentiates each ℓ_i through the batch's forward


def test_batch_norm_without_parameters_is_still_reported_as_mixing():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, affine=False), nn.Linear(4, 2))
    coverage = per_sample_layers(model)
    assert coverage.uncovered == () and coverage.mixing == ("1",) and not coverage.complete


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.fc = nn.Linear(3, 4)
        self.frozen = nn.Parameter(torch.ones(4), requires_grad=False)

    def forward(self, x):
        return self.fc(x) * self.scale + self.frozen


class Doubling(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_uncovered_parameters_are_named_with_their_reasons():
    tied = nn.Linear(4, 6)
    model = nn.ModuleDict({
        "custom": Custom(),
        "doubling": Doubling(3, 3),
        "tied_in": nn.Embedding(6, 4),
        "tied_out": tied,
        "attention": nn.MultiheadAttention(4, 2),
        "counted": nn.Embedding(5, 2, scale_grad_by_freq=True),
    })
    model.tied_out.weight = model.tied_in.weight  # weight tying: one parameter, two modules
    coverage = per_sample_layers(model)
    reasons = {u.name: u.reason for u in coverage.uncovered}
    assert set(reasons) == {"custom.scale", "doubling.weight", "doubling.bias", "tied_in.weight",
                            "attention.in_proj_weight", "attention.in_proj_bias", "attention.out_proj.weight",
                            "attention.out_proj.bias", "counted.weight"}
    assert "Custom" in reasons["custom.scale"]
    assert "overrides Linear.forward" in reasons["doubling.weight"]
    assert "'tied_in' and 'tied_out'" in reasons["tied_in.weight"]
    assert "MultiheadAttention 'attention'" in reasons["attention.out_proj.weight"]
    assert "scale_grad_by_freq" in reasons["counted.weight"]
    assert [(layer.name, layer.weight, layer.bias) for layer in coverage.layers] == [
        ("custom.fc", True, True), ("tied_out", False, True)]
    assert "custom.scale (" in coverage.describe()


def test_lazy_layer_is_covered_once_initialised():
    model = nn.Sequential(nn.LazyLinear(3), nn.Tanh(), nn.Linear(3, 2))
    assert [(u.name, u.reason) for u in per_sample_layers(model).uncovered] == [
        ("0.weight", "not initialised yet (a lazy module before its first forward pass)"),
        ("0.bias", "not initialised yet (a lazy module before its first forward pass)")]
    model(torch.ones(1, 4))
    assert_matches(model, data(4, 4))


def test_params_argument_limits_and_reports_strangers():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    stranger = nn.Parameter(torch.ones(2))
    coverage = per_sample_layers(model, [model[1].weight, stranger])
    assert [(layer.name, layer.weight, layer.bias) for layer in coverage.layers] == [("1", True, False)]
    assert [(u.name, u.reason) for u in coverage.uncovered] == [("<param 1>", "not a parameter of the model")]


# --- the taps' record -----------------------------------------------------------------------------


def test_evaluation_pass_without_graph_between_forward_and_backward_is_not_recorded():
    model = Text().to(DTYPE)
    ids = token_ids(4, 8, vocabulary=7)
    want = brute_force(model, ids, covered_params(model))
    taps = LayerTaps(per_sample_layers(model))
    out = model(ids)
    with torch.no_grad():
        model(token_ids(9, 5, vocabulary=7))  # another batch size: a record of it would be refused
    with torch.inference_mode():
        model(token_ids(2, 3, vocabulary=7))
    weights = torch.linspace(-1.0, 2.0, out[0].numel(), dtype=DTYPE).view(out.shape[1:])
    sample_losses(out, weights).mean().backward()
    assert torch.allclose(taps.take(4), want, rtol=0, atol=1e-10 * want.max().item())


def test_take_empties_the_taps():
    model = nn.Sequential(nn.Linear(3, 2)).to(DTYPE)
    taps = LayerTaps(per_sample_layers(model))
    model(data(4, 3)).sum().backward()
    assert taps.take().shape == (4,)
    with pytest.raises(TapError, match="no backward pass"):
        taps.take()


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


def test_module_called_twice_is_reported():
    model = Twice().to(DTYPE)
    taps = LayerTaps(per_sample_layers(model))
    model(data(4, 3)).sum().backward()
    assert taps.repeated == ("fc",)
    with pytest.raises(TapError, match="'fc' ran more than once"):
        taps.take()
    assert taps.repeated == ()  # the next step starts afresh


def test_two_forward_passes_in_one_loss_are_reported():
    model = nn.Sequential(nn.Linear(3, 2)).to(DTYPE)
    taps = LayerTaps(per_sample_layers(model))
    (model(data(4, 3)).sum() + model(data(4, 3, seed=1)).sum()).backward()
    assert taps.repeated == ("0",)


def test_abandoned_forward_pass_is_replaced_not_reported():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    x = data(5, 3)
    want = brute_force(model, x, covered_params(model))
    taps = LayerTaps(per_sample_layers(model))
    model(data(7, 3, seed=2))  # a forward pass with a graph that no backward pass uses
    out = model(x)
    weights = torch.linspace(-1.0, 2.0, out[0].numel(), dtype=DTYPE).view(out.shape[1:])
    sample_losses(out, weights).mean().backward()
    assert taps.repeated == ()
    assert torch.allclose(taps.take(5), want, rtol=0, atol=1e-10 * want.max().item())


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool | None):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)
        self.reentrant = reentrant  # None: no checkpointing

    def forward(self, x):
        if self.reentrant is None:
            return self.head(torch.tanh(self.body(x)))
        return self.head(torch.tanh(torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=self.reentrant)))


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_is_not_a_second_call(reentrant):
    model = Checkpointed(None).to(DTYPE)
    x = data(5, 3).requires_grad_(reentrant)  # the reentrant form needs an input that requires a gradient
    # The oracle without checkpointing: the reentrant form's inner backward pass ignores autograd.grad.
    want = brute_force(model, x, covered_params(model))
    model.reentrant = reentrant
    got = tapped(model, x)
    assert torch.allclose(got, want, rtol=0, atol=1e-10 * want.max().item())


def test_second_backward_pass_through_the_graph_replaces_the_kept_gradient():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)
    x = data(5, 3)
    want = brute_force(model, x, covered_params(model))
    taps = LayerTaps(per_sample_layers(model))
    out = model(x)
    out.square().sum().backward(retain_graph=True)  # another loss through the same graph first
    weights = torch.linspace(-1.0, 2.0, out[0].numel(), dtype=DTYPE).view(out.shape[1:])
    sample_losses(out, weights).mean().backward()
    assert torch.allclose(taps.take(5), want, rtol=0, atol=1e-10 * want.max().item())


def test_inactive_taps_record_nothing():
    model = nn.Sequential(nn.Linear(3, 2)).to(DTYPE)
    taps = LayerTaps(per_sample_layers(model))
    taps.active = False
    model(data(4, 3)).sum().backward()
    with pytest.raises(TapError, match="no backward pass"):
        taps.take()


def test_batch_size_disagreement_is_refused():
    model = nn.Sequential(nn.Linear(3, 2)).to(DTYPE)
    taps = LayerTaps(per_sample_layers(model))
    model(data(4, 3)).sum().backward()
    with pytest.raises(TapError, match="batch size 5"):
        taps.take(batch_size=5)


def test_unbatched_input_is_refused():
    model = nn.Sequential(nn.Conv1d(2, 3, 2)).to(DTYPE)
    taps = LayerTaps(per_sample_layers(model))
    model(data(2, 5)).sum().backward()  # (C, L): one unbatched sample
    with pytest.raises(TapError, match="without a batch dimension"):
        taps.take()


def test_hooks_removed_on_close_and_when_garbage():
    model = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    taps = LayerTaps(per_sample_layers(model))
    assert all(len(m._forward_hooks) == 1 for m in model)
    taps.close()
    assert all(len(m._forward_hooks) == 0 for m in model)
    taps = LayerTaps(per_sample_layers(model))
    del taps
    gc.collect()
    assert all(len(m._forward_hooks) == 0 for m in model)
