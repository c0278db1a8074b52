"""A pruning plan as a table and as JSON: channel groups, what blocks them and where, what pruning would save.

No anchor tool says *why* a layer is left alone or whether removal is exact; the plan does, before any change.
Sizes at a sparsity level are computed from the plan's bindings (every narrowed tensor dim) with that fraction of
each group's removable classes gone; MACs come from ``torch.utils.flop_counter`` on fake tensors, each layer scaled
by how much of its weight remains.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from lightning_prune.fusion.alike import common_removals, signature
from lightning_prune.fusion.cost import layer_macs, mac_shares, own_tensors

if TYPE_CHECKING:
    from lightning_prune.fusion.plan import PruningPlan


def describe(plan: PruningPlan, sparsity_level: float = 0.5) -> dict[str, Any]:
    """The plan as plain data (see :meth:`PruningPlan.to_dict`)."""
    plan.walk.refresh()
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
            "granularity": group.granularity,
            "channels": int(group.classes.numel()),
            "removable": len(free) if group.members else 0,
            "exact": True,
            "blocked_by": reasons,
        })
    params_before, params_after, scale = _params(plan, root, kept)
    macs = _macs(plan, scale)
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


def _first(plan: PruningPlan, group) -> int:
    order = {id(p): k for k, p in enumerate(plan.walk.producers.values())}
    return min(order[id(p)] for p in group.producers)


def _consumers(plan: PruningPlan, root: torch.Tensor, classes: torch.Tensor) -> list[str]:
    """Layers reading the group's channels (their weight's input dim is narrowed with them)."""
    names = []
    for _node, module, _rule, labels in plan.walk.consumers:
        live = labels[labels >= 0]
        if live.numel() and torch.isin(root[live], classes).any():
            name = next((h[1] for hs in plan.walk.holders.values() for h in hs if h[0] is module), "?")
            if name not in names:
                names.append(name)
    return names


def _params(plan: PruningPlan, root: torch.Tensor, kept: torch.Tensor) -> tuple[int, int, dict[int, float]]:
    """Unique parameter counts before and after; and, per tensor id, the fraction of it that remains."""
    fraction: dict[int, float] = {}
    for (tensor_id, _dim), binding in plan.walk.bindings.items():
        labels = binding.labels
        live = labels >= 0
        remains = (~live | torch.where(live, kept[root[labels.clamp_min(0)]], True)).float().mean().item()
        fraction[tensor_id] = fraction.get(tensor_id, 1.0) * remains
    tensors = {id(t): t for m in plan.model.modules() for t in own_tensors(m)}
    before = sum(t.numel() for t in tensors.values())
    after = sum(round(t.numel() * fraction.get(i, 1.0)) for i, t in tensors.items())
    return before, after, fraction


def _macs(plan: PruningPlan, fraction: dict[int, float]) -> dict[str, int] | None:
    """Dense MACs per layer (:func:`~.cost.layer_macs`), and each layer's share per tensor (:func:`~.cost.mac_shares`)
    scaled by the fraction of that tensor left."""
    counted = layer_macs(plan)
    if counted is None:
        return None
    total, leaves, batch = counted
    modules = dict(plan.model.named_modules())
    after = total - sum(leaves.values())
    for name, macs in leaves.items():
        shares = mac_shares(plan, modules[name]) or [(None, 1.0)]
        after += sum(macs * share * fraction.get(id(tensor), 1.0) for tensor, share in shares)
    return {"dense": total, "pruned": int(after), "batch": batch}
