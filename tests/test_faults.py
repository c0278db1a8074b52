"""The reference's faults, each fixed (issue 2), and bad input: a clear error, the model left as it was."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_prune.errors import PrunerStateError, PruningConfigError, UnsupportedPatternError
from lightning_prune.masks import FakeStructuredSparsity
from lightning_prune.sparsifier import BaseStructuredSparsifier, LSTMSaliencyPruner, SaliencyPruner
from tests import models, structures
from tests.checks import assert_outputs_match, randomize_norms, snapshot

LINEAR_BIAS_CONFIG = [{"tensor_fqn": f"seq.{i}.weight"} for i in range(4)]
CONV_BN_CONFIG = [{"tensor_fqn": "conv1.weight"}, {"tensor_fqn": "conv2.weight"}]


def stepped(model: nn.Module, config, **defaults) -> SaliencyPruner:
    """A SaliencyPruner prepared on ``model`` whose masks have been updated once."""
    pruner = SaliencyPruner({"sparsity_level": 0.5, **defaults})
    pruner.prepare(model, config)
    pruner.enable_mask_update = True
    pruner.step()
    return pruner


def masks_of(pruner: BaseStructuredSparsifier) -> dict[str, torch.Tensor]:
    return {fqn: state["mask"].clone() for fqn, state in pruner.state.items()}


# --- every parameter trains while masks are attached --------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "config", "x_shape"),
    [(models.LinearBias, LINEAR_BIAS_CONFIG, (8, 7)), (structures.ConvBatchNorm, CONV_BN_CONFIG, (2, 3, 10, 10))],
    ids=["linear_bias", "conv_batchnorm"],
)
def test_every_parameter_gets_gradient_and_trains(build, config, x_shape):
    model = build()
    randomize_norms(model)
    stepped(model, config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert any("bias" in name for name in before)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(x_shape)).pow(2).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    optimizer.step()
    for name, p in model.named_parameters():
        assert not torch.equal(before[name], p.detach()), f"{name} did not change after an optimizer step"


def test_bias_stays_a_parameter_and_is_masked_with_its_rows():
    model = models.LinearBias()
    pruner = stepped(model, LINEAR_BIAS_CONFIG)
    layer = model.seq[0]
    biases = [p for name, p in layer.named_parameters() if "bias" in name]
    assert len(biases) == 1 and isinstance(biases[0], nn.Parameter) and biases[0].requires_grad
    keep = pruner.state["seq.0.weight"]["mask"]
    assert (layer.bias[~keep] == 0).all()
    assert (layer.bias[keep] != 0).all()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_masked_batchnorm_channel_is_silent(train: bool):
    """The BatchNorm affine after a pruned channel is masked too, so the masked model is the final model."""
    model = structures.ConvBatchNorm()
    randomize_norms(model)
    pruner = stepped(model, CONV_BN_CONFIG)
    model.train(train)
    out = model.bn1(model.conv1(torch.randn(2, 3, 10, 10)))
    pruned = ~pruner.state["conv1.weight"]["mask"]
    assert pruned.any()
    assert (out[:, pruned] == 0).all()


# --- prune() right after step() -----------------------------------------------------------------------------


@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "keep_bias"])
@pytest.mark.parametrize(
    ("build", "config", "x_shape"),
    [
        (models.LinearBias, LINEAR_BIAS_CONFIG, (8, 7)),
        (models.Conv2dBias, [{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "seq.1.weight"}], (1, 1, 28, 28)),
    ],
    ids=["linear_bias", "conv_bias"],
)
def test_prune_straight_after_step_equals_masked_output(build, config, x_shape, prune_bias):
    """No forward pass between step() and prune(): the result must not depend on one."""
    model = build().eval()
    twin = copy.deepcopy(model)
    x = torch.randn(x_shape)
    stepped(twin, config, prune_bias=prune_bias)
    with torch.no_grad():
        y_masked = twin(x)

    pruned = stepped(model, config, prune_bias=prune_bias).prune()
    with torch.no_grad():
        assert_outputs_match(y_masked, pruned(x))


# --- masks are state ----------------------------------------------------------------------------------------


def test_model_state_dict_holds_masks_and_loads_strictly():
    model = models.LinearBias()
    pruner = stepped(model, LINEAR_BIAS_CONFIG)
    state = model.state_dict()
    for fqn, mask in masks_of(pruner).items():
        module_fqn = fqn.rsplit(".", 1)[0]
        saved = [v for k, v in state.items() if k.startswith(f"{module_fqn}.") and "mask" in k]
        assert any(torch.equal(v, mask) for v in saved), f"no mask for {fqn} in {sorted(state)}"

    fresh = models.LinearBias()
    fresh_pruner = SaliencyPruner({"sparsity_level": 0.5})
    fresh_pruner.prepare(fresh, LINEAR_BIAS_CONFIG)
    fresh.load_state_dict(state, strict=True)

    for fqn, mask in masks_of(pruner).items():
        assert torch.equal(fresh_pruner.state[fqn]["mask"], mask)
    x = torch.randn(8, 7)
    with torch.no_grad():
        assert_outputs_match(model(x), fresh(x))


def test_pruner_state_dict_round_trips_masks():
    model = models.LinearBias()
    fresh = copy.deepcopy(model)  # same weights, so the restored masked model must compute the same
    pruner = stepped(model, LINEAR_BIAS_CONFIG)
    saved = pruner.state_dict()

    restored = SaliencyPruner({"sparsity_level": 0.5})
    restored.prepare(fresh, LINEAR_BIAS_CONFIG)
    restored.load_state_dict(saved)

    for group in restored.groups:
        parametrization = group["module"].parametrizations[group["tensor_name"]][0]
        assert type(parametrization) is FakeStructuredSparsity
        assert parametrization.mask.dtype == torch.bool
        assert torch.equal(parametrization.mask, pruner.state[group["tensor_fqn"]]["mask"])
    for fqn, mask in masks_of(pruner).items():
        assert torch.equal(restored.state_dict()["state"][fqn]["mask"], mask)
    x = torch.randn(8, 7)
    with torch.no_grad():
        y_masked = model(x)
        assert_outputs_match(y_masked, fresh(x))
        assert_outputs_match(y_masked, restored.prune()(x))


def test_deepcopy_of_prepared_model_is_independent():
    model = models.Conv2dBias().eval()
    pruner = stepped(model, [{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "conv2d1.weight"}])
    twin = copy.deepcopy(model)
    x = torch.randn(1, 1, 28, 28)
    with torch.no_grad():
        y_before = twin(x)
        pruner.prune()
        model(x)
        y_after = twin(x)

    assert torch.equal(y_before, y_after)
    assert parametrize.is_parametrized(twin.seq[0], "weight")
    assert twin.seq[0].weight.shape[0] == 32 and model.seq[0].weight.shape[0] < 32
    # the copy's bias mask follows the copy's own row mask, not the original's
    twin.seq[0].parametrizations.weight[0].mask[:] = False
    assert (twin.seq[0].bias == 0).all()


# --- LSTM ---------------------------------------------------------------------------------------------------


def test_lstm_tied_gates_mask_gate_biases_and_silence_pruned_units():
    model = models.LSTMLinearModel(8, 8, 8, 2).eval()
    config = [{"tensor_fqn": f"lstm.weight_{kind}_l{k}"} for k in range(2) for kind in ("ih", "hh")]
    pruner = LSTMSaliencyPruner(sparsity_level=0.5, tie_gates=True)
    pruner.prepare(model, config)
    pruner.enable_mask_update = True
    pruner.step()

    for k in range(2):
        ih = pruner.state[f"lstm.weight_ih_l{k}"]["mask"]
        assert torch.equal(ih, pruner.state[f"lstm.weight_hh_l{k}"]["mask"]), (
            "ih and hh of a layer must agree"
        )
        gates = ih.reshape(4, 8)
        assert (gates == gates[0]).all(), f"layer {k}: the four gates keep different units"
        assert int(gates[0].sum()) == 4
        for bias_name in (f"bias_ih_l{k}", f"bias_hh_l{k}"):
            assert (getattr(model.lstm, bias_name)[~ih] == 0).all(), f"{bias_name} not masked with its rows"

    with torch.no_grad():
        _, sequence = model(torch.randn(7, 3, 8))
    pruned_units = ~pruner.state["lstm.weight_ih_l1"]["mask"][:8]
    assert (sequence[..., pruned_units] == 0).all()


def lstm_with_gates_that_disagree() -> nn.Module:
    """The seed's LSTM weights: per-gate saliency keeps unit 1 in the first gate and unit 0 in the second."""
    model = models.LSTMLinearModel(input_dim=2, hidden_dim=2, output_dim=2, num_layers=1)
    rows = torch.tensor([[1.0, 1], [2, 2], [2, 2], [1, 1], [-1, -1], [-2, -2], [-2, -2], [-1, -1]])
    with torch.no_grad():
        model.lstm.weight_ih_l0.copy_(rows)
        model.lstm.weight_hh_l0.copy_(rows)
    return model


@pytest.mark.parametrize("tie_gates", [False, True], ids=["default", "tied"])
def test_only_untied_lstm_pruning_warns_approximate(tie_gates: bool):
    model = lstm_with_gates_that_disagree()
    pruner = LSTMSaliencyPruner(sparsity_level=0.5, tie_gates=True) if tie_gates else LSTMSaliencyPruner()
    pruner.prepare(model, [{"tensor_fqn": "lstm.weight_ih_l0"}, {"tensor_fqn": "lstm.weight_hh_l0"}])
    pruner.enable_mask_update = True
    pruner.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner.prune()
    approximate = [
        w for w in caught if issubclass(w.category, UserWarning) and "approximate" in str(w.message)
    ]
    assert len(approximate) == (0 if tie_gates else 1)
    assert model(torch.randn(7, 3, 2))[0].shape == (7, 3, 2)


# --- bad input: a clear error, the model untouched ----------------------------------------------------------


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert not any(parametrize.is_parametrized(m) for m in model.modules()), "a mask was left attached"
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"{name} changed"


def assert_prepare_refuses(model, pruner, config, error, *named: str) -> None:
    """prepare() raises ``error`` whose message names each of ``named``, and leaves ``model`` as it was."""
    before = snapshot(model)
    with pytest.raises(error) as raised:
        pruner.prepare(model, config)
    for text in named:
        assert text in str(raised.value), f"{text!r} not named in: {raised.value}"
    assert_untouched(model, before)


def test_unknown_tensor_names_closest_valid_names():
    assert_prepare_refuses(
        models.LinearBias(),
        SaliencyPruner(),
        [{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "seq.1.wieght"}],
        PruningConfigError,
        "seq.1.wieght",
        "seq.1.weight",
    )


def test_unknown_module_in_tensor_name():
    assert_prepare_refuses(
        models.SimpleLinear(),
        SaliencyPruner(),
        [{"tensor_fqn": "linear3.weight"}],
        PruningConfigError,
        "linear3.weight",
        "linear1.weight",
    )


def test_one_dimensional_tensor_is_refused():
    assert_prepare_refuses(
        models.LinearBias(),
        SaliencyPruner(),
        [{"tensor_fqn": "seq.0.bias"}],
        PruningConfigError,
        "seq.0.bias",
    )


@pytest.mark.parametrize("level", [1.0, 1.5, -0.1, "half"])
@pytest.mark.parametrize(
    "construct",
    [
        lambda level: SaliencyPruner({"sparsity_level": level}),
        lambda level: SaliencyPruner(sparsity_level=level),
    ],
    ids=["defaults_dict", "keyword"],
)
def test_sparsity_out_of_range_refused_at_construction(level, construct):
    with pytest.raises(PruningConfigError) as raised:
        construct(level)
    for text in ("sparsity_level", repr(level), "[0, 1)"):
        assert text in str(raised.value), f"{text!r} not named in: {raised.value}"


@pytest.mark.parametrize("level", [1.0, -0.5])
def test_sparsity_out_of_range_refused_per_group(level):
    assert_prepare_refuses(
        models.LinearBias(),
        SaliencyPruner(),
        [{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "seq.1.weight", "sparsity_level": level}],
        PruningConfigError,
        "seq.1.weight",
        "sparsity_level",
        repr(level),
    )


@pytest.mark.parametrize("method", ["step", "prune"])
def test_step_or_prune_before_prepare(method):
    with pytest.raises(PrunerStateError, match=rf"{method}\(\)[^\n]*prepare"):
        getattr(SaliencyPruner(), method)()


@pytest.mark.parametrize(
    ("build", "fqn", "op"),
    [(structures.LinearSoftmax, "fc1.weight", "softmax"), (structures.ConvChannelMean, "conv1.weight", "mean")],
    ids=["softmax", "channel_mean"],
)
def test_unremovable_channels_refused_naming_tensor_and_op(build, fqn, op):
    assert_prepare_refuses(build(), SaliencyPruner(), [{"tensor_fqn": fqn}], UnsupportedPatternError, fqn, op)


def test_config_none_leaves_out_unremovable_tensors():
    pruner = SaliencyPruner()
    pruner.prepare(structures.LinearSoftmax(), None)
    assert [group["tensor_fqn"] for group in pruner.groups] == ["fc2.weight"]


def test_base_class_cannot_be_instantiated():
    with pytest.raises(TypeError, match="BaseStructuredSparsifier.*update_mask"):
        BaseStructuredSparsifier()


@pytest.mark.parametrize(
    ("make", "bad"),
    [
        (lambda: SaliencyPruner(amount=0.3), "amount"),
        (lambda: SaliencyPruner(sparsity_levl=0.3), "sparsity_levl"),
        (lambda: SaliencyPruner({"sparsity": 0.3}), "sparsity"),
    ],
)
def test_built_in_pruner_refuses_unknown_hyperparameters(make, bad):
    with pytest.raises(PruningConfigError, match=rf"{bad}.*accepts \['allocation', 'prune_bias', 'sparsity_level'\]"):
        make()


def test_unknown_hyperparameter_in_a_config_entry_is_refused_before_masks():
    model = models.LinearBias()
    # allocation is the pruner's (prepare refuses it in an entry), so the entry's accepted keys do not offer it
    with pytest.raises(PruningConfigError, match=r"sparsity_levl.*did you mean 'sparsity_level'.*accepts in a "
                                                 r"config entry \['prune_bias', 'sparsity_level'\]$"):
        SaliencyPruner(sparsity_level=0.5).prepare(model, [{"tensor_fqn": "seq.0.weight", "sparsity_levl": 0.1}])
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


def test_custom_pruner_without_declared_keys_accepts_any_key():
    class Custom(BaseStructuredSparsifier):
        def update_mask(self, module, tensor_name, **kwargs):
            pass

    assert Custom({"test": 3}).defaults["test"] == 3


def test_explicit_output_layer_refused_when_output_is_protected():
    model = models.LinearBias()
    pruner = SaliencyPruner(sparsity_level=0.5)
    with pytest.raises(PruningConfigError, match=r"\['seq.4.weight'\].*reach the model's output"):
        pruner.prepare(model, [{"tensor_fqn": "seq.0.weight"}, {"tensor_fqn": "seq.4.weight"}], exclude_output=True)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    pruner.prepare(model, [{"tensor_fqn": "seq.0.weight"}], exclude_output=True)
    assert [g["tensor_fqn"] for g in pruner.groups] == ["seq.0.weight"]


@pytest.mark.parametrize("bad", [3, "x", {1: torch.ones(1)}])
def test_bad_example_inputs_refused(bad):
    with pytest.raises(PruningConfigError, match="example input must be a tensor, a tuple"):
        SaliencyPruner(sparsity_level=0.5).prepare(models.LinearBias(), None, example_inputs=bad)
