"""What the walk records about the model, and how to find a tensor again: the records rules write through a
:class:`~.visit.Visit` and the plan is built from.

A :class:`Walk` holds each node's value, the channel groups, the tensor dims to narrow with them (*bindings*), the
candidate producers, the per-channel tensors to mask (*silences*), the consumers and the rule-specific actions; all of
it is keyed by the walk-time tensors' ids, which :meth:`Walk.refresh` follows when the model replaced them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from lightning_prune.fusion.graph import Traced
from lightning_prune.fusion.groups import ChannelGroups
from lightning_prune.masks import ChannelMask, FakeStructuredSparsity


@dataclass(frozen=True)
class TensorRef:
    """A parameter or buffer read directly in forward (``get_attr``), not through its module's call."""

    tensor: torch.Tensor
    fqn: str


@dataclass
class Binding:
    """One dim of one tensor that fusion narrows: ``labels`` gives the channel at each index along ``dim``."""

    tensor: torch.Tensor
    dim: int
    labels: torch.Tensor
    where: str


@dataclass
class Producer:
    """A weight whose rows (along ``dim``) are output channels a pruner can mask: a candidate config entry."""

    module: nn.Module
    module_fqn: str
    tensor_name: str
    dim: int
    labels: torch.Tensor  # the channel id of each row
    rule: Any
    follows: bool = False  # its rows are its input's channels (a depthwise conv): left out, it blocks nothing

    @property
    def tensor_fqn(self) -> str:
        return f"{self.module_fqn}.{self.tensor_name}" if self.module_fqn else self.tensor_name


@dataclass
class Silence:
    """A per-channel tensor (a bias, a norm's affine) masked with the channels it belongs to (``prune_bias``)."""

    module: nn.Module
    tensor_name: str
    labels: torch.Tensor
    always: bool = False  # masked whatever ``prune_bias`` says (an LSTM's gate biases keep pruned units at zero)
    dim: int = 0  # the tensor's channel dim (2 for a ViT's class token and position embeddings, (1, T, C))
    #: a norm taking masked statistics over these channels: every tensor silenced with them is masked too (always)
    statistics: bool = False


@dataclass
class Walk:
    """Everything the walk recorded; the plan is built from it."""

    model: nn.Module
    traced: Traced
    groups: ChannelGroups = field(default_factory=ChannelGroups)
    values: dict[str, Any] = field(default_factory=dict)
    bindings: dict[tuple[int, int], Binding] = field(default_factory=dict)  # (id(tensor), dim) -> binding
    producers: dict[tuple[int, int], Producer] = field(default_factory=dict)
    silences: list[Silence] = field(default_factory=list)
    #: (node, module, rule, the label of each input feature) of every layer call that reads channels
    consumers: list[tuple[fx.Node, nn.Module, Any, torch.Tensor]] = field(default_factory=list)
    steps: list[tuple[fx.Node, Any]] = field(default_factory=list)  # (node, rule) of nodes that carry channels
    actions: list[tuple[nn.Module, Any, Any]] = field(default_factory=list)  # rule-specific narrowing records
    frozen: dict[int, str] = field(default_factory=dict)  # id(tensor) -> why it must keep its shape
    holders: dict[int, list[tuple[nn.Module, str, str]]] = field(default_factory=dict)  # id -> (module, fqn, name)
    notes: dict[str, Any] = field(default_factory=dict)  # what a rule tells the rule of a later node, by node name
    #: node name -> the op where the channels it is computed from were lost (refused without an output layout)
    lost: dict[str, str] = field(default_factory=dict)
    #: (module, where, rank) of each layer call whose input rank was assumed (a batch) because no shapes were known
    assumed_ranks: list[tuple[nn.Module, str, int]] = field(default_factory=list)

    def refresh(self) -> None:
        """Follow tensors the model replaced since the walk: ``Module._apply`` (``.to``, ``.double()``, a strategy
        moving the model to its device, a precision plugin) swaps buffers for new objects, and everything here is
        keyed by the walk-time tensor's id. Each is found again where its first holder (module, name) keeps it, when
        it has the shape the walk saw (a narrowed tensor, after prune, is another tensor)."""
        shapes = {key[0]: binding.tensor.shape for key, binding in self.bindings.items()}
        moved: dict[int, torch.Tensor] = {}
        for old, holders in self.holders.items():
            module, _fqn, name = holders[0]
            current = held(module, name)
            if current is not None and id(current) != old and current.shape == shapes.get(old, current.shape):
                moved[old] = current
        if not moved:
            return
        self.holders = {id(moved[k]) if k in moved else k: v for k, v in self.holders.items()}
        self.frozen = {id(moved[k]) if k in moved else k: v for k, v in self.frozen.items()}
        bindings = {}
        for (old, dim), binding in self.bindings.items():
            if old in moved:
                binding = Binding(moved[old], dim, binding.labels, binding.where)
            bindings[(id(binding.tensor), dim)] = binding
        self.bindings = bindings
        self.producers = {(id(moved[k]) if k in moved else k, dim): p for (k, dim), p in self.producers.items()}


def held(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>`` as a plain parameter or buffer, or the original under a parametrization."""
    if parametrize.is_parametrized(module, name):  # one original (a mask); several (weight_norm's): none stored
        return getattr(module.parametrizations[name], "original", None)
    return module._parameters.get(name, module._buffers.get(name))


def computed_tensors(module: nn.Module) -> list[str]:
    """The module's tensors computed when read rather than stored: a parametrization other than a pruning mask, or
    a hook-set attribute (the old ``weight_norm`` / ``spectral_norm``)."""
    names = [n for n, value in vars(module).items() if isinstance(value, torch.Tensor) and not n.startswith("_")]
    if parametrize.is_parametrized(module):
        names += [n for n, plist in module.parametrizations.items()
                  if not all(isinstance(p, (FakeStructuredSparsity, ChannelMask)) for p in plist)]
    return names
