"""Convolutions: ConvNd (grouped and depthwise included) and ConvTransposeNd."""

from __future__ import annotations

import torch
from torch import nn

from lightning_prune.fusion.layout import Layout
from lightning_prune.fusion.rules.base import LayerRule, features_at, input_layout, tie_axis
from lightning_prune.fusion.rules.registry import register_layer


def _pads_with_zeros(conv: nn.Module) -> bool:
    if conv.padding_mode != "zeros":
        return False
    if conv.padding == "same":
        return any(k > 1 for k in conv.kernel_size)
    if conv.padding == "valid":
        return False
    return any(p > 0 for p in conv.padding)


class ConvRule(LayerRule):
    """ConvNd. ``groups == 1`` is a layer; a depthwise conv (``groups == in_channels``) ties each output channel to
    its input channel.

    A grouped conv (1 < groups < in_channels) keeps its ``groups``: its input channels and its output channels each
    fall into ``groups`` equal parts that are coupled position by position, so the same positions go in every group
    (as Torch-Pruning does) and the widths stay divisible by ``groups``. Its weight's input dim holds one part.
    Each output row keeps its own channel id, so a removed row's bias is its own constant.
    """

    channel_dim = 1

    def output_ndim(self, module) -> int:
        return len(module.kernel_size) + 2

    def in_channels(self, module):
        return module.in_channels

    def out_channels(self, module):
        return module.out_channels

    def channel_dim_for(self, v) -> int:
        if v.shapes and v.ndim(v.arg(0, "input")) == len(v.module.kernel_size) + 1:
            return 0  # an unbatched input (C, *spatial)
        return self.channel_dim

    def constant_input_is_constant(self, module) -> bool:
        return not _pads_with_zeros(module)

    def fold(self, module, removed, values):
        """Input channel i reads through column ``i % per_group`` of the rows of group ``i // per_group``."""
        groups = module.groups
        taps = module.weight.flatten(2).sum(-1).to(values.dtype)  # (out, in / groups)
        per_group = taps.shape[1]
        group, column = removed // per_group, removed % per_group
        contribution = taps.reshape(groups, -1, per_group)[group, :, column] * values[:, None]
        return torch.zeros(groups, taps.shape[0] // groups, dtype=values.dtype,
                           device=values.device).index_add_(0, group, contribution).reshape(-1)

    def visit(self, v) -> None:
        if _depthwise(v.module):
            self._visit_depthwise(v, v.module)
        else:
            super().visit(v)

    def consume(self, v, module, flow, dim) -> None:
        labels = features_at(v, flow, dim, module.in_channels)
        if labels is None:
            return
        parts = labels.reshape(module.groups, -1)
        tie_axis(v, parts, 0)
        name, weight_dim = self.input_tensor(module)
        v.bind(v.tensor(name), weight_dim, parts[0])
        v.consumer(module, labels, self)

    def produce(self, v, module, dim) -> Layout:
        out = super().produce(v, module, dim)
        tie_axis(v, out.labels.reshape(module.groups, -1), 0)
        return out

    def _visit_depthwise(self, v, module) -> None:
        """Output channel o reads input channel o // k (k = out / in): they are coupled, so leaving the conv out of
        the config blocks nothing. Each output row keeps its own id (its constant differs from its input's)."""
        flow = input_layout(v)
        dim = self.channel_dim_for(v)
        labels = features_at(v, flow, dim, module.in_channels) if flow is not None else None
        if labels is None:
            labels = v.fresh(module.in_channels)
            v.block(labels, f"{v.where} ties its output channels to input channels that no configured layer "
                            "produces; configure the layer feeding it too")
        ids = v.produce(module, "weight", 0, follows=True)
        v.couple(ids, labels.repeat_interleave(module.out_channels // module.in_channels))
        if module.bias is not None:
            v.bind(module.bias, 0, ids)
            v.silence(module, "bias", ids)
        v.set(Layout.vector(ids, dim, self.out_ndim(v, module)))

    def const(self, v, *inputs):
        module = v.module
        if not _depthwise(module) or not inputs:
            return super().const(v)
        multiplier = module.out_channels // module.in_channels
        out = module.weight.detach().flatten(1).sum(1).to(torch.float64).cpu() * inputs[0].repeat_interleave(
            multiplier)
        if module.bias is not None:
            out = out + module.bias.detach().to(torch.float64).cpu()
        return out, _pads_with_zeros(module) & (out != 0)

    def sync(self, module):
        if _depthwise(module):  # whole groups went
            module.groups = module.weight.shape[0] // (module.out_channels // module.groups)
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups


def _depthwise(conv: nn.Module) -> bool:
    return 1 < conv.groups == conv.in_channels


class ConvTransposeRule(ConvRule):
    """ConvTransposeNd (groups == 1): the weight is (in, out, *kernel), so output channels are weight dim 1.

    A constant input does not give a constant output (border positions receive fewer taps), so removed input
    channels that still emit a non-zero constant are kept.
    """

    def visit(self, v) -> None:
        if v.module.groups == 1:
            LayerRule.visit(self, v)
            return
        reason = f"{v.where} is a grouped transposed convolution (groups={v.module.groups}); only groups=1 is supported"
        v.block(input_layout(v), reason)
        ids = v.produce(v.module, "weight", 1)
        v.block(ids, reason)
        v.set(Layout.vector(ids, self.channel_dim_for(v), self.out_ndim(v, v.module)))

    def channel_dim_of_weight(self, module) -> int:
        return 1

    def constant_input_is_constant(self, module) -> bool:
        return False

    def const(self, v, *inputs):
        return LayerRule.const(self, v)

    def sync(self, module):
        module.in_channels, module.out_channels = module.weight.shape[:2]
        module.out_channels *= module.groups


_CONV = ConvRule()
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer(_cls, _CONV)
_CONV_T = ConvTransposeRule()
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_layer(_cls, _CONV_T)
