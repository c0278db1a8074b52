"""Optimizer-state surgery after a shrink: torch-only, for anyone who prunes in the middle of training.

``pruner.prune()`` replaces the narrowed parameters with new tensors and records where each came from in
``pruner.lineage``. :func:`carry_optimizer_state` points an optimizer at the new tensors and slices their state
(momentum, Adam's moments) to the kept channels, so training goes on as if the pruned channels had never existed.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch


def carry_optimizer_state(optimizer: torch.optim.Optimizer, lineage: list, model_order: list[torch.Tensor]) -> None:
    """Point ``optimizer`` at the narrowed parameters, slicing each one's state (momentum, Adam moments) to match.

    Args:
        optimizer: any ``torch.optim.Optimizer`` built over the model before ``prune()``.
        lineage: ``pruner.lineage`` after ``prune()``: (new tensor, id of the old one, {dim: kept indices}).
        model_order: ``list(model.parameters())`` after ``prune()``. Each group's parameters are put in this order,
            as a freshly built optimizer over the narrowed model would list them, so a checkpoint written now resumes
            into one.

    A state tensor that cannot be sliced to the new shape is dropped (the optimizer re-initialises it); scalars such
    as Adam's ``step`` are kept. LR schedulers hold the optimizer, not its parameters, so they keep working.
    """
    replaced = {old_id: (new, index) for new, old_id, index in lineage}
    position = {id(p): i for i, p in enumerate(model_order)}
    state = {}
    for group in optimizer.param_groups:
        params = []
        for param in group["params"]:
            new, index = replaced.get(id(param), (param, {}))
            params.append(new)
            if param in optimizer.state:
                carried = {key: _slice_like(value, param, new, index) for key, value in optimizer.state[param].items()}
                if all(v is not None for v in carried.values()):
                    state[new] = carried
        group["params"] = sorted(params, key=lambda p: position.get(id(p), len(position)))
    optimizer.state = defaultdict(dict, state)


def _slice_like(value: Any, old: torch.Tensor, new: torch.Tensor, index: dict[int, torch.Tensor]) -> Any:
    if not isinstance(value, torch.Tensor) or value.shape != old.shape:
        return value  # scalars such as Adam's step
    for dim, kept in index.items():
        value = value.index_select(dim, kept.to(value.device))
    return value.clone() if value.shape == new.shape else None
