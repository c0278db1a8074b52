"""Small replicas of the CNN families whose pruning needs shapes (issue 13): ResNeXt, RegNet-X and RegNet-Y (SE),
EfficientNet (MBConv with SE and stochastic depth), ShuffleNetV2, CSP (YOLO's C3 and C2f), GhostNet, HRNet-style
multi-resolution fusion and DeepLab's ASPP.

Each keeps the structure of its family's blocks as torchvision / timm / ultralytics write them (what the analysis
must follow: grouped convs, chunk and channel shuffle, ghost slices, upsampling, concatenation) at a width and depth
small enough for tests. Like benchmarks/models.py, each model has ``example_input(batch=1)`` and calls its final
classifier ``head``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn


def conv_bn(c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU,
            dilation: int = 1) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> BatchNorm -> activation (none when ``act`` is None)."""
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, dilation * (kernel // 2), dilation, groups, bias=False),
              nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, *([act()] if act is not None else []))


def stochastic_depth(x: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """``torchvision.ops.stochastic_depth`` (torchvision is not importable here): drops whole samples in training,
    identity in eval. Fusion knows it, and its module, by their qualified names."""
    if not training or p == 0.0:
        return x
    shape = [x.shape[0]] + [1] * (x.ndim - 1) if mode == "row" else [1] * x.ndim
    noise = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(1 - p)
    return x * noise / (1 - p)


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
fx.wrap("stochastic_depth")  # as torchvision does: fx keeps it as one call


class StochasticDepth(nn.Module):
    __module__ = "torchvision.ops.stochastic_depth"

    def __init__(self, p: float, mode: str = "row"):
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(x, self.p, self.mode, self.training)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: global pool -> 1x1 conv -> act -> 1x1 conv -> sigmoid, scaling the input."""

    def __init__(self, channels: int, squeeze: int, act: type = nn.ReLU):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(self.act(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class Classifier(nn.Module):
    """Global average pool -> Linear ``head`` after a ``body`` that maps (B, 3, S, S) to (B, C, ., .)."""

    def __init__(self, body: nn.Module, channels: int, num_classes: int, image_size: int):
        super().__init__()
        self.body = body
        self.head = nn.Linear(channels, num_classes)
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.body(x), 1), 1))

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, self.image_size, self.image_size)


# -- ResNeXt and RegNet: grouped 3x3 convs in bottlenecks -----------------------------------------------------------
class GroupedBottleneck(nn.Module):
    """1x1 -> grouped 3x3 -> [SE] -> 1x1, added to the input or its projection: ResNeXt's block (width = out / 2,
    a fixed number of groups) and RegNet's X / Y blocks (width = out, groups of a fixed width, Y with SE)."""

    def __init__(self, c_in: int, c_out: int, width: int, groups: int, stride: int, se: bool):
        super().__init__()
        self.conv1 = conv_bn(c_in, width)
        self.conv2 = conv_bn(width, width, 3, stride, groups=groups)
        self.se = SqueezeExcitation(width, max(1, c_in // 4)) if se else nn.Identity()
        self.conv3 = conv_bn(width, c_out, act=None)
        reshaped = stride != 1 or c_in != c_out
        self.shortcut = conv_bn(c_in, c_out, 1, stride, act=None) if reshaped else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv3(self.se(self.conv2(self.conv1(x)))) + self.shortcut(x))


def _grouped_net(width: int, depth: int, bottleneck: float, groups: Callable[[int], int], se: bool,
                 num_classes: int, image_size: int) -> Classifier:
    """Three stages of ``depth`` blocks, ``width`` doubling per stage; ``groups(w)``: the groups of a w-wide conv."""
    layers: list[nn.Module] = [conv_bn(3, width, 3)]
    c_in = width
    for stage in range(3):
        c_out = width * 2**stage
        for block in range(depth):
            hidden = int(c_out * bottleneck)
            layers.append(GroupedBottleneck(c_in, c_out, hidden, groups(hidden), 2 if stage and not block else 1, se))
            c_in = c_out
    return Classifier(nn.Sequential(*layers), c_in, num_classes, image_size)


def ResNeXt(width: int = 64, depth: int = 2, cardinality: int = 8, num_classes: int = 10,
            image_size: int = 32) -> Classifier:
    """ResNeXt: a bottleneck of width out / 2 split into ``cardinality`` groups in every stage."""
    return _grouped_net(width, depth, 0.5, lambda _: cardinality, False, num_classes, image_size)


def RegNet(width: int = 48, depth: int = 2, group_width: int = 8, se: bool = False, num_classes: int = 10,
           image_size: int = 32) -> Classifier:
    """RegNet-X (``se=False``) or RegNet-Y: bottleneck ratio 1, groups of ``group_width`` channels."""
    return _grouped_net(width, depth, 1.0, lambda w: w // group_width, se, num_classes, image_size)


# -- EfficientNet: MBConv with SE and stochastic depth --------------------------------------------------------------
class MBConv(nn.Module):
    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int, drop: float):
        super().__init__()
        hidden = c_in * expand
        self.expand = conv_bn(c_in, hidden, act=nn.SiLU) if expand != 1 else nn.Identity()
        self.dw = conv_bn(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU)
        self.se = SqueezeExcitation(hidden, max(1, c_in // 4), nn.SiLU)
        self.project = conv_bn(hidden, c_out, act=None)
        self.residual = stride == 1 and c_in == c_out
        self.drop = StochasticDepth(drop) if self.residual else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.dw(self.expand(x))))
        return x + self.drop(out) if self.residual else out


def EfficientNet(width: int = 16, num_classes: int = 10, image_size: int = 32) -> Classifier:
    """EfficientNet-B0's layout in short: stem, MBConv1 then MBConv6 stages with 3x3 and 5x5 kernels, 1x1 head."""
    plan = [(1, width, 3, 1), (6, width * 3 // 2, 3, 2), (6, width * 3 // 2, 3, 1), (6, width * 5 // 2, 5, 2),
            (6, width * 5 // 2, 5, 1)]
    layers: list[nn.Module] = [conv_bn(3, 2 * width, 3, 2, act=nn.SiLU)]
    c_in = 2 * width
    for k, (expand, c_out, kernel, stride) in enumerate(plan):
        layers.append(MBConv(c_in, c_out, expand, kernel, stride, 0.2 * k / len(plan)))
        c_in = c_out
    layers.append(conv_bn(c_in, 8 * width, act=nn.SiLU))
    return Classifier(nn.Sequential(*layers), 8 * width, num_classes, image_size)


# -- ShuffleNetV2: chunk, concat and channel shuffle ----------------------------------------------------------------
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    return torch.transpose(x, 1, 2).contiguous().view(batch, channels, height, width)


class ShuffleUnit(nn.Module):
    """torchvision's ShuffleNetV2 InvertedResidual: stride 1 splits the input in two halves and transforms one."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        half = c_out // 2
        self.stride = stride
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn(c_in, c_in, 3, stride, groups=c_in, act=None), conv_bn(c_in, half))
        self.branch2 = nn.Sequential(conv_bn(c_in if stride > 1 else half, half),
                                     conv_bn(half, half, 3, stride, groups=half, act=None), conv_bn(half, half))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


def ShuffleNetV2(width: int = 24, repeats: int = 2, num_classes: int = 10, image_size: int = 32) -> Classifier:
    layers: list[nn.Module] = [conv_bn(3, width, 3, 2)]
    c_in = width
    for c_out in (2 * width, 4 * width, 8 * width):
        layers += [ShuffleUnit(c_in, c_out, 2)] + [ShuffleUnit(c_out, c_out, 1) for _ in range(repeats - 1)]
        c_in = c_out
    layers.append(conv_bn(c_in, 16 * width))
    return Classifier(nn.Sequential(*layers), 16 * width, num_classes, image_size)


# -- CSP: YOLOv5's C3 (two branches concatenated) and YOLOv8's C2f (chunk, then every stage concatenated) --------
class YoloBottleneck(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.cv1 = conv_bn(channels, channels, 3, act=nn.SiLU)
        self.cv2 = conv_bn(channels, channels, 3, act=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x))


class C3(nn.Module):
    def __init__(self, c_in: int, c_out: int, n: int = 1):
        super().__init__()
        hidden = c_out // 2
        self.cv1, self.cv2 = conv_bn(c_in, hidden, act=nn.SiLU), conv_bn(c_in, hidden, act=nn.SiLU)
        self.m = nn.Sequential(*(YoloBottleneck(hidden) for _ in range(n)))
        self.cv3 = conv_bn(2 * hidden, c_out, act=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class C2f(nn.Module):
    def __init__(self, c_in: int, c_out: int, n: int = 1):
        super().__init__()
        self.hidden = c_out // 2
        self.cv1 = conv_bn(c_in, 2 * self.hidden, act=nn.SiLU)
        self.m = nn.ModuleList(YoloBottleneck(self.hidden) for _ in range(n))
        self.cv2 = conv_bn((2 + n) * self.hidden, c_out, act=nn.SiLU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def CSPNet(width: int = 32, num_classes: int = 10, image_size: int = 32) -> Classifier:
    """A CSPDarknet-style backbone: strided convs between C3 and C2f stages."""
    layers = [conv_bn(3, width, 3, 2, act=nn.SiLU), C3(width, width), conv_bn(width, 2 * width, 3, 2, act=nn.SiLU),
              C2f(2 * width, 2 * width, 2), conv_bn(2 * width, 4 * width, 3, 2, act=nn.SiLU), C3(4 * width, 4 * width),
              C2f(4 * width, 4 * width)]
    return Classifier(nn.Sequential(*layers), 4 * width, num_classes, image_size)


# -- GhostNet: half the channels from a cheap depthwise conv, concatenated and sliced -----------------------------
class GhostModule(nn.Module):
    def __init__(self, c_in: int, c_out: int, relu: bool = True):
        super().__init__()
        self.oup = c_out
        init = math.ceil(c_out / 2)
        act = nn.ReLU if relu else None
        self.primary_conv = conv_bn(c_in, init, act=act)
        self.cheap_operation = conv_bn(init, init, 3, groups=init, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.primary_conv(x)
        out = torch.cat([x1, self.cheap_operation(x1)], dim=1)
        return out[:, : self.oup, :, :]


class GhostBottleneck(nn.Module):
    def __init__(self, c_in: int, hidden: int, c_out: int, stride: int, se: bool):
        super().__init__()
        self.ghost1 = GhostModule(c_in, hidden)
        self.dw = conv_bn(hidden, hidden, 3, stride, groups=hidden, act=None) if stride > 1 else nn.Identity()
        self.se = SqueezeExcitation(hidden, hidden // 4) if se else nn.Identity()
        self.ghost2 = GhostModule(hidden, c_out, relu=False)
        reshaped = stride != 1 or c_in != c_out
        self.shortcut = nn.Sequential(conv_bn(c_in, c_in, 3, stride, groups=c_in, act=None),
                                      conv_bn(c_in, c_out, act=None)) if reshaped else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ghost2(self.se(self.dw(self.ghost1(x)))) + self.shortcut(x)


def GhostNet(width: int = 16, num_classes: int = 10, image_size: int = 32) -> Classifier:
    plan = [(width, width, 1, False), (3 * width, 3 * width // 2, 2, False), (9 * width // 2, 3 * width // 2, 1, False),
            (9 * width // 2, 5 * width // 2, 2, True), (15 * width // 2, 5 * width // 2, 1, True)]
    layers: list[nn.Module] = [conv_bn(3, width, 3, 2)]
    c_in = width
    for hidden, c_out, stride, se in plan:
        layers.append(GhostBottleneck(c_in, hidden, c_out, stride, se))
        c_in = c_out
    layers.append(conv_bn(c_in, 8 * width))
    return Classifier(nn.Sequential(*layers), 8 * width, num_classes, image_size)


# -- HRNet: two resolutions exchanging features (nn.Upsample up, strided conv down) ------------------------------
class HRFusion(nn.Module):
    def __init__(self, high: int, low: int):
        super().__init__()
        self.branch_high = conv_bn(high, high, 3)
        self.branch_low = conv_bn(low, low, 3)
        self.low_to_high = nn.Sequential(conv_bn(low, high, act=None), nn.Upsample(scale_factor=2, mode="nearest"))
        self.high_to_low = conv_bn(high, low, 3, 2, act=None)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        high, low = self.branch_high(high), self.branch_low(low)
        return F.relu(high + self.low_to_high(low)), F.relu(low + self.high_to_low(high))


class HRNet(nn.Module):
    """Stem, a split into a high- and a low-resolution branch, fusion modules, then HRNetV2's head: the low branch
    upsampled and concatenated to the high one."""

    def __init__(self, width: int = 16, modules: int = 2, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        self.image_size = image_size
        self.stem = conv_bn(3, width, 3, 2)
        self.to_high, self.to_low = conv_bn(width, width, 3), conv_bn(width, 2 * width, 3, 2)
        self.fusions = nn.ModuleList(HRFusion(width, 2 * width) for _ in range(modules))
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.mix = conv_bn(3 * width, 4 * width)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        high, low = self.to_high(x), self.to_low(x)
        for fusion in self.fusions:
            high, low = fusion(high, low)
        x = self.mix(torch.cat([high, self.up(low)], dim=1))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, self.image_size, self.image_size)


# -- DeepLab: ASPP (dilated branches, image pooling resized with F.interpolate, concatenated) ----------------------
class ASPP(nn.Module):
    def __init__(self, c_in: int, c_out: int, rates: tuple[int, ...] = (2, 3)):
        super().__init__()
        self.branches = nn.ModuleList([conv_bn(c_in, c_out)] + [conv_bn(c_in, c_out, 3, dilation=r) for r in rates])
        self.pooling = conv_bn(c_in, c_out)
        self.project = conv_bn(c_out * (len(rates) + 2), c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.pooling(F.adaptive_avg_pool2d(x, 1)), size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class DeepLab(nn.Module):
    """A strided backbone, ASPP, a 1x1 classifier ``head`` per pixel, upsampled to the input size."""

    def __init__(self, width: int = 16, num_classes: int = 5, image_size: int = 32):
        super().__init__()
        self.image_size = image_size
        self.backbone = nn.Sequential(conv_bn(3, width, 3, 2), conv_bn(width, 2 * width, 3, 2),
                                      conv_bn(2 * width, 4 * width, 3), conv_bn(4 * width, 4 * width, 3))
        self.aspp = ASPP(4 * width, 2 * width)
        self.head = nn.Conv2d(2 * width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.aspp(self.backbone(x)))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, self.image_size, self.image_size)


FAMILIES = {"ResNeXt": ResNeXt, "RegNet-X": RegNet, "RegNet-Y": lambda **kw: RegNet(se=True, **kw),
            "EfficientNet": EfficientNet, "ShuffleNetV2": ShuffleNetV2, "CSP": CSPNet, "GhostNet": GhostNet,
            "HRNet": HRNet, "DeepLab-ASPP": DeepLab}
