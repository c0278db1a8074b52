"""A pruning plan as a table and as JSON: channel groups, what blocks them and where, what pruning would save.

No anchor tool says *why* a layer is left alone or whether removal is exact; the plan does, before any change.
Sizes at a sparsity level are the plan's cost models (:class:`~.cost.CostModel`: params, and MACs counted once by
``torch.utils.flop_counter`` on fake tensors) evaluated with that fraction of each group's removable classes gone.

``plan`` is a :class:`~.plan.PruningPlan` (this module sits below it: its ``to_dict`` and ``table`` call these).
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_prune.fusion.alike import common_removals, signature
from lightning_prune.fusion.cost import CostModel
from lightning_prune.fusion.rules.norms import StreamNormRule


def describe(plan, sparsity_level: float = 0.5) -> dict[str, Any]:
    """The plan as plain data (see :meth:`PruningPlan.to_dict`)."""
    root = plan.groups.solve()
    kept = torch.ones(plan.groups.size, dtype=torch.bool)
    rows = []
    groups = sorted(plan.channel_groups(), key=lambda g: _first(plan, g))
    frees = [[c for c in group.classes.tolist() if c not in group.blocked] for group in groups]
    counts = [int(len(free) * sparsity_level) if g.members else 0 for g, free in zip(groups, frees, strict=True)]
    if plan.allocation == "uniform_layers":
        counts = common_removals(counts, [signature((m.tensor_fqn for m in g.members), g.classes.numel())
                                          for g in groups])
    for number, (group, free, count) in enumerate(zip(groups, frees, counts, strict=True)):
        for c in free[:count]:
            kept[c] = False
        configured = {m.tensor_fqn for m in group.members}
        reasons = list(dict.fromkeys(r for rs in group.blocked.values() for r in rs
                                     if not r.startswith("its channels are tied to")))
        rows.append({
            "group": number,
            "producers": [p.tensor_fqn for p in group.producers],
            "configured": sorted(configured),
            "consumers": _consumers(plan, root, group.classes),
            "norms": _norms(plan, root, group.classes),
            "granularity": group.granularity,
            "channels": int(group.classes.numel()),
            "removable": len(free) if group.members else 0,
            "exact": True,
            "blocked_by": reasons,
        })
    params_before, params_after = _sizes(plan.cost("params"), kept)
    macs = None
    if plan.example_inputs is not None:
        cost = plan.cost("macs")
        dense, pruned = _sizes(cost, kept)
        macs = {"dense": dense, "pruned": pruned, "batch": cost.batch}
    traced = plan.walk.traced
    return {
        "front_end": traced.front_end,
        "shapes": traced.shapes,
        "sparsity_level": sparsity_level,
        "allocation": plan.allocation,
        "groups": rows,
        "left_out": dict(plan.dropped),
        "retained": dict(plan.retained),
        "params": {"dense": params_before, "pruned": params_after},
        "macs": macs,
    }


def format_table(data: dict[str, Any]) -> str:
    """A fixed-width table of :func:`describe`'s data."""
    source = f"{data['front_end']}, {'shapes from example inputs' if data['shapes'] else 'no shapes'}"
    allocation = "" if data["allocation"] == "auto" else f", {data['allocation']}"
    lines = [f"Pruning plan ({source}; sizes at sparsity {data['sparsity_level']}{allocation})",
             f"{'group':>5}  {'channels':>8}  {'removable':>9}  {'granularity':<14} {'producers (* configured)':<44}"
             " blocked by"]
    for row in data["groups"]:
        names = ", ".join(f"{p}{'*' if p in row['configured'] else ''}" for p in row["producers"])
        names = names if len(names) <= 44 else names[:41] + "..."
        blocked = _short(row["blocked_by"][0]) + (f" (+{len(row['blocked_by']) - 1})" if len(row["blocked_by"]) > 1
                                                  else "") if row["blocked_by"] else "-"
        lines.append(f"{row['group']:>5}  {row['channels']:>8}  {row['removable']:>9}  {row['granularity']:<14} "
                     f"{names:<44} {blocked}")
    params = data["params"]
    ratio = params["pruned"] / max(params["dense"], 1)
    lines.append(f"params {params['dense']:,} -> {params['pruned']:,} ({ratio:.2f})")
    macs = data["macs"]
    if macs is None:
        lines.append("MACs   n/a (pass example_inputs to count them)")
    else:
        lines.append(f"MACs   {macs['dense']:,} -> {macs['pruned']:,} ({macs['pruned'] / max(macs['dense'], 1):.2f}) "
                     f"for the example inputs (batch {macs['batch']})")
    for fqn, reason in data["left_out"].items():
        lines.append(f"left out {fqn}: {_short(reason)}")
    for fqn, reason in data["retained"].items():
        lines.append(f"kept (zeroed) {fqn}: {_short(reason)}")
    return "\n".join(lines)


def _short(reason: str, limit: int = 110) -> str:
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


def _first(plan, group) -> int:
    order = {id(p): k for k, p in enumerate(plan.walk.producers.values())}
    return min(order[id(p)] for p in group.producers)


def _consumers(plan, root: torch.Tensor, classes: torch.Tensor) -> list[str]:
    """Layers reading the group's channels (their weight's input dim is narrowed with them)."""
    names = []
    for _node, module, _rule, labels in plan.walk.consumers:
        live = labels[labels >= 0]
        if live.numel() and torch.isin(root[live], classes).any():
            name = next((h[1] for hs in plan.walk.holders.values() for h in hs if h[0] is module), "?")
            if name not in names:
                names.append(name)
    return names


def _norms(plan, root: torch.Tensor, classes: torch.Tensor) -> list[str]:
    """Norms whose statistics span the group's channels (a residual stream's RMSNorms and LayerNorms)."""
    names = []
    for module, rule, labels in plan.walk.actions:
        if not isinstance(rule, StreamNormRule):
            continue
        live = labels[labels >= 0]
        if live.numel() and torch.isin(root[live], classes).any():
            name = next((fqn for fqn, m in plan.model.named_modules() if m is module), "?")
            if name not in names:
                names.append(name)
    return names


def _sizes(cost: CostModel, kept: torch.Tensor) -> tuple[int, int]:
    """Dense and pruned counts of a cost model, with the classes in ``kept``."""
    return int(cost.dense), int(round(cost.total(kept)))
