"""The pruning plan: what the analysis found, readable before anything changes.

The analysis (:func:`~.analysis.analyse`) traces the model, walks it, and settles which configured tensors can be
pruned; a :class:`PruningPlan` holds what it settled: the configured tensors (*members*) with the channel of each of
their rows, the channel groups (producers whose channels are coupled, and the layers that read them), and for each
group whether it can be pruned and, if not, the op, module and source line that block it. This module is data and
queries only; ``prune()`` executes a plan (:mod:`.apply`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_prune.fusion.cost import CostModel
from lightning_prune.fusion.describe import describe, format_table
from lightning_prune.fusion.records import Producer, Walk, held


@dataclass
class Member:
    """A configured tensor: its rows (along ``dim``) are channels whose ids are ``labels``."""

    module: nn.Module
    module_fqn: str
    tensor_name: str
    tensor_fqn: str
    dim: int
    labels: torch.Tensor
    rule: Any

    @property
    def rows(self) -> int:
        return self.labels.numel()


@dataclass
class ChannelGroup:
    """Producers whose output channels are coupled, the members among them, and what the group's classes are."""

    producers: list[Producer]
    members: list[Member]
    classes: torch.Tensor  # distinct classes of the group's channels
    blocked: dict[int, list[str]]  # class -> reasons it stays
    granularity: str = "channel"


@dataclass
class PruningPlan:
    """The analysis of one model for one configuration (see module docstring)."""

    model: nn.Module
    walk: Walk
    members: list[Member]
    dropped: dict[str, str] = field(default_factory=dict)  # tensor fqn -> why config=None left it out
    retained: dict[str, str] = field(default_factory=dict)  # tensor fqn -> why its channels stay (zeroed)
    example_inputs: tuple[tuple, dict] | None = None
    #: the level sizes are shown at by :meth:`table` and :meth:`to_dict` (the analysis is told it)
    sparsity_level: float = 0.5
    #: how those sizes are allocated: ``"uniform_layers"`` removes as many classes from every set alike across layers
    allocation: str = "auto"
    _channel_groups: list[ChannelGroup] | None = field(default=None, init=False, repr=False)
    _costs: dict[str, CostModel] = field(default_factory=dict, init=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data: every channel group (producers, configured tensors, consumers, granularity,
        channels and removable classes, what blocks it), the tensors left out and why, and params / MACs dense and
        at :attr:`sparsity_level` (MACs need example inputs)."""
        return describe(self, self.sparsity_level)

    def table(self) -> str:
        """:meth:`to_dict` as a fixed-width table."""
        return format_table(self.to_dict())

    def __str__(self) -> str:
        return self.table()

    def cost(self, metric: str) -> CostModel:
        """The cost model of ``metric`` ("params", or "macs" with example inputs), built once from the walk and kept:
        the table and a budget read the same one.

        Raises:
            ValueError: an unknown metric, or "macs" without example inputs.
        """
        if metric not in self._costs:
            self._costs[metric] = CostModel.of(self.current_walk(), metric, self.example_inputs)
        return self._costs[metric]

    def current_walk(self) -> Walk:
        """The walk, following the tensors the model replaced since the analysis (``.to()``, a strategy moving the
        model to its device: see :meth:`Walk.refresh`). Everything that reads the walk's tables by tensor id after
        the model may have moved (the cost models, ``prune()``) reads them through this."""
        self.walk.refresh()
        return self.walk

    @property
    def groups(self):
        return self.walk.groups

    def classes(self, labels: torch.Tensor) -> torch.Tensor:
        return self.walk.groups.classes(labels)

    def channel_groups(self) -> list[ChannelGroup]:
        """Producers joined by shared classes, with their members (configured tensors) and blockers."""
        if self._channel_groups is None:
            self._channel_groups = self._find_channel_groups()
        return self._channel_groups

    def _find_channel_groups(self) -> list[ChannelGroup]:
        producers = list(self.walk.producers.values())
        by_fqn = {m.tensor_fqn: m for m in self.members}
        parent = list(range(len(producers)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        owner: dict[int, int] = {}
        classes_of = []
        for i, producer in enumerate(producers):
            classes = self.classes(producer.labels)
            classes = classes[classes >= 0].unique()
            classes_of.append(classes)
            for c in classes.tolist():
                if c in owner:
                    parent[find(i)] = find(owner[c])
                else:
                    owner[c] = i
        blocked = self.walk.groups.blocked_classes()
        result: dict[int, list[int]] = {}
        for i in range(len(producers)):
            result.setdefault(find(i), []).append(i)
        groups = []
        for indices in result.values():
            classes = torch.cat([classes_of[i] for i in indices]).unique()
            members = [by_fqn[producers[i].tensor_fqn] for i in indices if producers[i].tensor_fqn in by_fqn]
            groups.append(ChannelGroup([producers[i] for i in indices], members, classes,
                                       {c: blocked[c] for c in classes.tolist() if c in blocked},
                                       _granularity(self, [producers[i] for i in indices], classes)))
        return groups

    def coupled_members(self) -> list[list[Member]]:
        """Members whose channels are coupled (a residual stream, an attention block's heads, an LSTM layer)."""
        return [g.members for g in self.channel_groups() if g.members]

    def tensor(self, module: nn.Module, name: str) -> torch.Tensor | None:
        """A tensor as the walk saw it: the original under a mask, or the plain one."""
        return held(module, name)

    def kept_classes(self) -> torch.Tensor:
        """A bool per channel id, read at class roots: True where the class stays under the current masks (a class
        is kept when any configured row in it is kept) or because something blocks its removal."""
        root = self.groups.solve()
        kept = torch.zeros(self.groups.size, dtype=torch.bool)
        for member in self.members:
            plist = getattr(getattr(member.module, "parametrizations", None), member.tensor_name, None)
            if plist is None:
                continue
            live = member.labels >= 0
            kept[root[member.labels[live]][plist[0].mask.cpu()[live]]] = True
        blocked = list(self.groups.blocked_classes())
        if blocked:
            kept[torch.tensor(blocked, dtype=torch.long)] = True
        return kept

    def input_classes(self, module: nn.Module, name: str, row_dim: int) -> torch.Tensor | None:
        """The class of each input feature of ``module.<name>`` (its bound dim other than the rows), if any."""
        tensor = self.tensor(module, name)
        if tensor is None:
            return None
        for dim in range(tensor.dim()):
            binding = self.walk.bindings.get((id(tensor), dim))
            if binding is not None and dim != row_dim:
                return self.classes(binding.labels)
        return None


def _granularity(plan: PruningPlan, producers: list[Producer], classes: torch.Tensor) -> str:
    """channel, or group-of-k when each class holds k rows of a producer (heads, GroupNorm groups); group-of-k/m when
    producers differ (grouped-query attention: a key/value head's rows, and its query heads' rows)."""
    sizes = set()
    for producer in producers:
        cls = plan.classes(producer.labels)
        cls = cls[cls >= 0]
        if cls.numel():
            counts = torch.unique(cls, return_counts=True)[1]
            rows_per_channel = producer.labels.numel() // max(producer.labels.unique().numel(), 1)
            sizes |= set((counts // rows_per_channel).tolist())
    if not sizes or sizes == {1}:
        return "channel"
    return "group-of-" + "/".join(str(size) for size in sorted(sizes, reverse=True))
