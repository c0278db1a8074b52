"""``explain()``: the pruning plan of a model, read before anything changes."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_prune.arguments import (
    check_flag,
    check_sparsity,
    config_fqns,
    fqn_filter,
    resolve_tensor,
)
from lightning_prune.errors import PruningConfigError
from lightning_prune.fusion.analysis import analyse
from lightning_prune.fusion.plan import PruningPlan
from lightning_prune.fusion.rules import Rule, rules_scope
from lightning_prune.inputs import as_call
from lightning_prune.sparsifier.budget import check_allocation


def explain(
    model: nn.Module,
    config: list[dict[str, Any]] | None = None,
    *,
    example_inputs: Any = None,
    sparsity_level: float = 0.5,
    allocation: str = "auto",
    exclude_output: bool = True,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    rules: dict[Any, Rule] | None = None,
) -> PruningPlan:
    """Analyse ``model`` as ``prepare()`` would, without touching it, and return the :class:`PruningPlan`.

    ``print(plan)`` shows every channel group: its producers (configured ones starred), granularity (channel,
    group-of-k for heads or GroupNorm groups), channels and how many of them can go, and what blocks the rest with
    the op, module and source line; then parameters and MACs dense and at ``sparsity_level`` (MACs need
    ``example_inputs``: a tensor, a tuple of positional arguments or a dict of keyword arguments for forward).
    ``allocation="uniform_layers"`` sizes the plan as that pruner option prunes: every set alike across layers loses
    as many classes as the most constrained of them. ``plan.to_dict()`` gives the same as JSON-ready data. Unlike
    ``prepare()``, an explicit ``config`` naming a tensor that cannot be pruned exactly is shown as left out (with the
    reason) instead of raising. With ``exclude_output`` (the default, as the callback does) layers whose channels reach
    the output are left out.
    The table and ``to_dict()`` read the live model: take them before pruning it.

    Raises:
        PruningConfigError: a malformed config, an unknown tensor, a bad regex, bad example inputs, a sparsity level
            outside [0, 1), an allocation other than ``"auto"``, ``"uniform"`` or ``"uniform_layers"``.
        UnsupportedPatternError: the model's forward cannot be read (neither torch.fx nor torch.export).
    """
    if not isinstance(model, nn.Module):
        raise PruningConfigError(f"explain() needs an nn.Module, got {type(model).__name__}")
    check_sparsity(sparsity_level, "explain()")
    check_allocation(allocation, None, "explain()")
    check_flag(exclude_output, "exclude_output", "explain()")
    fqns = config_fqns(config) if config is not None else None
    for fqn in fqns or []:
        resolve_tensor(model, fqn)
    with rules_scope(rules):
        plan = analyse(model, fqns, example_inputs=None if example_inputs is None else as_call(example_inputs),
                       exclude_output=exclude_output, select=fqn_filter(include, exclude), strict=False,
                       sparsity_level=sparsity_level)
    plan.allocation = allocation
    return plan
