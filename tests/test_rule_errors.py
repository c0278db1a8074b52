"""A rule that raises while the walk visits a node refuses that node (issue 23, item 4): the analysis never crashes
on a rule's IndexError, the refusal names the op, its source line and the error, and the layers whose channels reach
the node are left out (config=None) or refused (named in the config) while the rest still prune exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_prune as lp
from lightning_prune.errors import UnsupportedPatternError
from lightning_prune.fusion.rules.base import ElementwiseRule
from tests.checks import step_and_prune_exactly


class Scale(nn.Module):
    def forward(self, x):
        return x * 2.0


class BrokenRule(ElementwiseRule):
    """Records a coupling and a binding, then fails like a rule meeting an input it was not written for."""

    def visit(self, v):
        flow = v.layout(v.arg(0))
        v.couple(flow.labels, flow.labels)
        v.set(flow)
        v.action("half-done")
        return ()[0]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.odd, self.fc2 = nn.Linear(8, 16), Scale(), nn.Linear(16, 12)
        self.fc3, self.head = nn.Linear(12, 10), nn.Linear(10, 4)

    def forward(self, x):
        h = self.odd(torch.relu(self.fc1(x)))  # the broken rule's node
        return self.head(torch.relu(self.fc3(torch.relu(self.fc2(h)))))


@pytest.mark.parametrize("shapes", [False, True], ids=["fx", "fx-shapes"])
def test_a_rule_raising_indexerror_refuses_its_node_and_the_rest_prunes(shapes: bool) -> None:
    model, x = Net().eval(), torch.randn(3, 8)
    example = {"example_inputs": (x,)} if shapes else {}
    with lp.rules_scope({Scale: BrokenRule()}):
        plan = lp.explain(model, **example)
        left_out = plan.to_dict()["left_out"]
        assert set(left_out) == {"fc1.weight", "head.weight"}
        reason = left_out["fc1.weight"]
        assert "Scale 'odd'" in reason and "BrokenRule.visit raised IndexError: tuple index out of range" in reason
        assert "test_rule_errors.py:" in reason and "self.odd(torch.relu(self.fc1(x)))" in reason  # the user's line

        with pytest.raises(UnsupportedPatternError, match=r"fc1\.weight.*Scale 'odd'.*IndexError"):
            lp.SaliencyPruner(sparsity_level=0.5).prepare(model, [{"tensor_fqn": "fc1.weight"}], **example)

        pruner = lp.SaliencyPruner(sparsity_level=0.5)
        pruner.prepare(model, None, exclude_output=True, **example)
        assert [g["tensor_fqn"] for g in pruner.groups] == ["fc2.weight", "fc3.weight"]
        assert not pruner.plan.walk.actions  # what the failed visit recorded is dropped
        step_and_prune_exactly(pruner, model, x)
    assert (model.fc1.out_features, model.fc2.out_features, model.fc3.out_features) == (16, 6, 5)


class BrokenConstant(ElementwiseRule):
    """Follows the channels, then fails when asked what a removed channel's constant becomes (at prune time)."""

    def const(self, v, values, *others):
        return values[len(values)]


@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "fold_bias"])
def test_a_rule_raising_in_const_keeps_those_channels_and_prune_completes_exactly(prune_bias: bool) -> None:
    model, x = Net().eval(), torch.randn(3, 8)
    with lp.rules_scope({Scale: BrokenConstant()}):
        pruner = lp.SaliencyPruner(sparsity_level=0.5, prune_bias=prune_bias)
        pruner.prepare(model, None, exclude_output=True)
        assert "fc1.weight" in [g["tensor_fqn"] for g in pruner.groups]
        with pytest.warns(UserWarning, match=r"Scale 'odd'.*BrokenConstant\.const raised IndexError.*channels there "
                                             r"stay"):
            step_and_prune_exactly(pruner, model, x)
    assert (model.fc1.out_features, model.fc2.in_features, model.fc2.out_features) == (16, 16, 6)


def test_project_errors_from_a_rule_pass_through() -> None:
    """A rule that refuses on purpose (the project's own error) is not turned into a blocker."""

    class Refusing(ElementwiseRule):
        def visit(self, v):
            raise lp.PruningConfigError("Scale is not supported here, on purpose")

    with lp.rules_scope({Scale: Refusing()}), pytest.raises(lp.PruningConfigError, match="on purpose"):
        lp.explain(Net())


class Cached(nn.Module):
    """``torch.cat`` with a 1-D empty tensor, which torch skips: how a Hugging Face key/value cache starts."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.register_buffer("cache", torch.empty(0))

    def forward(self, x):
        return self.fc2(torch.relu(torch.cat([self.cache, self.fc1(x)], dim=-1)))


def test_cat_skips_an_empty_1d_tensor_as_torch_does() -> None:
    model, x = Cached().eval(), torch.randn(3, 8)
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, [{"tensor_fqn": "fc1.weight"}], example_inputs=(x,))
    step_and_prune_exactly(pruner, model, x)
    assert model.fc1.out_features == 8
