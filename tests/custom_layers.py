"""A user's own layers and the rules that teach fusion about them: ``ScaledLinear`` (its own weight and bias) and
``Scale`` (a per-channel gain). Nothing is registered on import: a test asks for the ``custom_layer_rules``
fixture (conftest.py), which registers them for that test only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune.fusion import rules as R


class ScaledLinear(nn.Module):
    """A user's layer holding its own weight and bias: ``scale * (x @ weight.T) + bias``."""

    def __init__(self, n_in: int, n_out: int, scale: float = 2.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(x, self.weight) + self.bias


class ScaledLinearRule(R.LayerRule):
    channel_dim = -1

    def in_channels(self, module: ScaledLinear) -> int:
        return module.weight.shape[1]

    def out_channels(self, module: ScaledLinear) -> int:
        return module.weight.shape[0]

    def fold(self, module, removed, values):
        return module.scale * module.weight[:, removed].to(values.dtype) @ values


class Scale(nn.Module):
    """A user's per-channel scale over NC... tensors."""

    def __init__(self, channels: int):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain.view(1, -1, *([1] * (x.dim() - 2)))


class ScaleRule(R.ChannelwiseRule):
    def channel_tensors(self, module: Scale) -> list[str]:
        return ["gain"]

    def const_map(self, module: Scale, values: torch.Tensor) -> tuple[torch.Tensor, bool]:
        return values * module.gain.detach().to(values.dtype), False


#: what ``custom_layer_rules`` registers: layer type -> rule
RULES = {ScaledLinear: ScaledLinearRule(), Scale: ScaleRule()}
