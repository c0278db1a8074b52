"""Constant propagation: what a removed channel still emits, and where that value goes.

A removed channel's weights are zero, but it may still emit a constant: its bias (``prune_bias=False``),
``sigmoid(0)``, a BatchNorm shift. A pass over the walk's steps, in graph order, asks each node's rule what it makes
of the constants reaching it. The consumer that loses the channel folds the constant into its bias; where the value
would depend on position (zero padding, a run-time tensor), the channel is kept instead, as it is where a rule's
``const`` raises (with a warning naming the op and the error).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import fx

from lightning_prune.errors import PruningConfigError
from lightning_prune.fusion.layout import Layout
from lightning_prune.fusion.records import Walk
from lightning_prune.fusion.visit import Visit


@dataclass
class IdValues:
    """A value per channel id (ids sorted); ids not listed are 0."""

    ids: torch.Tensor
    values: torch.Tensor

    @staticmethod
    def empty() -> IdValues:
        return IdValues(torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.float64))

    def at(self, labels: torch.Tensor) -> torch.Tensor:
        """The value at each position of ``labels`` (FIXED positions: 0)."""
        flat = labels.reshape(-1)
        out = torch.zeros(flat.shape, dtype=torch.float64)
        if self.ids.numel():
            index = torch.searchsorted(self.ids, flat.clamp_min(0)).clamp_max(self.ids.numel() - 1)
            found = (flat >= 0) & (self.ids[index] == flat)
            out[found] = self.values[index[found]]
        return out.reshape(labels.shape)

    @staticmethod
    def from_positions(labels: torch.Tensor, values: torch.Tensor) -> tuple[IdValues, torch.Tensor]:
        """Values per id from values per position; also the ids given different values at different positions."""
        flat, vals = labels.reshape(-1), values.reshape(-1).to(torch.float64)
        live = flat >= 0
        flat, vals = flat[live], vals[live]
        ids, inverse = torch.unique(flat, return_inverse=True)
        first = torch.zeros(ids.shape, dtype=torch.float64).scatter_(0, inverse, vals)
        clash = (first[inverse] != vals)
        return IdValues(ids, first), flat[clash].unique()

    @staticmethod
    def merge(maps: list[IdValues]) -> tuple[IdValues, torch.Tensor]:
        """One map from several; also the ids that the maps give different values (``cat([x, bn(x)])`` holds
        one channel at two positions with two constants, which no value per id describes)."""
        maps = [m for m in maps if m.ids.numel()]
        if not maps:
            return IdValues.empty(), torch.empty(0, dtype=torch.long)
        ids = torch.cat([m.ids for m in maps])
        values = torch.cat([m.values for m in maps])
        unique, inverse = torch.unique(ids, return_inverse=True)
        merged = torch.zeros(unique.shape, dtype=torch.float64).scatter_(0, inverse, values)
        return IdValues(unique, merged), ids[merged[inverse] != values].unique()


def _layouts(value) -> list[Layout]:
    if isinstance(value, Layout):
        return [value]
    if isinstance(value, (tuple, list)):
        return [layout for item in value for layout in _layouts(item)]
    return []


def propagate(walk: Walk) -> tuple[dict[str, IdValues], torch.Tensor]:
    """Each node's constants per channel id, and the ids whose constant varies with position somewhere."""
    modules = dict(walk.model.named_modules(remove_duplicate=False))
    consts: dict[str, IdValues] = {}
    dependent: list[torch.Tensor] = []
    with torch.no_grad():
        for node, rule in walk.steps:
            visit = Visit(walk, node, modules)
            visit.rule = rule
            inputs = [a for a in node.all_input_nodes if isinstance(walk.values.get(a.name), Layout)]
            positional = [consts.get(a.name, IdValues.empty()).at(walk.values[a.name].labels) for a in inputs]
            outputs = _layouts(walk.values[node.name])
            try:
                result = rule.const(visit, *positional)
            except PruningConfigError:
                raise
            except Exception as error:  # noqa: BLE001 - a rule's failure keeps the channels, never breaks prune()
                warnings.warn(f"{visit.where}: {type(rule).__name__}.const raised {type(error).__name__}: {error}; "
                              "the channels there stay (zeroed where masked) so the result is still exact",
                              UserWarning, stacklevel=4)
                dependent += [layout.labels.reshape(-1) for layout in outputs]
                consts[node.name] = IdValues.empty()
                continue
            if result is None or not outputs:
                consts[node.name], clash = IdValues.merge([consts[a.name] for a in node.all_input_nodes
                                                           if a.name in consts])
                dependent.append(clash)
                continue
            values, varies = result if isinstance(result, tuple) else (result, False)
            labels = outputs[0].labels
            values = _shaped(values, labels)
            if values is None:
                dependent.append(labels.reshape(-1))
                consts[node.name] = IdValues.empty()
                continue
            mapped, clash = IdValues.from_positions(labels, values)
            consts[node.name] = mapped
            dependent.append(clash)
            if isinstance(varies, torch.Tensor):
                dependent.append(labels[_shaped(varies, labels).bool()].reshape(-1))
            elif varies:
                dependent.append(labels.reshape(-1))
    found = torch.cat(dependent) if dependent else torch.empty(0, dtype=torch.long)
    return consts, found[found >= 0].unique()


def _shaped(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    values = torch.as_tensor(values)
    if values.shape == labels.shape:
        return values
    try:
        return values.expand(labels.shape) if values.dim() <= labels.dim() else values.reshape(labels.shape)
    except RuntimeError:
        return None


def input_node(node: fx.Node) -> fx.Node | None:
    """The tensor a layer call reads its channels from (its first argument)."""
    first = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    return first if isinstance(first, fx.Node) else None
