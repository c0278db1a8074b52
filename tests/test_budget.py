"""Cost budgets: they land within 2% of the target, keep width floors, ramp monotonically, and refuse bad input."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lightning_prune import (
    Budget,
    FPGMPruner,
    LSTMSaliencyPruner,
    PruningConfigError,
    SaliencyPruner,
    TaylorPruner,
)
from lightning_prune.app.models import DigitsCNN, DigitsLSTM, DigitsResNet
from lightning_prune.measure import count_macs, count_params
from tests.checks import cheapest_digits_cnn_class
from tests.transformer_models import hand

IMAGES = torch.randn(2, 1, 8, 8)


def _cost(model: nn.Module, metric: str) -> int:
    return count_macs(model, IMAGES) if metric == "macs" else count_params(model)


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.1])
@pytest.mark.parametrize("allocation", ["global", "uniform"])
@pytest.mark.parametrize("metric", ["macs", "params"])
@pytest.mark.parametrize("model_class", [DigitsCNN, DigitsResNet, DigitsLSTM])
def test_a_budget_lands_within_two_percent_of_the_dense_cost(model_class, metric, allocation, ratio):
    model = model_class()
    dense = _cost(model, metric)
    pruner = SaliencyPruner(target={metric: ratio, "allocation": allocation})
    pruner.prepare(model, None, exclude_output=True, example_inputs=IMAGES)
    pruner.step()
    pruner.prune()
    reached = _cost(model, metric) / dense
    assert ratio - 0.02 <= reached <= ratio
    assert reached == pytest.approx(pruner.budget_reached)  # the cost model is exact for these layers


class AttentionNet(nn.Module):
    """Self-attention whose output projection feeds a Linear directly: out_proj loses rows as well as columns."""

    def __init__(self):
        super().__init__()
        self.e, self.a = nn.Linear(8, 32), nn.MultiheadAttention(32, 8, batch_first=True)
        self.f, self.o = nn.Linear(32, 64), nn.Linear(64, 10)

    def forward(self, x):
        h = self.e(x)
        return self.o(torch.relu(self.f(self.a(h, h, h, need_weights=False)[0].mean(1))))


@pytest.mark.parametrize("pruner", [SaliencyPruner, TaylorPruner])
def test_a_budget_counts_attention_projections_on_both_sides(pruner):
    torch.manual_seed(0)
    model, x = AttentionNet(), torch.randn(4, 10, 8)
    dense = count_macs(model, x)
    p = pruner(target={"macs": 0.5})
    p.prepare(model, None, exclude_output=True, example_inputs=x)
    if isinstance(p, TaylorPruner):
        model(x).square().sum().backward()
    p.step()
    p.prune()
    assert 0.48 <= count_macs(model, x) / dense <= 0.5


def test_a_global_budget_over_a_stacked_lstm_warns_that_layers_share_one_width():
    model = nn.Sequential(nn.LSTM(8, 16, num_layers=2, batch_first=True))
    with pytest.warns(UserWarning, match=r"LSTM\(s\) \['0'\] have several layers and one hidden size"):
        TaylorPruner(target={"macs": 0.5}).prepare(model, None, example_inputs=torch.randn(2, 5, 8))


def test_global_ranking_differs_from_uniform_which_auto_picks_for_weight_norms():
    """Global allocation removes more of the layers whose channels cost most per unit of score; "auto" keeps L1 norms,
    which mean nothing across layers, uniform (Taylor's loss changes go global: see the test below)."""
    widths = {}
    for allocation in ("global", "uniform", "auto"):
        model = DigitsCNN()
        pruner = SaliencyPruner(target={"macs": 0.25, "allocation": allocation})
        pruner.prepare(model, None, exclude_output=True, example_inputs=IMAGES)
        pruner.step()
        pruner.prune()
        widths[allocation] = [model.features[i].out_channels for i in (0, 3, 7)]
    assert widths["global"] != widths["uniform"] == widths["auto"]
    first, second, third = (w / d for w, d in zip(widths["uniform"], (16, 32, 64), strict=True))
    assert max(first, second, third) - min(first, second, third) < 0.1  # uniform: the same fraction everywhere


def test_width_floors_and_multiples_hold():
    model = DigitsCNN()
    pruner = SaliencyPruner(target={"macs": 0.1, "multiple_of": 8, "min_channels": 8})
    pruner.prepare(model, None, exclude_output=True, example_inputs=IMAGES)
    pruner.step()
    pruner.prune()
    widths = [model.features[i].out_channels for i in (0, 3, 7)]
    assert all(w >= 8 and w % 8 == 0 for w in widths), widths
    assert count_macs(model, IMAGES) <= 0.1 * count_macs(DigitsCNN(), IMAGES)


def test_a_ramped_budget_only_adds_to_the_pruned_set():
    model = DigitsResNet()
    pruner = FPGMPruner(target={"macs": 0.25})
    pruner.prepare(model, None, exclude_output=True, example_inputs=IMAGES)
    masks = []
    for level in (0.25, 0.5, 0.75):  # the cost removed: 1 - budget, as a schedule ramps it
        for group in pruner.groups:
            group["sparsity_level"] = level
        pruner.step()
        assert pruner.budget_reached == pytest.approx(1 - level, abs=0.02)
        masks.append({fqn: s["mask"].clone() for fqn, s in pruner.state.items()})
    for earlier, later in itertools.pairwise(masks):
        for fqn in earlier:
            assert not (later[fqn] & ~earlier[fqn]).any(), fqn


def test_statistics_pruners_spend_a_budget():
    model = DigitsCNN()
    pruner = TaylorPruner(target={"params": 0.5})
    pruner.prepare(model, None, exclude_output=True)  # a params budget needs no example inputs
    model(IMAGES).sum().backward()
    pruner.step()
    assert 0.48 <= pruner.budget_reached <= 0.5


def test_budget_takes_its_class_or_a_dict():
    assert Budget.parse({"macs": 0.5, "multiple_of": 8}) == Budget(macs=0.5, multiple_of=8)
    budget = Budget(params=0.3)
    assert Budget.parse(budget) is budget and (budget.metric, budget.ratio) == ("params", 0.3)


@pytest.mark.parametrize(("target", "match"), [
    ({"macs": 0.0}, r"macs=0.0 must be a fraction .* in \(0, 1\]"),
    ({"macs": 1.5}, r"in \(0, 1\]"),
    ({"params": True}, r"in \(0, 1\]"),
    ({"flops": 0.5}, r"unknown budget key\(s\) \['flops'\]; a target takes \['macs', 'params'"),
    ({"macs": 0.5, "params": 0.5}, "exactly one of 'macs' or 'params'"),
    ({"min_channels": 2}, "exactly one of 'macs' or 'params'.*neither"),
    ({"macs": 0.5, "multiple_of": 0}, "multiple_of must be an int >= 1"),
    ({"macs": 0.5, "min_channels": 1.5}, "min_channels must be an int >= 1"),
    ({"macs": 0.5, "allocation": "local"},
     r"allocation must be one of \['auto', 'global', 'uniform', 'uniform_layers'\]"),
    (0.5, "target must be a dict such as"),
])
def test_bad_budgets_fail_at_construction_naming_the_fix(target, match):
    with pytest.raises(PruningConfigError, match=match):
        SaliencyPruner(target=target)


def test_a_budget_and_a_sparsity_level_are_refused_together():
    with pytest.raises(PruningConfigError, match="either sparsity_level .* or target"):
        SaliencyPruner(sparsity_level=0.3, target={"macs": 0.5})
    with pytest.raises(PruningConfigError, match="either sparsity_level"):
        FPGMPruner(0.3, target={"macs": 0.5})
    with pytest.raises(PruningConfigError, match="tie_gates=True"):
        LSTMSaliencyPruner(target={"params": 0.5})


def test_budget_problems_found_at_prepare_leave_the_model_untouched():
    model = DigitsCNN()
    with pytest.raises(PruningConfigError, match="counts MACs on example inputs: pass prepare"):
        SaliencyPruner(target={"macs": 0.5}).prepare(model, None, exclude_output=True)
    with pytest.raises(PruningConfigError, match="remove 'sparsity_level' from the config entries"):
        SaliencyPruner(target={"params": 0.5}).prepare(
            model, [{"tensor_fqn": "features.0.weight", "sparsity_level": 0.2}])
    with pytest.raises(PruningConfigError, match=r"cannot be reached: .*min_channels=32 .* leaves 0\.\d+"):
        SaliencyPruner(target={"macs": 0.1, "min_channels": 32}).prepare(
            model, None, exclude_output=True, example_inputs=IMAGES)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_taylor_scores_are_compared_across_layers_as_loss_changes():
    """Under a budget, Taylor's scores are ranked as they are: a layer whose channels barely change the loss goes
    first, however its scores compare with its neighbours' (a per-layer normalisation would hide that)."""
    model = DigitsCNN()
    pruner = TaylorPruner(target={"macs": 0.55})
    pruner.prepare(model, None, exclude_output=True, example_inputs=IMAGES)
    model(IMAGES).sum().backward()
    values = torch.ones(pruner.plan.groups.size)
    first = next(m for m in pruner.plan.members if m.tensor_fqn == "features.0.weight")
    values[first.labels] = 1e-6 * torch.arange(1, 17, dtype=torch.float32)
    pruner.load_statistics(values)
    pruner.step()
    pruner.prune()
    assert model.features[0].out_channels <= 2
    assert model.features[3].out_channels == 32 and model.features[7].out_channels >= 60


def test_a_ramp_keeps_small_classes_for_its_last_step():
    """Attention heads are coarse and MLP widths fine: removing the cheap MLP widths first on a ramp would leave the
    last step only whole heads to remove, landing far below the budget. The ramp removes only what the final budget's
    plan would, and lands on it."""
    model, inputs = hand()
    pruner = TaylorPruner(target={"macs": 0.4})
    pruner.prepare(model, None, exclude_output=True, example_inputs=inputs)
    model.train()
    model(*inputs).square().mean().backward()
    values = torch.ones(pruner.plan.groups.size)
    fc1 = next(m for m in pruner.plan.members if m.tensor_fqn == "fc1.weight")
    values[fc1.labels] = 1e-3 * torch.rand(fc1.labels.numel())  # the MLP's channels matter least
    pruner.load_statistics(values)
    for tick in range(1, 6):
        for group in pruner.groups:
            group["sparsity_level"] = 0.6 * tick / 5
        pruner.step()
        assert pruner.budget_reached <= 1 - 0.6 * tick / 5
    assert 0.38 <= pruner.budget_reached <= 0.4


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_a_ramped_budget_lands_below_it_by_less_than_the_cheapest_class(allocation):
    """A ramp's removals are final, so its last step could only choose among what was left: with a global budget on
    DigitsCNN it landed at 0.4932, 1.6 times the cheapest channel below the budget. The plan toward the budget, the
    trade of a coarse removal for smaller ones and single swaps at the last step land it within one channel."""
    torch.manual_seed(1)
    model, images = DigitsCNN(), torch.randn(4, 1, 8, 8)
    dense = count_macs(model, images[:1])
    pruner = TaylorPruner(target={"macs": 0.5, "allocation": allocation})
    pruner.prepare(model, None, exclude_output=True, example_inputs=images)
    model(images).square().mean().backward()  # a sample, then statistics of our choosing
    pruner.load_statistics(torch.rand(pruner.plan.groups.size))
    for tick in range(1, 6):
        for group in pruner.groups:
            group["sparsity_level"] = 0.5 * tick / 5
        pruner.step()
    landing = pruner.budget_landing()
    pruner.prune()
    reached = count_macs(model, images[:1]) / dense
    assert reached == pytest.approx(landing["reached"])
    cheapest = cheapest_digits_cnn_class(model)
    assert landing["resolution"] == pytest.approx(cheapest / dense)
    assert 0.5 - cheapest / dense < reached <= 0.5
