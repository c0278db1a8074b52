"""The exactness checks the tests share: outputs within 1e-5 relative, step-then-prune, norms far from identity; and
small readings of a model: a config naming tensors, its unique parameters, a copy of its state, whether masks remain."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


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


def config_for(*fqns: str) -> list[dict]:
    """A pruner config naming ``fqns``, no hyper-parameters of their own."""
    return [{"tensor_fqn": fqn} for fqn in fqns]



def unique_params(model: nn.Module) -> int:
    """Parameter count with each tied parameter counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every tensor of the state dict."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def masked(model: nn.Module) -> bool:
    """Whether any module still carries a parametrization (a pruning mask)."""
    return any(parametrize.is_parametrized(m) for m in model.modules())


def cheapest_digits_cnn_class(model: nn.Module) -> int:
    """MACs per sample one more output channel of the cheapest conv of a DigitsCNN would save (8x8 inputs, the third
    conv after a 2x2 pool, 10 classes), from its widths."""
    first, second, third = (m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))
    return min((1 + second) * 9 * 64, first * 9 * 64 + third * 9 * 16, second * 9 * 16 + 10)
