"""Pruners that score channels, so coupled tensors can be decided together."""

from __future__ import annotations

import abc
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_prune.errors import PrunerStateError, PruningConfigError
from lightning_prune.fusion.alike import common_removals, signature
from lightning_prune.fusion.cost import CostModel
from lightning_prune.fusion.plan import Member, PruningPlan
from lightning_prune.fusion.rules import Rule
from lightning_prune.sparsifier.base import BaseStructuredSparsifier
from lightning_prune.sparsifier.budget import Budget, allocate, check_allocation, smallest_removal, with_allocation
from lightning_prune.sparsifier.classes import ClassSet, class_set, class_structure


class ScoringPruner(BaseStructuredSparsifier):
    """Prunes the lowest-scoring channels. Tensors whose channels are coupled (a residual stream, a depthwise block,
    an LSTM layer's two weights) get one combined score, so the same channels go in every member.

    Channels pruned earlier score lowest, so a rising schedule only ever adds to the pruned set.

    Args:
        defaults: the seed's dict of hyper-parameters (``{"sparsity_level": 0.5}``); the keywords win over it.
        sparsity_level: the fraction of each coupled set's classes to prune, in [0, 1). ``None``: the ``defaults``
            dict's, else 0.5.
        prune_bias: also mask and remove the bias and the per-channel affine after each pruned channel. ``None``:
            the ``defaults`` dict's, else True.
        target: a cost budget instead of ``sparsity_level``: a :class:`~lightning_prune.sparsifier.budget.Budget` or
            a dict such as ``{"macs": 0.5}`` (half the dense MACs; needs ``example_inputs`` at prepare) or
            ``{"params": 0.25, "multiple_of": 8}``. Classes are then ranked across coupled sets (see
            :mod:`~lightning_prune.sparsifier.budget`). The groups' ``sparsity_level`` becomes the fraction of the
            dense cost to remove, ``1 - target``, so a schedule ramps the budget as it ramps a sparsity.
        allocation: ``"uniform_layers"`` keeps every layer of a stack alike (the same heads, key/value heads and FFN
            width in each: :mod:`~lightning_prune.fusion.alike`), with ``sparsity_level`` (each family of alike sets
            removes as many classes as its most constrained set can) or a ``target`` (its allocation when the target
            names none); ``"auto"``/``"uniform"`` are the default per-set decisions, ``"global"`` needs a target.
        rules: fusion rules for this pruner only, as for :class:`BaseStructuredSparsifier`.

    Raises:
        PruningConfigError: a bad ``target`` (unknown key, fraction outside (0, 1]), or both ``target`` and
            ``sparsity_level``, an unknown ``allocation`` or one the target contradicts; at prepare, a MACs budget
            without example inputs, a config entry with its own ``allocation`` (or ``sparsity_level`` under a budget),
            or a budget the width floors cannot reach.
    """

    hyperparameters = frozenset({"sparsity_level", "prune_bias", "allocation"})
    pruner_wide = frozenset({"allocation"})
    #: whether a row's score depends on the other rows (FPGM's distances do; a norm does not)
    rows_interact = False
    #: whether scores are in the same units in every layer (Taylor's are loss changes), so a class sums its members'
    #: scores as they are and a budget ranks classes across layers without normalising them; otherwise (norms,
    #: distances, activation magnitudes) each member, and each coupled set under a budget, is scaled to mean 1
    comparable_scores = False

    @abc.abstractmethod
    def row_scores(self, weight: torch.Tensor) -> torch.Tensor:
        """One importance score per row of ``weight`` (higher is kept)."""

    def __init__(self, defaults: dict[str, Any] | None = None, *, sparsity_level: float | None = None,
                 prune_bias: bool | None = None, target: Budget | Mapping[str, Any] | None = None,
                 allocation: str | None = None, rules: dict[Any, Rule] | None = None, **kwargs: Any):
        if allocation is not None:
            kwargs["allocation"] = allocation
        budget = None if target is None else Budget.parse(target)
        if budget is not None and (sparsity_level is not None or "sparsity_level" in (defaults or {})):
            raise PruningConfigError(
                f"{type(self).__name__}: give either sparsity_level (the same fraction of every layer) or target "
                f"(a {budget.metric} budget), not both")
        super().__init__(defaults, sparsity_level=sparsity_level, prune_bias=prune_bias, rules=rules, **kwargs)
        self.budget: Budget | None = None
        #: the cost model of the budget and, after each step(), the fraction of the dense cost reached
        self.cost: CostModel | None = None
        self.budget_reached: float | None = None
        #: after each step() under a budget, what the cheapest further removal would save, a fraction of dense
        self.budget_resolution: float | None = None
        if budget is not None:
            self.use_budget(budget)
        check_allocation(self.defaults.get("allocation"), self.budget, type(self).__name__)

    def use_budget(self, target: Any) -> None:
        """Prune to a cost budget (see ``target``) instead of ``sparsity_level``, which becomes ``1 - target``. The
        Lightning callback's ``target`` calls this before ``prepare()``.

        Raises:
            PruningConfigError: a bad target, or the pruner is already prepared.
        """
        if self.model is not None and not self.pruned:
            raise PrunerStateError("use_budget() must come before prepare()")
        self.budget = with_allocation(Budget.parse(target), self.defaults.get("allocation"))
        self.defaults["sparsity_level"] = 1.0 - self.budget.ratio

    def check_plan(self, plan: PruningPlan, groups: list[dict[str, Any]]) -> None:
        budget = self.budget
        own = [g["tensor_fqn"] for g in groups if g.get("allocation") != self.defaults.get("allocation")]
        if own:
            raise PruningConfigError(f"allocation decides across layers, so it is the pruner's: remove it from the "
                                     f"config entries for {own}")
        if budget is None:
            return
        if budget.metric == "macs" and plan.example_inputs is None:
            raise PruningConfigError(
                "target={'macs': ...} counts MACs on example inputs: pass prepare(..., example_inputs=...) (the "
                "Lightning callback takes the LightningModule's example_input_array), or give a 'params' budget")
        own = [g["tensor_fqn"] for g in groups if g["sparsity_level"] != self.defaults["sparsity_level"]]
        if own:
            raise PruningConfigError(f"with a target the budget decides every layer's share: remove "
                                     f"'sparsity_level' from the config entries for {own}")
        self.cost = plan.cost(budget.metric)
        stacked = sorted({m.module_fqn for m in plan.members
                          if isinstance(m.module, nn.LSTM) and m.module.num_layers > 1})
        if stacked and (budget.allocation == "global" or budget.allocation == "auto" and self.comparable_scores):
            warnings.warn(f"{type(self).__name__}: the LSTM(s) {stacked} have several layers and one hidden size, so "
                          "every layer keeps as many units as the widest; a global budget counts each layer's own, "
                          "so it can land above the target. allocation='uniform' removes the same share everywhere.",
                          UserWarning, stacklevel=3)
        kept = torch.ones(plan.groups.size, dtype=torch.bool)
        sets = [(cs, torch.zeros(cs.classes.numel()).masked_fill(~cs.free, float("inf")))
                for cs in (class_set(plan, members) for members in plan.coupled_members())]
        floor = allocate(sets, self.cost, budget, kept, 0.0) / self.cost.dense
        if floor > budget.ratio:
            raise PruningConfigError(
                f"budget {budget.metric}={budget.ratio} cannot be reached: removing every removable channel down to "
                f"min_channels={budget.min_channels} (multiple_of={budget.multiple_of}) leaves {floor:.3f} of the "
                f"dense {budget.metric}; raise the budget, lower the floors, or configure more layers")

    def num_to_prune(self, channels: int, sparsity_level: float) -> int:
        return int(channels * sparsity_level)

    def update_mask(self, module: nn.Module, tensor_name: str, sparsity_level: float, **kwargs: Any) -> None:
        fqn = kwargs.get("tensor_fqn")
        member = next(m for m in self.plan.members if m.tensor_fqn == fqn or fqn is None and m.module is module
                      and m.tensor_name == tensor_name)
        self.decide([member], sparsity_level)

    def update_masks(self) -> None:
        kept_roots = self.plan.kept_classes()  # updated as each coupled set is decided
        if self.budget is not None:
            self.spend_budget(kept_roots)
            return
        sets = [([member for _, member in coupled], max(group["sparsity_level"] for group, _ in coupled))
                for coupled in self.coupled_sets()]
        counts = [None] * len(sets)
        if self.defaults.get("allocation") == "uniform_layers":
            classes = [self.class_set(members) for members, _ in sets]
            alone = [self.num_to_prune(int(cs.free.sum()), level)
                     for cs, (_, level) in zip(classes, sets, strict=True)]
            counts = common_removals(
                alone, [signature((m.tensor_fqn for m in cs.members), cs.classes.numel()) for cs in classes])
        for (members, level), count in zip(sets, counts, strict=True):
            self.decide(members, level, kept_roots, count)

    def spend_budget(self, kept_roots: torch.Tensor | None = None) -> None:
        """Mask classes across all coupled sets until the cost is ``1 - sparsity_level`` of dense (the budget,
        ramped by a schedule); records the fraction reached in :attr:`budget_reached`. ``kept_roots``: the plan's
        kept classes (:meth:`PruningPlan.kept_classes`), when the caller has them."""
        kept_roots = self.plan.kept_classes() if kept_roots is None else kept_roots
        level = max((g["sparsity_level"] for g in self.groups), default=0.0)
        sets = [(cs, self.class_scores(cs, kept_roots))
                for cs in (self.class_set(m) for m in self.plan.coupled_members())]
        kept = kept_roots.clone()
        reached = allocate(sets, self.cost, self.budget, kept, 1.0 - level, normalise=not self.comparable_scores)
        for cs, _ in sets:
            cs.write(kept[cs.classes])
        self.budget_reached = reached / self.cost.dense
        cheapest = smallest_removal(sets, self.cost, self.budget, kept)
        self.budget_resolution = None if cheapest is None else cheapest / self.cost.dense

    def budget_landing(self) -> dict[str, Any] | None:
        """Where the last ``step()`` landed under the budget, in plain types: ``{"metric", "budget", "reached",
        "resolution"}``, fractions of the dense cost (``resolution``: what the cheapest further removal would save;
        None when the width floors allow none). None without a budget or before the first step."""
        if self.budget is None or self.budget_reached is None:
            return None
        return {"metric": self.budget.metric, "budget": self.budget.ratio, "reached": self.budget_reached,
                "resolution": self.budget_resolution}

    def class_set(self, members: list[Member]) -> ClassSet:
        """The classes of ``members``' rows, which of them the masks keep, and which nothing blocks (the classes are
        cached: the plan does not change between steps)."""
        key = tuple(m.tensor_fqn for m in members)
        cache = self.__dict__.setdefault("_class_cache", {})
        if key not in cache or cache[key][0] is not self.plan:
            cache[key] = (self.plan, class_structure(self.plan, members))
        return class_set(self.plan, members, cache[key][1])

    def class_scores(self, cs: ClassSet, kept_roots: torch.Tensor | None = None) -> torch.Tensor:
        """One score per class of ``cs``: removed classes score -inf (they go first), blocked ones +inf
        (``kept_roots``: as for :meth:`member_row_scores`)."""
        scores = self.channel_scores(cs.members, cs.index, cs.kept, cs.classes.numel(), kept_roots)
        return scores.masked_fill(~cs.kept, float("-inf")).masked_fill(~cs.free, float("inf"))

    def decide(self, members: list[Member], sparsity_level: float, kept_roots: torch.Tensor | None = None,
               count: int | None = None) -> None:
        """Mask the ``sparsity_level`` lowest-scoring classes of channels in every member (``count`` of them, when
        given: the number ``allocation="uniform_layers"`` agreed on for sets alike across layers).

        The classes are those of the members' rows (a channel, or a head, or a GroupNorm group: whatever the
        analysis found must go together); classes that cannot be removed are never counted or chosen.
        ``kept_roots`` (a bool per class root, as :meth:`PruningPlan.kept_classes`), when given, is updated with
        the decision, so the coupled sets decided after this one see it.
        """
        cs = self.class_set(members)
        scores = self.class_scores(cs, kept_roots)
        free = int(cs.free.sum())
        k = min(max(self.num_to_prune(free, sparsity_level) if count is None else count, 0), free)
        keep = torch.ones(cs.classes.numel(), dtype=torch.bool)
        keep[scores.topk(k, largest=False).indices] = False
        cs.write(keep)
        if kept_roots is not None:
            kept_roots[cs.classes] = keep | ~cs.free

    def channel_scores(self, members: list[Member], index: list[torch.Tensor], kept: torch.Tensor,
                       count: int, kept_roots: torch.Tensor | None = None) -> torch.Tensor:
        """Each class's score: the sum over members of the scores of its rows (:meth:`member_row_scores`), each
        member scaled to mean 1 over its kept classes so layers of different magnitude weigh the same (unless
        :attr:`comparable_scores`)."""
        total = torch.zeros(count)
        for member, idx in zip(members, index, strict=True):
            row_scores = self.member_row_scores(member, kept[idx], kept_roots)
            scores = torch.zeros(count).index_add_(0, idx, row_scores.float().cpu())
            if self.comparable_scores:
                total += scores
                continue
            touched = torch.zeros(count, dtype=torch.bool)
            touched[idx] = True
            base = scores[touched & kept] if (touched & kept).any() else scores[touched]
            total += scores / base.abs().mean().clamp_min(torch.finfo(scores.dtype).tiny)
        return total

    def member_row_scores(self, member: Member, alive: torch.Tensor,
                          kept_roots: torch.Tensor | None = None) -> torch.Tensor:
        """One score per row of ``member`` (``alive``: whether each row's class is kept). Weight-based: the
        :meth:`row_scores` of the raw weight, without the input columns fed only by removed channels (those whose
        class ``kept_roots`` does not keep; default: the plan's :meth:`PruningPlan.kept_classes`)."""
        plan = self.plan
        kept_classes = plan.kept_classes() if kept_roots is None else kept_roots
        # the raw weight: masked rows differ from the masked weight, but they score -inf anyway
        weight = plan.tensor(member.module, member.tensor_name).detach().movedim(member.dim, 0)
        columns = plan.input_classes(member.module, member.tensor_name, member.dim)
        if columns is not None and weight.dim() > 1 and columns.numel() == weight.shape[1]:
            live = (columns < 0) | kept_classes[columns.clamp_min(0)]
            if not live.all():
                weight = weight.index_select(1, live.nonzero().flatten().to(weight.device))
        if self.rows_interact and not alive.all():  # keep removed rows out of the living rows' comparison
            rows = alive.nonzero().flatten().to(weight.device)
            row_scores = torch.zeros(weight.shape[0], device=weight.device)
            row_scores[rows] = self.row_scores(weight.index_select(0, rows)).float()
            return row_scores
        return self.row_scores(weight)
