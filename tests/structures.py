"""Small structures beyond the seed's models, one fusion pattern each (pass-through, gates, fan-out, residuals,
padding, pooling into a Linear, refusals)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.models import conv3, linears


class LinearPassThrough(nn.Module):
    """Linears joined by each spelling of a pass-through: F.relu, torch.relu, x.relu(), Dropout, Identity."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.fc4, self.fc5 = linears([6, 12, 10, 9, 8, 3], [True] * 5)
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
        self.conv1 = conv3(3, 8, True)
        self.conv2 = conv3(8, 6, False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(self.conv2(torch.sigmoid(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class ConvSpatialMean(nn.Module):
    """A mean over the spatial dims (global average pooling as a tensor method) keeps channels apart."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv3(3, 8, True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean(dim=(2, 3)))


class ConvBatchNorm(nn.Module):
    """Conv -> BatchNorm -> ReLU twice, unpadded, then a bias-free conv and a global pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = conv3(3, 12, False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = conv3(12, 10, True)
        self.bn2 = nn.BatchNorm2d(10)
        self.conv3 = conv3(10, 4, False)

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
        self.trunk = conv3(3, 10, True)
        self.branch_a = conv3(10, 4, True)
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
        self.stem = conv3(3, 8, False, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv_a = conv3(8, 12, False, padding=1)
        self.bn_a = nn.BatchNorm2d(12)
        self.conv_b = conv3(12, 8, False, padding=1)
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
        self.conv1 = conv3(3, 10, True)
        self.conv2 = conv3(10, 6, True, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class ConvPoolFlattenLinear(nn.Module):
    """Conv -> ReLU -> 2x2 max pool -> flatten (each channel a block of 9 features) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = conv3(3, 6, True)
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
        self.conv1 = conv3(3, 8, True)
        self.conv2 = conv3(1, 4, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x).mean(dim=1, keepdim=True))


class ConvWhere(nn.Module):
    """Comparisons and ``torch.where`` on the channels: a leaky ReLU spelt out, a thresholded gate and a fill."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x)
        h = torch.where(h > 0, h, 0.1 * h)
        h = torch.where(h.gt(0.2), h, torch.zeros_like(h)) + (h <= 1).float()
        return self.conv2(torch.where(h != 0, h, 1.5))


class Conv1dToLinear(nn.Module):
    """A temporal Conv1d over (B, C, T), transposed to (B, T, C) for a Linear over its channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).transpose(1, 2))
