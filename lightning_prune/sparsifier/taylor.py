"""First-order Taylor importance from the gradients of the training run (Molchanov et al., "Importance Estimation
for Neural Network Pruning", CVPR 2019, https://arxiv.org/abs/1906.10771)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.utils.hooks import RemovableHandle

from lightning_prune.errors import PruningConfigError
from lightning_prune.fusion.rules import Rule
from lightning_prune.sparsifier.budget import Budget
from lightning_prune.sparsifier.statistics import StatisticsPruner, masked_tensors

SAMPLE_POINTS = ("backward", "step")


class TaylorPruner(StatisticsPruner):
    """Prunes the channels whose removal changes the loss least, to first order.

    Removing channel ``c`` zeroes the parameters masked with it: its rows of the configured weights and, with
    ``prune_bias`` (the default), its bias and the per-channel affine after it (a BatchNorm's weight and bias).
    The first-order change of the loss is ``sum_{w in c} w * dL/dw``; per batch the pruner records its square
    (Molchanov et al. eq. 8, the contribution of a group of parameters), and averages it over batches as
    :mod:`~lightning_prune.sparsifier.statistics` describes. The scores are loss changes, comparable across layers:
    a class that spans several producers (a residual stream) sums its members' scores as they are, and a budget ranks
    them across layers without normalising.

    With a BatchNorm after the layer the weight rows carry almost no signal (in training mode the normalisation
    makes the loss invariant to their scale, so ``sum w * dL/dw`` is ~0) and the affine's terms carry it: the
    "gate after BN" criterion of the paper. With ``prune_bias=False`` the affine is not masked and not counted.

    Gradients are those of the raw (unmasked) parameters; masked rows receive none and are pruned already.

    Args:
        defaults, sparsity_level, prune_bias, target, allocation, rules: as for every :class:`ScoringPruner`
            (``sparsity_level``: the fraction of each coupled set's channels to prune, in [0, 1), or give ``target``).
        beta: decay of the moving average over batches, in [0, 1).
        sample: ``"backward"`` (default): hooks registered at ``prepare()`` take one sample per backward pass, from
            that pass's gradients (each micro-batch of gradient accumulation counts; gradients scaled by a
            ``GradScaler`` are taken as they are, so call :meth:`observe` instead). ``"step"``: one sample per call
            of :meth:`observe`, from the parameters' ``.grad`` at that moment: call it once per optimizer step, after
            ``scaler.unscale_(optimizer)`` and the last micro-batch, before clipping. The Lightning callback does
            this at ``on_before_optimizer_step`` (gradients accumulated, unscaled, averaged over DDP ranks).

    Raises:
        PruningConfigError: ``sample`` is not one of ``"backward"``, ``"step"``; a bad ``beta`` or hyper-parameter.
        PrunerStateError: ``step()`` before any sample was taken.
    """

    needs = "at least one forward and backward pass"
    comparable_scores = True  # loss changes: summed across a class's members and ranked across layers as they are

    def __init__(self, defaults: dict[str, Any] | None = None, *, sparsity_level: float | None = None,
                 prune_bias: bool | None = None, target: Budget | Mapping[str, Any] | None = None,
                 allocation: str | None = None, beta: float = 0.9, sample: str = "backward",
                 rules: dict[Any, Rule] | None = None, **kwargs: Any):
        if sample not in SAMPLE_POINTS:
            raise PruningConfigError(f"TaylorPruner: sample must be one of {list(SAMPLE_POINTS)}, got {sample!r}")
        super().__init__(defaults, sparsity_level=sparsity_level, prune_bias=prune_bias, target=target,
                         allocation=allocation, beta=beta, rules=rules, **kwargs)
        self.sample = sample

    def register_hooks(self) -> list[RemovableHandle]:
        self._tensors = [(t, dim, labels) for t, dim, labels in masked_tensors(self) if t.requires_grad]
        if not self._tensors:
            return []

        def on_backward(grads: list[torch.Tensor | None]) -> None:
            if self.sample == "backward":
                self._take(grads)

        hook = torch.autograd.graph.register_multi_grad_hook([t for t, _, _ in self._tensors], on_backward, mode="all")
        return [hook]

    def sample_at_optimizer_steps(self) -> None:
        self.sample = "step"

    def observe(self) -> None:
        """Take one sample from the ``.grad`` of the masked parameters (see ``sample="step"``). Parameters a strategy
        replaced since ``prepare()`` are found again; sharded ones (FSDP2's DTensors) are read whole, so every rank
        samples the full rows: a collective then, which every rank calls at the same step."""
        self._require_prepared("observe()")
        self.plan.walk.refresh()
        self._tensors = [(t, dim, labels) for t, dim, labels in masked_tensors(self) if t.requires_grad]
        self._take([t.grad for t, _, _ in self._tensors])

    def _take(self, grads: list[torch.Tensor | None]) -> None:
        pairs = [((_whole(t), dim, labels), _whole(g)) for (t, dim, labels), g in zip(self._tensors, grads, strict=True)
                 if g is not None]
        if not pairs:
            return
        with torch.no_grad():
            sample, seen = self.new_sample(pairs[0][1].device)
            for (tensor, dim, labels), grad in pairs:
                per_index = (tensor.detach().float() * grad.float()).movedim(dim, 0).reshape(labels.numel(), -1).sum(1)
                live = labels >= 0
                sample.index_add_(0, labels[live].to(sample.device), per_index[live.to(per_index.device)])
                seen[labels[live]] = True
            self.record(sample.square(), seen)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor (a DTensor) gathered whole; any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
