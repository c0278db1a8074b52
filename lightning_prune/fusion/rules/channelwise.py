"""Per-channel layers (BatchNorm, InstanceNorm, GroupNorm, PReLU) and the norms whose statistics span channels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_prune.fusion.rules.base import BlockingRule, ChannelwiseRule, input_layout, tie_axis
from lightning_prune.fusion.rules.registry import aten, register_functions, register_layer


class BatchNormRule(ChannelwiseRule):
    """BatchNorm / InstanceNorm: statistics per channel; weight, bias and running statistics are narrowed."""

    keeps_shape = True  # and on meta tensors its Python decomposition is the slowest step of the shape pass

    def channel_tensors(self, module):
        return [n for n in ("weight", "bias", "running_mean", "running_var") if getattr(module, n, None) is not None]

    def affine_names(self, module):
        return ["weight", "bias"] if module.affine else []

    def widths(self, module):
        return module.num_features, module.num_features

    def dim_for(self, v, flow):
        if isinstance(v.module, nn.modules.instancenorm._InstanceNorm) and v.shapes:
            spatial = v.module._get_no_batch_dim()
            return 0 if v.ndim(v.arg(0, "input")) == spatial else 1
        return super().dim_for(v, flow)

    def visit(self, v) -> None:
        super().visit(v)
        if v.output() is not None:
            v.action(v.layout(v.arg(0, "input")).labels.reshape(-1))

    def const_map(self, module, values):
        if module.track_running_stats and module.running_mean is not None:
            mean = module.running_mean.detach().to(torch.float64).cpu()
            var = module.running_var.detach().to(torch.float64).cpu()
            out = (values - mean) / torch.sqrt(var + module.eps)
        else:
            out = torch.zeros_like(values)  # batch or instance statistics: a constant channel normalises to 0
        if module.affine:
            out = out * module.weight.detach().to(torch.float64).cpu() + module.bias.detach().to(torch.float64).cpu()
        return out, False

    def narrow(self, module, labels, ctx):
        module.num_features = int(ctx.kept_positions(labels).numel())

    def sync(self, module):
        tensors = [t for t in (module.weight, module.running_mean) if t is not None]
        if tensors:
            module.num_features = tensors[0].shape[0]


class GroupNormRule(ChannelwiseRule):
    """GroupNorm(G, C): a group's channels share statistics, so whole groups are removed (exact: the other groups'
    statistics do not change) and ``num_groups`` shrinks with them. One group spans every channel: refused."""

    def channel_tensors(self, module):
        return ["weight", "bias"] if module.affine else []

    def affine_names(self, module):
        return ["weight", "bias"] if module.affine else []

    def widths(self, module):
        return module.num_channels, module.num_channels

    def visit(self, v) -> None:
        module = v.module
        flow = input_layout(v)
        if flow is None:
            return
        if module.num_groups == 1:
            v.block(flow, f"{v.where} normalises all channels together (num_groups=1), so removing any changes the "
                          "others; GroupNorm(C, C) or InstanceNorm normalise per channel, and GroupNorm(G, C) with "
                          "G > 1 is pruned a whole group at a time")
            v.set(flow)
            return
        super().visit(v)
        if v.output() is None:
            return
        tie_axis(v, flow.labels.reshape(module.num_groups, -1), 1)  # one group = one class
        v.action(flow.labels.reshape(-1))

    def const_map(self, module, values):
        groups = values.reshape(module.num_groups, -1)
        mean = groups.mean(1, keepdim=True)
        var = groups.var(1, unbiased=False, keepdim=True)
        out = ((groups - mean) / torch.sqrt(var + module.eps)).reshape(-1)
        if module.affine:
            out = out * module.weight.detach().to(torch.float64).cpu() + module.bias.detach().to(torch.float64).cpu()
        return out, False

    def narrow(self, module, labels, ctx):
        per_group = module.num_channels // module.num_groups
        module.num_channels = int(ctx.kept_positions(labels).numel())
        module.num_groups = module.num_channels // per_group

    def sync(self, module):
        if module.affine:
            per_group = module.num_channels // module.num_groups
            module.num_channels = module.weight.shape[0]
            module.num_groups = module.num_channels // per_group


class PReLURule(ChannelwiseRule):
    """PReLU: one slope for all channels (elementwise) or one per channel (narrowed with them)."""

    def channel_tensors(self, module):
        return ["weight"] if module.num_parameters > 1 else []

    def widths(self, module):
        return (module.num_parameters, module.num_parameters) if module.num_parameters > 1 else None

    def visit(self, v) -> None:
        if v.module.num_parameters > 1:
            super().visit(v)
            return
        flow = input_layout(v)
        if flow is not None:
            v.set(flow)

    def const_map(self, module, values):
        slope = module.weight.detach().to(torch.float64).cpu()
        return torch.where(values >= 0, values, slope * values), False

    def sync(self, module):
        module.num_parameters = module.weight.shape[0]


class NormOverLastRule(ChannelwiseRule):
    """LayerNorm / RMSNorm over the last ``len(normalized_shape)`` dims.

    Over the channels its statistics span them, so removing any changes the others: refused. Over other dims a
    removed channel still emits the norm's bias, so it must have none.
    """

    def __init__(self, normalized_dims=None):
        self.normalized_dims = normalized_dims

    def normalized(self, v) -> int | None:
        """How many trailing dims it normalises over; None when that is computed at run time and not known."""
        if self.normalized_dims is not None:
            return self.normalized_dims
        module = v.module
        if module is not None:
            shape = getattr(module, "normalized_shape", None)
            return len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
        shape = v.arg(1, "normalized_shape", ())
        if isinstance(shape, fx.Node):  # ``h.shape[1:]``: its length is known only with shapes
            shape = shape.meta.get("val")
            return len(shape) if isinstance(shape, (tuple, list, torch.Size)) else None
        return len(shape) if isinstance(shape, (tuple, list)) else 1

    def visit(self, v) -> None:
        flow = input_layout(v)
        if flow is None:
            return
        count = self.normalized(v)
        ndim = v.ndim(v.arg(0, "input")) if v.shapes else flow.ndim
        axes = flow.axes if ndim is None else tuple(a - ndim for a in flow.axes)
        if count is None:
            v.block(flow, f"{v.where} normalises over a number of dims computed at run time; pass example_inputs "
                          "so it is known")
            v.set(flow)
            return
        if any(a < 0 and a >= -count for a in axes) or (ndim is None and any(a >= 0 for a in axes)):
            v.block(flow, f"{v.where} normalises over the pruned channels, so its statistics change when they are "
                          "removed; leave this dimension whole and prune the layers inside the block instead (an "
                          "MLP's hidden width, attention heads)")
            v.set(flow)  # the same channels flow on (kept): whatever they meet later is blocked for this reason
            return
        bias = getattr(v.module, "bias", None) if v.module is not None else v.arg(3, "bias")
        if bias is not None:
            v.block(flow, f"{v.where} adds its bias to every channel, so a removed channel would still emit it")
            return
        v.set(flow)

    def const_map(self, module, values):
        return torch.zeros_like(values), False

    def widths(self, module):
        shape = getattr(module, "normalized_shape", None)
        return (shape[-1], shape[-1]) if shape else None


register_layer(nn.modules.batchnorm._BatchNorm, BatchNormRule())
register_layer(nn.modules.instancenorm._InstanceNorm, BatchNormRule())
register_layer(nn.GroupNorm, GroupNormRule())
register_layer(nn.PReLU, PReLURule())
register_functions([F.layer_norm, aten("layer_norm"), getattr(F, "rms_norm", None), aten("rms_norm")],
                   NormOverLastRule())  # the modules' rules (the stream's norms) are in norms.py
register_layer(nn.LocalResponseNorm, BlockingRule("normalises across neighbouring channels"))
register_layer(nn.Softmax2d, BlockingRule("takes a softmax over the channels"))
register_layer(nn.PixelShuffle, BlockingRule("moves channels into space (the channel count is fixed by its "
                                             "upscale factor)"))
register_layer(nn.PixelUnshuffle, BlockingRule("moves space into channels"))
register_layer(nn.ChannelShuffle, BlockingRule("reorders channels by group"))
