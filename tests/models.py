"""The seed's test models (same names, layer FQNs and shapes); other structures are in ``tests/structures.py``.

The seed's conv models turn (1, 1, 28, 28) into (1, 52, H, W); its linear models map (N, 7) to (N, 10).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rows_are_subset(subset: torch.Tensor, superset: torch.Tensor) -> bool:
    """True when every row of ``subset`` appears in ``superset``, in the same relative order."""
    remaining = iter(superset)
    return all(any(torch.equal(row, candidate) for candidate in remaining) for row in subset)


def linears(widths: list[int], biases: list[bool]) -> list[nn.Linear]:
    return [
        nn.Linear(n_in, n_out, bias=b) for n_in, n_out, b in zip(widths[:-1], widths[1:], biases, strict=True)
    ]


def conv3(n_in: int, n_out: int, bias: bool, padding: int = 0) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel_size=3, stride=1, padding=padding, bias=bias)


# --- the seed's linear models -------------------------------------------------------------------------------


class SimpleLinear(nn.Module):
    """Bias-free linears, three inside a Sequential and two after it: 7 -> 5 -> 6 -> 4 -> 4 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(*linears([7, 5, 6, 4], [False] * 3))
        self.linear1 = nn.Linear(4, 4, bias=False)
        self.linear2 = nn.Linear(4, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.linear1(self.seq(x)))


class LinearBias(nn.Module):
    """Linears with and without bias, alternating, all in one Sequential: 7 -> 5 -> 6 -> 3 -> 3 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(*linears([7, 5, 6, 3, 3, 10], [True, False, True, True, False]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class LinearActivation(nn.Module):
    """Linears with activation modules between them, inside and after a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        first, second, third = linears([7, 5, 6, 4], [True, False, True])
        self.seq = nn.Sequential(first, nn.ReLU(), second, nn.Tanh(), third)
        self.linear1 = nn.Linear(4, 3, bias=True)
        self.act1 = nn.ReLU()
        self.linear2 = nn.Linear(3, 10, bias=False)
        self.act2 = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.linear1(self.seq(x)))
        return self.act2(self.linear2(x))


class LinearActivationFunctional(nn.Module):
    """Like LinearActivation, but the layers after the Sequential are joined by ``F.relu``."""

    def __init__(self) -> None:
        super().__init__()
        first, second, third = linears([7, 5, 6, 4], [True, False, True])
        self.seq = nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), third)
        self.linear1 = nn.Linear(4, 3, bias=True)
        self.linear2 = nn.Linear(3, 8, bias=False)
        self.linear3 = nn.Linear(8, 10, bias=False)
        self.act1 = nn.ReLU()  # unused in forward, as in the seed: idle modules must not confuse tracing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.linear1(self.seq(x)))
        x = F.relu(self.linear2(x))
        return F.relu(self.linear3(x))


# --- the seed's conv models ---------------------------------------------------------------------------------


class SimpleConv2d(nn.Module):
    """Bias-free 3x3 convs, no padding: (1, 1, 28, 28) -> (1, 52, 20, 20)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(conv3(1, 32, False), conv3(32, 64, False))
        self.conv2d1 = conv3(64, 48, False)
        self.conv2d2 = conv3(48, 52, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2d2(self.conv2d1(self.seq(x)))


class Conv2dBias(nn.Module):
    """3x3 convs, some with bias, no padding: (1, 1, 28, 28) -> (1, 52, 18, 18)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(conv3(1, 32, True), conv3(32, 32, True), conv3(32, 64, False))
        self.conv2d1 = conv3(64, 48, True)
        self.conv2d2 = conv3(48, 52, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2d2(self.conv2d1(self.seq(x)))


class Conv2dActivation(nn.Module):
    """3x3 convs, activation modules in the Sequential, functional ones after it: -> (1, 52, 18, 18)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            conv3(1, 32, True), nn.ReLU(),
            conv3(32, 64, True), nn.Tanh(),
            conv3(64, 64, False), nn.ReLU(),
        )  # fmt: skip
        self.conv2d1 = conv3(64, 48, False)
        self.conv2d2 = conv3(48, 52, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2d1(self.seq(x)))
        return F.hardtanh(self.conv2d2(x))


class Conv2dPadBias(nn.Module):
    """Biased convs, some padded, so a pruned channel's bias meets zero padding: -> (1, 52, 24, 24)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            conv3(1, 32, True, padding=1), nn.ReLU(),
            conv3(32, 32, False), nn.ReLU(),
            conv3(32, 32, True, padding=1), nn.ReLU(),
            conv3(32, 32, True, padding=1), nn.ReLU(),
            conv3(32, 64, True), nn.Tanh(),
        )  # fmt: skip
        self.conv2d1 = conv3(64, 48, True, padding=1)
        self.act1 = nn.ReLU()
        self.conv2d2 = conv3(48, 52, True, padding=1)
        self.act2 = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv2d1(self.seq(x)))
        return self.act2(self.conv2d2(x))


def _pool_stem(channels: tuple[int, int]) -> nn.Sequential:
    """conv -> maxpool -> relu -> conv -> tanh -> avgpool, every conv and pool padded by 1."""
    mid, out = channels
    return nn.Sequential(
        conv3(1, mid, True, padding=1),
        nn.MaxPool2d(kernel_size=2, stride=2, padding=1),
        nn.ReLU(),
        conv3(mid, out, True, padding=1),
        nn.Tanh(),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=1),
    )


class Conv2dPool(nn.Module):
    """Padded convs with max/avg pooling (modules and functional) between them: -> (1, 52, 3, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = _pool_stem((32, 64))
        self.conv2d1 = conv3(64, 48, True, padding=1)
        self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2, padding=1)
        self.af1 = nn.ReLU()
        self.conv2d2 = conv3(48, 52, True, padding=1)
        self.conv2d3 = conv3(52, 52, True, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.af1(self.maxpool(self.conv2d1(self.seq(x))))
        x = F.avg_pool2d(self.conv2d2(x), kernel_size=2, stride=2, padding=1)
        return self.conv2d3(F.relu(x))


class Conv2dPoolFlattenFunctional(nn.Module):
    """Convs and pools, then a global average pool, ``torch.flatten`` and a Linear: -> (1, 13)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = _pool_stem((3, 5))
        self.conv2d1 = conv3(5, 7, True, padding=1)
        self.af1 = nn.ReLU()
        self.conv2d2 = conv3(7, 11, True, padding=1)
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(11, 13, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2d1(self.seq(x))
        x = self.af1(F.max_pool2d(x, kernel_size=2, stride=2, padding=1))
        x = self.avg_pool(self.conv2d2(x))
        return self.fc(torch.flatten(x, 1))


class Conv2dPoolFlatten(nn.Module):
    """Convs and pools, then a 2x2 adaptive pool and ``nn.Flatten`` (4 features a channel): -> (1, 13)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = _pool_stem((3, 5))
        self.conv2d1 = conv3(5, 7, True, padding=1)
        self.af1 = nn.ReLU()
        self.conv2d2 = conv3(7, 11, True, padding=1)
        self.avg_pool = nn.AdaptiveAvgPool2d((2, 2))
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(44, 13, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2d1(self.seq(x))
        x = self.af1(F.max_pool2d(x, kernel_size=2, stride=2, padding=1))
        x = self.avg_pool(self.conv2d2(x))
        return self.fc(self.flatten(x))


# --- the seed's LSTM models ---------------------------------------------------------------------------------


class LSTMLinearModel(nn.Module):
    """An LSTM whose output sequence feeds a Linear; returns (decoded, lstm output)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_dim, hidden_dim, num_layers)
        self.linear = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sequence, _ = self.lstm(x)
        return self.linear(sequence), sequence


class LSTMLayerNormLinearModel(nn.Module):
    """An LSTM, a LayerNorm over its hidden units, then a Linear; returns (decoded, (h_n, c_n))."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_dim, hidden_dim, num_layers)
        self.norm = nn.LayerNorm(hidden_dim)
        self.linear = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        sequence, state = self.lstm(x)
        return self.linear(self.norm(sequence)), state
