"""The readable plan (explain) and the one rule registry (issue 10)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import lightning_prune as lp
from benchmarks import models as archs
from lightning_prune.app import DigitsCNN, DigitsLSTM
from lightning_prune.fusion.rules import registry, rule_for
from lightning_prune.measure import count_macs
from tests.checks import step_and_prune_exactly


def test_explain_reads_the_plan_without_touching_the_model() -> None:
    model = DigitsCNN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = lp.explain(model, example_inputs=torch.randn(256, 1, 8, 8))
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    data = plan.to_dict()
    json.dumps(data)  # JSON-ready
    groups = {tuple(g["producers"]): g for g in data["groups"]}
    assert groups[("features.0.weight",)]["removable"] == 16
    assert groups[("features.0.weight",)]["consumers"] == ["features.3"]
    assert groups[("classifier.weight",)]["removable"] == 0
    assert data["left_out"] == {"classifier.weight": "its channels reach the model's output"}
    # the README's demo figures, computed before anything changes
    assert data["params"] == {"dense": 24_058, "pruned": 6_274}
    assert data["macs"] == {"dense": 153_518_080, "pruned": 39_010_304, "batch": 256}
    table = str(plan)
    assert "features.0.weight*" in table and "params 24,058 -> 6,274" in table


def test_explain_sizes_match_what_prune_then_gives() -> None:
    model = archs.ResNet18(width=8, image_size=8)
    x = model.example_input(2)
    plan = lp.explain(model, example_inputs=x)
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, None, exclude_output=True, example_inputs=(x,))
    pruner.step()
    pruner.prune()
    assert plan.to_dict()["params"]["pruned"] == sum(p.numel() for p in model.parameters())
    assert plan.to_dict()["macs"]["pruned"] == count_macs(model, x)


def test_lstm_macs_are_counted_and_predicted_as_prune_then_gives() -> None:
    """oneDNN's fused LSTM kernel has no FLOP formula: the plan counts with the reference kernels, and splits the
    LSTM's MACs between weight_ih and weight_hh (hidden x hidden shrinks quadratically)."""
    x = torch.randn(2, 1, 8, 8)
    model = DigitsLSTM()
    plan = lp.explain(model, example_inputs=x, sparsity_level=0.5)
    assert plan.to_dict()["macs"]["dense"] == count_macs(model, x)
    pruner = lp.LSTMSaliencyPruner(sparsity_level=0.5, tie_gates=True)
    pruner.prepare(model, None, exclude_output=True, example_inputs=(x,))
    pruner.step()
    pruner.prune()
    assert plan.to_dict()["macs"]["pruned"] == count_macs(model, x)


def test_a_prepared_model_plan_counts_the_masked_layers_macs() -> None:
    """The callback prints the pruner's plan after the masks are attached: a masked layer is still a leaf."""
    x = torch.randn(256, 1, 8, 8)
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(DigitsCNN(), None, exclude_output=True, example_inputs=(x,))
    pruner.plan.sparsity_level = 0.5
    assert pruner.plan.to_dict()["macs"] == {"dense": 153_518_080, "pruned": 39_010_304, "batch": 256}


class NormOverTwoDims(nn.Module):
    """A LayerNorm over (channels, length): its statistics span more than the channels."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv1d(4, 8, 3), nn.LayerNorm([8, 6]), nn.Linear(48, 2)

    def forward(self, x):
        return self.head(self.norm(self.conv(x)).flatten(1))


def test_explain_names_the_blocker_and_its_source_line_instead_of_raising() -> None:
    plan = lp.explain(NormOverTwoDims(), [{"tensor_fqn": "conv.weight"}])
    data = plan.to_dict()
    assert "LayerNorm" in data["left_out"]["conv.weight"] and "test_plan.py:" in data["left_out"]["conv.weight"]
    group = next(g for g in data["groups"] if "conv.weight" in g["producers"])
    assert group["removable"] == 0 and any("normalises over the pruned channels" in r for r in group["blocked_by"])
    assert data["macs"] is None  # no example inputs, no MACs
    assert "MACs   n/a" in plan.table()


def test_explain_shows_heads_and_groups_as_their_granularity() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 8, 3))
    data = lp.explain(model, example_inputs=torch.randn(1, 3, 8, 8), exclude_output=True).to_dict()
    first = next(g for g in data["groups"] if g["producers"] == ["0.weight"])
    assert first["granularity"] == "group-of-4" and first["channels"] == 4


@pytest.mark.parametrize("bad", [{"sparsity_level": 1.0}, {"config": ["0.weight"]}, {"example_inputs": 3}])
def test_explain_refuses_bad_input_naming_it(bad) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    with pytest.raises(lp.PruningConfigError):
        lp.explain(model, **bad)


# -- one registry --------------------------------------------------------------------------------------------------
class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class UsesSwish(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(4, 8), Swish(), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(swish(self.act(self.fc1(x))))


def test_a_scoped_registration_applies_inside_the_scope_only() -> None:
    rule = lp.ElementwiseRule(lambda module, values: values * torch.sigmoid(values))
    with lp.rules_scope({Swish: rule}):
        assert rule_for(Swish()) is rule
    assert rule_for(Swish()) is None


def test_a_pruner_can_carry_its_own_rules_for_layers_and_functions() -> None:
    torch.manual_seed(0)
    model = UsesSwish().eval()
    x = torch.randn(5, 4)
    const = lp.ElementwiseRule(lambda module, values: values * torch.sigmoid(values))
    pruner = lp.SaliencyPruner(sparsity_level=0.5, prune_bias=False, rules={Swish: const, swish: const})
    pruner.prepare(model, [{"tensor_fqn": "fc1.weight"}])
    step_and_prune_exactly(pruner, model, x)
    assert model.fc1.out_features == model.fc2.in_features == 4
    assert rule_for(Swish()) is None, "a pruner's rules do not leak into the global registry"


@pytest.mark.parametrize("bad", [(int, lp.ElementwiseRule()), (nn.Linear, "rule")])
def test_register_layer_refuses_what_is_not_a_module_type_and_a_rule(bad, rules) -> None:
    with pytest.raises(lp.PruningConfigError, match="register_layer expects"):
        lp.register_layer(*bad)


def test_register_function_refuses_a_non_rule(rules) -> None:
    with pytest.raises(lp.PruningConfigError, match="register_function expects a Rule"):
        lp.register_function(F.relu, object())


def declared_kind(rule: lp.Rule) -> lp.RuleKind | None:
    """The kind the rule or a class of it below :class:`~lightning_prune.Rule` declares (None: only the base's
    default, which no rule should fall back on silently)."""
    if "kind" in vars(rule):
        return rule.kind
    for cls in type(rule).__mro__:
        if cls is lp.Rule:
            return None
        if "kind" in vars(cls):
            return vars(cls)["kind"]
    return None


def test_every_rule_has_a_documented_kind() -> None:
    rules = [*registry.active().modules.values(), *registry.active().functions.values(),
             *registry.active().names.values()]
    undeclared = sorted({type(rule).__qualname__ for rule in rules if not isinstance(declared_kind(rule), lp.RuleKind)})
    assert len(rules) > 50 and not undeclared, f"rules declaring no kind: {undeclared}"
