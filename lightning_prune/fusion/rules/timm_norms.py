"""Norm-activation layers of timm (and torchvision's frozen BatchNorm) whose ``forward`` computes per-channel
arithmetic from its own tensors, registered by class name (neither library is imported).

- ``torchvision.ops.misc.FrozenBatchNorm2d`` (what timm freezes BatchNorm2d into) and timm's ``FrozenBatchNormAct2d``:
  buffers only, ``x * w / sqrt(var + eps) + (b - mean * w / sqrt(var + eps))``, then (Act) drop and activation.
- ``EvoNorm2dB0`` (Liu et al., "Evolving Normalization-Activation Layers", NeurIPS 2020): ``x / max(sqrt(var +
  eps), v * x + instance_std(x))`` then the affine; every statistic is per channel (the batch variance over N, H, W;
  the instance std over H, W), so its channels are removed like BatchNorm's.
- ``EvoNorm2dS0``: ``x * sigmoid(v * x) / group_std(x)`` then the affine. Its group statistics span the channels of a
  group and its ``groups`` count is not stored with the tensors (a checkpoint's shapes cannot say it), so with the
  activation on its channels are kept, with that reason; without it (``apply_act=False``) it is a per-channel affine.

Each rule narrows the per-channel tensors, masks the affine pair with the channels while masked (``prune_bias``),
and maps a removed channel's constant through the layer as it computes in eval mode.
"""

from __future__ import annotations

import torch

from lightning_prune.fusion.rules.base import ChannelwiseRule, RuleKind, input_layout
from lightning_prune.fusion.rules.registry import active, register_by_name


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to(torch.float64).cpu()


class PerChannelNormRule(ChannelwiseRule):
    """A norm whose every tensor holds one value per channel (dim 0), with an affine ``weight`` / ``bias``; a
    submodule ``act`` (and ``drop``), when it has them, is applied after it and must keep channels apart."""

    keeps_shape = True
    #: the per-channel tensors it reads (those present are narrowed)
    names: tuple[str, ...] = ("weight", "bias")

    def channel_tensors(self, module):
        return [n for n in self.names if getattr(module, n, None) is not None]

    def affine_names(self, module):
        return [n for n in ("weight", "bias") if getattr(module, n, None) is not None]

    def widths(self, module):
        return module.weight.shape[0], module.weight.shape[0]

    def visit(self, v) -> None:
        for name in ("drop", "act"):
            inner = getattr(v.module, name, None)
            rule = active().module_rule(inner) if inner is not None else None
            if inner is not None and (rule is None or rule.kind is not RuleKind.ELEMENTWISE):
                flow = input_layout(v)
                if flow is not None:
                    v.block(flow, f"{v.where} applies its {name} {type(inner).__name__}, which fusion does not know "
                                  "to keep channels apart")
                return
        super().visit(v)

    def const_map(self, module, values):
        out = self.normalise(module, values) * _f64(module.weight) + _f64(module.bias)
        act = getattr(module, "act", None)  # drop is the identity in eval mode
        return (act(out) if act is not None else out), False

    def normalise(self, module, values: torch.Tensor) -> torch.Tensor:
        """A constant channel (one value per channel, float64) before the affine."""
        raise NotImplementedError

    def sync(self, module):
        if hasattr(module, "num_features"):  # timm's freeze_batch_norm_2d sets it
            module.num_features = module.weight.shape[0]


class FrozenBatchNormRule(PerChannelNormRule):
    """``FrozenBatchNorm2d`` / ``FrozenBatchNormAct2d``: fixed statistics and affine, all buffers."""

    names = ("weight", "bias", "running_mean", "running_var")

    def normalise(self, module, values):
        return (values - _f64(module.running_mean)) * torch.rsqrt(_f64(module.running_var) + module.eps)


class EvoNormB0Rule(PerChannelNormRule):
    """``EvoNorm2dB0``: per-channel statistics; a constant channel's instance std is ``sqrt(eps)``."""

    names = ("weight", "bias", "v", "running_var")

    def normalise(self, module, values):
        if module.v is None:
            return values
        left = torch.sqrt(_f64(module.running_var) + module.eps)
        right = values * _f64(module.v) + module.eps ** 0.5
        return values / torch.maximum(left, right)


class EvoNormS0Rule(PerChannelNormRule):
    """``EvoNorm2dS0``: with the activation, group statistics (refused, see the module docstring); without it, the
    affine alone."""

    names = ("weight", "bias", "v")

    def visit(self, v) -> None:
        if v.module.v is not None:
            flow = input_layout(v)
            if flow is not None:
                v.block(flow, f"{v.where} divides by the std of each group of {v.module.groups} channels, so removing "
                              "a channel changes the others' output, and its group count is not stored with its "
                              "tensors (a checkpoint's shapes could not restore it); its channels are kept "
                              "(EvoNorm2dB0, or EvoNorm2dS0 with apply_act=False, prune)")
                v.set(flow)
            return
        super().visit(v)

    def normalise(self, module, values):
        return values


_FROZEN = FrozenBatchNormRule()
register_by_name("torchvision.ops.misc.FrozenBatchNorm2d", _FROZEN)
register_by_name("timm.layers.norm_act.FrozenBatchNormAct2d", _FROZEN)
register_by_name("timm.layers.evo_norm.EvoNorm2dB0", EvoNormB0Rule())
register_by_name("timm.layers.evo_norm.EvoNorm2dS0", EvoNormS0Rule())
