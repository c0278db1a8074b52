"""Cost budgets: prune until the model's MACs or parameters are a given fraction of the dense model's.

A :class:`Budget` replaces ``sparsity_level``: instead of every layer losing the same fraction of its channels, the
pruner removes classes of channels (a channel, a head, a GroupNorm group, a residual-stream channel) until the cost
fits. Costs come from :class:`~lightning_prune.fusion.cost.CostModel`, exact for the layers it counts.

``allocation="global"`` ranks classes across all coupled sets by score per unit of cost saved, the cheapest first (a
greedy knapsack, as HALP does with Taylor importance and latency: Shen et al., "Structural Pruning via Latency-Saliency
Knapsack", NeurIPS 2022), re-measuring the exact cost after each pass, then putting back the most valuable removals
that still fit and, when only coarse classes (heads) were left to remove and the cost fell more than 1% below the
budget, trading one back for smaller ones. Scores in loss units (Taylor's) are
compared as they are. Other scores (norms, distances, activations) mean nothing across layers, so each set's are first
divided by their mean over its kept, removable classes (Torch-Pruning's "mean" normaliser): every set then averages 1,
and the cost decides more. ``allocation="uniform"`` removes the same fraction of every set's classes, the smallest
fraction that fits (found by bisection), then puts back what still fits as above. ``allocation="uniform_layers"`` does
the same with the sets that are alike across layers (:mod:`lightning_prune.fusion.alike`: every layer's heads, every
layer's FFN) held at one width and put back together, so every layer of a stack stays alike (for a Hugging Face config
that plain ``from_pretrained``, vLLM and TGI load). Global and uniform allocations then swap single removals
while that lands closer below the budget (to the resolution of the cheapest class), and on a ramp each step removes
only classes that the final budget's plan (made at that step) removes, so the small classes are not spent before the
last step. ``allocation="auto"`` (the default)
is global for scores in loss units and uniform for the others: in ``benchmarks/study.py`` (see benchmarks/RESULTS.md)
global ranking of normalised norms, distances and activations cost 2-16 points of accuracy on the CNNs at a quarter of
the MACs and 10-13 on the ViT at half, while global Taylor was the best or level.

Minimum widths: every configured layer keeps at least ``min_channels`` channels (and always one), and with
``multiple_of`` a width that is a multiple of it (or its full width). Classes removed earlier stay removed, so a budget
ramped by a schedule only ever adds to the pruned set.
"""

from __future__ import annotations

import functools
import heapq
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from lightning_prune.errors import PruningConfigError
from lightning_prune.fusion.alike import families, signature
from lightning_prune.fusion.cost import CostModel
from lightning_prune.sparsifier.classes import ClassSet

ALLOCATIONS = ("auto", "global", "uniform", "uniform_layers")
#: how far below the budget (a fraction of the dense cost) a removal may overshoot before smaller ones are tried
TOLERANCE = 0.01


@dataclass(frozen=True)
class Budget:
    """A cost target, checked on construction.

    Args:
        macs: the pruned model's MACs as a fraction of the dense model's, in (0, 1] (needs example inputs).
        params: the same for parameters. Give exactly one of ``macs`` and ``params``.
        min_channels: the fewest channels a configured layer keeps, an int >= 1.
        multiple_of: keep each layer's width a multiple of this (e.g. 8 for tensor cores), an int >= 1.
        allocation: ``"auto"``, ``"global"``, ``"uniform"`` or ``"uniform_layers"`` (see the module docstring).

    Raises:
        PruningConfigError: neither or both of ``macs``/``params``, a fraction outside (0, 1], a bad width floor or
            multiple, an unknown allocation.
    """

    macs: float | None = None
    params: float | None = None
    min_channels: int = 1
    multiple_of: int = 1
    allocation: str = "auto"

    def __post_init__(self) -> None:
        given = {k: v for k, v in (("macs", self.macs), ("params", self.params)) if v is not None}
        if len(given) != 1:
            raise PruningConfigError(f"a budget needs exactly one of 'macs' or 'params' (e.g. target={{'macs': 0.5}} "
                                     f"for half the dense MACs), got {sorted(given) or 'neither'}")
        (metric, ratio), = given.items()
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio <= 1:
            raise PruningConfigError(f"budget {metric}={ratio!r} must be a fraction of the dense model's {metric} in "
                                     "(0, 1], e.g. 0.5 for half")
        for name in ("min_channels", "multiple_of"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PruningConfigError(f"budget {name} must be an int >= 1, got {value!r}")
        if self.allocation not in ALLOCATIONS:
            raise PruningConfigError(f"budget allocation must be one of {list(ALLOCATIONS)}, got {self.allocation!r}")

    @property
    def metric(self) -> str:
        return "macs" if self.macs is not None else "params"

    @property
    def ratio(self) -> float:
        return float(self.macs if self.macs is not None else self.params)

    @classmethod
    def parse(cls, target: Any) -> Budget:
        """A :class:`Budget` from itself or a mapping such as ``{"macs": 0.5, "multiple_of": 8}``.

        Raises:
            PruningConfigError: not a mapping, an unknown key (the error lists the valid ones), or a bad value.
        """
        if isinstance(target, Budget):
            return target
        if not isinstance(target, Mapping):
            raise PruningConfigError(f"target must be a dict such as {{'macs': 0.5}} or a Budget, got {target!r}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(target) - set(known))
        if unknown:
            raise PruningConfigError(f"unknown budget key(s) {unknown}; a target takes {known}")
        return cls(**dict(target))


def check_allocation(allocation: Any, budget: Budget | None, where: str) -> None:
    """Raise unless a pruner's ``allocation`` hyper-parameter (None: not given) is one of :data:`ALLOCATIONS`, and
    ``"global"`` only under a budget (with ``sparsity_level`` every set removes its own fraction)."""
    if allocation is None:
        return
    if allocation not in ALLOCATIONS:
        raise PruningConfigError(f"{where}: allocation must be one of {list(ALLOCATIONS)}, got {allocation!r}")
    if allocation == "global" and budget is None:
        raise PruningConfigError(f"{where}: allocation='global' ranks classes across layers under a cost budget; give "
                                 "a target (e.g. target={'macs': 0.5}), or 'uniform_layers' / 'uniform' with "
                                 "sparsity_level")


def with_allocation(budget: Budget, allocation: str | None) -> Budget:
    """``budget`` with a pruner's ``allocation`` where the budget names none (``"auto"``).

    Raises:
        PruningConfigError: the two name different allocations, or ``allocation`` is unknown.
    """
    if allocation is None or allocation == budget.allocation:
        return budget
    if budget.allocation != "auto":
        raise PruningConfigError(f"the pruner's allocation={allocation!r} contradicts the target's "
                                 f"allocation={budget.allocation!r}: give it in one place")
    return replace(budget, allocation=allocation)


@dataclass
class _Set:
    """One coupled set as the allocator sees it: classes in removal order and the widths it may take."""

    cs: ClassSet
    scores: torch.Tensor  # normalised, one per class of cs
    order: torch.Tensor  # positions in cs.classes of the removable kept classes, lowest score first
    widths: list[int]  # allowed widths in classes, from the current one down


def allocate(sets: list[tuple[ClassSet, torch.Tensor]], cost: CostModel, budget: Budget, kept: torch.Tensor,
             ratio: float, normalise: bool = True) -> float:
    """Remove classes from ``kept`` (a bool per channel id, at class roots; changed in place) until the cost is at
    most ``ratio`` of dense, and return the cost reached. ``sets`` pair each coupled set with its class scores
    (removed classes -inf, blocked +inf); ``normalise=False`` ranks them as they are (scores in the same units
    everywhere). Returns more than the target only where the width floors forbid it.

    On a ramp (``ratio`` above the budget's), each step removes only classes that the budget's own allocation,
    planned now, would remove: otherwise early steps could spend the small classes (MLP widths, the cheap channels of
    a late conv) and leave the last step only coarse ones (heads, costly channels), landing well below the budget.

    At the budget itself (no ramp, or its last step) both allocations end with :func:`_exchange`, so the cost lands
    as close below the budget as single swaps of classes allow. The steps of a ramp and their plans skip it: swaps
    made for precision at every step would add up, drifting a uniform allocation away from uniform."""
    views = [_view(cs, scores, budget, normalise) for cs, scores in sets]
    final = ratio <= budget.ratio
    if budget.allocation == "uniform_layers":
        # alike sets keep one width, so single-set swaps (tighten, exchange) would break them apart
        alike = families([signature((m.tensor_fqn for m in v.cs.members), v.cs.classes.numel()) for v in views])
        spend = functools.partial(_uniform, units=alike, precise=False)
    elif budget.allocation == "uniform" or budget.allocation == "auto" and normalise:
        spend = functools.partial(_uniform, units=[[i] for i in range(len(views))], precise=True)
    else:
        spend = _spend
    if not final:
        plan_steps = spend(views, cost, kept.clone(), budget.ratio * cost.dense, False)
        for view, taken in zip(views, plan_steps, strict=True):
            del view.widths[taken + 1:]
    spend(views, cost, kept, ratio * cost.dense, final)
    return cost.total(kept)


def _spend(views: list[_Set], cost: CostModel, kept: torch.Tensor, target: float, exchange: bool) -> list[int]:
    """Global allocation into ``kept``; returns how many of each view's widths it took."""
    steps = [0] * len(views)
    touched: set[int] = set()
    total = _global(views, cost, kept, target, steps, touched)
    total = _tighten(views, cost, kept, target, total, steps, touched)
    if exchange:
        _exchange(views, cost, kept, target, total, steps, touched)
    return steps


def _view(cs: ClassSet, scores: torch.Tensor, budget: Budget, normalise: bool) -> _Set:
    movable = cs.kept & cs.free
    base = scores[movable].abs().mean() if movable.any() and normalise else torch.tensor(1.0)
    normalised = torch.where(movable, scores / base.clamp_min(torch.finfo(torch.float32).tiny), scores)
    order = movable.nonzero().flatten()
    order = order[normalised[order].argsort(stable=True)]
    pairs = torch.unique(torch.stack([cs.members[0].labels, cs.index[0]]), dim=1)
    per_class = int(torch.bincount(pairs[1]).max())  # channels per class (a head, a GroupNorm group)
    total, current = cs.classes.numel(), int(cs.kept.sum())
    lowest = max(current - order.numel(), math.ceil(max(1, budget.min_channels) / per_class))
    widths = [w for w in range(current, -1, -1)
              if w == current or (w >= lowest and (w * per_class) % budget.multiple_of == 0)]
    return _Set(cs, normalised, order, widths if total else [])


def _remove(view: _Set, kept: torch.Tensor, start: int, stop: int, value: bool = False) -> None:
    kept[view.cs.classes[view.order[start:stop]]] = value


def _global(views: list[_Set], cost: CostModel, kept: torch.Tensor, target: float, steps: list[int],
            touched: set[int], frozen: int | None = None) -> float:
    """Greedy removals (never from view ``frozen``) until the cost fits, then the refill; ``steps`` and ``touched``
    are updated in place."""
    total = cost.total(kept)
    slack = TOLERANCE * cost.dense
    while total > target:
        savings = cost.savings(kept)
        heap = [(_unit_ratio(v, steps[i], savings), i) for i, v in enumerate(views)
                if steps[i] + 1 < len(v.widths) and i != frozen]
        heapq.heapify(heap)
        need, gained, deferred = total - target, 0.0, []
        while heap and gained < need:
            ratio, i = heapq.heappop(heap)
            saved = _unit_saving(views[i], steps[i], savings)
            if saved > need - gained + slack:  # would overshoot: try the smaller removals first
                deferred.append((saved, i))
                continue
            gained += saved
            _take(views[i], steps, i, kept, touched)
            if steps[i] + 1 < len(views[i].widths):
                heapq.heappush(heap, (_unit_ratio(views[i], steps[i], savings), i))
        if gained < need and deferred:  # only large removals are left: the one that overshoots least
            saved, i = min(deferred)
            gained += saved
            _take(views[i], steps, i, kept, touched)
        if not gained:
            break  # nothing left to remove: the floors bind
        total = cost.total(kept)
    return _refill(views, cost, kept, target, total, steps, [[i] for i in touched])


def _take(view: _Set, steps: list[int], i: int, kept: torch.Tensor, touched: set[int]) -> None:
    _remove(view, kept, *_span(view, steps[i]))
    steps[i] += 1
    touched.add(i)


def _unit_saving(view: _Set, step: int, savings: torch.Tensor) -> float:
    start, stop = _span(view, step)
    return float(savings[view.cs.classes[view.order[start:stop]]].sum())


def _unit_ratio(view: _Set, step: int, savings: torch.Tensor) -> float:
    """Normalised score lost per unit of cost saved by the view's next removal."""
    start, stop = _span(view, step)
    saved = _unit_saving(view, step, savings)
    return float(view.scores[view.order[start:stop]].sum()) / saved if saved > 0 else math.inf


def _tighten(views: list[_Set], cost: CostModel, kept: torch.Tensor, target: float, total: float,
             steps: list[int], touched: set[int]) -> float:
    """When the cost fell below the target by more than the cheapest removal left would save, or by more than
    TOLERANCE (only coarse removals were left: heads): put back one view's last removal and take smaller ones
    elsewhere instead, keeping whichever lands closest below it."""
    resolution = _cheapest(views, steps, cost.savings(kept))
    if resolution is None or target - total <= min(resolution, TOLERANCE * cost.dense):
        return total
    best = None
    for i in sorted(touched):
        if steps[i] == 0:
            continue
        trial, trial_steps, trial_touched = kept.clone(), list(steps), set(touched)
        view = views[i]
        _remove(view, trial, *_span(view, steps[i] - 1), True)
        trial_steps[i] -= 1
        reached = _global(views, cost, trial, target, trial_steps, trial_touched, frozen=i)
        if total < reached <= target and (best is None or reached > best[0]):
            best = (reached, trial, trial_steps, trial_touched)
    if best is None:
        return total
    kept.copy_(best[1])
    steps[:] = best[2]
    touched.update(best[3])
    return best[0]


def _refill(views: list[_Set], cost: CostModel, kept: torch.Tensor, target: float, total: float,
            steps: list[int], units: list[list[int]]) -> float:
    """Put back the last removal of each unit's views (together) while the cost still fits, the most valuable per
    unit of cost first."""
    while True:
        best = None
        for unit in units:
            if any(steps[i] == 0 for i in unit):
                continue
            for i in unit:
                _remove(views[i], kept, *_span(views[i], steps[i] - 1), True)
            restored = cost.total(kept)
            for i in unit:
                _remove(views[i], kept, *_span(views[i], steps[i] - 1))
            if restored <= target:
                score = sum(float(views[i].scores[views[i].order[slice(*_span(views[i], steps[i] - 1))]].sum())
                            for i in unit)
                value = score / max(restored - total, 1e-12)
                if best is None or value > best[0]:
                    best = (value, unit, restored)
        if best is None:
            return total
        _, unit, total = best
        for i in unit:
            _remove(views[i], kept, *_span(views[i], steps[i] - 1), True)
            steps[i] -= 1


def _uniform(views: list[_Set], cost: CostModel, kept: torch.Tensor, target: float, exchange: bool, *,
             units: list[list[int]], precise: bool) -> list[int]:
    """The smallest common fraction of each view's classes whose removal fits the target, then the refill (and with
    ``exchange`` and ``precise``, :func:`_tighten` and :func:`_exchange`); the views of a unit keep one width (the
    widest any of them takes) and are put back together. Returns how many of each view's widths it took."""
    original = kept.clone()
    steps = [0] * len(views)

    def apply(fraction: float) -> float:
        kept.copy_(original)
        for unit in units:
            wanted = max(views[i].cs.classes.numel() - int(views[i].cs.free.sum() * fraction) for i in unit)
            for i in unit:
                view = views[i]
                width = max([w for w in view.widths if w <= wanted] or view.widths[-1:])
                steps[i] = view.widths.index(width)
                _remove(view, kept, 0, view.widths[0] - width)
        return cost.total(kept)

    low, high = 0.0, 1.0
    if apply(high) > target:
        return steps
    for _ in range(30):
        middle = (low + high) / 2
        if apply(middle) <= target:
            high = middle
        else:
            low = middle
    total = apply(high)
    total = _refill(views, cost, kept, target, total, steps, [u for u in units if any(steps[i] for i in u)])
    touched = {i for i, step in enumerate(steps) if step}
    if exchange and precise:
        total = _tighten(views, cost, kept, target, total, steps, touched)
        _exchange(views, cost, kept, target, total, steps, touched)
    return steps


def _exchange(views: list[_Set], cost: CostModel, kept: torch.Tensor, target: float, total: float,
              steps: list[int], touched: set[int]) -> float:
    """Close the gap below the target to the resolution of the cheapest class: put back one view's last removal of
    this allocation (the most valuable of its removals) and take another view's next one instead (its least valuable
    class), or nothing, the swap landing closest below the target first, while one lands closer. Candidates are
    estimated from the exact single-removal savings and checked with the exact cost before one is kept."""
    for _ in range(len(views) + 1):  # each swap raises the cost; bounded so huge plans stay cheap
        candidates = []
        for i in sorted(touched):
            if steps[i] == 0:
                continue
            back = _span(views[i], steps[i] - 1)
            _remove(views[i], kept, *back, True)
            restored, savings = cost.total(kept), cost.savings(kept)
            _remove(views[i], kept, *back)
            candidates.append((restored, i, None))
            candidates += [(restored - _unit_saving(view, steps[j], savings), i, j) for j, view in enumerate(views)
                           if j != i and steps[j] + 1 < len(view.widths)]
        for _estimate, i, j in sorted((c for c in candidates if total < c[0] <= target), reverse=True,
                                      key=lambda c: c[0]):
            trial, trial_steps = kept.clone(), list(steps)
            _remove(views[i], trial, *_span(views[i], steps[i] - 1), True)
            trial_steps[i] -= 1
            if j is not None:
                _remove(views[j], trial, *_span(views[j], steps[j]))
                trial_steps[j] += 1
            reached = cost.total(trial)
            if total < reached <= target:
                kept.copy_(trial)
                steps[:] = trial_steps
                touched.update(() if j is None else (j,))
                total = reached
                break
        else:
            return total
    return total


def _cheapest(views: list[_Set], steps: list[int], savings: torch.Tensor) -> float | None:
    """What the cheapest next removal of any view would save (None when the floors allow none)."""
    found = [_unit_saving(view, steps[j], savings) for j, view in enumerate(views) if steps[j] + 1 < len(view.widths)]
    return min(found) if found else None


def _span(view: _Set, step: int) -> tuple[int, int]:
    """The positions in ``view.order`` that its removal number ``step`` (from ``widths[step]`` to the next) takes."""
    return view.widths[0] - view.widths[step], view.widths[0] - view.widths[step + 1]


def smallest_removal(sets: list[tuple[ClassSet, torch.Tensor]], cost: CostModel, budget: Budget,
                     kept: torch.Tensor) -> float | None:
    """The cost the cheapest further removal would save from ``kept`` (one class, or a ``multiple_of`` step),
    within the width floors: the resolution a budget can be met to. None when nothing more can go."""
    views = [_view(replace(cs, kept=kept[cs.classes]), scores, budget, False) for cs, scores in sets]
    return _cheapest(views, [0] * len(views), cost.savings(kept))
