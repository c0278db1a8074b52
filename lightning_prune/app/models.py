"""Demo networks over 8x8 digits, input (N, 1, 8, 8).

Plain ``nn.Module``s with no data-dependent control flow, so torch.fx can trace them, and with stable
submodule names, so pruning configs can name tensors such as ``net.features.0.weight``.
"""

from torch import Tensor, nn


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class DigitsCNN(nn.Module):
    """conv-bn-relu x2, max-pool, conv-bn-relu, global average pool, linear classifier.

    Tensor names: ``features.0.weight``, ``features.3.weight``, ``features.7.weight``, ``classifier.weight``.
    """

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        first, second, third = widths
        self.features = nn.Sequential(
            *_conv_bn_relu(1, first),
            *_conv_bn_relu(first, second),
            nn.MaxPool2d(2),
            *_conv_bn_relu(second, third),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(third, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class DigitsLSTM(nn.Module):
    """Reads the 8 pixel rows of a digit as a sequence and classifies from the last step.

    The classifier runs on every step and the last step's logits are kept: the same result as classifying
    the last hidden state, but the pruned hidden units then only pass through ops that fusion can narrow
    (indexing the LSTM output itself is refused, since fusion cannot prove it spares the channel dim).
    Tensor names: ``lstm.weight_ih_l{k}``, ``lstm.weight_hh_l{k}``, ``classifier.weight``.
    """

    def __init__(self, hidden_size: int = 64, num_layers: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(input_size=8, hidden_size=hidden_size, num_layers=num_layers, batch_first=True)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.squeeze(1)
        hidden = self.lstm(rows)[0]
        return self.classifier(hidden)[:, -1]


class BasicBlock(nn.Module):
    """The ResNet basic block; a strided or widening block gets a 1x1 conv + BN shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class DigitsResNet(nn.Module):
    """A small ResNet: stem, an identity-shortcut block, a strided block with a 1x1 downsample shortcut.

    The residual adds couple the stem with ``layer1.conv2`` and ``layer2.conv2`` with ``layer2.shortcut.0``,
    so pruning must keep the same channels across each coupled set.
    """

    def __init__(self, widths: tuple[int, int] = (16, 32), num_classes: int = 10) -> None:
        super().__init__()
        first, second = widths
        self.stem = nn.Sequential(*_conv_bn_relu(1, first))
        self.layer1 = BasicBlock(first, first)
        self.layer2 = BasicBlock(first, second, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(second, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.classifier(self.flatten(self.pool(x)))
