"""Pruners that score channels, so coupled tensors can be decided together."""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

from lightning_prune.fusion.apply import live_inputs
from lightning_prune.fusion.graph import Member
from lightning_prune.sparsifier.base import BaseStructuredSparsifier


class ScoringPruner(BaseStructuredSparsifier):
    """Prunes the lowest-scoring channels. Tensors whose channels are coupled (a residual stream, a depthwise block,
    an LSTM layer's two weights) get one combined score, so the same channels go in every member.

    Channels pruned earlier score lowest, so a rising schedule only ever adds to the pruned set.
    """

    hyperparameters = frozenset({"sparsity_level", "prune_bias"})
    #: whether a row's score depends on the other rows (FPGM's distances do; a norm does not)
    rows_interact = False

    @abc.abstractmethod
    def row_scores(self, weight: torch.Tensor) -> torch.Tensor:
        """One importance score per row of ``weight`` (higher is kept)."""

    def num_to_prune(self, channels: int, sparsity_level: float) -> int:
        return int(channels * sparsity_level)

    def update_mask(self, module: nn.Module, tensor_name: str, sparsity_level: float, **kwargs: Any) -> None:
        dim = getattr(module.parametrizations, tensor_name)[0].dim
        member = Member(module, tensor_name, kwargs.get("tensor_fqn", tensor_name), dim=dim)
        self.decide([member], sparsity_level)

    def update_masks(self) -> None:
        for coupled in self.coupled_sets():
            level = max(group["sparsity_level"] for group, _ in coupled)
            self.decide([member for _, member in coupled], level)

    def channel_scores(self, members: list[Member], kept: torch.Tensor) -> torch.Tensor:
        """Sum of each member's channel scores, each scaled to mean 1 over the ``kept`` channels so layers of
        different magnitude weigh the same. Input columns fed only by masked channels do not count."""
        total = None
        for member in members:
            # the raw weight: masked rows differ from the masked weight, but they are set to -inf below anyway
            weight = member.module.parametrizations[member.tensor_name].original.detach().movedim(member.dim, 0)
            live = live_inputs(self.graph, member.module) if member.rows_per_channel == 1 else None
            if live is not None and live.numel() == weight.shape[1] and not live.all():
                weight = weight.index_select(1, live.nonzero().flatten().to(weight.device))
            if self.rows_interact and not kept.all():  # keep the pruned rows out of the living rows' comparison
                rows = kept.repeat(member.rows_per_channel).nonzero().flatten().to(weight.device)
                row_scores = torch.zeros(weight.shape[0], device=weight.device)
                row_scores[rows] = self.row_scores(weight.index_select(0, rows)).float()
            else:  # rows are scored on their own; pruned ones are set to -inf afterwards anyway
                row_scores = self.row_scores(weight).float()
            scores = row_scores.reshape(member.rows_per_channel, -1).sum(0)
            scale = scores[kept].abs().mean() if kept.any() else scores.abs().mean()
            scores = scores / scale.clamp_min(torch.finfo(scores.dtype).tiny)
            total = scores if total is None else total + scores
        return total

    def decide(self, members: list[Member], sparsity_level: float) -> None:
        """Mask the ``sparsity_level`` lowest-scoring channels in every member."""
        masks = [getattr(m.module.parametrizations, m.tensor_name)[0].mask for m in members]
        kept_before = torch.stack([mask.reshape(m.rows_per_channel, -1).any(0)
                                   for m, mask in zip(members, masks, strict=True)]).any(0)
        scores = self.channel_scores(members, kept_before).masked_fill(~kept_before, float("-inf"))
        channels = scores.numel()
        k = min(max(self.num_to_prune(channels, sparsity_level), 0), channels)
        keep = torch.ones(channels, dtype=torch.bool, device=scores.device)
        keep[scores.topk(k, largest=False).indices] = False
        for m, mask in zip(members, masks, strict=True):
            mask.copy_(keep.repeat(m.rows_per_channel).to(mask.device))
