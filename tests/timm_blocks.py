"""Small replicas of timm's fused norm-activation layers (written for these tests; no timm dependency) and of a net
built from them the way timm's EfficientNet / MobileNetV3 are (conv + BatchNormAct2d, squeeze-excitation, residual).

``BatchNormAct2d`` and ``GroupNormAct`` subclass torch's norms and override ``forward`` with the functional call, as
timm's do, so fusion reads them op by op (``F.batch_norm`` / ``F.group_norm`` on the module's own tensors). The
layers fusion knows by their timm (or torchvision) class name (EvoNorm, the frozen BatchNorms) carry that name here, so
the tests exercise the same registration a real timm model meets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _as(module_name: str):
    """Give the replica the module path of the class it copies (rules for optional libraries match by that name)."""

    def mark(cls):
        cls.__module__ = module_name
        return cls

    return mark


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d: BatchNorm2d's arithmetic written out with F.batch_norm, then drop, act."""

    def __init__(self, num_features: int, act_layer=nn.ReLU, apply_act: bool = True, drop_layer=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer() if apply_act else nn.Identity()

    def forward(self, x):
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = True if self.training else (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, bn_training, factor, self.eps,
        )
        return self.act(self.drop(x))


class GroupNormAct(nn.GroupNorm):
    """timm.layers.norm_act.GroupNormAct: F.group_norm, then drop, act (channels first in its signature)."""

    def __init__(self, num_channels: int, num_groups: int = 32, act_layer=nn.ReLU, **kwargs):
        super().__init__(num_groups, num_channels, **kwargs)
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x):
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return self.act(self.drop(x))


@_as("torchvision.ops.misc")
class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d (timm freezes BatchNorm2d into it): buffers only, x * scale + shift."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((num_features,), fill))

    def forward(self, x):
        w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        rv, rm = self.running_var.reshape(1, -1, 1, 1), self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


@_as("timm.layers.norm_act")
class FrozenBatchNormAct2d(FrozenBatchNorm2d):
    """timm.layers.norm_act.FrozenBatchNormAct2d: the frozen BatchNorm, then drop, act."""

    def __init__(self, num_features: int, eps: float = 1e-5, act_layer=nn.ReLU):
        super().__init__(num_features, eps)
        self.drop, self.act = nn.Identity(), act_layer()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def _instance_std(x, eps):
    return x.float().var(dim=(2, 3), unbiased=False, keepdim=True).add(eps).sqrt().to(x.dtype).expand(x.shape)


def _group_std(x, groups, eps):
    b, c, h, w = x.shape
    grouped = x.reshape(b, groups, c // groups, h, w)
    std = grouped.float().var(dim=(2, 3, 4), unbiased=False, keepdim=True).add(eps).sqrt().to(x.dtype)
    return std.expand(grouped.shape).reshape(b, c, h, w)


@_as("timm.layers.evo_norm")
class EvoNorm2dB0(nn.Module):
    """timm.layers.evo_norm.EvoNorm2dB0 (Liu et al. 2020): x / max(sqrt(var_batch + eps), v * x + instance_std(x)),
    then the affine; the batch variance is tracked in ``running_var``."""

    def __init__(self, num_features: int, apply_act: bool = True, momentum: float = 0.1, eps: float = 1e-3):
        super().__init__()
        self.apply_act, self.momentum, self.eps = apply_act, momentum, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features)) if apply_act else None
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        shape = (1, -1, 1, 1)
        if self.v is not None:
            if self.training:
                var = x.float().var(dim=(0, 2, 3), unbiased=False)
                n = x.numel() / x.shape[1]
                self.running_var.copy_(self.running_var * (1 - self.momentum) + var.detach() * self.momentum *
                                       (n / (n - 1)))
            else:
                var = self.running_var
            left = var.add(self.eps).sqrt_().to(x.dtype).view(shape).expand_as(x)
            right = x * self.v.to(x.dtype).view(shape) + _instance_std(x, self.eps)
            x = x / left.max(right)
        return x * self.weight.to(x.dtype).view(shape) + self.bias.to(x.dtype).view(shape)


@_as("timm.layers.evo_norm")
class EvoNorm2dS0(nn.Module):
    """timm.layers.evo_norm.EvoNorm2dS0: x * sigmoid(v * x) / group_std(x), then the affine (``groups`` groups)."""

    def __init__(self, num_features: int, groups: int = 32, group_size: int | None = None, apply_act: bool = True,
                 eps: float = 1e-5):
        super().__init__()
        self.apply_act, self.eps = apply_act, eps
        self.groups = num_features // group_size if group_size else groups
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.v = nn.Parameter(torch.ones(num_features)) if apply_act else None

    def forward(self, x):
        shape = (1, -1, 1, 1)
        if self.v is not None:
            v = self.v.view(shape).to(x.dtype)
            x = x * (x * v).sigmoid() / _group_std(x, self.groups, self.eps)
        return x * self.weight.view(shape).to(x.dtype) + self.bias.view(shape).to(x.dtype)


class SqueezeExcite(nn.Module):
    """timm's EfficientNet squeeze-excitation: mean over space, 1x1 reduce, act, 1x1 expand, sigmoid gate."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.conv_reduce, self.act1 = nn.Conv2d(channels, reduced, 1), nn.SiLU()
        self.conv_expand, self.gate = nn.Conv2d(reduced, channels, 1), nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True)))))


class InvertedResidual(nn.Module):
    """timm's MBConv: 1x1 expand + BatchNormAct2d, 3x3 depthwise + BatchNormAct2d, SE, 1x1 project + BatchNormAct2d
    without act, and a residual when the shape allows."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int, act=nn.SiLU):
        super().__init__()
        mid = cin * expand
        self.conv_pw, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), BatchNormAct2d(mid, act_layer=act)
        self.conv_dw = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = BatchNormAct2d(mid, act_layer=act)
        self.se = SqueezeExcite(mid, max(1, cin // 4))
        self.conv_pwl, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), BatchNormAct2d(cout, apply_act=False)
        self.has_skip = stride == 1 and cin == cout

    def forward(self, x):
        shortcut = x
        x = self.bn3(self.conv_pwl(self.se(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x)))))))
        return x + shortcut if self.has_skip else x


class TinyEfficientNet(nn.Module):
    """A stem, four MBConv blocks (two with residuals), a 1x1 head conv, global pooling and a classifier, every norm a
    BatchNormAct2d as in timm's efficientnet_b0 / mobilenetv3 (``act=nn.Hardswish`` for the latter)."""

    def __init__(self, act=nn.SiLU, classes: int = 10):
        super().__init__()
        self.conv_stem, self.bn1 = nn.Conv2d(3, 16, 3, 2, 1, bias=False), BatchNormAct2d(16, act_layer=act)
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1, 1, act), InvertedResidual(16, 24, 4, 2, act),
                                    InvertedResidual(24, 24, 4, 1, act), InvertedResidual(24, 40, 4, 2, act))
        self.conv_head, self.bn2 = nn.Conv2d(40, 96, 1, bias=False), BatchNormAct2d(96, act_layer=act)
        self.classifier = nn.Linear(96, classes)

    def forward(self, x):
        x = self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))
        return self.classifier(x.mean((2, 3)))
