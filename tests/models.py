"""Test models: the seed's models (same names, layer FQNs and shapes) and small extra structures for fusion.

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


def _linears(widths: list[int], biases: list[bool]) -> list[nn.Linear]:
    return [
        nn.Linear(n_in, n_out, bias=b) for n_in, n_out, b in zip(widths[:-1], widths[1:], biases, strict=True)
    ]


def _conv3(n_in: int, n_out: int, bias: bool, padding: int = 0) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel_size=3, stride=1, padding=padding, bias=bias)


# --- the seed's linear models -------------------------------------------------------------------------------


class SimpleLinear(nn.Module):
    """Bias-free linears, three inside a Sequential and two after it: 7 -> 5 -> 6 -> 4 -> 4 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(*_linears([7, 5, 6, 4], [False] * 3))
        self.linear1 = nn.Linear(4, 4, bias=False)
        self.linear2 = nn.Linear(4, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.linear1(self.seq(x)))


class LinearBias(nn.Module):
    """Linears with and without bias, alternating, all in one Sequential: 7 -> 5 -> 6 -> 3 -> 3 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(*_linears([7, 5, 6, 3, 3, 10], [True, False, True, True, False]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class LinearActivation(nn.Module):
    """Linears with activation modules between them, inside and after a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        first, second, third = _linears([7, 5, 6, 4], [True, False, True])
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
        first, second, third = _linears([7, 5, 6, 4], [True, False, True])
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
        self.seq = nn.Sequential(_conv3(1, 32, False), _conv3(32, 64, False))
        self.conv2d1 = _conv3(64, 48, False)
        self.conv2d2 = _conv3(48, 52, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2d2(self.conv2d1(self.seq(x)))


class Conv2dBias(nn.Module):
    """3x3 convs, some with bias, no padding: (1, 1, 28, 28) -> (1, 52, 18, 18)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(_conv3(1, 32, True), _conv3(32, 32, True), _conv3(32, 64, False))
        self.conv2d1 = _conv3(64, 48, True)
        self.conv2d2 = _conv3(48, 52, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2d2(self.conv2d1(self.seq(x)))


class Conv2dActivation(nn.Module):
    """3x3 convs, activation modules in the Sequential, functional ones after it: -> (1, 52, 18, 18)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            _conv3(1, 32, True), nn.ReLU(),
            _conv3(32, 64, True), nn.Tanh(),
            _conv3(64, 64, False), nn.ReLU(),
        )  # fmt: skip
        self.conv2d1 = _conv3(64, 48, False)
        self.conv2d2 = _conv3(48, 52, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2d1(self.seq(x)))
        return F.hardtanh(self.conv2d2(x))


class Conv2dPadBias(nn.Module):
    """Biased convs, some padded, so a pruned channel's bias meets zero padding: -> (1, 52, 24, 24)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            _conv3(1, 32, True, padding=1), nn.ReLU(),
            _conv3(32, 32, False), nn.ReLU(),
            _conv3(32, 32, True, padding=1), nn.ReLU(),
            _conv3(32, 32, True, padding=1), nn.ReLU(),
            _conv3(32, 64, True), nn.Tanh(),
        )  # fmt: skip
        self.conv2d1 = _conv3(64, 48, True, padding=1)
        self.act1 = nn.ReLU()
        self.conv2d2 = _conv3(48, 52, True, padding=1)
        self.act2 = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv2d1(self.seq(x)))
        return self.act2(self.conv2d2(x))


def _pool_stem(channels: tuple[int, int]) -> nn.Sequential:
    """conv -> maxpool -> relu -> conv -> tanh -> avgpool, every conv and pool padded by 1."""
    mid, out = channels
    return nn.Sequential(
        _conv3(1, mid, True, padding=1),
        nn.MaxPool2d(kernel_size=2, stride=2, padding=1),
        nn.ReLU(),
        _conv3(mid, out, True, padding=1),
        nn.Tanh(),
        nn.AvgPool2d(kernel_size=2, stride=2, padding=1),
    )


class Conv2dPool(nn.Module):
    """Padded convs with max/avg pooling (modules and functional) between them: -> (1, 52, 3, 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = _pool_stem((32, 64))
        self.conv2d1 = _conv3(64, 48, True, padding=1)
        self.maxpool = nn.MaxPool2d(kernel_size=2, stride=2, padding=1)
        self.af1 = nn.ReLU()
        self.conv2d2 = _conv3(48, 52, True, padding=1)
        self.conv2d3 = _conv3(52, 52, True, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.af1(self.maxpool(self.conv2d1(self.seq(x))))
        x = F.avg_pool2d(self.conv2d2(x), kernel_size=2, stride=2, padding=1)
        return self.conv2d3(F.relu(x))


class Conv2dPoolFlattenFunctional(nn.Module):
    """Convs and pools, then a global average pool, ``torch.flatten`` and a Linear: -> (1, 13)."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = _pool_stem((3, 5))
        self.conv2d1 = _conv3(5, 7, True, padding=1)
        self.af1 = nn.ReLU()
        self.conv2d2 = _conv3(7, 11, True, padding=1)
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
        self.conv2d1 = _conv3(5, 7, True, padding=1)
        self.af1 = nn.ReLU()
        self.conv2d2 = _conv3(7, 11, True, padding=1)
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


# --- extra structures ---------------------------------------------------------------------------------------


class LinearPassThrough(nn.Module):
    """Linears joined by each spelling of a pass-through: F.relu, torch.relu, x.relu(), Dropout, Identity."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4, self.fc5 = _linears([6, 12, 10, 9, 8, 3], [True] * 5)
        self.drop = nn.Dropout(0.5)
        self.ident = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(F.relu(self.fc1(x)))
        x = self.fc3(torch.relu(x))
        x = self.drop(self.fc4(x.relu()))
        return self.fc5(self.ident(x))


class LinearSigmoid(nn.Module):
    """Sigmoid between linears: a pruned row becomes the constant sigmoid(0) = 0.5 that fusion must fold.

    ``fc2`` has no bias, so folding must give it one.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 10, bias=True)
        self.fc2 = nn.Linear(10, 8, bias=False)
        self.act = nn.Sigmoid()
        self.fc3 = nn.Linear(8, 3, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(torch.sigmoid(self.fc1(x)))))


class ConvSigmoid(nn.Module):
    """Unpadded convs joined by sigmoid, then a pool and a Linear: the 0.5 constant folds into a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = _conv3(3, 8, True)
        self.conv2 = _conv3(8, 6, False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(self.conv2(torch.sigmoid(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class ConvSpatialMean(nn.Module):
    """A mean over the spatial dims (global average pooling as a tensor method) keeps channels apart."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = _conv3(3, 8, True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean(dim=(2, 3)))


class ConvBatchNorm(nn.Module):
    """Conv -> BatchNorm -> ReLU twice, unpadded, then a bias-free conv and a global pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = _conv3(3, 12, False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = _conv3(12, 10, True)
        self.bn2 = nn.BatchNorm2d(10)
        self.conv3 = _conv3(10, 4, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.conv3(x).mean(dim=(2, 3))


class LinearFanOut(nn.Module):
    """One producer whose output feeds two consumers (one through tanh), summed after them."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(6, 12)
        self.head_a = nn.Linear(12, 4)
        self.head_b = nn.Linear(12, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.trunk(x))
        return self.head_a(h) + self.head_b(torch.tanh(h))


class ConvFanOut(nn.Module):
    """A conv feeding two unpadded convs whose outputs are concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = _conv3(3, 10, True)
        self.branch_a = _conv3(10, 4, True)
        self.branch_b = nn.Conv2d(10, 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.trunk(x))
        return torch.cat([self.branch_a(h), self.branch_b(h)[:, :, 1:-1, 1:-1]], dim=1)


class LinearResidual(nn.Module):
    """A residual MLP block: ``stem`` and ``fc2`` write the same stream, so their rows are coupled."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 16)
        self.fc1 = nn.Linear(16, 24)
        self.fc2 = nn.Linear(24, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.stem(x))
        h = h + self.fc2(F.relu(self.fc1(h)))
        return self.head(h)


class ConvResidual(nn.Module):
    """A ResNet basic block (padded convs, BatchNorm, identity shortcut) then a pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv3(3, 8, False, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv_a = _conv3(8, 12, False, padding=1)
        self.bn_a = nn.BatchNorm2d(12)
        self.conv_b = _conv3(12, 8, False, padding=1)
        self.bn_b = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.bn0(self.stem(x)))
        y = self.bn_b(self.conv_b(F.relu(self.bn_a(self.conv_a(s)))))
        out = F.relu(s + y)
        return self.fc(torch.flatten(self.pool(out), 1))


class ConvSamePadding(nn.Module):
    """Convs with ``padding='same'``, of different kernel sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding="same")
        self.conv2 = nn.Conv2d(8, 10, 5, padding="same")
        self.conv3 = nn.Conv2d(10, 4, 3, padding="same")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))


class BiasedConvPaddedConv(nn.Module):
    """A biased, unpadded conv straight into a padded conv: the case the reference never shrinks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = _conv3(3, 10, True)
        self.conv2 = _conv3(10, 6, True, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class ConvPoolFlattenLinear(nn.Module):
    """Conv -> ReLU -> 2x2 max pool -> flatten (each channel a block of 9 features) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = _conv3(3, 6, True)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(F.relu(self.conv(x))), 1))


class LinearSoftmax(nn.Module):
    """Softmax over the features of ``fc1``: its rows cannot be removed exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.softmax(self.fc1(x), dim=-1))


class ConvChannelMean(nn.Module):
    """A mean over the channel dim after ``conv1``: its channels cannot be removed exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = _conv3(3, 8, True)
        self.conv2 = _conv3(1, 4, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x).mean(dim=1, keepdim=True))


# --- helpers shared by the tests ----------------------------------------------------------------------------


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
