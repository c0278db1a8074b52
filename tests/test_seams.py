"""What forward does that the plan must see (found by trying to break it): tensors read outside the rules that
narrow them, subclasses that change a layer's forward, shapes computed at run time, sizes written as literals,
constants that pooling rescales, an LSTM's initial state, and weights computed by parametrizations."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_prune as lp
from tests.checks import randomize_norms, step_and_prune_exactly


class ReadsWhole(nn.Module):
    """A hidden layer whose channels are pruned, and a parameter that also goes with them read whole elsewhere."""

    def __init__(self, read: str):
        super().__init__()
        self.read = read
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)
        self.gain = nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x)) * self.gain
        extra = {"weight-norm": lambda: self.a.weight.norm(dim=1).mean(), "bias-mean": lambda: self.a.bias.mean(),
                 "gain-energy": lambda: (self.gain * self.gain).sum()}[self.read]()
        return self.b(h) + extra


@pytest.mark.parametrize(("read", "fqn", "op"), [("weight-norm", "a.weight", "norm"), ("bias-mean", "a.bias", "mean"),
                                                 ("gain-energy", "gain", "mul")])
def test_a_tensor_read_whole_outside_the_rules_that_narrow_it_is_refused(read, fqn, op) -> None:
    """Narrowing it would change what that read computes: refused at prepare, naming the tensor and the read."""
    model = ReadsWhole(read)
    with pytest.raises(lp.UnsupportedPatternError, match=rf"'{fqn}' is read whole by .*'{op}'.*test_seams.py"):
        lp.SaliencyPruner(sparsity_level=0.5).prepare(model, [{"tensor_fqn": "a.weight"}],
                                                      example_inputs=(torch.randn(2, 8),))
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_a_tensor_read_only_where_it_is_narrowed_still_prunes() -> None:
    class Gained(ReadsWhole):
        def forward(self, x):
            return self.b(torch.relu(self.a(x)) * self.gain)

    model = Gained("bias-mean").eval()
    x = torch.randn(3, 8)
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, [{"tensor_fqn": "a.weight"}], example_inputs=(x,))
    step_and_prune_exactly(pruner, model, x)
    assert model.gain.shape == (8,)


class ScaledLinear(nn.Linear):
    """Overrides forward: the base layer's rule no longer describes its call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * 2.0, self.bias)


class PaddedConv(nn.Conv2d):
    """Overrides forward with ops fusion follows one by one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)


class RenamedLinear(nn.Linear):
    """Inherits forward: the base layer's rule holds."""


def test_a_subclass_that_overrides_forward_is_not_read_as_its_base_layer() -> None:
    model = nn.Sequential(ScaledLinear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(lp.UnsupportedPatternError,
                       match=r"ScaledLinear '0' overrides Linear.forward.*register_layer\(ScaledLinear, Linear\)"):
        lp.SaliencyPruner(sparsity_level=0.5).prepare(model, [{"tensor_fqn": "0.weight"}])


def test_a_subclass_registered_with_its_base_layers_rule_prunes_exactly(rules) -> None:
    model = nn.Sequential(ScaledLinear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    lp.register_layer(ScaledLinear, nn.Linear)
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, [{"tensor_fqn": "0.weight"}])
    step_and_prune_exactly(pruner, model, x)
    assert model[0].out_features == 8 and model[2].in_features == 8


@pytest.mark.parametrize("layer", [PaddedConv, RenamedLinear])
def test_subclasses_are_followed_through_their_forward_or_read_as_the_base(layer) -> None:
    conv = layer is PaddedConv
    model = (nn.Sequential(layer(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3)) if conv else
             nn.Sequential(layer(8, 16), nn.ReLU(), nn.Linear(16, 4))).eval()
    x = torch.randn(2, 3, 8, 8) if conv else torch.randn(3, 8)
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, [{"tensor_fqn": "0.weight"}], example_inputs=(x,))
    step_and_prune_exactly(pruner, model, x)
    assert (model[0].out_channels if conv else model[0].out_features) == 8


def test_register_layer_with_a_type_that_has_no_rule_says_so(rules) -> None:
    with pytest.raises(lp.PruningConfigError, match="Module has no rule to share"):
        lp.register_layer(ScaledLinear, nn.Module)


class ShapeNormed(nn.Module):
    """A functional layer norm whose normalised shape is read off the tensor at run time."""

    def __init__(self, trailing: int):
        super().__init__()
        self.trailing = trailing
        self.a, self.b = nn.Conv2d(3, 16, 3), nn.Conv2d(16, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(F.layer_norm(h, h.shape[-self.trailing:]))


@pytest.mark.parametrize("example", [False, True])
def test_a_layer_norm_over_the_channels_given_as_a_runtime_shape_is_refused(example) -> None:
    """``h.shape[1:]`` of an (N, C, H, W) tensor spans the channels; without shapes its length is unknown."""
    why = "normalises over the pruned channels" if example else "normalises over a number of dims computed at run"
    with pytest.raises(lp.UnsupportedPatternError, match=why):
        lp.SaliencyPruner(sparsity_level=0.5).prepare(
            ShapeNormed(3), [{"tensor_fqn": "a.weight"}],
            example_inputs=(torch.randn(2, 3, 8, 8),) if example else None)


def test_a_layer_norm_over_the_spatial_dims_given_as_a_runtime_shape_prunes_exactly() -> None:
    model, x = ShapeNormed(2).eval(), torch.randn(2, 3, 8, 8)
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, [{"tensor_fqn": "a.weight"}], example_inputs=(x,))
    step_and_prune_exactly(pruner, model, x)
    assert model.a.out_channels == 8


class Literal(nn.Module):
    """A hidden width of 16 that forward handles with sizes written as literals; ``width`` is what reaches ``b``."""

    def __init__(self, how, width: int = 8):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Linear(8, 16), nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.how(self.a(x)))


LITERALS = {  # the op, and the width it hands on
    "split at sizes": (lambda h: torch.split(h, [8, 8], 1)[0], 8),
    "tensor_split at indices": (lambda h: torch.tensor_split(h, [8], 1)[0], 8),
    "narrow": (lambda h: h.narrow(1, 8, 8), 8),
    "unflatten": (lambda h: h.unflatten(1, (4, 4)).flatten(1), 16),
    "ones": (lambda h: h * torch.ones(16), 16),
    "arange": (lambda h: h + torch.arange(16.0), 16),
}
REFUSALS = {
    "split at sizes": "splits the pruned channels at literal sizes \\(\\[8, 8\\]\\)",
    "tensor_split at indices": "splits the pruned channels at literal sizes",
    "narrow": "picks channels by position with literal bounds, so the channels up to the end of the pick",
    "unflatten": "writes the size of a pruned dim as a literal",
    "ones": "a tensor made in forward .* has the channels' size written there",
    "arange": "a tensor made in forward .* has the channels' size written there",
}


@pytest.mark.parametrize("case", list(LITERALS))
def test_sizes_written_as_literals_are_refused_at_prepare(case) -> None:
    model = Literal(*LITERALS[case])
    with pytest.raises(lp.UnsupportedPatternError, match=REFUSALS[case]):
        lp.SaliencyPruner(sparsity_level=0.5).prepare(model, [{"tensor_fqn": "a.weight"}],
                                                      example_inputs=(torch.randn(3, 8),))
    assert not any(name.startswith("_tensor_constant") for name in vars(model)), "tracing left attributes behind"


PLACED = {
    "narrow from the start": lambda h: h.narrow(1, 0, 8),
    "narrow from the end": lambda h: h.narrow(1, -8, 8),
    "slice between negative bounds": lambda h: h[:, -8:-4].repeat(1, 2),
    "chunk": lambda h: h.chunk(2, 1)[0],
    "tensor_split into parts": lambda h: torch.tensor_split(h, 2, 1)[1],
}


@pytest.mark.parametrize("case", list(PLACED))
def test_picks_whose_channels_keep_their_places_prune_exactly(case) -> None:
    model, x = Literal(PLACED[case]).eval(), torch.randn(3, 8)
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, [{"tensor_fqn": "a.weight"}], example_inputs=(x,))
    step_and_prune_exactly(pruner, model, x)
    assert model.a.out_features < 16


@pytest.mark.parametrize("prune_bias", [False, True])
def test_power_average_pooling_of_a_removed_channels_constant_stays_exact(prune_bias) -> None:
    """LPPool scales a constant by the window size, so a removed channel's BatchNorm shift cannot be folded as is."""
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.LPPool2d(2, 2), nn.Conv2d(16, 4, 1))
    randomize_norms(model)
    model.eval()
    x = torch.randn(2, 3, 10, 10)
    pruner = lp.SaliencyPruner(sparsity_level=0.5, prune_bias=prune_bias)
    pruner.prepare(model, [{"tensor_fqn": "0.weight"}], example_inputs=(x,))
    step_and_prune_exactly(pruner, model, x)
    assert model[0].out_channels == (16 if not prune_bias else 8)


class LSTMWithState(nn.Module):
    """The tutorial LSTM: an initial state of zeros sized from an attribute that fusion cannot narrow."""

    def __init__(self, initial_state: bool):
        super().__init__()
        self.initial_state, self.hidden_size = initial_state, 16
        self.lstm, self.fc = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.initial_state:
            h0 = torch.zeros(1, x.size(0), self.hidden_size)
            out, _ = self.lstm(x, (h0, torch.zeros_like(h0)))
        else:
            out, _ = self.lstm(x)
        return self.fc(out[:, -1])


@pytest.mark.parametrize("initial_state", [False, True])
def test_an_lstm_given_an_initial_state_keeps_its_units_and_says_so_at_prepare(initial_state) -> None:
    model, x = LSTMWithState(initial_state).eval(), torch.randn(2, 5, 8)
    pruner = lp.LSTMSaliencyPruner(sparsity_level=0.5, tie_gates=True)
    config = [{"tensor_fqn": "lstm.weight_ih_l0"}, {"tensor_fqn": "lstm.weight_hh_l0"}]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner.prepare(model, config)
    said = [str(w.message) for w in caught if "will keep its channels" in str(w.message)]
    assert bool(said) == initial_state
    assert all("is given an initial state (h_0, c_0)" in s for s in said)
    step_and_prune_exactly(pruner, model, x)
    assert model.lstm.hidden_size == (16 if initial_state else 8)


class LSTMOnlyExported(LSTMWithState):
    """fx cannot trace ``range(x.dim() - 2)``, so the model is read with torch.export."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(x.dim() - 2):
            x = x + 0
        return super().forward(x)


def test_an_lstm_in_an_exported_graph_keeps_its_units_naming_the_consumer_instead_of_guessing() -> None:
    """The export graph unpacks the LSTM's output tuple inside the call; the dry run refuses rather than guess."""
    model, x = LSTMOnlyExported(False).eval(), torch.randn(2, 5, 8)
    pruner = lp.LSTMSaliencyPruner(sparsity_level=0.5, tie_gates=True)
    config = [{"tensor_fqn": "lstm.weight_ih_l0"}, {"tensor_fqn": "lstm.weight_hh_l0"}]
    with pytest.warns(UserWarning, match=r"breaks the model's forward at .*test_seams\.py"):
        pruner.prepare(model, config, example_inputs=(x,))
    assert pruner.plan.walk.traced.front_end == "export"
    step_and_prune_exactly(pruner, model, x)
    assert model.lstm.hidden_size == 16


def test_untied_lstm_gates_are_warned_about_at_prepare() -> None:
    model = LSTMWithState(False)
    with pytest.warns(UserWarning, match=r"tie_gates=False\) prunes each gate of \['lstm'\].*tie_gates=True"):
        lp.LSTMSaliencyPruner(sparsity_level=0.5).prepare(model, [{"tensor_fqn": "lstm.weight_ih_l0"}])

REPARAMETRIZED = {
    "weight_norm": lambda layer: torch.nn.utils.parametrizations.weight_norm(layer),
    "spectral_norm": lambda layer: torch.nn.utils.parametrizations.spectral_norm(layer),
    "old weight_norm": lambda layer: torch.nn.utils.weight_norm(layer),
    "old spectral_norm": lambda layer: torch.nn.utils.spectral_norm(layer),
}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("kind", list(REPARAMETRIZED))
@pytest.mark.parametrize("where", ["producer", "consumer"])
def test_a_weight_computed_at_run_time_is_refused_at_prepare_naming_the_fix(kind, where) -> None:
    """weight_norm and spectral_norm compute ``weight`` when it is read: there is no stored weight to narrow."""
    first, second = nn.Linear(8, 16), nn.Linear(16, 4)
    if where == "producer":
        first = REPARAMETRIZED[kind](first)
    else:
        second = REPARAMETRIZED[kind](second)
    model = nn.Sequential(first, nn.ReLU(), second)
    with pytest.raises(lp.UnsupportedPatternError, match=r"computes \['weight'\] at run time .*remove_param"):
        lp.SaliencyPruner().prepare(model, [{"tensor_fqn": "0.weight"}])


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("kind", list(REPARAMETRIZED))
def test_a_reparametrized_layer_is_left_as_it_is_while_the_others_prune(kind) -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          REPARAMETRIZED[kind](nn.Linear(16, 4))).eval()
    x = torch.randn(3, 8)
    assert "0.weight" in str(lp.explain(model))
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, None, exclude_output=True)
    assert [g["tensor_fqn"] for g in pruner.groups] == ["0.weight"]
    step_and_prune_exactly(pruner, model, x)
    assert model[0].out_features == 8 and model[2].in_features == 8 and model[4].in_features == 16
