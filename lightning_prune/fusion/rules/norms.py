"""Norms over the pruned channels (a transformer's residual stream), made exact.

A masked stream holds zeros on its removed channels. Over ``d`` channels of which ``k`` stay:

- **RMSNorm** is exact after a rescale: ``S / k + eps * d / k = (d / k) (S / d + eps)``, so the narrowed norm takes
  ``eps' = eps * d / k`` and ``weight' = weight * sqrt(d / k)`` (Gemma's ``1 + weight`` form:
  ``1 + weight' = (1 + weight) * sqrt(d / k)``). Nothing changes while masked.
- **LayerNorm** cannot be rescaled (its mean counts the zeros), so while masked it computes its mean and variance
  over the kept channels only and outputs zeros on the others (:class:`MaskedStatistics`, a forward hook that reads
  the kept channels from the masks on its own weight, which follow the producers' masks; nothing is added to the
  module's state). Narrowing it is then exact by construction.

Either norm must normalise over the channels alone (one normalised dim, the channels on it and nowhere else); any
other layout keeps :class:`~.channelwise.NormOverLastRule`'s refusal.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

from lightning_prune.errors import UnsupportedPatternError
from lightning_prune.fusion.rules.base import input_layout
from lightning_prune.fusion.rules.channelwise import NormOverLastRule
from lightning_prune.fusion.rules.registry import register_by_name, register_layer, register_predicate
from lightning_prune.masks import ChannelMask


class StreamNormRule(NormOverLastRule):
    """A norm whose statistics span the channels on its ``channel_dim``: per-channel weight (and bias) narrowed with
    them; subclasses make the narrowed norm compute what the masked one did."""

    keeps_shape = True
    #: the input dim the norm normalises over: -1 (channels last) or 1 (``LayerNorm2d``)
    channel_dim: int = -1

    def channel_tensors(self, module: nn.Module) -> list[str]:
        return [n for n in ("weight", "bias") if isinstance(getattr(module, n, None), torch.Tensor)]

    def widths(self, module: nn.Module) -> tuple[int, int] | None:
        weight = getattr(module, "weight", None)
        return (weight.shape[0],) * 2 if isinstance(weight, torch.Tensor) else super().widths(module)

    def refusal(self, module: nn.Module) -> str | None:
        """Why this module's channels cannot be followed (no per-channel weight to narrow), or None."""
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            return "has no per-channel weight, so its narrowed form could not compute the masked one"
        return None

    def over_channels(self, v, flow) -> bool:
        """Whether this call normalises over exactly the channels: one dim, ``channel_dim``, carrying them all."""
        shape = getattr(v.module, "normalized_shape", None)
        if v.module is None or (isinstance(shape, (tuple, list, torch.Size)) and len(shape) != 1):
            return False
        weight = getattr(v.module, "weight", None)
        return flow.at(self.channel_dim) and (not isinstance(weight, torch.Tensor) or flow.width == weight.shape[0])

    def visit(self, v) -> None:
        flow = input_layout(v)
        if flow is None:
            return
        if not self.over_channels(v, flow):
            if self.channel_dim != -1:
                v.block(flow, f"{v.where} normalises over dim {self.channel_dim}, where the pruned channels are "
                              "not alone")
                v.set(flow)
                return
            super().visit(v)  # normalises over other dims (or several): the generic norm's reasons
            return
        why = self.refusal(v.module)
        if why is not None:
            v.block(flow, f"{v.where} normalises over the pruned channels and {why}")
            v.set(flow)
            return
        labels = flow.labels.reshape(-1)
        for name in self.channel_tensors(v.module):
            v.bind(v.tensor(name), 0, labels)
        self.record(v, labels)
        v.action(labels)
        v.set(flow)

    def record(self, v, labels: torch.Tensor) -> None:
        """What a subclass notes about the call beyond its bound tensors (masks to attach)."""


class RMSNormRule(StreamNormRule):
    """``x * rsqrt(mean(x^2) + eps) * weight`` (``offset=1``: ``* (1 + weight)``, Gemma), with ``eps`` read from
    ``eps`` or ``variance_epsilon`` (None: the input dtype's ``finfo.eps``, as ``nn.RMSNorm``)."""

    def __init__(self, offset: float = 0.0):
        super().__init__()
        self.offset = offset

    def refusal(self, module: nn.Module) -> str | None:
        return super().refusal(module) or (None if _eps_name(module) else "keeps its epsilon in no known attribute")

    def const_map(self, module, values):
        return torch.zeros_like(values), values != 0  # a non-zero removed channel would still count in the mean

    def narrow(self, module: nn.Module, labels: torch.Tensor, ctx) -> None:
        self.rescale(module, labels.numel(), int(ctx.kept_positions(labels).numel()), ctx.surgery)

    def rescale(self, module: nn.Module, dense: int, kept: int, surgery=None) -> None:
        """Make the ``kept``-channel norm compute what the ``dense``-channel one did on zeros elsewhere."""
        if kept == dense:
            return
        name = _eps_name(module)
        eps = getattr(module, name)
        if eps is None:
            eps = torch.finfo(module.weight.dtype).eps
        setattr(module, name, float(eps) * dense / kept)
        if isinstance(getattr(module, "normalized_shape", None), tuple):
            module.normalized_shape = (kept,)
        weight = module.weight
        scaled = ((weight.detach().double() + self.offset) * math.sqrt(dense / kept) - self.offset).to(weight.dtype)
        if surgery is not None:
            surgery.assign(weight, scaled)
            return
        with torch.no_grad():
            weight.copy_(scaled)

    def resized(self, module: nn.Module, before: tuple[int, int] | None) -> None:
        """``load_pruned`` narrowed the weight of a dense-width module: take the narrowed norm's epsilon (the
        checkpoint's weight is already rescaled)."""
        if before is not None:
            name = _eps_name(module)
            eps = getattr(module, name)
            if eps is None:
                eps = torch.finfo(module.weight.dtype).eps
            setattr(module, name, float(eps) * before[0] / module.weight.shape[0])
        self.sync(module)

    def sync(self, module: nn.Module) -> None:
        if isinstance(getattr(module, "normalized_shape", None), tuple):
            module.normalized_shape = (module.weight.shape[0],)


class LayerNormRule(StreamNormRule):
    """``nn.LayerNorm`` over the channels: masked statistics while masked (:class:`MaskedStatistics`), then narrowed.

    Args:
        channel_dim: -1 for channels last; 1 for a ``LayerNorm2d`` that normalises the channels of (N, C, H, W).
    """

    def __init__(self, channel_dim: int = -1):
        super().__init__()
        self.channel_dim = channel_dim

    def record(self, v, labels: torch.Tensor) -> None:
        for name in self.channel_tensors(v.module):
            v.silence(v.module, name, labels, always=True, statistics=True)  # its mask tells the hook what stays

    def const_map(self, module, values):
        return torch.zeros_like(values), False  # a removed channel is outside the statistics and silenced

    def on_masked(self, module: nn.Module) -> None:
        if not any(isinstance(h, MaskedStatistics) for h in module._forward_hooks.values()):
            module.register_forward_hook(MaskedStatistics(self.channel_dim))

    def adjust_kept(self, module: nn.Module, labels: torch.Tensor, ctx) -> None:
        ctx.store[id(module)] = _kept_channels(module)

    def narrow(self, module: nn.Module, labels: torch.Tensor, ctx) -> None:
        masked = ctx.store.get(id(module))
        kept = ctx.kept_positions(labels)
        if masked is not None and not torch.equal(masked.nonzero().flatten().cpu(), kept.cpu()):
            raise UnsupportedPatternError(
                f"LayerNorm '{ctx.name(module)}' took its statistics over {int(masked.sum())} channels while masked, "
                f"but fusion keeps {kept.numel()} of them (a masked channel kept for another reason: blocked, or a "
                "constant it emits meets zero padding), so the narrowed norm would differ; the model is unchanged. "
                "Mask only removable channels of this stream (plan.channel_groups()), or use prune_bias=True")
        self.sync(module)
        module._forward_hooks = OrderedDict((k, h) for k, h in module._forward_hooks.items()
                                            if not isinstance(h, MaskedStatistics))

    def sync(self, module: nn.Module) -> None:
        if isinstance(getattr(module, "normalized_shape", None), tuple):
            module.normalized_shape = (module.weight.shape[0],)


class MaskedStatistics:
    """Forward hook of a LayerNorm over a masked stream, normalising along ``dim``: its output with mean and variance
    taken over the kept channels only (the masked ones output 0); None (the output as it is) when no mask is
    attached, so a hook left behind by a mask removed otherwise changes nothing."""

    def __init__(self, dim: int):
        self.dim = dim

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        keep = _kept_channels(module)
        if keep is None:
            return None
        return _masked_layer_norm(module, args[0], keep, self.dim).to(output.dtype)


def _masked_layer_norm(module: nn.Module, x: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """LayerNorm of ``x`` along ``dim`` over the ``keep`` channels, in float32."""
    shape = [1] * x.dim()
    shape[dim] = -1
    m = keep.to(device=x.device, dtype=torch.float32).reshape(shape)
    h = x.float()
    mean = (h * m).sum(dim, keepdim=True) / m.sum()
    centred = (h - mean) * m
    y = centred * torch.rsqrt((centred * centred).sum(dim, keepdim=True) / m.sum() + module.eps)
    y = y * module.weight.float().reshape(shape)  # the masked weight (and bias) zero the removed channels
    if module.bias is not None:
        y = y + module.bias.float().reshape(shape)
    return y


def _kept_channels(module: nn.Module) -> torch.Tensor | None:
    """The kept channels of a norm's weight, from the :class:`ChannelMask` on it (None: not masked)."""
    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    for p in plist or ():
        if isinstance(p, ChannelMask):
            return p.channel_mask(p.positions.device)
    return None


def _eps_name(module: nn.Module) -> str | None:
    return next((n for n in ("variance_epsilon", "eps") if hasattr(module, n)), None)


def is_hf_rms_norm(module: nn.Module) -> bool:
    """A transformers ``*RMSNorm``: a per-channel ``weight`` and a float epsilon (``variance_epsilon``/``eps``)."""
    cls = type(module)
    weight = module._parameters.get("weight") if isinstance(module, nn.Module) else None
    eps = getattr(module, _eps_name(module) or "", None)
    return (cls.__name__.endswith("RMSNorm") and cls.__module__.startswith("transformers.models.")
            and isinstance(weight, torch.Tensor) and weight.dim() == 1 and isinstance(eps, float))


register_layer(nn.RMSNorm, RMSNormRule())
register_layer(nn.LayerNorm, LayerNormRule())
register_predicate(is_hf_rms_norm, RMSNormRule())
register_by_name("transformers.models.t5.modeling_t5.T5LayerNorm", RMSNormRule())
for _family in ("gemma.modeling_gemma.Gemma", "gemma2.modeling_gemma2.Gemma2", "gemma3.modeling_gemma3.Gemma3"):
    register_by_name(f"transformers.models.{_family}RMSNorm", RMSNormRule(offset=1.0))
for _name in ("timm.layers.norm.LayerNorm2d", "torchvision.models.convnext.LayerNorm2d"):
    register_by_name(_name, LayerNormRule(channel_dim=1))
register_by_name("timm.layers.norm.LayerNorm", LayerNormRule())
