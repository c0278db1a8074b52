"""Pruning a model that FSDP2 (``torch.distributed.fsdp.fully_shard``) shards, as Lightning's
``ModelParallelStrategy`` does in the LightningModule's ``configure_model``.

The callback's ``setup`` runs before ``configure_model``, so the masks are attached to the whole, unsharded model:
the plan, ``explain()`` and the check of the example input see full weights. ``fully_shard`` then shards each
masked weight's ``parametrizations.<name>.original`` on dim 0 (its rows: our channels) and leaves the mask buffers
whole, replicated on every rank. Before a forward FSDP2 gathers the full parameter and the parametrization masks it
with the full mask, so masking needs nothing more.

What does need whole weights happens between :func:`gathered` (a decision: weight-based pruners score full rows,
identical on every rank) and :func:`unsharded` (fusion: FSDP2 is taken off the module, the masked channels are
removed, and the LightningModule's ``configure_model`` shards the narrowed model again). Statistics gathered from
the run (activations) are averaged over the ranks as under DDP.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import lightning.pytorch as pl
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer import call
from torch import nn
from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
from torch.distributed._composable_state import _module_state_mapping
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from lightning_prune.errors import PruningConfigError
from lightning_prune.fusion.plan import PruningPlan
from lightning_prune.schedule import SparsityScheduler


def is_sharded(trainer: pl.Trainer) -> bool:
    """Whether the trainer's strategy shards the module with FSDP2 (``ModelParallelStrategy``)."""
    return isinstance(trainer.strategy, ModelParallelStrategy)


def refuse_unsupported(trainer: pl.Trainer, shrink_every_n_steps: int | None) -> None:
    """Raise for what the callback cannot do under ``ModelParallelStrategy``: shrinking during training (the
    re-sharded model gets new optimizers, so their state would be lost mid-run)."""
    if is_sharded(trainer) and shrink_every_n_steps:
        raise PruningConfigError(
            f"StructuredPruning(shrink_every_n_steps={shrink_every_n_steps}) is not supported under "
            "ModelParallelStrategy: a shrink re-shards the model, which needs new optimizers, and their state "
            "(momentum, Adam moments) would be lost mid-run. Use shrink_every_n_steps=None (fuse when fit ends) "
            "or strategy='ddp'.")


def fsdp_modules(module: nn.Module) -> list[FSDPModule]:
    """The modules ``fully_shard`` was applied to, in ``modules()`` order."""
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def whole_weights(trainer: pl.Trainer, module: nn.Module, scheduler: SparsityScheduler,
                  step: int | None) -> AbstractContextManager[None]:
    """:func:`gathered` when the trainer shards ``module`` and ``scheduler.step(step)`` (``finish()`` for
    ``step=None``) is about to decide masks; otherwise nothing. Every rank computes the same answer."""
    if not is_sharded(trainer) or step == scheduler.last_step:
        return nullcontext()
    levels = scheduler.levels(step)
    if all(g["sparsity_level"] == levels[g["tensor_fqn"]] for g in scheduler.sparsifier.groups):
        return nullcontext()
    return gathered(module, scheduler.sparsifier.plan)


@contextmanager
def gathered(module: nn.Module, plan: PruningPlan | None = None) -> Iterator[None]:
    """Within the block every FSDP2-sharded parameter of ``module`` is its full, unsharded tensor (the same on
    every rank), and ``plan`` finds its tensors there; resharded on exit. A collective: every rank must enter it at
    the same point. Without FSDP2 it does nothing."""
    sharded = fsdp_modules(module)
    for fsdp in sharded:
        fsdp.unshard()
    if plan is not None:
        plan.current_walk()  # the plan knows the tensors by identity: the unsharded ones replaced the walk's
    try:
        yield
    finally:
        for fsdp in sharded:
            fsdp.reshard()


def remove_fsdp(module: nn.Module) -> None:
    """Take FSDP2 off ``module`` in place: every sharded parameter becomes a plain ``nn.Parameter`` holding the full
    tensor, each module gets back its own class and loses FSDP2's hooks and state. A collective (the parameters are
    all-gathered): every rank must call it. Gradients are dropped."""
    for fsdp in fsdp_modules(module):
        state = fsdp._get_fsdp_state()
        for group in state._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                info = fsdp_param._module_info
                sharded = fsdp_param.sharded_param
                full = sharded.full_tensor() if isinstance(sharded, DTensor) else sharded
                param = nn.Parameter(full.detach().clone(), requires_grad=sharded.requires_grad)
                for owner, name in [(info.module, info.param_name),
                                    *zip(info.shared_modules, info.shared_param_names, strict=True)]:
                    owner._parameters[name] = param
        for handle in {id(h): h for h in (state._pre_forward_hook_handle, state._post_forward_hook_handle)}.values():
            handle.remove()
        for managed in state._modules:  # fully_shard's entry in the composable APIs' registry and state
            managed.__dict__.get(REGISTRY_KEY, {}).pop("fully_shard", None)
            states = managed.__dict__.get(STATE_KEY, {})
            for key in [k for k, v in states.items() if v is state]:
                del states[key]
            _module_state_mapping.pop(managed, None)
        fsdp.__class__ = type(fsdp).__mro__[type(fsdp)._orig_cls_mro_index]
    for sub in module.modules():
        sub.__dict__.pop("_is_fsdp_managed_module", None)
        sub.__dict__.pop("_fsdp_use_orig_params", None)


@contextmanager
def unsharded(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Within the block ``pl_module`` is a plain, whole module on every rank (no optimizer refers to it); on exit
    the LightningModule's ``configure_model`` shards it again and the optimizers are created anew for its
    parameters. A collective: every rank must enter it at the same point. Without sharding it does nothing."""
    if not is_sharded(trainer):
        yield
        return
    strategy = trainer.strategy
    remove_fsdp(pl_module)
    optimizers = strategy.optimizers
    strategy.optimizers = []
    try:
        yield
    finally:
        strategy.optimizers = optimizers
        call._call_configure_model(trainer)
        strategy.model_to_device()
        if optimizers:
            strategy.setup_optimizers(trainer)
