"""StructuredPruning: masks at setup, a pruning schedule during training, physical removal at the end of fit.

A thin Lightning adapter. Its hooks hand off to torch-only parts: the :class:`SparsityScheduler` (how much to prune
and when), :mod:`lightning_prune.optim` (optimizer state after a shrink), :mod:`lightning_prune.checkpoint`
(everything about loading), :mod:`lightning_prune.inputs` (the example input) and :mod:`lightning_prune.verify`
(masked vs pruned outputs); :mod:`lightning_prune.setup_checks` holds what setup checks about the Trainer. What
stays here needs Lightning: the hooks, DDP, logging and checkpoint files.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_prune import inputs, sharded
from lightning_prune.arguments import check_arguments, check_flag, checked_config, checked_patterns
from lightning_prune.checkpoint import DetachingHook, reshape_for_load, stale_best_checkpoints
from lightning_prune.errors import OutputReachedError, PruningConfigError
from lightning_prune.fusion.plan import PruningPlan
from lightning_prune.measure import count_params
from lightning_prune.optim import carry_optimizer_state
from lightning_prune.schedule import SparsityScheduler
from lightning_prune.setup_checks import example_input, refuse_unsupported
from lightning_prune.sparsifier import BaseStructuredSparsifier, StatisticsPruner
from lightning_prune.sparsifier.explain import explain
from lightning_prune.sparsifier.statistics import mean_over_ranks
from lightning_prune.verify import fusion_summary, snapshot, try_forward, verdict


class StructuredPruning(Callback):
    """Prune whole channels during ``fit`` and shrink the LightningModule in place when fit ends.

    Args:
        pruner: any :class:`BaseStructuredSparsifier`; its ``sparsity_level`` is the target the schedule reaches.
        config: ``[{"tensor_fqn": "net.0.weight"}, ...]`` relative to the LightningModule, honoured exactly or refused
            at ``setup``. ``None`` takes every supported layer, reasoning from ``forward()`` alone, except those whose
            channels reach the model's output.
        schedule: ``"oneshot"`` (the target at ``start_step``), ``"linear"`` or ``"cubic"`` (Zhu & Gupta 2017).
        start_step, end_step: ints are optimizer steps; floats in [0, 1] are fractions of the run
            (``trainer.estimated_stepping_batches``). ``end_step=None`` ends a ramp at 0.75 of the run, leaving the
            last quarter to fine-tune at the final width.
        every_n_steps: the ramp's level changes every this many optimizer steps.
        prune_on_fit_end: run the fusion pass when training ends (then ModelCheckpoint's ``last.ckpt`` is rewritten).
        verify: compare the masked and the pruned model on the example input, every tensor of the output; raise if
            they differ.
        include, exclude: regexes over tensor FQNs that narrow ``config=None``.
        shrink_every_n_steps: also fuse during training, every this many optimizer steps (when something new is
            masked), so the rest of the run trains the smaller model. The optimizers keep their state for the kept
            channels, DDP is re-wrapped, and masks are re-attached while the schedule still has pruning to do.
        narrow_output: allow configured tensors whose channels reach the model's output, which changes its width (a
            classifier loses classes). Off by default: such a config is refused at ``setup``.
        target: a cost budget replacing the pruner's ``sparsity_level``, ramped by the schedule: ``{"macs": 0.5}`` is
            half the dense MACs on the example input (see :class:`~lightning_prune.sparsifier.budget.Budget`).

    A :class:`~lightning_prune.sparsifier.statistics.StatisticsPruner` samples at ``on_before_optimizer_step``
    (gradients accumulated, unscaled, DDP-averaged, not yet clipped), averages its statistics over DDP ranks before
    each decision and keeps them in this callback's state.

    The example input (to check ``forward`` at setup, trace shapes, verify and count MACs) is the LightningModule's
    ``example_input_array`` when set, otherwise the first training batch's worth of samples (see
    :func:`lightning_prune.inputs.first_batch`; the run's randomness is left untouched).

    Raises:
        PruningConfigError: a bad argument (in ``__init__``), or at ``setup``: an unsupported strategy, a config that
            names the output without ``narrow_output``, a forward that cannot run on the example input, include
            patterns that match no weight, a callback already set up for another module.
        UnsupportedPatternError: at ``setup``, a configured tensor whose channels cannot be removed exactly.
    """

    def __init__(
        self,
        pruner: BaseStructuredSparsifier,
        config: Sequence[Mapping[str, Any]] | None = None,
        schedule: str = "oneshot",
        start_step: int | float = 0,
        end_step: int | float | None = None,
        every_n_steps: int = 1,
        prune_on_fit_end: bool = True,
        verify: bool = True,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        shrink_every_n_steps: int | None = None,
        narrow_output: bool = False,
        target: Mapping[str, Any] | None = None,
    ):
        if not isinstance(pruner, BaseStructuredSparsifier):
            raise PruningConfigError(
                f"pruner must be a BaseStructuredSparsifier (e.g. SaliencyPruner(sparsity_level=0.5)), got {pruner!r}"
            )
        check_arguments(config, include, exclude, shrink_every_n_steps, target)
        if target is not None:
            pruner.use_budget(target)
        self.scheduler = SparsityScheduler(pruner, schedule, start_step, end_step, every_n_steps)
        self.pruner = pruner
        self.config = checked_config(config)
        self.include, self.exclude = checked_patterns("include", include), checked_patterns("exclude", exclude)
        self.prune_on_fit_end, self.verify, self.narrow_output = (
            check_flag(value, name, "StructuredPruning") for name, value in (
                ("prune_on_fit_end", prune_on_fit_end), ("verify", verify), ("narrow_output", narrow_output)))
        self.shrink_every_n_steps = shrink_every_n_steps
        self.fused = False
        self._resolved_config: list[dict[str, Any]] = []  # the tensors chosen at setup, to mask again after a shrink
        self._example: Any = None
        self._hook = None
        self._stage: str | None = None
        self._restored = False  # the schedule's position came from a checkpoint in this fit
        self._final_step: int | None = None
        self._fused_sparsity = 0.0
        self._observed_step = -1
        self._module_id: int | None = None  # the LightningModule this callback masks (one per callback)

    # -- setup --------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stage = stage
        if stage == "fit":
            refuse_unsupported(trainer)
            sharded.refuse_unsupported(trainer, self.shrink_every_n_steps)
        if self._hook is None:  # so that any checkpoint loads into the module, masked or fused (see checkpoint/)
            self._hook = pl_module.register_load_state_dict_pre_hook(DetachingHook(self._before_load))
        if self._module_id is not None and self._module_id != id(pl_module):
            raise PruningConfigError(
                f"this StructuredPruning was set up for another {type(pl_module).__name__}: its masks, schedule and "
                "fusion belong to that module. Create a new StructuredPruning(...) for each model.")
        if stage != "fit" or self.fused or self.pruner.model is not None:
            return  # a second fit() continues with the same masks, or with the already narrowed model
        self._example = example_input(trainer, pl_module)
        self._prepare(pl_module)
        self._module_id = id(pl_module)
        if isinstance(self.pruner, StatisticsPruner):
            self.pruner.sample_at_optimizer_steps()
            self.pruner.sync = mean_over_ranks if trainer.world_size > 1 else None
            self.pruner.in_training_step = False  # forward hooks count training steps only, in any module mode

    def check(self, pl_module: pl.LightningModule, example_input: Any = None) -> list[str]:
        """Check the tensor selection against ``pl_module`` as ``setup`` would, on copies (the module and this
        callback stay as they are), and return the tensors it would prune. The Hydra app calls it before training.

        Raises:
            PruningConfigError, UnsupportedPatternError: what ``setup`` would raise.
        """
        probe = copy.copy(self)
        probe.pruner, probe.scheduler = copy.deepcopy(self.pruner), copy.copy(self.scheduler)
        probe.scheduler.sparsifier = probe.pruner
        probe._example = pl_module.example_input_array if example_input is None else example_input
        probe._prepare(copy.deepcopy(pl_module), announce=False)
        return [g["tensor_fqn"] for g in probe.pruner.groups]

    def explain(self, pl_module: pl.LightningModule, example_input: Any = None) -> PruningPlan:
        """The pruning plan this callback would follow on ``pl_module`` (nothing is changed): channel groups, what
        blocks them and where, params and MACs dense and at the target. ``print()`` it for a table."""
        example = pl_module.example_input_array if example_input is None else example_input
        return explain(pl_module, self.config, example_inputs=example, exclude_output=not self.narrow_output,
                       include=self.include, exclude=self.exclude,
                       sparsity_level=self.pruner.defaults["sparsity_level"], rules=self.pruner.rules)

    def _prepare(self, pl_module: pl.LightningModule, announce: bool = True) -> None:
        try:
            self.pruner.prepare(pl_module, self.config, include=self.include, exclude=self.exclude,
                                exclude_output=not self.narrow_output, example_inputs=self._example)
        except OutputReachedError as error:
            raise OutputReachedError(f"{error} To narrow the output on purpose, pass "
                                     "StructuredPruning(..., narrow_output=True).") from error
        if self.pruner.groups and not any(g["sparsity_level"] for g in self.pruner.groups):
            rank_zero_warn("StructuredPruning: every target sparsity is 0, so nothing will be pruned")
        if not self.pruner.groups:
            rank_zero_warn("StructuredPruning found no prunable layer (the selected ones all reach the output or meet "
                           "an op fusion cannot narrow); training continues dense and nothing will be pruned")
        self._resolved_config = [{k: v for k, v in g.items() if k not in ("module", "module_fqn", "tensor_name")}
                                 for g in self.pruner.groups]
        self.scheduler.track()
        if announce:
            rank_zero_info(f"StructuredPruning: masking {len(self.pruner.groups)} tensors "
                           f"({', '.join(self.scheduler.targets) or 'none'})")
            rank_zero_info(str(self.pruner.plan))

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fused or not self.pruner.groups:
            return
        total = trainer.estimated_stepping_batches
        if not self._restored or self.scheduler.start is None:
            self.scheduler.resolve(total)
        self._restored = False
        problem = self.scheduler.fit_problem(total)
        if problem:
            rank_zero_warn(f"StructuredPruning: {problem}. Give start_step/end_step as fractions of the run (e.g. "
                           "end_step=0.75) or make the run longer.")

    # -- the schedule -------------------------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if isinstance(self.pruner, StatisticsPruner) and self.pruner.groups and not self.fused and \
                trainer.global_step != self._observed_step:  # once per step, however many optimizers
            self._observed_step = trainer.global_step
            self.pruner.observe()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if isinstance(self.pruner, StatisticsPruner):
            self.pruner.in_training_step = True

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if isinstance(self.pruner, StatisticsPruner):
            self.pruner.in_training_step = False
        step = trainer.global_step
        if self.fused or not self.pruner.groups or step == self.scheduler.last_step:
            return
        with sharded.whole_weights(trainer, pl_module, self.scheduler, step):
            ticked = self.scheduler.step(step)
        if ticked:
            self._broadcast_masks(trainer)
            pl_module.log("pruning/sparsity", self.sparsity(), rank_zero_only=True)
        if self.shrink_every_n_steps and step % self.shrink_every_n_steps == 0 and \
                any(not bool(s["mask"].all()) for s in self.pruner.state.values()):  # something new to remove
            self._shrink(trainer, pl_module)

    def _shrink(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fuse now; carry the optimizers' state over to the narrowed parameters; re-wrap DDP."""
        schedule_done = self.scheduler.done
        self.pruner.prune()
        self.fused = schedule_done
        if not schedule_done:
            self._prepare_again(pl_module)
        for optimizer in trainer.optimizers:
            carry_optimizer_state(optimizer, self.pruner.lineage, list(pl_module.parameters()))
        strategy = trainer.strategy
        if isinstance(strategy.model, DistributedDataParallel):
            strategy.model = pl_module
            strategy.configure_ddp()
        rank_zero_info(f"StructuredPruning: shrank at step {trainer.global_step}: {count_params(pl_module):,} params")

    def _prepare_again(self, pl_module: pl.LightningModule) -> None:
        """Masks back on the narrowed layers, each group continuing toward its target (relative to its old width)."""
        self.pruner.prepare(pl_module, self._resolved_config, example_inputs=self._example)
        self.scheduler.rebase()

    def _broadcast_masks(self, trainer: pl.Trainer) -> None:
        """Rank 0's masks on every rank, so randomised or tie-breaking pruners agree."""
        if trainer.world_size <= 1:
            return
        masks = {fqn: state["mask"].cpu() for fqn, state in self.pruner.state.items()}
        masks = trainer.strategy.broadcast(masks, src=0)
        with torch.no_grad():
            for fqn, mask in masks.items():
                target = self.pruner.state[fqn]["mask"]
                target.copy_(mask.to(target.device))

    def sparsity(self) -> float:
        """Fraction of the configured tensors' original channels pruned so far (masked, or removed by a shrink)."""
        if self.fused or self.pruner.model is None:
            return self._fused_sparsity
        return self.scheduler.sparsity()

    def summary(self) -> dict[str, Any]:
        """What pruning did in the last fit, in plain types (the Hydra app writes it to metrics.json)."""
        last, final = self.scheduler.last_change, self._final_step
        return {
            "pruned_tensors": len(self.scheduler.targets),
            "schedule": self.scheduler.describe() if self.scheduler.start is not None else None,
            "schedule_completed": self.scheduler.completed_at is not None,
            "last_pruning_step": last,
            "steps_after_last_pruning": None if last is None or final is None else final - last,
            "budget": self.pruner.budget_landing(),  # under a target: where the last step landed
        }

    # -- fusion -------------------------------------------------------------------------------------------------
    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._final_step = trainer.global_step
        if self.fused or not self.prune_on_fit_end or not self.pruner.groups:
            return
        before = self.sparsity()
        with sharded.whole_weights(trainer, pl_module, self.scheduler, None):
            cut = self.scheduler.finish()
        if cut:  # whatever stopped training early, the target is reached before fusion
            self._broadcast_masks(trainer)
            rank_zero_warn(
                f"StructuredPruning: training stopped at step {trainer.global_step}, before the "
                f"{self.scheduler.describe()} finished: the rest of the target was applied at once, from sparsity "
                f"{before:.3f} to {self.sparsity():.3f}, with 0 steps of fine-tuning after it. Give "
                "start_step/end_step as fractions of the run (e.g. end_step=0.75) so the schedule fits however long "
                "the run is."
            )
        target = self.sparsity()
        with sharded.unsharded(trainer, pl_module):
            self.fuse(trainer, pl_module)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
                trainer.save_checkpoint(callback.last_model_path, weights_only=callback.save_weights_only)
        if trainer.is_global_zero:
            for warning in stale_best_checkpoints(trainer.checkpoint_callbacks, target):
                rank_zero_warn(f"StructuredPruning: {warning}")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fit that never trained (``max_steps`` already reached, ``limit_train_batches=0``) calls no
        ``on_train_end``: the masks as they are are fused here, so no fit leaves masks on the module."""
        if self.fused or not self.prune_on_fit_end or not self.pruner.groups or self.pruner.model is not pl_module:
            return
        rank_zero_warn(f"StructuredPruning: training did not run in this fit (global step {trainer.global_step}), so "
                       f"the masks as they are (sparsity {self.sparsity():.3f}) were fused without pruning further")
        with sharded.unsharded(trainer, pl_module):
            self.fuse(trainer, pl_module)

    def fuse(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove the masked channels in place, check the result, and report what changed.

        Raises:
            RuntimeError: with ``verify``, the pruned model's outputs differ from the masked model's (beyond 1e-5
                relative, unless fusion announced an approximation) or it fails where the masked model ran.
        """
        precision = trainer.precision_plugin
        example = precision.convert_input(inputs.to_device(self._example, pl_module.device))
        sparsity, was_training = self.sparsity(), pl_module.training
        pl_module.eval()
        with precision.forward_context():
            expected, expected_error = try_forward(pl_module, example)
            before = snapshot(pl_module, example)
        with torch.no_grad():
            self.pruner.prune()
        for optimizer in trainer.optimizers:  # so checkpoints written from now on resume on the narrow model
            carry_optimizer_state(optimizer, self.pruner.lineage, list(pl_module.parameters()))
        with precision.forward_context():
            actual, actual_error = try_forward(pl_module, example)
            after = snapshot(pl_module, example)
        pl_module.train(was_training)
        self.fused, self._fused_sparsity = True, sparsity
        problem = verdict(expected, actual, (expected_error, actual_error), verify=self.verify,
                          output_may_change=self.narrow_output, approximate=bool(self.pruner.notes))
        if problem and problem[0] == "error":
            raise RuntimeError(f"StructuredPruning(verify=True): {problem[1]}")
        if problem:
            rank_zero_warn(f"StructuredPruning: {problem[1]}")
        metrics = {"pruning/sparsity": sparsity, "pruning/params_before": before.params, "pruning/params": after.params}
        if before.macs is not None and after.macs is not None:
            metrics.update({"pruning/macs_before": before.macs, "pruning/macs": after.macs})
        _log_metrics(trainer, metrics)
        rank_zero_info(fusion_summary(before, after, self.pruner.budget_landing()))

    # -- checkpointing ------------------------------------------------------------------------------------------
    def _before_load(self, module: torch.nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        action = reshape_for_load(module, state_dict, prefix)
        if action in ("fused", "shrunk"):
            self.pruner.forget_model()
            if action == "fused":
                self.fused = True
            else:  # shrunk mid-fit with the schedule still running: masks go back on the narrow layers
                self.pruner.prepare(module, self._resolved_config, example_inputs=self._example)
                self.scheduler.rebase()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:  # nothing of the callback stays on the module: it pickles
            self._hook.remove()
            self._hook = None
        if isinstance(self.pruner, StatisticsPruner):  # hooks left on (prune_on_fit_end=False) count as without us
            self.pruner.in_training_step = None

    @override
    def state_dict(self) -> dict[str, Any]:
        learnt = isinstance(self.pruner, StatisticsPruner) and self.pruner.model is not None
        return {"fused": self.fused, "schedule": self.scheduler.state_dict(),
                "statistics": self.pruner.state_dict()["statistics"] if learnt else None}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._stage not in (None, "fit"):
            return  # testing or predicting from a checkpoint restores its weights, not the pruning run
        self.fused = self.fused or bool(state_dict.get("fused", False))
        schedule = state_dict.get("schedule")
        if schedule is None:  # written by lightning_prune 0.1
            schedule = {"targets": state_dict.get("targets"), "levels": state_dict.get("levels", {}),
                        "last_step": state_dict.get("applied_step", -1), "end": state_dict.get("end_step")}
        self.scheduler.load_state_dict(schedule)
        self._restored = self.scheduler.start is not None
        if state_dict.get("statistics") is not None and self.pruner.model is not None:
            self.pruner.load_state_dict({"statistics": state_dict["statistics"]})


@rank_zero_only
def _log_metrics(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
