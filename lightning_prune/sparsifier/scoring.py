"""Pruners that score channels, so coupled tensors can be decided together."""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

from lightning_prune.fusion.plan import Member
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
        fqn = kwargs.get("tensor_fqn")
        member = next(m for m in self.plan.members if m.tensor_fqn == fqn or fqn is None and m.module is module
                      and m.tensor_name == tensor_name)
        self.decide([member], sparsity_level)

    def update_masks(self) -> None:
        self._kept = self.plan.kept_classes()  # updated as each coupled set is decided
        try:
            for coupled in self.coupled_sets():
                level = max(group["sparsity_level"] for group, _ in coupled)
                self.decide([member for _, member in coupled], level)
        finally:
            self._kept = None

    def decide(self, members: list[Member], sparsity_level: float) -> None:
        """Mask the ``sparsity_level`` lowest-scoring classes of channels in every member.

        The classes are those of the members' rows (a channel, or a head, or a GroupNorm group: whatever the
        analysis found must go together); classes that cannot be removed are never counted or chosen.
        """
        classes, index, free = self._classes_of(members)
        masks = [getattr(m.module.parametrizations, m.tensor_name)[0].mask for m in members]
        kept_before = torch.zeros(classes.numel(), dtype=torch.long)
        for idx, mask in zip(index, masks, strict=True):
            kept_before.scatter_reduce_(0, idx, mask.cpu().long(), "amax")
        kept_before = kept_before.bool()
        scores = self.channel_scores(members, index, kept_before, classes.numel())
        scores = scores.masked_fill(~kept_before, float("-inf")).masked_fill(~free, float("inf"))
        count = int(free.sum())
        k = min(max(self.num_to_prune(count, sparsity_level), 0), count)
        keep = torch.ones(classes.numel(), dtype=torch.bool)
        keep[scores.topk(k, largest=False).indices] = False
        for idx, mask in zip(index, masks, strict=True):
            mask.copy_(keep[idx].to(mask.device))
        if getattr(self, "_kept", None) is not None:
            self._kept[classes] = keep | ~free

    def _classes_of(self, members: list[Member]) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """The members' classes (sorted), each member's row -> class index, and which classes may go (cached: the
        plan does not change between steps)."""
        key = tuple(m.tensor_fqn for m in members)
        cache = self.__dict__.setdefault("_class_cache", {})
        if key not in cache or cache[key][0] is not self.plan:
            row_classes = [self.plan.classes(m.labels) for m in members]
            classes = torch.cat([c[c >= 0] for c in row_classes]).unique()
            index = [torch.searchsorted(classes, c.clamp_min(0)) for c in row_classes]
            cache[key] = (self.plan, (classes, index, ~self.plan.groups.blocked_mask()[classes]))
        return cache[key][1]

    def channel_scores(self, members: list[Member], index: list[torch.Tensor], kept: torch.Tensor,
                       count: int) -> torch.Tensor:
        """Each class's score: the sum over members of the scores of its rows, each member scaled to mean 1 over its
        kept classes so layers of different magnitude weigh the same. Input columns fed only by removed channels
        do not count."""
        plan = self.plan
        kept_classes = self._kept if getattr(self, "_kept", None) is not None else plan.kept_classes()
        total = torch.zeros(count)
        for member, idx in zip(members, index, strict=True):
            # the raw weight: masked rows differ from the masked weight, but they score -inf anyway
            weight = plan.tensor(member.module, member.tensor_name).detach().movedim(member.dim, 0)
            columns = plan.input_classes(member.module, member.tensor_name, member.dim)
            if columns is not None and weight.dim() > 1 and columns.numel() == weight.shape[1]:
                live = (columns < 0) | kept_classes[columns.clamp_min(0)]
                if not live.all():
                    weight = weight.index_select(1, live.nonzero().flatten().to(weight.device))
            alive = kept[idx]
            if self.rows_interact and not alive.all():  # keep removed rows out of the living rows' comparison
                rows = alive.nonzero().flatten().to(weight.device)
                row_scores = torch.zeros(weight.shape[0], device=weight.device)
                row_scores[rows] = self.row_scores(weight.index_select(0, rows)).float()
            else:
                row_scores = self.row_scores(weight).float()
            scores = torch.zeros(count).index_add_(0, idx, row_scores.cpu())
            touched = torch.zeros(count, dtype=torch.bool)
            touched[idx] = True
            base = scores[touched & kept] if (touched & kept).any() else scores[touched]
            total += scores / base.abs().mean().clamp_min(torch.finfo(scores.dtype).tiny)
        return total
