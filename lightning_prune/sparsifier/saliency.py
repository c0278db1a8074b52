"""Saliency pruning: drop the rows with the smallest L1 norm."""

from __future__ import annotations

import torch

from lightning_prune.sparsifier.scoring import ScoringPruner


class SaliencyPruner(ScoringPruner):
    """Prunes the output channels whose weight rows have the smallest L1 norm."""

    def row_scores(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(weight.flatten(1), ord=1, dim=1)
