"""Pruners that learn channel importance from the training run, through hooks registered at ``prepare()``.

Each pruner turns what one training batch shows (gradients, activations) into a *sample*: one float per channel id
of the plan (``plan.groups``; a configured tensor's rows map to ids through ``member.labels``). Samples are
accumulated as an exponential moving average, bias-corrected as Adam's moments are: after samples ``x_1..x_n``,

    value = sum_i (1 - beta) * beta ** (n - i) * x_i / (1 - beta ** n).

``beta=0.9`` (the default) weighs about the last ten batches, the window Molchanov et al. average over between
pruning steps; ``beta=0`` keeps the last batch only. The average runs across decisions rather than restarting at each
one, so a schedule that ticks every step still decides from several batches, and it is linear in the samples, so
averaging it across data-parallel ranks (:meth:`StatisticsPruner.statistics` / :meth:`load_statistics`) gives what
one process would have accumulated from the same global batches.

A decision (``step()``) ranks each coupled set's classes by the sum over its members of the statistics of their rows,
each member scaled to mean 1 over its kept classes (:meth:`ScoringPruner.channel_scores`), as the weight-based
pruners do.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_prune.errors import PrunerStateError, PruningConfigError
from lightning_prune.fusion.plan import Member
from lightning_prune.fusion.rules import Rule
from lightning_prune.masks import ChannelMask
from lightning_prune.sparsifier.budget import Budget
from lightning_prune.sparsifier.scoring import ScoringPruner


class StatisticsPruner(ScoringPruner):
    """Base of the pruners that score channels from statistics gathered during training.

    Args:
        defaults, sparsity_level, prune_bias, target, allocation, rules: as for every :class:`ScoringPruner`.
        beta: the moving average's decay, in [0, 1) (see the module docstring).

    Subclasses register their hooks in :meth:`register_hooks` and feed :meth:`record` one sample per batch.

    Raises:
        PruningConfigError: ``beta`` outside [0, 1).
    """

    #: what must happen between prepare() and step(), for the error when nothing was seen
    needs = "a training batch"

    def __init__(self, defaults: dict[str, Any] | None = None, *, sparsity_level: float | None = None,
                 prune_bias: bool | None = None, target: Budget | Mapping[str, Any] | None = None,
                 allocation: str | None = None, beta: float = 0.9, rules: dict[Any, Rule] | None = None,
                 **kwargs: Any):
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not 0 <= beta < 1:
            raise PruningConfigError(f"{type(self).__name__}: beta must be a number in [0, 1), got {beta!r}")
        super().__init__(defaults, sparsity_level=sparsity_level, prune_bias=prune_bias, target=target,
                         allocation=allocation, rules=rules, **kwargs)
        self.beta = float(beta)
        self._average: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = []
        #: called with :meth:`statistics` before every decision, its result loaded: e.g. :func:`mean_over_ranks`
        #: (every rank must then decide at the same points; the Lightning callback sets it under DDP)
        self.sync: Callable[[torch.Tensor], torch.Tensor] | None = None
        #: which forward calls a forward hook counts: ``None`` (the default, without Lightning) those in training
        #: mode; the Lightning callback sets True during each training step and False outside them, whatever the
        #: module's mode (a fit of a module in eval mode, frozen BatchNorm, samples at every step)
        self.in_training_step: bool | None = None

    def row_scores(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} scores channels from training statistics, not weights")

    # -- life cycle ---------------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, config: list[dict[str, Any]] | None, **kwargs: Any) -> None:
        """:meth:`BaseStructuredSparsifier.prepare`, then register the hooks that gather statistics (from zero)."""
        super().prepare(model, config, **kwargs)
        self._average = self._counts = None
        self._handles = self.register_hooks()

    def register_hooks(self) -> list[RemovableHandle]:
        """Register the hooks that call :meth:`record` on the prepared model; return their handles."""
        raise NotImplementedError

    def prune(self) -> nn.Module:
        model = super().prune()
        self._remove_hooks()
        return model

    def forget_model(self) -> None:
        self._remove_hooks()
        super().forget_model()

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def counts(self, module: nn.Module) -> bool:
        """Whether a forward call of ``module`` now is a sample (see :attr:`in_training_step`)."""
        return module.training if self.in_training_step is None else self.in_training_step

    def observe(self) -> None:
        """Take a sample from the state of the model now (e.g. its ``.grad``), where the pruner samples on request
        (:meth:`TaylorPruner.sample_at_optimizer_steps`); pruners that sample in their hooks ignore it."""

    def sample_at_optimizer_steps(self) -> None:
        """From now on, sample only when :meth:`observe` is called (the Lightning callback calls it at
        ``on_before_optimizer_step``); pruners whose samples do not depend on the optimizer keep their hooks."""

    # -- accumulating -------------------------------------------------------------------------------------------
    def record(self, sample: torch.Tensor, seen: torch.Tensor) -> None:
        """Fold one sample into the moving average of the channel ids where ``seen`` (a bool per id) holds.

        Each id keeps its own count of samples (a layer that skips a batch, such as an unused branch, is not
        averaged with zeros), so the bias correction is per id.
        """
        sample = sample.detach().float()
        if self._average is None:
            self._average = torch.zeros_like(sample)
            self._counts = torch.zeros(sample.shape, dtype=torch.long)
        elif self._average.device != sample.device:
            self._average = self._average.to(sample.device)
        seen_here = seen.to(sample.device)
        blended = self._average * self.beta + sample * (1 - self.beta)
        self._average = torch.where(seen_here, blended, self._average)
        self._counts += seen.cpu().long()

    def new_sample(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeros and a False per channel id of the plan, to fill with one batch's sample and where it was seen."""
        size = self.plan.groups.size
        return torch.zeros(size, device=device), torch.zeros(size, dtype=torch.bool)

    @property
    def samples(self) -> int:
        """The most samples any channel id has seen since ``prepare()``."""
        return int(self._counts.max()) if self._counts is not None and self._counts.numel() else 0

    def values(self) -> torch.Tensor:
        """The bias-corrected moving average, one float per channel id of the plan (on the CPU; 0 where no sample
        was seen).

        Raises:
            PrunerStateError: nothing was sampled since ``prepare()``.
        """
        self._require_prepared("values()")
        if self.samples == 0:
            raise PrunerStateError(
                f"{type(self).__name__} has no statistics to decide from: run {self.needs} of the prepared model "
                "(in training mode) between prepare() and step()")
        correction = 1 - torch.full(self._counts.shape, self.beta, dtype=torch.float64) ** self._counts
        average = self._average.cpu().double()
        return torch.where(self._counts > 0, average / correction.clamp_min(1e-300), 0.0).float()

    def update_masks(self) -> None:
        self.values()  # nothing seen yet: raise before any collective call
        if self.sync is not None:
            self.load_statistics(self.sync(self.statistics()))
        self._scores = self.values()
        try:
            super().update_masks()
        finally:
            self._scores = None

    def member_row_scores(self, member: Member, alive: torch.Tensor,
                          kept_roots: torch.Tensor | None = None) -> torch.Tensor:
        scores = self._scores if getattr(self, "_scores", None) is not None else self.values()
        return scores[member.labels]

    # -- distributed and checkpointed state ---------------------------------------------------------------------
    def statistics(self) -> torch.Tensor:
        """A copy of the accumulated moving average (float32, one entry per channel id, on the device it was
        gathered on; zeros before the first sample), for averaging across data-parallel ranks before a decision::

            values = pruner.statistics()
            torch.distributed.all_reduce(values)                   # every rank must call it at the same point
            pruner.load_statistics(values / torch.distributed.get_world_size())

        or set ``pruner.sync = mean_over_ranks`` to have every ``step()`` do it. The ranks must have taken the same
        number of samples (DDP steps them together).
        """
        self._require_prepared("statistics()")
        return self._average.clone() if self._average is not None else self.new_sample(torch.device("cpu"))[0]

    def load_statistics(self, values: torch.Tensor) -> None:
        """Replace the moving average by ``values`` (as :meth:`statistics` returned it, e.g. averaged over ranks).

        Raises:
            PruningConfigError: ``values`` does not have one entry per channel id of the plan.
        """
        self._require_prepared("load_statistics()")
        if not isinstance(values, torch.Tensor) or values.shape != (self.plan.groups.size,):
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise PruningConfigError(f"load_statistics() needs a tensor of shape ({self.plan.groups.size},), one "
                                     f"entry per channel id of the plan, got {shape}")
        device = self._average.device if self._average is not None else values.device
        self._average = values.detach().float().to(device).clone()
        if self._counts is None:
            self._counts = torch.zeros(values.shape, dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        """The base state plus ``"statistics"``: the moving average (on the CPU) and each id's number of samples."""
        state = super().state_dict()
        if self._average is None:
            state["statistics"] = None
        else:
            state["statistics"] = {"average": self._average.detach().cpu().clone(), "counts": self._counts.clone()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore masks, hyper-parameters and the statistics, so a resumed run decides as an uninterrupted one."""
        super().load_state_dict(state_dict)
        saved = state_dict.get("statistics")
        if saved is None:
            self._average = self._counts = None
            return
        self.load_statistics(saved["average"])
        self._counts = saved["counts"].clone().long()


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the ranks of the default process group (all-reduce SUM, then divide: gloo has no
    AVG). A collective: every rank must call it. NCCL needs ``values`` on the rank's GPU, where the pruner gathers
    them when the model trains there."""
    total = values.clone()
    torch.distributed.all_reduce(total)
    return total / torch.distributed.get_world_size()


def masked_tensors(pruner: ScoringPruner) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """Every tensor the masks act on, once: ``(tensor, dim, labels)`` with the raw (unmasked) tensor, the dim its
    channels run along and the channel id at each index of that dim. The configured weights' rows, and with
    ``prune_bias`` the biases and per-channel affines masked with them."""
    plan = pruner.plan
    found: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}
    for member in plan.members:
        tensor = plan.tensor(member.module, member.tensor_name)
        found.setdefault(id(tensor), (tensor, member.dim, member.labels))
    for silence in plan.walk.silences:
        plist = getattr(getattr(silence.module, "parametrizations", None), silence.tensor_name, None)
        if plist is not None and any(isinstance(p, ChannelMask) for p in plist):
            found.setdefault(id(plist.original), (plist.original, silence.dim, silence.labels))
    return list(found.values())
