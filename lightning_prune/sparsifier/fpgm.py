"""FPGM: Filter Pruning via Geometric Median (He et al., 2019, https://arxiv.org/abs/1811.00250)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from lightning_prune.errors import PruningConfigError
from lightning_prune.fusion.rules import Rule
from lightning_prune.sparsifier.budget import Budget
from lightning_prune.sparsifier.scoring import ScoringPruner


class FPGMPruner(ScoringPruner):
    """Prunes the filters closest to the geometric median of their layer: the most replaceable ones, not the smallest.

    Args:
        sparsity_level: fraction of channels to prune, in [0, 1); default 0.5 (or give ``target``, a budget). The
            first positional argument, as in torch.ao's FPGMPruner.
        dist: 1 or 2 for the L1/L2 distance between flattened filters, or a callable mapping an (N, D) matrix to an
            (N, N) distance matrix. Default: 2.
        prune_bias, target, allocation, rules, defaults: as for every :class:`ScoringPruner`.
    """

    rows_interact = True

    def __init__(self, sparsity_level: float | None = None, dist: int | Callable | None = None, *,
                 prune_bias: bool | None = None, target: Budget | Mapping[str, Any] | None = None,
                 allocation: str | None = None, rules: dict[Any, Rule] | None = None,
                 defaults: dict[str, Any] | None = None, **kwargs: Any):
        if dist is None:
            dist = 2
        if callable(dist):
            self.dist_fn = dist
        elif dist in (1, 2):
            p = float(dist)
            self.dist_fn = lambda x: torch.cdist(x, x, p=p)
        else:
            raise PruningConfigError(f"FPGMPruner dist must be 1, 2 or a callable, got {dist!r}")
        super().__init__(defaults, sparsity_level=sparsity_level, prune_bias=prune_bias, target=target,
                         allocation=allocation, rules=rules, **kwargs)

    def _compute_distance(self, t: torch.Tensor) -> torch.Tensor:
        """Each filter's summed distance to all others, computed as one matrix (no loop over filters)."""
        flat = t.detach().reshape(t.shape[0], -1)
        return self.dist_fn(flat).abs().sum(1)

    def row_scores(self, weight: torch.Tensor) -> torch.Tensor:
        return self._compute_distance(weight)

    def num_to_prune(self, channels: int, sparsity_level: float) -> int:
        return round(channels * sparsity_level)
