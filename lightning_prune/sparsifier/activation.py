"""Activation-based importance: the mean magnitude of each channel's output over the training batches, as in
Minitron (Muralidharan et al., "Compact Language Models via Pruning and Knowledge Distillation", 2024,
https://arxiv.org/abs/2407.14679), which scores neurons, heads and embedding channels by their aggregated
activations on calibration batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_prune.errors import UnsupportedPatternError
from lightning_prune.fusion.layout import Layout
from lightning_prune.fusion.plan import PruningPlan
from lightning_prune.sparsifier.statistics import StatisticsPruner


@dataclass
class _Site:
    """Where a producer's channels are in its module's output: the tuple path to the tensor and its layout."""

    module: nn.Module
    path: tuple[int, ...]
    layout: Layout


class ActivationPruner(StatisticsPruner):
    """Prunes the channels whose outputs are smallest on average over the training batches.

    A forward hook on each configured layer's module takes, per training-mode call, ``mean |y|`` of every output
    channel over all other dims (batch, positions, time), with the channel dims read from the plan's layouts (dim 1
    of a conv output, the last dim of a Linear's, dim 0 of an unbatched input, a head's block of features), and
    averages it over batches as :mod:`~lightning_prune.sparsifier.statistics` describes. Calls in eval mode
    (validation, the analysis, a verification forward) are not counted. Under the Lightning callback the calls inside
    a training step count, whatever the module's mode (``model.eval()`` then ``fit``: frozen BatchNorm), and no other
    call does (:attr:`~StatisticsPruner.in_training_step`). A class that spans several producers (a
    residual stream) sums its members' scores, each scaled to mean 1.

    The output is read where the layer produces it, before any normalisation after it: behind a BatchNorm a
    channel's raw magnitude says little about what reaches the next layer. Minitron scores transformer layers,
    whose Linear outputs feed the next op directly.

    Args (those of :class:`StatisticsPruner`):
        defaults, sparsity_level, prune_bias, target, allocation, rules: as for every :class:`ScoringPruner`
            (``sparsity_level``: the fraction of each coupled set's channels to prune, in [0, 1), or give ``target``).
        beta: decay of the moving average over batches, in [0, 1).

    Raises:
        UnsupportedPatternError: at ``prepare()``, a configured tensor whose channels are not in its module's output
            (a weight used through ``F.linear`` rather than a module call, an inner layer of a stacked LSTM), or a
            module called at several places with its channels on different dims.
        PrunerStateError: ``step()`` before any training-mode forward pass (or, under the callback, training step).
    """

    needs = "at least one forward pass"

    def check_plan(self, plan: PruningPlan, groups: list[dict[str, Any]]) -> None:
        super().check_plan(plan, groups)
        self._sites = output_sites(plan)

    def register_hooks(self) -> list[RemovableHandle]:
        return [site.module.register_forward_hook(self._hook(site)) for site in self._sites]

    def _hook(self, site: _Site):
        layout = site.layout
        live = layout.labels.reshape(-1) >= 0
        ids = layout.labels.reshape(-1)[live]

        def on_forward(module: nn.Module, args: Any, output: Any) -> None:
            if not self.counts(module) or module is not site.module:  # eval calls, or a deep copy of the model
                return
            for index in site.path:
                output = output[index]
            with torch.no_grad():
                axes = [a % output.dim() for a in layout.axes]
                others = [d for d in range(output.dim()) if d not in axes]
                magnitude = output.detach().abs().mean(dim=others, dtype=torch.float32) if others else \
                    output.detach().abs().float()  # the layout's axes are ascending, as the kept dims are
                sample, seen = self.new_sample(output.device)
                sample.index_add_(0, ids.to(output.device), magnitude.reshape(-1)[live.to(output.device)])
                seen[ids] = True
                self.record(sample, seen)

        return on_forward


def output_sites(plan: PruningPlan) -> list[_Site]:
    """One site per module of a configured tensor: where in its output its channels are.

    Raises:
        UnsupportedPatternError: a configured tensor whose channels its module's output does not carry, or a module
            whose calls put its channels in different places.
    """
    modules = dict(plan.model.named_modules(remove_duplicate=False))
    sites: dict[int, _Site] = {}
    for member in plan.members:
        found = []
        for node in plan.walk.traced.graph.nodes:
            if node.op == "call_module" and modules.get(node.target) is member.module:
                found.append(_find(plan.walk.values.get(node.name), member.labels, ()))
        if not found or any(f is None for f in found):
            raise UnsupportedPatternError(
                f"ActivationPruner reads each configured layer's output channels in a forward hook, but the output "
                f"of {type(member.module).__name__} '{member.module_fqn}' does not carry the channels of "
                f"'{member.tensor_fqn}' (the weight is used outside a call of its module, or it is an inner layer "
                "whose output forward does not return); leave it out (exclude=...) or use TaylorPruner")
        first = found[0]
        if any(f[0] != first[0] or f[1].axes != first[1].axes or not torch.equal(f[1].labels, first[1].labels)
               for f in found[1:]):
            raise UnsupportedPatternError(
                f"ActivationPruner: {type(member.module).__name__} '{member.module_fqn}' is called at several places "
                "with its channels on different dims; one forward hook cannot read them all")
        sites.setdefault(id(member.module), _Site(member.module, first[0], first[1]))
    return list(sites.values())


def _find(value: Any, ids: torch.Tensor, path: tuple[int, ...]) -> tuple[tuple[int, ...], Layout] | None:
    """The path to the first layout in ``value`` (nested tuples) that holds every id in ``ids``."""
    if isinstance(value, Layout):
        return (path, value) if torch.isin(ids, value.labels.reshape(-1)).all() else None
    if isinstance(value, (tuple, list)):
        for k, item in enumerate(value):
            hit = _find(item, ids, path + (k,))
            if hit is not None:
                return hit
    return None
