"""The exactness checks the tests share: outputs within 1e-5 relative, step-then-prune, norms far from identity."""

from __future__ import annotations

import torch
from torch import nn


def assert_outputs_match(expected: torch.Tensor, actual: torch.Tensor, rtol: float = 1e-5) -> None:
    """The exactness contract: max abs difference <= rtol * max(1, max |expected|)."""
    assert expected.shape == actual.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    scale = max(1.0, expected.abs().max().item())
    diff = (expected - actual).abs().max().item()
    assert diff <= rtol * scale, f"max abs diff {diff:.3g} exceeds {rtol:g} * {scale:.3g}"


def step_and_prune_exactly(pruner, model: nn.Module, *inputs: torch.Tensor) -> None:
    """``step()``, then ``prune()``: the same model object, whose output now equals the masked one's."""
    pruner.step()
    with torch.no_grad():
        masked = model(*inputs)
    assert pruner.prune() is model
    with torch.no_grad():
        assert_outputs_match(masked, model(*inputs))


def randomize_norms(model: nn.Module) -> None:
    """Give each norm (BatchNorm, InstanceNorm, GroupNorm, LayerNorm) statistics and affine values far from 0 and 1,
    and each PReLU slopes far from its default, so slicing errors show."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._NormBase) and module.running_mean is not None:
                module.running_mean.uniform_(-1.0, 1.0)
                module.running_var.uniform_(0.5, 2.0)
            if isinstance(module, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) and (
                    module.weight is not None):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-1.0, 1.0)
            if isinstance(module, nn.PReLU):
                module.weight.uniform_(0.05, 0.5)
