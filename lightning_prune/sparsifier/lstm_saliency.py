"""Saliency pruning for LSTMs, whose weights pack four gate blocks of rows per hidden unit."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_prune.arguments import check_flag
from lightning_prune.errors import PruningConfigError
from lightning_prune.fusion.plan import PruningPlan
from lightning_prune.fusion.rules import Rule
from lightning_prune.sparsifier.budget import Budget
from lightning_prune.sparsifier.saliency import SaliencyPruner


class LSTMSaliencyPruner(SaliencyPruner):
    """Prunes LSTM rows by L1 saliency.

    Args:
        defaults, sparsity_level, prune_bias, target, allocation, rules: as for every :class:`ScoringPruner` (a
            ``target`` needs ``tie_gates=True``).
        tie_gates: decide per hidden unit, with a layer's ``weight_ih`` and ``weight_hh`` together, so a unit loses
            all its gate rows at once and fusion is exact. The default (False) keeps torch.ao's result: each gate
            block of each tensor is pruned on its own, which fusion can only approximate (it warns).
    """

    def __init__(self, defaults: dict[str, Any] | None = None, tie_gates: bool = False, *,
                 sparsity_level: float | None = None, prune_bias: bool | None = None,
                 target: Budget | Mapping[str, Any] | None = None, allocation: str | None = None,
                 rules: dict[Any, Rule] | None = None, **kwargs: Any):
        check_flag(tie_gates, "tie_gates", "LSTMSaliencyPruner")
        if target is not None and not tie_gates:
            raise PruningConfigError("LSTMSaliencyPruner: a target (budget) needs tie_gates=True, so whole hidden "
                                     "units are removed and their cost is known")
        super().__init__(defaults, sparsity_level=sparsity_level, prune_bias=prune_bias, target=target,
                         allocation=allocation, rules=rules, **kwargs)
        self.tie_gates = tie_gates

    def check_plan(self, plan: PruningPlan, groups: list[dict[str, Any]]) -> None:
        super().check_plan(plan, groups)
        lstms = sorted({m.module_fqn for m in plan.members if isinstance(m.module, nn.LSTM)})
        if lstms and not self.tie_gates:
            warnings.warn(f"LSTMSaliencyPruner(tie_gates=False) prunes each gate of {lstms} on its own, as torch.ao "
                          "does; nn.LSTM has one hidden size, so prune() can only approximate the masked model. Pass "
                          "tie_gates=True for an exact result.", UserWarning, stacklevel=3)

    def update_masks(self) -> None:
        if self.tie_gates:
            super().update_masks()
        else:
            for group in self.groups:
                self.update_mask(**group)

    def update_mask(self, module: nn.Module, tensor_name: str, sparsity_level: float, **kwargs: Any) -> None:
        if not isinstance(module, nn.LSTM):
            super().update_mask(module, tensor_name, sparsity_level, **kwargs)
            return
        mask = getattr(module.parametrizations, tensor_name)[0].mask
        saliency = self.row_scores(getattr(module, tensor_name).detach()).masked_fill(~mask, float("-inf"))
        gates_keep = torch.ones_like(mask).reshape(4, -1)
        for gate, scores in enumerate(saliency.reshape(4, -1)):
            k = self.num_to_prune(scores.numel(), sparsity_level)
            gates_keep[gate, scores.topk(k, largest=False).indices] = False
        mask.copy_(gates_keep.reshape(-1))
