"""Ops that keep channel c at c with no state: activations, dropout, identity, pooling, resizing, padding."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune.fusion.rules.base import ElementwiseRule, input_layout
from lightning_prune.fusion.rules.registry import aten, register_by_name, register_functions, register_layer


def _apply_module(module: nn.Module, values: torch.Tensor) -> torch.Tensor:
    return module(values)


class ApplyRule(ElementwiseRule):
    """A pointwise function: a removed channel's constant goes through the function itself."""

    def const(self, v, values, *others):
        node = v.node
        if any(isinstance(a, torch.fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
            return values, values != 0  # another tensor takes part: the output varies with it
        kwargs = {k: a for k, a in node.kwargs.items() if k != "inplace"}
        if node.op == "call_method":
            out = getattr(values.clone(), node.target)(*node.args[1:], **kwargs)
        else:
            out = node.target(values.clone(), *node.args[1:], **kwargs)
        return out.to(torch.float64), False


class PoolRule(ElementwiseRule):
    """Pooling over the dims after the channels; zero-padded average pooling turns a constant position-dependent, and
    power-average pooling (LPPool) scales it by the window size, so a removed channel's constant is kept instead."""

    def dependent(self, v, out):
        module = v.module
        if isinstance(module, _LP_POOLS):
            return out != 0
        if module is not None:
            if not isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
                return False
            padding, count_include_pad = module.padding, module.count_include_pad
        else:
            if "avg_pool" not in getattr(v.node.target, "__name__", str(v.node.target)) or "adaptive" in str(
                    v.node.target):
                return False
            padding = v.arg(3, "padding", 0)
            count_include_pad = v.arg(5, "count_include_pad", True)
        padding = padding if isinstance(padding, (tuple, list)) else (padding,)
        return (out != 0) if count_include_pad and any(p > 0 for p in padding) else False


class ChannelsFirstRule(ElementwiseRule):
    """Resizing (``F.interpolate``, ``nn.Upsample``): works on every dim after dim 1, where the channels must be."""

    def visit(self, v) -> None:
        flow = input_layout(v)
        if flow is None:
            return
        if not flow.at(1):
            v.block(flow, f"{v.where} resizes the pruned channel dimension")
            return
        v.set(flow)


class PadRule(ElementwiseRule):
    """``F.pad``: fine unless it pads the channel dim; a constant pad makes a constant channel position-dependent."""

    def visit(self, v) -> None:
        flow = input_layout(v)
        if flow is None:
            return
        pad = v.arg(1, "pad", ())
        ndim = v.ndim(v.arg(0, "input")) if v.shapes else flow.ndim
        padded = len(pad) // 2
        axes = flow.front_axes() if ndim is not None else None
        if axes is None or ndim is None or max(axes) >= ndim - padded:
            v.block(flow, f"{v.where} pads the pruned channel dimension (or the channels' place is not known)")
            return
        v.set(flow)

    def dependent(self, v, out):
        mode = v.arg(2, "mode", "constant")
        value = v.arg(3, "value", 0.0) or 0.0
        return (out != value) if mode == "constant" else False


_ACTIVATIONS = (
    nn.ReLU, nn.ReLU6, nn.RReLU, nn.Hardtanh, nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.SiLU, nn.Mish, nn.Hardswish,
    nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.Hardshrink, nn.Softshrink, nn.LeakyReLU, nn.LogSigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.Threshold,
)
_IDENTITIES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
               nn.FeatureAlphaDropout)
_POOLS = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}
_LP_POOLS = tuple(getattr(nn, f"LPPool{d}d") for d in (1, 2, 3) if hasattr(nn, f"LPPool{d}d"))
_POOLS.update({cls: int(cls.__name__[-2]) for cls in _LP_POOLS})
_POOL_FUNCTIONS = {
    1: ("max_pool1d", "avg_pool1d", "adaptive_avg_pool1d", "adaptive_max_pool1d"),
    2: ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "max_pool2d_with_indices"),
    3: ("max_pool3d", "avg_pool3d", "adaptive_avg_pool3d", "adaptive_max_pool3d"),
}
_POINTWISE = (
    "relu", "relu6", "elu", "selu", "celu", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "hardtanh",
    "leaky_relu", "logsigmoid", "softplus", "softsign", "tanhshrink", "hardshrink", "softshrink", "sigmoid", "tanh",
    "abs", "exp", "sqrt", "rsqrt", "square", "neg", "clamp", "clip", "erf", "sin", "cos", "log1p", "expm1",
)
_SAME_VALUES = ("contiguous", "clone", "detach", "float", "to", "type_as", "half", "double", "bfloat16",
                "requires_grad_", "alias", "_to_copy", "lift_fresh_copy", "dropout", "feature_dropout", "alpha_dropout")

for _cls in _ACTIVATIONS:
    register_layer(_cls, ElementwiseRule(_apply_module))
for _cls in _IDENTITIES:
    register_layer(_cls, ElementwiseRule())
for _cls, _dims in _POOLS.items():
    register_layer(_cls, PoolRule(spatial_dims=_dims))
register_layer(nn.Upsample, ChannelsFirstRule())
register_layer(nn.UpsamplingNearest2d, ChannelsFirstRule())
register_layer(nn.UpsamplingBilinear2d, ChannelsFirstRule())

_APPLY = ApplyRule()
for _name in _POINTWISE:
    register_functions([getattr(F, _name, None), getattr(torch, _name, None), _name, f"{_name}_", aten(_name),
                        aten(f"{_name}_")], _APPLY)
register_functions([torch.pow, "pow", aten("pow")], _APPLY)
for _name in ("zeros_like", "ones_like", "full_like"):  # the input's layout, values of their own
    register_functions([getattr(torch, _name), aten(_name)], _APPLY)
_SAME = ElementwiseRule()
for _name in _SAME_VALUES:
    register_functions([_name, aten(_name)], _SAME)
register_functions([F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                    torch.clone, torch.detach, operator.pos], _SAME)
for _dims, _names in _POOL_FUNCTIONS.items():
    _rule = PoolRule(spatial_dims=_dims)
    register_functions([x for n in _names for x in (getattr(F, n, None), getattr(torch, n, None), aten(n))], _rule)
register_functions([F.interpolate, F.upsample, aten("upsample_nearest2d"), aten("upsample_bilinear2d"),
                    aten("upsample_nearest1d"), aten("upsample_linear1d"), aten("upsample_nearest3d"),
                    aten("upsample_trilinear3d"), aten("upsample_bicubic2d")], ChannelsFirstRule())
register_functions([F.pad, aten("pad"), aten("constant_pad_nd")], PadRule())
# identity at inference; in training they drop whole samples, which keeps channels apart too
register_by_name("torchvision.ops.stochastic_depth.stochastic_depth", ElementwiseRule())
register_by_name("torchvision.ops.stochastic_depth.StochasticDepth", ElementwiseRule())
register_by_name("timm.layers.drop.DropPath", ElementwiseRule())
register_by_name("timm.models.layers.drop.DropPath", ElementwiseRule())
