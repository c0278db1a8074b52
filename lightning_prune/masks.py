"""Channel masks as parametrizations: the one primitive that both the sparsifier and fusion use.

A weight gets a :class:`FakeStructuredSparsity` that zeroes whole rows (output channels). Tensors that must fall
silent with those rows, such as the layer's bias or the BatchNorm affine after it, get a :class:`ChannelMask` that
reads the same masks, so a masked channel contributes nothing downstream while every parameter keeps training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize


class FakeStructuredSparsity(nn.Module):
    """Zeroes the rows of a weight whose entry in ``mask`` (a bool vector, one per row) is False.

    The mask is a persistent buffer, so it is part of the model's ``state_dict``. ``dim`` is the weight dimension
    that holds the output channels: 0 for Linear/Conv, 1 for ConvTranspose.
    """

    def __init__(self, mask: torch.Tensor, dim: int = 0):
        super().__init__()
        self.register_buffer("mask", mask)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return x * self.mask.reshape(shape)


class ChannelMask(nn.Module):
    """Masks a per-channel tensor (a bias, a norm's affine) with row masks owned elsewhere.

    Position ``p`` of the tensor (along ``dim``) belongs to class ``positions[p]`` (-1: no class, always kept); a
    class is kept when any row of any source that belongs to it is kept (``rows[k][r]`` is the class of row ``r`` of
    source ``k``; rows of other classes are ignored). The sources are referenced, not registered, so each mask is
    stored once, in its own module's state.
    """

    def __init__(self, sources: Sequence[FakeStructuredSparsity], rows: Sequence[torch.Tensor],
                 positions: torch.Tensor, classes: int, dim: int = 0):
        super().__init__()
        object.__setattr__(self, "_sources", list(sources))
        for k, row_classes in enumerate(rows):
            self.register_buffer(f"rows{k}", row_classes.clamp(-1, classes).masked_fill(row_classes < 0, classes),
                                 persistent=False)
        self.register_buffer("positions", positions, persistent=False)
        self.classes = classes
        self.dim = dim
        #: every source's rows are exactly the positions, in order: the mask is the OR of the source masks
        self.aligned = bool((positions >= 0).all()) and all(torch.equal(r, positions) for r in rows)

    def channel_mask(self, device: torch.device) -> torch.Tensor:
        if self.aligned:
            keep = self._sources[0].mask.to(device)
            for source in self._sources[1:]:
                keep = keep | source.mask.to(device)
            return keep
        counts = torch.zeros(self.classes + 1, dtype=torch.long, device=device)
        for k, source in enumerate(self._sources):
            counts.index_add_(0, getattr(self, f"rows{k}").to(device), source.mask.to(device).long())
        kept = counts[: self.classes] > 0
        positions = self.positions.to(device)
        keep = torch.ones(positions.shape, dtype=torch.bool, device=device)
        live = positions >= 0
        keep[live] = kept[positions[live]]
        return keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return x * self.channel_mask(x.device).reshape(shape)


def row_mask(module: nn.Module, tensor_name: str) -> FakeStructuredSparsity | None:
    """The row-mask parametrization on ``module.<tensor_name>``, or None."""
    if not parametrize.is_parametrized(module, tensor_name):
        return None
    for p in module.parametrizations[tensor_name]:
        if isinstance(p, FakeStructuredSparsity):
            return p
    return None


def attach_row_mask(module: nn.Module, tensor_name: str, dim: int = 0) -> FakeStructuredSparsity:
    """Attach an all-True mask over dimension ``dim`` of ``module.<tensor_name>`` and return it."""
    tensor = getattr(module, tensor_name)
    mask = torch.ones(tensor.shape[dim], dtype=torch.bool, device=tensor.device)
    parametrization = FakeStructuredSparsity(mask, dim)
    parametrize.register_parametrization(module, tensor_name, parametrization, unsafe=True)
    return parametrization


def attach_channel_mask(module: nn.Module, tensor_name: str, mask: ChannelMask) -> None:
    """Mask a 1-D tensor (bias, affine) of ``module`` with masks owned by other parametrizations."""
    if getattr(module, tensor_name, None) is not None:
        parametrize.register_parametrization(module, tensor_name, mask, unsafe=True)


def bake_masks(module: nn.Module, keep_masked_values: bool = True) -> None:
    """Remove every mask from ``module``, leaving plain parameters: the masked values, or the raw ones.

    torch's ``remove_parametrizations`` deletes properties from the parametrized class, which a deepcopy of the
    model shares, so the copy would break. When masks are the only parametrizations, we restore the module's own
    class and parameters directly instead.
    """
    if not parametrize.is_parametrized(module):
        return
    ours = [name for name, plist in module.parametrizations.items()
            if any(isinstance(p, (FakeStructuredSparsity, ChannelMask)) for p in plist)]
    with torch.no_grad():
        if len(ours) == len(module.parametrizations) and all(len(module.parametrizations[n]) == 1 for n in ours):
            originals = {name: module.parametrizations[name].original for name in ours}
            values = {name: getattr(module, name) for name in ours} if keep_masked_values else originals
            del module._modules["parametrizations"]
            module.__class__ = module.__class__.__bases__[0]
            for name, value in values.items():
                module._parameters[name] = value if value is originals[name] else \
                    nn.Parameter(value.detach(), requires_grad=originals[name].requires_grad)
            return
        for name in ours:
            parametrize.remove_parametrizations(module, name, leave_parametrized=keep_masked_values)


def has_masks(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module) and any(
        isinstance(p, (FakeStructuredSparsity, ChannelMask))
        for plist in module.parametrizations.values()
        for p in plist
    )


def has_masks_anywhere(model: nn.Module) -> bool:
    """Whether any module of ``model`` carries a pruning mask."""
    return any(has_masks(module) for module in model.modules())
