"""TaylorPruner and ActivationPruner: their scores against a hand computation, when they sample, their state."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune import ActivationPruner, PrunerStateError, PruningConfigError, TaylorPruner
from lightning_prune.errors import UnsupportedPatternError
from lightning_prune.masks import has_masks
from tests.checks import assert_outputs_match
from tests.transformer_models import hand


class MLP(nn.Module):
    """Linear(3, 4) -> ReLU -> Linear(4, 2); only ``fc1`` is pruned (``fc2`` is the output)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm -> ReLU -> global pool -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 1).flatten(1))


class FunctionalLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(F.linear(x, self.fc1.weight, self.fc1.bias).relu())


def _batches(n: int, shape=(5, 3), classes: int = 2):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(*shape, generator=generator), torch.randint(0, classes, (shape[0],), generator=generator))
            for _ in range(n)]


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _taylor_by_hand(model: MLP, batch) -> torch.Tensor:
    """(sum over fc1's row r and bias r of w * dL/dw) ** 2, from autograd on a copy of the unprepared model."""
    twin = copy.deepcopy(model)
    _loss(twin, batch).backward()
    fc1 = twin.fc1
    return ((fc1.weight * fc1.weight.grad).sum(1) + fc1.bias * fc1.bias.grad).detach() ** 2


def _fc1_ids(pruner) -> torch.Tensor:
    return next(m.labels for m in pruner.plan.members if m.tensor_fqn == "fc1.weight")


def test_taylor_scores_equal_the_hand_computation_and_average_with_bias_correction():
    model = MLP()
    first, second = _batches(2)
    expected_first, expected_second = _taylor_by_hand(model, first), _taylor_by_hand(model, second)
    pruner = TaylorPruner(beta=0.5)
    pruner.prepare(model, None, exclude_output=True)
    _loss(model, first).backward()
    torch.testing.assert_close(pruner.values()[_fc1_ids(pruner)], expected_first)
    model.zero_grad()
    _loss(model, second).backward()
    average = (0.5 * 0.5 * expected_first + 0.5 * expected_second) / (1 - 0.5 ** 2)
    torch.testing.assert_close(pruner.values()[_fc1_ids(pruner)], average)

    pruner.groups[0]["sparsity_level"] = 0.5
    pruner.step()
    mask = model.fc1.parametrizations.weight[0].mask
    assert mask.tolist() == (average >= average.sort().values[2]).tolist()  # the two highest stay


def test_taylor_counts_the_batchnorm_affine_masked_with_each_channel():
    model = ConvBN()
    batch = (torch.randn(6, 2, 5, 5), torch.randint(0, 3, (6,)))
    twin = copy.deepcopy(model)
    _loss(twin, batch).backward()
    per_channel = ((twin.conv.weight * twin.conv.weight.grad).flatten(1).sum(1)
                   + twin.bn.weight * twin.bn.weight.grad + twin.bn.bias * twin.bn.bias.grad).detach()
    # in training mode BatchNorm makes the loss invariant to the conv rows' scale: they alone carry no signal
    rows_only = (twin.conv.weight * twin.conv.weight.grad).flatten(1).sum(1).detach()
    assert rows_only.abs().max() < 1e-3 * per_channel.abs().max()

    pruner = TaylorPruner(beta=0.0)
    pruner.prepare(model, [{"tensor_fqn": "conv.weight"}])
    _loss(model, batch).backward()
    ids = pruner.plan.members[0].labels
    torch.testing.assert_close(pruner.values()[ids], per_channel ** 2)


def test_taylor_takes_each_backward_pass_and_on_request_the_accumulated_grad():
    model = MLP()
    first, second = _batches(2)
    expected = [_taylor_by_hand(model, first), _taylor_by_hand(model, second)]
    hooks = TaylorPruner(beta=0.5)
    hooks.prepare(model, None, exclude_output=True)
    _loss(model, first).backward()
    _loss(model, second).backward()  # gradient accumulation: .grad sums both, each sample is one pass's own
    average = (0.25 * expected[0] + 0.5 * expected[1]) / 0.75
    torch.testing.assert_close(hooks.values()[_fc1_ids(hooks)], average)

    on_request = TaylorPruner(sample="step")
    twin = MLP()
    on_request.prepare(twin, None, exclude_output=True)
    _loss(twin, first).backward()
    with pytest.raises(PrunerStateError, match="no statistics"):
        on_request.values()
    _loss(twin, second).backward()
    on_request.observe()
    fc1 = twin.fc1.parametrizations.weight.original
    accumulated = ((fc1 * fc1.grad).sum(1) + twin.fc1.parametrizations.bias.original
                   * twin.fc1.parametrizations.bias.original.grad).detach() ** 2
    torch.testing.assert_close(on_request.values()[_fc1_ids(on_request)], accumulated)


def test_activation_scores_are_the_mean_magnitude_over_batch_and_positions_in_training_mode_only():
    model = ConvBN()
    pruner = ActivationPruner(beta=0.0)
    pruner.prepare(model, [{"tensor_fqn": "conv.weight"}])
    with pytest.raises(PrunerStateError, match="at least one forward pass"):
        pruner.step()
    x = torch.randn(6, 2, 5, 5)
    model.eval()
    model(x)
    with pytest.raises(PrunerStateError):
        pruner.values()  # eval calls are not training batches
    model.train()
    model(x)
    expected = F.conv2d(x, model.conv.weight).abs().mean(dim=(0, 2, 3))
    torch.testing.assert_close(pruner.values()[pruner.plan.members[0].labels], expected)


@pytest.mark.parametrize(("layer", "after", "x", "dims"), [
    (nn.Conv1d(2, 4, 3), nn.Conv1d(4, 4, 3), torch.randn(2, 7), (1,)),  # unbatched: channels at dim 0
    (nn.Linear(3, 4), nn.Linear(4, 4), torch.randn(2, 6, 3), (0, 1)),  # channels last, over batch and sequence
])
def test_activation_reads_channels_where_the_plan_puts_them(layer, after, x, dims):
    model = nn.Sequential(layer, nn.ReLU(), after)
    pruner = ActivationPruner(beta=0.0)
    pruner.prepare(model, [{"tensor_fqn": "0.weight"}], example_inputs=x)
    model(x)
    expected = layer(x).abs().mean(dim=dims)
    torch.testing.assert_close(pruner.values()[pruner.plan.members[0].labels], expected.detach())


def test_activation_refuses_a_weight_used_outside_its_module_before_attaching_masks():
    model = FunctionalLinear()
    with pytest.raises(UnsupportedPatternError, match="'fc1.weight'.*TaylorPruner"):
        ActivationPruner().prepare(model, [{"tensor_fqn": "fc1.weight"}])
    assert not any(has_masks(m) for m in model.modules())
    TaylorPruner().prepare(model, [{"tensor_fqn": "fc1.weight"}])  # Taylor reads the parameters' gradients


def test_hooks_go_with_prune_and_a_deep_copy_does_not_feed_the_pruner():
    model = MLP()
    pruner = ActivationPruner(beta=0.0)
    pruner.prepare(model, None, exclude_output=True)
    x = torch.randn(5, 3)
    model(x)
    before = pruner.statistics()
    copy.deepcopy(model)(torch.randn(5, 3) * 100)
    torch.testing.assert_close(pruner.statistics(), before)
    pruner.step()
    pruner.prune()
    model(x)  # no hook left behind
    with pytest.raises(PrunerStateError):
        pruner.statistics()


def test_resume_from_state_dicts_decides_as_an_uninterrupted_run():
    batches = _batches(6)

    def train(model, pruner, part):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        for batch in part:
            optimizer.zero_grad()
            _loss(model, batch).backward()
            optimizer.step()

    model = MLP()
    fresh = copy.deepcopy(model)
    pruner = TaylorPruner(sparsity_level=0.25)
    pruner.prepare(model, None, exclude_output=True)
    train(model, pruner, batches[:3])
    pruner.step()
    model_state, pruner_state = copy.deepcopy(model.state_dict()), copy.deepcopy(pruner.state_dict())
    train(model, pruner, batches[3:])
    pruner.groups[0]["sparsity_level"] = 0.5
    pruner.step()

    resumed = TaylorPruner(sparsity_level=0.25)
    resumed.prepare(fresh, None, exclude_output=True)
    fresh.load_state_dict(model_state)
    resumed.load_state_dict(pruner_state)
    torch.testing.assert_close(resumed.statistics(), pruner_state["statistics"]["average"])
    train(fresh, resumed, batches[3:])
    resumed.groups[0]["sparsity_level"] = 0.5
    resumed.step()
    torch.testing.assert_close(resumed.statistics(), pruner.statistics())
    assert torch.equal(resumed.state["fc1.weight"]["mask"], pruner.state["fc1.weight"]["mask"])


def test_statistics_round_trip_and_refuse_a_wrong_shape():
    model = MLP()
    pruner = ActivationPruner()
    pruner.prepare(model, None, exclude_output=True)
    model(torch.randn(5, 3))
    doubled = pruner.statistics() * 2
    pruner.load_statistics(doubled)
    torch.testing.assert_close(pruner.statistics(), doubled)
    with pytest.raises(PruningConfigError, match=r"shape \(\d+,\)"):
        pruner.load_statistics(torch.zeros(3, 3))


@pytest.mark.parametrize(("make", "match"), [
    (lambda: TaylorPruner(beta=1.0), "beta must be a number in \\[0, 1\\)"),
    (lambda: ActivationPruner(beta=-0.1), "beta"),
    (lambda: TaylorPruner(sample="epoch"), "sample must be one of \\['backward', 'step'\\]"),
])
def test_bad_pruner_arguments_fail_at_construction(make, match):
    with pytest.raises(PruningConfigError, match=match):
        make()


@pytest.mark.parametrize("pruner_class", [TaylorPruner, ActivationPruner])
def test_statistics_decide_whole_attention_heads_and_prune_exactly(pruner_class):
    model, inputs = hand()
    pruner = pruner_class(sparsity_level=0.5)
    pruner.prepare(model, [{"tensor_fqn": "qkv.weight"}], example_inputs=inputs)
    model.train()
    model(*inputs).square().mean().backward()
    pruner.step()
    heads = model.qkv.parametrizations.weight[0].mask.reshape(3, 4, 8)  # q, k, v x 4 heads x 8 channels
    assert (heads == heads[..., :1]).all() and (heads == heads[:1]).all()  # whole heads, the same in q, k and v
    assert int(heads[0, :, 0].sum()) == 2
    model.eval()
    expected = model(*inputs)
    pruner.prune()
    assert_outputs_match(expected, model(*inputs))
    assert model.proj.in_features == 16
