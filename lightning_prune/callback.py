"""StructuredPruning: masks at setup, a pruning schedule during training, physical removal at the end of fit."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

from lightning_prune.checkpoint import dense_view, narrow_to_state_dict, strip_masks
from lightning_prune.errors import PruningConfigError
from lightning_prune.measure import count_macs, count_params, layer_widths
from lightning_prune.schedule import SCHEDULES, sparsity_at, validate_schedule
from lightning_prune.sparsifier import BaseStructuredSparsifier

_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


class StructuredPruning(Callback):
    """Prune whole channels during ``fit`` and shrink the LightningModule in place when fit ends.

    Args:
        pruner: any :class:`BaseStructuredSparsifier`; its ``sparsity_level`` is the target the schedule reaches.
        config: ``[{"tensor_fqn": ...}, ...]`` relative to the LightningModule, honoured exactly or refused at
            ``setup``. ``None`` takes every supported layer except those whose channels reach the model output.
        schedule: ``"oneshot"`` (the target at ``start_step``), ``"linear"`` or ``"cubic"`` (Zhu & Gupta 2017).
        start_step, end_step, every_n_steps: in optimizer steps; ``end_step=None`` is the end of training.
        prune_on_fit_end: run the fusion pass when training ends (before the final ``last.ckpt`` is rewritten).
        verify: compare the masked and the pruned model on a batch held from training; raise if they differ.
        include, exclude: regexes over tensor FQNs that narrow ``config=None``.
        shrink_every_n_steps: also fuse during training, every this many optimizer steps (when something new is
            masked), so the rest of the run trains the smaller model. The optimizers keep their state for the kept
            channels, DDP is re-wrapped, and masks are re-attached while the schedule still has pruning to do.
    """

    def __init__(
        self,
        pruner: BaseStructuredSparsifier,
        config: list[dict[str, Any]] | None = None,
        schedule: str = "oneshot",
        start_step: int = 0,
        end_step: int | None = None,
        every_n_steps: int = 1,
        prune_on_fit_end: bool = True,
        verify: bool = True,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        shrink_every_n_steps: int | None = None,
    ):
        if not isinstance(pruner, BaseStructuredSparsifier):
            raise PruningConfigError(
                f"pruner must be a BaseStructuredSparsifier (e.g. SaliencyPruner(sparsity_level=0.5)), got {pruner!r}"
            )
        if schedule not in SCHEDULES:
            raise PruningConfigError(f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
        validate_schedule(schedule, pruner.defaults["sparsity_level"], start_step, end_step, every_n_steps)
        if shrink_every_n_steps is not None and (isinstance(shrink_every_n_steps, bool) or
                                                 not isinstance(shrink_every_n_steps, int) or shrink_every_n_steps < 1):
            raise PruningConfigError(f"shrink_every_n_steps must be None or an int >= 1, got {shrink_every_n_steps!r}")
        if config is not None and (include is not None or exclude is not None):
            raise PruningConfigError("give either config (explicit tensors) or include/exclude patterns, not both")
        for pattern in (include or []) + (exclude or []):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise PruningConfigError(f"include/exclude pattern {pattern!r} is not a valid regex: {exc}") from None
        self.pruner = pruner
        self.config = None if config is None else [dict(entry) for entry in config]
        self.schedule = schedule
        self.start_step, self.end_step, self.every_n_steps = start_step, end_step, every_n_steps
        self.prune_on_fit_end, self.verify = prune_on_fit_end, verify
        self.include, self.exclude = include, exclude
        self.shrink_every_n_steps = shrink_every_n_steps
        self.fused = False
        self.applied_step = -1
        self._targets: dict[str, float] = {}
        self._widths: dict[str, int] = {}  # channels of each configured tensor before any pruning
        self._resolved_config: list[dict[str, Any]] = []  # the tensors chosen at setup, to mask again after a shrink
        self._resolved_end: int | None = end_step
        self._held_input: Any = None
        self._hook = None

    # -- setup --------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        if type(strategy).__name__ in _SHARDED_STRATEGIES:
            raise PruningConfigError(
                f"StructuredPruning does not support {type(strategy).__name__}: it shards parameters, so masks and "
                "fusion cannot see whole weights. Supported: single-device and DDP strategies (ddp, ddp_spawn, "
                "ddp_find_unused_parameters_true)."
            )
        if getattr(strategy, "_layer_sync", None) is not None:
            raise PruningConfigError(
                "StructuredPruning does not support Trainer(sync_batchnorm=True): Lightning swaps the BatchNorm "
                "layers after setup, dropping their masks. Use sync_batchnorm=False (the default)."
            )
        if self._hook is None:
            self._hook = pl_module.register_load_state_dict_pre_hook(self._before_load)
        if self.fused or self.pruner.model is not None:
            return  # a second fit() continues with the same masks, or with the already narrowed model
        self.pruner.prepare(pl_module, self.config, include=self.include, exclude=self.exclude,
                            exclude_output=self.config is None, example_inputs=_example_inputs(pl_module))
        if not self.pruner.groups:
            rank_zero_warn("StructuredPruning found no prunable layer; training continues dense")
        self._targets = {g["tensor_fqn"]: g["sparsity_level"] for g in self.pruner.groups}
        self._widths = {g["tensor_fqn"]: _channels(g) for g in self.pruner.groups}
        self._resolved_config = [{k: v for k, v in g.items() if k not in ("module", "module_fqn", "tensor_name")}
                                 for g in self.pruner.groups]
        for group in self.pruner.groups:
            group["sparsity_level"] = 0.0  # nothing is pruned until the schedule says so
        rank_zero_info(f"StructuredPruning: masking {len(self.pruner.groups)} tensors "
                       f"({', '.join(self._targets) or 'none'})")

    def _before_load(self, module, state_dict, prefix, *args) -> None:
        """Shape the model like a checkpoint written after fusion (or after a mid-fit shrink) before it loads."""
        dense = dense_view(state_dict)
        masked_checkpoint = len(dense) != len(state_dict)
        if not _shapes_differ(module, dense, prefix):
            if not masked_checkpoint:  # dense weights (say, pretrained) for a model that is about to be pruned
                _name_as_masked(module, state_dict, prefix)
            return  # the usual resume: same masks, same widths
        strip_masks(module)
        narrow_to_state_dict(module, dense, prefix)
        self.pruner.forget_model()
        if masked_checkpoint:  # shrunk mid-fit with the schedule still running: masks go back on the narrow layers
            self._prepare_again(module)
        else:
            self.fused = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.end_step is None and self.schedule != "oneshot":
            self._resolved_end = max(int(trainer.estimated_stepping_batches), self.start_step + 1)

    # -- the schedule -------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._held_input is None:
            self._held_input = _model_input(batch)
        step = trainer.global_step
        if self.fused or not self.pruner.groups or step == self.applied_step:
            return
        self.applied_step = step
        if self._apply(trainer, step):
            pl_module.log("pruning/sparsity", self.sparsity(), rank_zero_only=True)
        if self.shrink_every_n_steps and step % self.shrink_every_n_steps == 0 and self._masks_prune_something():
            self._shrink(trainer, pl_module, schedule_done=self._levels(None) == self._levels(step))

    def _masks_prune_something(self) -> bool:
        return any(not bool(s["mask"].all()) for s in self.pruner.state.values())

    def _shrink(self, trainer: pl.Trainer, pl_module: pl.LightningModule, schedule_done: bool) -> None:
        """Fuse now; carry the optimizers' state over to the narrowed parameters; re-wrap DDP."""
        self.pruner.prune()
        if schedule_done:
            self.fused = True
        else:
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
        self.pruner.prepare(pl_module, self._resolved_config, example_inputs=_example_inputs(pl_module))
        for group in self.pruner.groups:
            group["sparsity_level"] = 0.0

    def _levels(self, step: int | None) -> dict[str, float]:
        """Each group's level at ``step`` (None: the final target), relative to the layer's width now."""
        levels = {}
        for group in self.pruner.groups:
            fqn = group["tensor_fqn"]
            target = self._targets[fqn]
            level = target if step is None else sparsity_at(
                self.schedule, step, target, self.start_step, self._resolved_end, self.every_n_steps)
            levels[fqn] = _relative_level(level, self._widths[fqn], _channels(group))
        return levels

    def _apply(self, trainer: pl.Trainer, step: int | None) -> bool:
        """Set the groups' levels for ``step``; step the pruner and share rank 0's masks if any level changed."""
        levels = self._levels(step)
        if all(g["sparsity_level"] == levels[g["tensor_fqn"]] for g in self.pruner.groups):
            return False
        for group in self.pruner.groups:
            group["sparsity_level"] = levels[group["tensor_fqn"]]
        self.pruner.step()
        self._broadcast_masks(trainer)
        return True

    def _broadcast_masks(self, trainer: pl.Trainer) -> None:
        if trainer.world_size <= 1:
            return
        masks = {fqn: state["mask"].cpu() for fqn, state in self.pruner.state.items()}
        masks = trainer.strategy.broadcast(masks, src=0)
        with torch.no_grad():
            for fqn, mask in masks.items():
                target = self.pruner.state[fqn]["mask"]
                target.copy_(mask.to(target.device))

    def sparsity(self) -> float:
        """Fraction of the configured channels that are masked now."""
        total = sum(s["mask"].numel() for s in self.pruner.state.values())
        pruned = sum(int((~s["mask"]).sum()) for s in self.pruner.state.values())
        return pruned / total if total else 0.0

    # -- fusion -------------------------------------------------------------------------------------------------
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fused or not self.prune_on_fit_end or not self.pruner.groups:
            return
        self._apply(trainer, None)  # whatever stopped training early, the target is reached before fusion
        self.fuse(trainer, pl_module)
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
                trainer.save_checkpoint(callback.last_model_path)

    def fuse(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove the masked channels in place, check the result, and report what changed."""
        example = _to_device(self._held_input, pl_module.device)
        widths_before = layer_widths(pl_module)
        sparsity = self.sparsity()
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            expected = pl_module(example) if example is not None else None
            before = _measure(pl_module, example)
            self.pruner.prune()
            for optimizer in trainer.optimizers:  # so checkpoints written from now on resume on the narrow model
                carry_optimizer_state(optimizer, self.pruner.lineage, list(pl_module.parameters()))
            actual = pl_module(example) if example is not None else None
            after = _measure(pl_module, example)
        pl_module.train(was_training)
        self.fused = True
        if self.verify:
            self._verify(expected, actual, self.pruner.notes)
        widths_after = layer_widths(pl_module)
        metrics = {"pruning/sparsity": sparsity, "pruning/params_before": before[0], "pruning/params": after[0]}
        if before[1] is not None:
            metrics.update({"pruning/macs_before": before[1], "pruning/macs": after[1]})
        _log_metrics(trainer, metrics)
        rank_zero_info(_summary(widths_before, widths_after, before, after))

    def _verify(self, expected, actual, notes: list[str]) -> None:
        if expected is None:
            rank_zero_warn("StructuredPruning(verify=True) held no tensor batch to compare; skipped the check")
            return
        if not isinstance(expected, torch.Tensor) or expected.shape != actual.shape:
            rank_zero_warn("the pruned model's output has another shape than the masked one (an output layer was "
                           "configured); verification skipped")
            return
        diff = (expected.float() - actual.float()).abs().max().item()
        bound = 1e-5 * max(1.0, expected.float().abs().max().item())
        if diff > bound:
            message = f"pruned output differs from the masked output by {diff:.3g} (bound {bound:.3g})"
            if notes:
                rank_zero_warn(message + " (expected: fusion was approximate)")
            else:
                raise RuntimeError(message + "; please report this model structure as a lightning_prune bug")

    # -- checkpointing ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "applied_step": self.applied_step,
            "fused": self.fused,
            "targets": dict(self._targets),
            "levels": {g["tensor_fqn"]: g["sparsity_level"] for g in self.pruner.groups},
            "end_step": self._resolved_end,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied_step = state_dict["applied_step"]
        self.fused = self.fused or state_dict["fused"]
        self._targets = state_dict["targets"] or self._targets
        self._resolved_end = state_dict["end_step"]
        for group in self.pruner.groups:
            group["sparsity_level"] = state_dict["levels"].get(group["tensor_fqn"], group["sparsity_level"])


def _channels(group: dict[str, Any]) -> int:
    """Channels of a configured tensor now (an LSTM weight has 4 gate rows per hidden unit)."""
    rows = getattr(group["module"].parametrizations, group["tensor_name"])[0].mask.numel()
    return rows // 4 if isinstance(group["module"], torch.nn.LSTM) else rows


def _relative_level(level: float, original: int, current: int) -> float:
    """The level that prunes a layer now ``current`` wide to ``level`` of its ``original`` width.

    Pruners count ``int(n * level)`` (or round) channels; aiming a quarter channel above the whole count makes either
    rounding land on it.
    """
    if current == original or level == 0:
        return level
    remaining = int(original * level) - (original - current)
    return (remaining + 0.25) / current if remaining > 0 else 0.0


def carry_optimizer_state(optimizer: torch.optim.Optimizer, lineage: list, model_order: list[torch.Tensor]) -> None:
    """Point ``optimizer`` at the narrowed parameters, slicing each one's state (momentum, Adam moments) to match.

    Each group's parameters are put in the model's order, as a freshly built optimizer over the narrowed model
    would list them, so a checkpoint written now resumes into one.
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


def _shapes_differ(module: torch.nn.Module, dense: dict[str, torch.Tensor], prefix: str) -> bool:
    current = dense_view({prefix + k: v for k, v in module.state_dict().items()})
    return any(key in dense and tuple(value.shape) != tuple(dense[key].shape) for key, value in current.items())


def _name_as_masked(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], prefix: str) -> None:
    """Rename a dense state dict's masked tensors to their parametrized names; the masks keep their values."""
    for key, value in module.state_dict().items():
        head, marker, tail = key.partition(".parametrizations.")
        if not marker or prefix + key in state_dict:
            continue
        dense_key = f"{prefix}{head}.{tail.removesuffix('.original')}"
        state_dict[prefix + key] = state_dict.pop(dense_key) if tail.endswith(".original") else value


def _model_input(batch: Any) -> Any:
    """The part of a training batch the model's forward takes: the batch, or its first element."""
    if isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    return batch.detach().clone() if isinstance(batch, torch.Tensor) else None


def _to_device(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _measure(model: torch.nn.Module, example: Any) -> tuple[int, int | None]:
    return count_params(model), (count_macs(model, example) if example is not None else None)


@rank_zero_only
def _log_metrics(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def _summary(before: dict, after: dict, measured_before: tuple, measured_after: tuple) -> str:
    lines = ["StructuredPruning: fused", f"{'layer':<40} {'channels (in, out)':>28}"]
    for name, widths in before.items():
        if after.get(name) != widths:
            lines.append(f"{name:<40} {str(widths):>13} -> {str(after.get(name)):<12}")
    lines.append(f"params {measured_before[0]:,} -> {measured_after[0]:,}")
    if measured_before[1] is not None:
        lines.append(f"MACs   {measured_before[1]:,} -> {measured_after[1]:,}")
    return "\n".join(lines)


def _example_inputs(pl_module) -> Any:
    """Lightning's ``example_input_array``: with it, models torch.fx cannot trace (transformers) are read with
    torch.export."""
    return getattr(pl_module, "example_input_array", None)
