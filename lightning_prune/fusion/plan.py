"""The pruning plan: what the analysis found, readable before anything changes.

:func:`analyse` traces the model, walks it, and settles which configured tensors can be pruned: a :class:`PruningPlan`
holds the configured tensors (*members*) with the channel of each of their rows, the channel groups (producers
whose channels are coupled, and the layers that read them), and for each group whether it can be pruned and, if not,
the op, module and source line that block it. ``prune()`` executes a plan (:mod:`.apply`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_prune.errors import OutputReachedError, UnsupportedPatternError
from lightning_prune.fusion.dryrun import dry_run
from lightning_prune.fusion.records import Producer, Walk, computed_tensors, held
from lightning_prune.fusion.rules import registry
from lightning_prune.fusion.trace import trace
from lightning_prune.fusion.walk import walk


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

    @property
    def prunable(self) -> bool:
        return any(int(c) not in self.blocked for c in self.classes)


@dataclass
class PruningPlan:
    """The analysis of one model for one configuration (see module docstring)."""

    model: nn.Module
    walk: Walk
    members: list[Member]
    dropped: dict[str, str] = field(default_factory=dict)  # tensor fqn -> why config=None left it out
    retained: dict[str, str] = field(default_factory=dict)  # tensor fqn -> why its channels stay (zeroed)
    #: each module's parameter order before masks were attached, restored when they are removed
    param_orders: dict[int, list[str]] = field(default_factory=dict)
    rank_probes: list = field(default_factory=list)  # (RankProbe, hook handle): see fusion/ranks.py
    example_inputs: tuple[tuple, dict] | None = None
    #: the level sizes are shown at by :meth:`table` and :meth:`to_dict`
    sparsity_level: float = 0.5
    #: how those sizes are allocated: ``"uniform_layers"`` removes as many classes from every set alike across layers
    allocation: str = "auto"
    _channel_groups: list[ChannelGroup] | None = field(default=None, init=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data: every channel group (producers, configured tensors, consumers, granularity,
        channels and removable classes, what blocks it), the tensors left out and why, and params / MACs dense and
        at :attr:`sparsity_level` (MACs need example inputs)."""
        from lightning_prune.fusion.describe import describe

        return describe(self, self.sparsity_level)

    def table(self) -> str:
        """:meth:`to_dict` as a fixed-width table."""
        from lightning_prune.fusion.describe import format_table

        return format_table(self.to_dict())

    def __str__(self) -> str:
        return self.table()

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


def analyse(
    model: nn.Module,
    configured: list[str] | None,
    *,
    example_inputs: tuple[tuple, dict] | None = None,
    exclude_output: bool = False,
    select: Callable[[str], bool] | None = None,
    strict: bool = True,
) -> PruningPlan:
    """Trace and walk ``model``, then settle the members.

    ``configured``: explicit tensor FQNs, honoured exactly or refused (``strict=False``: left out with the reason,
    as :func:`explain` shows them); None: every producer the walk found (for which ``select(fqn)`` holds) that can be
    pruned exactly, leaving out the rest (and, with ``exclude_output``, those whose channels reach the output).

    Raises:
        UnsupportedPatternError: an explicit tensor cannot be pruned exactly (every such tensor and reason listed).
        OutputReachedError: with ``exclude_output``, an explicit tensor whose channels reach the model's output.
    """
    state = walk(model, trace(model, example_inputs))
    producers = _by_fqn(state)
    explicit = configured is not None
    if explicit:
        missing = {fqn: _never_produced(model, state, fqn) for fqn in configured if fqn not in producers}
        if missing and strict:
            raise UnsupportedPatternError("\n".join(missing.values()))
        chosen = [fqn for fqn in configured if fqn not in missing]
    else:
        order = {id(m): k for k, m in enumerate(model.modules())}
        found = sorted(state.producers.values(), key=lambda p: order.get(id(p.module), len(order)))
        chosen = [p.tensor_fqn for p in found if select is None or select(p.tensor_fqn)]
    chosen_keys = {id(producers[fqn]) for fqn in chosen}
    for producer in state.producers.values():
        if id(producer) not in chosen_keys and not producer.follows:
            state.groups.block(producer.labels, f"its channels are tied to those of '{producer.tensor_fqn}', which "
                                                "is not configured (configure both)")
    dropped: dict[str, str] = dict(missing) if explicit else {}
    retained: dict[str, str] = {}
    while True:  # an export-mode plan is checked by a dry run, which may block more (then settle again)
        chosen = _settle(state, producers, chosen, explicit, exclude_output, dropped, retained, strict)
        members = []
        for fqn in chosen:
            producer = producers[fqn]
            module_fqn, _, name = fqn.rpartition(".")
            module = model.get_submodule(module_fqn)
            members.append(Member(module, module_fqn, name, fqn, producer.dim, producer.labels, producer.rule))
        plan = PruningPlan(model, state, members, dropped, retained, example_inputs=example_inputs)
        if state.traced.front_end != "export" or not dry_run(plan, example_inputs):
            return plan


def _settle(state: Walk, producers: dict[str, Producer], chosen: list[str], explicit: bool, exclude_output: bool,
            dropped: dict[str, str], retained: dict[str, str], strict: bool) -> list[str]:
    """The configured tensors that stay members: refuse (explicit config) or leave out (config=None, recorded in
    ``dropped``) those with no removable channel or, with ``exclude_output``, whose channels reach the output."""
    while True:
        blocked = state.groups.blocked_classes()
        outputs = state.groups.output_classes() if exclude_output else set()
        problems: dict[str, str] = {}
        for fqn in chosen:
            producer = producers[fqn]
            classes = [c for c in state.groups.classes(producer.labels).unique().tolist() if c >= 0]
            if classes and all(c in blocked for c in classes):
                reasons = [r for r in dict.fromkeys(r for c in classes for r in blocked[c])
                           if not r.startswith(f"its channels are tied to those of '{fqn}'")]
                if getattr(producer.rule, "retain_blocked", False) and explicit:
                    retained[fqn] = _summary(reasons)
                    continue
                problems[fqn] = _summary(reasons) or "no channel of it can be removed"
            elif outputs and any(c in outputs for c in classes):
                problems[fqn] = "its channels reach the model's output"
        if explicit and strict and any(r == "its channels reach the model's output" for r in problems.values()):
            reaching = [f for f, r in problems.items() if r == "its channels reach the model's output"]
            raise OutputReachedError(
                f"config names {reaching}, whose channels reach the model's output: pruning them changes the output's "
                "width (a classifier would lose classes). Leave them out of the config, or opt in to narrowing the "
                "output explicitly.")
        if not problems:
            return chosen
        if explicit and strict:
            raise UnsupportedPatternError("\n".join(f"cannot prune '{fqn}' exactly: {reason}"
                                                     for fqn, reason in problems.items()))
        for fqn, reason in problems.items():
            dropped[fqn] = reason
            state.groups.block(producers[fqn].labels, f"'{fqn}' is left out ({reason})")
        chosen = [fqn for fqn in chosen if fqn not in dropped]


def _summary(reasons: list[str], shown: int = 2) -> str:
    """The first reasons in full, then how many more (a residual stream can meet a dozen norms)."""
    text = "; and ".join(reasons[:shown])
    return text + (f" (and {len(reasons) - shown} more like it)" if len(reasons) > shown else "")


def _by_fqn(state: Walk) -> dict[str, Producer]:
    """Producers by the FQN of every name their tensor goes by (a tied weight has several)."""
    found: dict[str, Producer] = {}
    for producer in state.producers.values():
        tensor = producer.module._parameters.get(producer.tensor_name)
        for _module, fqn, name in state.holders.get(id(tensor), []):
            found.setdefault(f"{fqn}.{name}" if fqn else name, producer)
    found.update({p.tensor_fqn: p for p in state.producers.values()})
    return found


def _never_produced(model: nn.Module, state: Walk, fqn: str) -> str:
    module_fqn, _, name = fqn.rpartition(".")
    module = model.get_submodule(module_fqn)
    called = any(node.op == "call_module" and node.target == module_fqn for node in state.traced.graph.nodes)
    if computed_tensors(module):
        return (f"'{fqn}' cannot be pruned: {type(module).__name__} '{module_fqn}' computes {computed_tensors(module)} "
                "at run time (weight_norm, spectral_norm or another parametrization); remove it before pruning "
                "(torch.nn.utils.parametrize.remove_parametrizations)")
    found = registry.active().registered(module)
    if not called and found is not None and registry.active().call_rule(module) is None:
        kind, base = type(module).__name__, found[0].__name__
        return (f"'{fqn}' is never used as a layer's output channels in forward: {kind} '{module_fqn}' overrides "
                f"{base}.forward, so fusion follows its forward op by op, and there the weight is not a layer's "
                f"weight; if {kind}'s channels map as {base}'s do, say so with "
                f"lightning_prune.register_layer({kind}, {base})")
    if not called:
        return (f"'{fqn}' is never used as a layer's output channels in forward: {type(module).__name__} "
                f"'{module_fqn}' is not called as a module in the traced graph (it is used inside another module or "
                "function that fusion cannot see into)")
    return f"'{fqn}' is not a tensor whose rows fusion prunes (its layer's rule does not produce channels from it)"
