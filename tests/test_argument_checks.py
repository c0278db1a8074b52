"""Bad arguments to the smaller entry points (flags, rules, load_pruned, the scheduler, per-channel tensors in a
config) are refused when given, naming the value and what is accepted."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import lightning_prune as lp


@pytest.mark.parametrize(("make", "named"), [
    (lambda: lp.LSTMSaliencyPruner(tie_gates="yes"), "tie_gates must be True or False, got 'yes'"),
    (lambda: lp.SaliencyPruner(prune_bias="false"), "prune_bias must be True or False, got 'false'"),
])
def test_flags_that_are_not_bools_are_refused_at_construction(make, named) -> None:
    with pytest.raises(lp.PruningConfigError, match=re.escape(named)):
        make()


def test_a_config_entry_whose_prune_bias_is_not_a_bool_is_refused_at_prepare() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(lp.PruningConfigError, match="tensor '0.weight': prune_bias must be True or False, got 0"):
        lp.SaliencyPruner().prepare(model, [{"tensor_fqn": "0.weight", "prune_bias": 0}])
    assert not any(hasattr(m, "parametrizations") for m in model.modules())


def test_a_state_dict_of_another_architecture_is_refused_before_anything_changes() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    other = nn.Sequential(nn.Conv1d(8, 16, 1), nn.ReLU(), nn.Linear(16, 4)).state_dict()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wrong_dims = r"'0.weight' with shape \(16, 8, 1\) where the model has \(16, 8\)"
    with pytest.raises(lp.PruningConfigError, match=wrong_dims):
        lp.narrow_to_state_dict(model, other)
    with pytest.raises(lp.PruningConfigError, match="not a checkpoint of this architecture"):
        lp.load_pruned(model, other)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("make", "named"), [
    (lambda: lp.SaliencyPruner(rules=[nn.Linear]), "rules must be a mapping of module types or functions to rules"),
    (lambda: lp.SaliencyPruner(rules={nn.Linear: 3}), "register_layer expects a Rule"),
    (lambda: lp.SaliencyPruner(rules={3: lp.ElementwiseRule()}), "register_function expects a function"),
    (lambda: lp.ElementwiseRule("relu"), "fn must be None or a function"),
    (lambda: lp.load_pruned(nn.Linear(2, 2), 3), "checkpoint must be a path, a loaded checkpoint dict or a state"),
    (lambda: lp.load_pruned("model.ckpt", {}), "model must be an nn.Module"),
])
def test_bad_rules_and_load_arguments_are_refused_when_given(make, named) -> None:
    with pytest.raises(lp.PruningConfigError, match=re.escape(named)):
        make()


def test_a_scheduler_drives_a_pruner_prepared_without_tracking() -> None:
    """The docstring's loop: prepare, make the scheduler, step; nothing else to call."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, [{"tensor_fqn": "0.weight"}])
    scheduler = lp.SparsityScheduler(pruner, "cubic", end_step=0.75, every_n_steps=10, total_steps=100)
    levels = []
    for step in range(1, 101):
        scheduler.step(step)
        levels.append(scheduler.sparsity())
    assert levels[0] == 0.0 and 0.0 < levels[40] < 0.5 and levels[-1] == 0.5


def test_bounds_in_steps_and_fractions_that_cross_are_refused() -> None:
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    with pytest.raises(lp.PruningConfigError, match=r"end_step resolves to step 10, before start_step=0.5 \(step 50\)"):
        lp.SparsityScheduler(pruner, "linear", start_step=0.5, end_step=10, total_steps=100)


def test_a_per_channel_tensor_named_in_the_config_points_at_the_layer_it_follows() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with pytest.raises(lp.PruningConfigError, match=r"'1.weight' is 1-D.*configure that layer instead, e.g. '0.w"):
        lp.SaliencyPruner().prepare(model, [{"tensor_fqn": "1.weight"}])


def test_output_reached_error_is_importable_from_the_package() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(lp.OutputReachedError, match="reach the model's output"):
        lp.SaliencyPruner().prepare(model, [{"tensor_fqn": "2.weight"}], exclude_output=True)


@pytest.mark.parametrize(("make", "named"), [
    (lambda: lp.StructuredPruning(lp.SaliencyPruner(), verify="yes"), "verify must be True or False, got 'yes'"),
    (lambda: lp.StructuredPruning(lp.SaliencyPruner(), narrow_output="x"), "narrow_output must be True or False"),
    (lambda: lp.StructuredPruning(lp.SaliencyPruner(), prune_on_fit_end=1), "prune_on_fit_end must be True or False"),
    (lambda: lp.SaliencyPruner().prepare(nn.Linear(2, 2), None, exclude_output="yes"),
     "prepare(): exclude_output must be True or False, got 'yes'"),
    (lambda: lp.explain(nn.Linear(2, 2), exclude_output=0), "explain(): exclude_output must be True or False, got 0"),
    (lambda: lp.explain(None), "explain() needs an nn.Module, got NoneType"),
    (lambda: lp.SparsityScheduler("x", "cubic", end_step=5), "SparsityScheduler drives a pruner"),
    (lambda: lp.SparsityScheduler(lp.SaliencyPruner(), total_steps=-5), "total_steps must be None or a whole"),
    (lambda: lp.SparsityScheduler(lp.SaliencyPruner(), total_steps=2.5), "number of optimizer steps >= 0"),
    (lambda: lp.narrow_to_state_dict(None, {}), "model must be an nn.Module, got None"),
    (lambda: lp.SparsityScheduler(lp.SaliencyPruner(), total_steps="100"), "optimizer steps >= 0"),
    (lambda: lp.narrow_to_state_dict(nn.Linear(2, 2), "last.ckpt"), "got str (for a file, load_pruned(model, path)"),
    (lambda: lp.narrow_to_state_dict(nn.Linear(2, 2), None), "state_dict must be the checkpoint's state dict"),
    (lambda: lp.SaliencyPruner(0.5), "for a sparsity pass sparsity_level=0.5"),
    (lambda: lp.TaylorPruner(betta=0.5), "did you mean 'beta'?); TaylorPruner accepts ['allocation', 'prune_bias', "
                                         "'sparsity_level'], and as constructor keywords ['beta', 'rules', 'sample'"),
])
def test_flags_types_and_positional_mistakes_are_refused_naming_the_value(make, named) -> None:
    with pytest.raises(lp.PruningConfigError, match=re.escape(named)):
        make()


def test_include_patterns_matching_no_weight_are_refused_by_the_core_api_too() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(lp.PruningConfigError, match=r"include=\['zzz'\] matches no weight of Sequential; its "
                                                    r"weights: 0.weight, 2.weight"):
        lp.SaliencyPruner().prepare(model, None, include=["zzz"])
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
