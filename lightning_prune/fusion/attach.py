"""Attach the masks that keep the masked model equal to the final one.

Every configured tensor gets a row mask (on every module that holds it, so a tied weight stays one parameter). With
``prune_bias`` each per-channel tensor recorded by the walk (a layer's bias, the BatchNorm affine after it, an added
parameter) gets a :class:`~lightning_prune.masks.ChannelMask` that silences a channel whenever its class is pruned,
so a pruned channel contributes nothing downstream while every parameter keeps training.
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from lightning_prune.fusion.plan import PruningPlan
from lightning_prune.fusion.rules import registry
from lightning_prune.masks import ChannelMask, FakeStructuredSparsity, attach_channel_mask, attach_row_mask


def attach_masks(plan: PruningPlan, prune_bias: dict[str, bool]
                 ) -> tuple[dict[str, FakeStructuredSparsity], dict[int, list[str]]]:
    """Row masks for the members, then the bias/affine masks. Returns the row masks by tensor FQN, and each module's
    parameter order before the masks (by ``id``), which ``fuse`` restores as it takes them off."""
    param_orders = {id(m): list(m._parameters) for m in plan.model.modules()}
    masks: dict[str, FakeStructuredSparsity] = {}
    for member in plan.members:
        tensor = member.module._parameters.get(member.tensor_name)
        fake = attach_row_mask(member.module, member.tensor_name, member.dim)
        for module, _fqn, name in plan.walk.holders.get(id(tensor), []):
            if module is not member.module or name != member.tensor_name:
                parametrize.register_parametrization(module, name, fake, unsafe=True)
        masks[member.tensor_fqn] = fake
    member_classes = {m.tensor_fqn: plan.classes(m.labels) for m in plan.members}
    pairs = [(c[c >= 0].unique(), k) for k, c in enumerate(member_classes.values())]
    pair_class = torch.cat([c for c, _ in pairs]) if pairs else torch.empty(0, dtype=torch.long)
    pair_member = torch.cat([torch.full_like(c, k) for c, k in pairs]) if pairs else pair_class
    marked = torch.zeros(plan.groups.size, dtype=torch.bool)  # the classes of the silence at hand
    done = {(id(m.module), m.tensor_name) for m in plan.members}
    spanned = torch.zeros(plan.groups.size + 1, dtype=torch.bool)  # classes a LayerNorm's masked statistics span
    for silence in plan.walk.silences:
        if silence.statistics:
            spanned[plan.classes(silence.labels)] = True  # (-1, no class, lands on the spare last entry)
    spanned[-1] = False
    for silence in plan.walk.silences:
        key = (id(silence.module), silence.tensor_name)
        if key in done:
            continue
        classes = plan.classes(silence.labels)
        order = classes[classes >= 0].unique()
        marked[order] = True
        sources = [plan.members[k] for k in pair_member[marked[pair_class]].unique().tolist()]
        marked[order] = False
        # under a LayerNorm's masked statistics a removed channel is silent whatever prune_bias says: a constant
        # it emitted could meet zero padding elsewhere and be kept, which the statistics already left out
        always = silence.always or bool(spanned[order].any())
        if not sources or not (always or all(prune_bias[m.tensor_fqn] for m in sources)):
            continue
        done.add(key)
        mask = ChannelMask([masks[m.tensor_fqn] for m in sources],
                           [_compact(member_classes[m.tensor_fqn], order) for m in sources],
                           _compact(classes, order), order.numel(), silence.dim)
        device = getattr(silence.module, silence.tensor_name).device
        attach_channel_mask(silence.module, silence.tensor_name, mask.to(device))
    for module in dict.fromkeys(m for m, _name in ((s.module, s.tensor_name) for s in plan.walk.silences)
                                if (id(m), _name) in done):
        rule = registry.rule_for(module)
        if rule is not None:
            rule.on_masked(module)  # a LayerNorm over the stream takes its statistics over the kept channels
    for container, rule in registry.containers_holding(plan.model, [m.module for m in plan.members]):
        rule.on_masked(container)
    return masks, param_orders


def _compact(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """The index of each value in the sorted ``order`` (-1 where absent)."""
    index = torch.searchsorted(order, values.clamp_min(0))
    found = (values >= 0) & (index < order.numel())
    found &= order[index.clamp_max(order.numel() - 1)] == values
    return torch.where(found, index, torch.full_like(index, -1))
