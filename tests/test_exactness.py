"""Invariant 1: after ``prune()`` the model computes what the masked model computed, for every structure.

Each structure is pruned by a weight-driven pruner (saliency) and by one that ignores the weights (random
rows), with ``prune_bias`` True and False, in eval mode on random input. Each test also checks that the
configured layers got narrower, so none can pass by pruning nothing. The exception is where DESIGN says that a
channel stays: a constant (a bias kept with ``prune_bias=False``, or sigmoid(0)) that meets zero padding, and
LSTM units that feed a LayerNorm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lightning_prune.errors import UnsupportedPatternError
from lightning_prune.sparsifier import LSTMSaliencyPruner, SaliencyPruner
from tests import models, structures
from tests.checks import assert_outputs_match
from tests.pruners import RandomRowPruner, make_pruner, prune_and_compare, rows


def weights(layers: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{layer}.weight" for layer in layers)


@dataclass(frozen=True)
class Case:
    model: Callable[[], nn.Module]
    layers: tuple[str, ...]  # module FQNs whose ``weight`` is configured
    input_shape: tuple[int, ...]
    narrow_with_bias_kept: tuple[str, ...] | None = None  # the layers that must narrow with prune_bias=False
    coupled: tuple[str, ...] = ()

    def narrows(self, prune_bias: bool) -> tuple[str, ...]:
        return weights(
            self.layers if prune_bias or self.narrow_with_bias_kept is None else self.narrow_with_bias_kept
        )


SEED_IMAGE = (2, 1, 28, 28)
IMAGE = (2, 3, 10, 10)
FEATURES = (16, 7)
CASES = {
    # the seed's structures, with every layer its tests configure
    "linear": Case(models.SimpleLinear, ("seq.0", "seq.1", "seq.2", "linear1"), FEATURES),
    "linear_bias": Case(models.LinearBias, ("seq.0", "seq.1", "seq.2", "seq.3"), FEATURES),
    "linear_activation": Case(models.LinearActivation, ("seq.0", "seq.2", "seq.4", "linear1"), FEATURES),
    "linear_activation_functional": Case(
        models.LinearActivationFunctional, ("seq.0", "seq.2", "seq.4", "linear1", "linear2"), FEATURES
    ),
    "conv": Case(models.SimpleConv2d, ("seq.0", "seq.1", "conv2d1"), SEED_IMAGE),
    "conv_bias": Case(models.Conv2dBias, ("seq.0", "seq.1", "seq.2", "conv2d1"), SEED_IMAGE),
    "conv_activation": Case(models.Conv2dActivation, ("seq.0", "seq.2", "seq.4", "conv2d1"), SEED_IMAGE),
    # a kept bias can only be folded where the next conv does not pad
    "conv_pad_bias": Case(
        models.Conv2dPadBias,
        ("seq.0", "seq.2", "seq.4", "seq.6", "seq.8", "conv2d1"),
        SEED_IMAGE,
        narrow_with_bias_kept=("seq.0", "seq.2", "seq.6"),
    ),
    "conv_pool": Case(
        models.Conv2dPool, ("seq.0", "seq.3", "conv2d1", "conv2d2"), SEED_IMAGE, narrow_with_bias_kept=()
    ),
    "conv_pool_flatten": Case(
        models.Conv2dPoolFlatten,
        ("seq.0", "seq.3", "conv2d1", "conv2d2"),
        SEED_IMAGE,
        narrow_with_bias_kept=("conv2d2",),
    ),
    "conv_pool_flatten_functional": Case(
        models.Conv2dPoolFlattenFunctional,
        ("seq.0", "seq.3", "conv2d1", "conv2d2"),
        SEED_IMAGE,
        narrow_with_bias_kept=("conv2d2",),
    ),
    # the structures the reference gets wrong
    "pass_through_spellings": Case(structures.LinearPassThrough, ("fc1", "fc2", "fc3", "fc4"), (16, 6)),
    "linear_sigmoid": Case(structures.LinearSigmoid, ("fc1", "fc2"), (16, 6)),
    "conv_sigmoid": Case(structures.ConvSigmoid, ("conv1", "conv2"), IMAGE),
    "batchnorm": Case(structures.ConvBatchNorm, ("conv1", "conv2"), IMAGE),
    "fan_out_linear": Case(structures.LinearFanOut, ("trunk",), (16, 6)),
    "fan_out_conv": Case(structures.ConvFanOut, ("trunk",), IMAGE),
    "residual_linear": Case(structures.LinearResidual, ("stem", "fc1", "fc2"), (16, 6), coupled=("stem", "fc2")),
    "residual_conv": Case(
        structures.ConvResidual,
        ("stem", "conv_a", "conv_b"),
        IMAGE,
        narrow_with_bias_kept=(),
        coupled=("stem", "conv_b"),
    ),
    "same_padding": Case(structures.ConvSamePadding, ("conv1", "conv2"), IMAGE, narrow_with_bias_kept=()),
    "biased_conv_padded_conv": Case(structures.BiasedConvPaddedConv, ("conv1",), IMAGE, narrow_with_bias_kept=()),
    "conv_pool_flatten_linear": Case(structures.ConvPoolFlattenLinear, ("conv",), (2, 3, 8, 8)),
    "conv_spatial_mean": Case(structures.ConvSpatialMean, ("conv",), IMAGE),
    "comparisons_and_where": Case(structures.ConvWhere, ("conv1",), IMAGE),
}


@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "keep_bias"])
@pytest.mark.parametrize("pruner_kind", ["saliency", "random"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_pruned_equals_masked(case: Case, pruner_kind: str, prune_bias: bool):
    prune_and_compare(
        case.model(),
        make_pruner(pruner_kind, prune_bias),
        weights(case.layers),
        torch.randn(case.input_shape),
        narrows=case.narrows(prune_bias),
        coupled=weights(case.coupled),
    )


@pytest.mark.parametrize("case", ["residual_linear", "residual_conv"])
def test_residual_sides_prune_the_same_channels(case: str):
    """Both writers of a residual stream keep the same channels, so the add still lines up after pruning."""
    first, last = weights(CASES[case].coupled)
    model = CASES[case].model()
    pruner = SaliencyPruner({"sparsity_level": 0.5})
    pruner.prepare(model, [{"tensor_fqn": fqn} for fqn in weights(CASES[case].layers)])
    pruner.enable_mask_update = True
    pruner.step()
    assert torch.equal(pruner.state[first]["mask"], pruner.state[last]["mask"])
    assert not pruner.state[first]["mask"].all()


def test_configured_output_layer_keeps_its_kept_outputs():
    """A configured output layer is narrowed (as in the seed's FPGM test); its kept outputs are unchanged."""
    model = models.LinearBias().eval()
    x = torch.randn(16, 7)
    pruner = SaliencyPruner({"sparsity_level": 0.5})
    pruner.prepare(model, [{"tensor_fqn": "seq.3.weight"}, {"tensor_fqn": "seq.4.weight"}])
    pruner.enable_mask_update = True
    pruner.step()
    keep = pruner.state["seq.4.weight"]["mask"].clone()
    with torch.no_grad():
        y_masked = model(x)
        y_pruned = pruner.prune()(x)
    assert y_pruned.shape == (16, int(keep.sum()))
    assert_outputs_match(y_masked[:, keep], y_pruned)
    assert (y_masked[:, ~keep] == 0).all()


LSTM_CASES = {
    "one_layer": (lambda: models.LSTMLinearModel(8, 8, 8, 1), 1, 1),
    "two_layers": (lambda: models.LSTMLinearModel(8, 8, 8, 2), 2, 2),
    # the last layer's units feed LayerNorm statistics, so DESIGN lets them stay; nn.LSTM has one hidden size
    # for all its layers, so the first layer's stay too
    "two_layers_layernorm": (lambda: models.LSTMLayerNormLinearModel(8, 8, 8, 2), 2, 0),
}


@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "keep_bias"])
@pytest.mark.parametrize("case", LSTM_CASES.values(), ids=LSTM_CASES.keys())
def test_lstm_tied_gates_exact_over_sequence(case, prune_bias: bool):
    """Tied gates: a pruned unit's h stays 0 at every one of 7 steps, so removing it is exact."""
    build, num_layers, narrowed_layers = case
    tensors = tuple(f"lstm.weight_{kind}_l{k}" for k in range(num_layers) for kind in ("ih", "hh"))
    narrows = tuple(f"lstm.weight_{kind}_l{k}" for k in range(narrowed_layers) for kind in ("ih", "hh"))
    prune_and_compare(
        build(),
        LSTMSaliencyPruner(sparsity_level=0.5, tie_gates=True, prune_bias=prune_bias),
        tensors,
        torch.randn(7, 3, 8),
        narrows=narrows if prune_bias else (),
        output=lambda y: y[0],
    )


class LastStepClassifier(nn.Module):
    """batch_first LSTM whose last time step is classified: ``out[:, -1]`` indexes time, not the hidden units."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


def test_batch_first_lstm_last_step_prunes_exactly():
    tensors = tuple(f"lstm.weight_{kind}_l{k}" for k in range(2) for kind in ("ih", "hh"))
    prune_and_compare(LastStepClassifier(), LSTMSaliencyPruner(sparsity_level=0.5, tie_gates=True), tensors,
                      torch.randn(3, 7, 8), narrows=tensors)


class ViewFlatten(nn.Module):
    """The classic CIFAR idiom: ``x.view(x.size(0), -1)`` (or ``x.reshape(x.shape[0], -1)``) before the classifier."""

    def __init__(self, use_shape: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 5)
        self.use_shape = use_shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = x.reshape(x.shape[0], -1) if self.use_shape else x.view(x.size(0), -1)
        return self.fc(x)


@pytest.mark.parametrize("use_shape", [False, True], ids=["view_size", "reshape_shape"])
def test_view_of_batch_size_flattens_exactly(use_shape: bool):
    prune_and_compare(ViewFlatten(use_shape), SaliencyPruner(sparsity_level=0.5), ("conv.weight",),
                      torch.randn(2, 3, 6, 6), narrows=("conv.weight",))


def test_a_channel_mixing_view_is_refused():
    class MixingView(ViewFlatten):
        def forward(self, x):
            return self.fc(F.relu(self.conv(x)).view(-1, 8 * 16))

    with pytest.raises(UnsupportedPatternError, match="reshapes the pruned channels"):
        SaliencyPruner().prepare(MixingView(False), [{"tensor_fqn": "conv.weight"}])


def test_where_choosing_by_a_condition_without_the_channels_is_refused():
    """A removed channel would be filled from the other operand wherever the condition says so."""
    class InputGate(structures.ConvWhere):
        def forward(self, x):
            return self.conv2(torch.where(x.mean(1, keepdim=True) > 0, self.conv1(x), x.mean()))

    with pytest.raises(UnsupportedPatternError, match="function 'where' .* selects between the pruned channels and "
                                                      "a value that does not carry them"):
        SaliencyPruner().prepare(InputGate(), [{"tensor_fqn": "conv1.weight"}])


# --- property tests over random stacks ----------------------------------------------------------------------


class Apply(nn.Module):
    """Calls a function, so that inside a Sequential the traced graph holds the function, not a module."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


# (builder, value at 0): a nonzero value is a constant that a padded consumer cannot absorb
ACTIVATIONS = {
    "ReLU": (nn.ReLU, 0.0),
    "Tanh": (nn.Tanh, 0.0),
    "GELU": (nn.GELU, 0.0),
    "Dropout": (lambda: nn.Dropout(0.3), 0.0),
    "Identity": (nn.Identity, 0.0),
    "F.silu": (lambda: Apply(F.silu), 0.0),
    "F.leaky_relu": (lambda: Apply(F.leaky_relu), 0.0),
    "torch.sigmoid": (lambda: Apply(torch.sigmoid), 0.5),
    "x.relu()": (lambda: Apply(lambda x: x.relu()), 0.0),
}


@st.composite
def linear_stacks(draw) -> list[tuple[int, int, bool, str | None]]:
    """(in, out, bias, activation after it) per Linear; the last layer has no activation."""
    depth = draw(st.integers(2, 4))
    widths = draw(st.lists(st.integers(2, 10), min_size=depth + 1, max_size=depth + 1))
    acts = draw(st.lists(st.sampled_from(sorted(ACTIVATIONS)), min_size=depth - 1, max_size=depth - 1))
    return [(widths[i], widths[i + 1], draw(st.booleans()), ([*acts, None])[i]) for i in range(depth)]


def build_linear_stack(spec) -> tuple[nn.Sequential, list[str]]:
    layers: list[nn.Module] = []
    tensors = []
    for width_in, width_out, bias, act in spec:
        if act is not None:
            tensors.append(f"{len(layers)}.weight")
        layers.append(nn.Linear(width_in, width_out, bias=bias))
        if act is not None:
            layers.append(ACTIVATIONS[act][0]())
    return nn.Sequential(*layers), tensors


@given(
    spec=linear_stacks(), prune_bias=st.booleans(), sparsity=st.floats(0.1, 0.9), seed=st.integers(0, 2**16)
)
def test_random_linear_stacks_prune_exactly(spec, prune_bias, sparsity, seed):
    torch.manual_seed(seed)
    model, tensors = build_linear_stack(spec)
    prune_and_compare(
        model,
        RandomRowPruner({"sparsity_level": sparsity, "prune_bias": prune_bias}),
        tuple(tensors),
        torch.randn(5, spec[0][0]),
        narrows=tuple(fqn for fqn in tensors if int(rows(model, fqn) * sparsity) > 0),
    )


@st.composite
def conv_stacks(draw) -> list[tuple[int, int, int, bool, bool, str]]:
    """(in, out, padding, bias, batchnorm, activation) per 3x3 conv block."""
    depth = draw(st.integers(2, 4))
    channels = draw(st.lists(st.integers(2, 8), min_size=depth + 1, max_size=depth + 1))
    return [
        (
            channels[i],
            channels[i + 1],
            draw(st.integers(0, 1)),
            draw(st.booleans()),
            draw(st.booleans()),
            draw(st.sampled_from(sorted(ACTIVATIONS))),
        )
        for i in range(depth)
    ]


def build_conv_stack(spec) -> tuple[nn.Sequential, list[str]]:
    layers: list[nn.Module] = []
    tensors = []
    for channels_in, channels_out, padding, bias, batchnorm, act in spec:
        tensors.append(f"{len(layers)}.weight")
        layers.append(nn.Conv2d(channels_in, channels_out, kernel_size=3, padding=padding, bias=bias))
        if batchnorm:
            layers.append(nn.BatchNorm2d(channels_out))
        layers.append(ACTIVATIONS[act][0]())
    return nn.Sequential(*layers), tensors


def must_narrow(spec, tensors: list[str], prune_bias: bool) -> tuple[str, ...]:
    """A pruned channel must go, unless it emits a constant (kept bias/BN shift, sigmoid(0)) into padding."""
    narrow = []
    for fqn, (_, _, _, bias, batchnorm, act), next_block in zip(tensors, spec[:-1], spec[1:], strict=True):
        emits_constant = ACTIVATIONS[act][1] != 0.0 or ((bias or batchnorm) and not prune_bias)
        next_padding = next_block[2]
        if not (emits_constant and next_padding):
            narrow.append(fqn)
    return tuple(narrow)


@given(spec=conv_stacks(), prune_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_random_conv_stacks_prune_exactly(spec, prune_bias, seed):
    torch.manual_seed(seed)
    model, tensors = build_conv_stack(spec)
    configured = tensors[:-1]  # the last conv is the model's output
    prune_and_compare(
        model,
        RandomRowPruner({"sparsity_level": 0.5, "prune_bias": prune_bias}),
        tuple(configured),
        torch.randn(2, spec[0][0], 11, 11),
        narrows=must_narrow(spec, configured, prune_bias),
    )
