"""Real-architecture models for the fusion tests and benchmarks: plain, fx-traceable nn.Modules.

Each model has ``example_input(batch=1)`` returning a tensor of the shape it was built for, and names its final
classifier ``head`` so that benchmarks can leave it out of pruning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """Two 3x3 convs added to the input; a 1x1 strided conv shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, c_out, 3, stride)
        self.conv2, self.bn2 = _conv_bn(c_out, c_out, 3)
        reshaped = stride != 1 or c_in != c_out
        self.shortcut = nn.Sequential(*_conv_bn(c_in, c_out, 1, stride)) if reshaped else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand (x4), added to the input or a 1x1 projection of it."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        c_out = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(c_in, width, 1)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.conv3, self.bn3 = _conv_bn(width, c_out, 1)
        reshaped = stride != 1 or c_in != c_out
        self.shortcut = nn.Sequential(*_conv_bn(c_in, c_out, 1, stride)) if reshaped else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


def _stages(block: type[nn.Module], c_in: int, widths: list[int], depths: list[int]) -> tuple[nn.Sequential, int]:
    """Stack residual stages; every stage after the first halves the resolution in its first block."""
    layers: list[nn.Module] = []
    for index, (width, depth) in enumerate(zip(widths, depths, strict=True)):
        for b in range(depth):
            stride = 2 if index > 0 and b == 0 else 1
            layers.append(block(c_in, width, stride))
            c_in = width * getattr(block, "expansion", 1)
    return nn.Sequential(*layers), c_in


class ResNet18(nn.Module):
    """CIFAR-style ResNet-18: 3x3 stem, BasicBlocks [2, 2, 2, 2]; ``width`` scales every channel count."""

    def __init__(self, num_classes: int = 10, width: int = 64, image_size: int = 32):
        super().__init__()
        self.image_size = image_size
        self.conv1, self.bn1 = _conv_bn(3, width, 3)
        self.layers, c_out = _stages(BasicBlock, width, [width, 2 * width, 4 * width, 8 * width], [2, 2, 2, 2])
        self.head = nn.Linear(c_out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, self.image_size, self.image_size)


class ResNet50(nn.Module):
    """ImageNet-layout ResNet-50: 7x7 stride-2 stem, max pool, Bottlenecks [3, 4, 6, 3]."""

    def __init__(self, num_classes: int = 1000, width: int = 64, image_size: int = 224):
        super().__init__()
        self.image_size = image_size
        self.conv1, self.bn1 = _conv_bn(3, width, 7, stride=2)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.layers, c_out = _stages(Bottleneck, width, [width, 2 * width, 4 * width, 8 * width], [3, 4, 6, 3])
        self.head = nn.Linear(c_out, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.pool(F.relu(self.bn1(self.conv1(x)))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, self.image_size, self.image_size)


class VGG11(nn.Module):
    """VGG-11 with conv biases; the last MaxPool feeds Flatten directly (no adaptive pool) into the classifier."""

    PLAN = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, num_classes: int = 10, width: int = 64, image_size: int = 32):
        super().__init__()
        self.image_size = image_size
        layers: list[nn.Module] = []
        c_in = 3
        for item in self.PLAN:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                c_out = item * width // 64
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        side = image_size // 32
        self.flatten = nn.Flatten()
        self.head = nn.Linear(c_in * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.flatten(self.features(x)))

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, self.image_size, self.image_size)


class MobileNetV2Block(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise 3x3 -> 1x1 project, each with BN, added to its input."""

    def __init__(self, channels: int, expand: int = 6):
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self.bn1(self.expand(x)))
        out = F.relu6(self.bn2(self.depthwise(out)))
        return x + self.bn3(self.project(out))


class MobileNetV2ish(nn.Module):
    """A stem conv, a few inverted residual blocks, global pooling and a classifier."""

    def __init__(self, num_classes: int = 10, channels: int = 16, blocks: int = 2, image_size: int = 16):
        super().__init__()
        self.image_size = image_size
        self.stem = nn.Conv2d(3, channels, 3, stride=2, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(channels)
        self.blocks = nn.Sequential(*(MobileNetV2Block(channels) for _ in range(blocks)))
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu6(self.stem_bn(self.stem(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, self.image_size, self.image_size)


class InceptionNet(nn.Module):
    """A stem, then two branches (1x1 and 1x1 -> 3x3) concatenated on channels into a 1x1 conv."""

    def __init__(self, num_classes: int = 10, width: int = 16, image_size: int = 16):
        super().__init__()
        self.image_size = image_size
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.branch1 = nn.Conv2d(width, width, 1)
        self.branch3_reduce = nn.Conv2d(width, width // 2, 1)
        self.branch3 = nn.Conv2d(width // 2, width * 3 // 2, 3, padding=1)
        self.mix = nn.Conv2d(width + width * 3 // 2, 2 * width, 1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        left = F.relu(self.branch1(x))
        right = F.relu(self.branch3(F.relu(self.branch3_reduce(x))))
        x = F.relu(self.mix(torch.cat([left, right], dim=1)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, self.image_size, self.image_size)


class TemporalConvNet(nn.Module):
    """Conv1d -> BatchNorm1d -> ReLU stacks over (batch, features, time), mean over time into a Linear."""

    def __init__(self, num_classes: int = 5, in_features: int = 8, width: int = 32, depth: int = 3, length: int = 24):
        super().__init__()
        self.in_features, self.length = in_features, length
        layers: list[nn.Module] = []
        c_in = in_features
        for level in range(depth):
            dilation = 2**level
            layers += [nn.Conv1d(c_in, width, 3, padding=dilation, dilation=dilation), nn.BatchNorm1d(width), nn.ReLU()]
            c_in = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=2))

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, self.in_features, self.length)


class TransformerMLPBlock(nn.Module):
    """Pre-norm MLP block: ``x + fc2(gelu(fc1(layernorm(x))))``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class TransformerMLP(nn.Module):
    """An embedding Linear, a stack of pre-norm MLP blocks over (batch, tokens, dim), a final norm and a head."""

    def __init__(self, num_classes: int = 10, in_features: int = 16, dim: int = 32, hidden: int = 128,
                 depth: int = 3, tokens: int = 6):
        super().__init__()
        self.in_features, self.tokens = in_features, tokens
        self.embed = nn.Linear(in_features, dim)
        self.blocks = nn.Sequential(*(TransformerMLPBlock(dim, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x))))

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, self.tokens, self.in_features)


class GroupedConvNet(nn.Module):
    """A grouped conv (groups=4, not depthwise) between two dense convs."""

    def __init__(self, num_classes: int = 10, width: int = 16, groups: int = 4, image_size: int = 8):
        super().__init__()
        self.image_size = image_size
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.grouped = nn.Conv2d(width, 2 * width, 3, padding=1, groups=groups)
        self.conv3 = nn.Conv2d(2 * width, width, 1)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv3(F.relu(self.grouped(F.relu(self.conv1(x))))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, self.image_size, self.image_size)


class ConvTransposeNet(nn.Module):
    """A tiny U-Net: two strided encoder convs, ConvTranspose2d decoders, a skip concat, a 1x1 output conv."""

    def __init__(self, in_channels: int = 3, out_channels: int = 2, width: int = 8, image_size: int = 8):
        super().__init__()
        self.in_channels, self.image_size = in_channels, image_size
        self.enc1 = nn.Conv2d(in_channels, width, 3, stride=2, padding=1)
        self.enc2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.head = nn.Conv2d(width, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = F.relu(self.enc1(x))
        x = F.relu(self.up2(F.relu(self.enc2(skip))))
        x = F.relu(self.up1(torch.cat([x, skip], dim=1)))
        return self.head(x)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, self.in_channels, self.image_size, self.image_size)


class MLP(nn.Module):
    """``depth`` Linear(width) layers with ReLU, then a classifier."""

    def __init__(self, num_classes: int = 10, width: int = 1024, depth: int = 8):
        super().__init__()
        self.width = width
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, self.width)
