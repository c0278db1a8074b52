"""What the callback checks about the Trainer at ``setup``, before any mask exists: a strategy it can work under,
and an example input that ``forward`` runs on.

Each check raises :class:`~lightning_prune.errors.PruningConfigError` naming the fix.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

from lightning_prune import inputs
from lightning_prune.errors import PruningConfigError
from lightning_prune.verify import try_forward

_SHARDED = (FSDPStrategy, DeepSpeedStrategy)
_SUPPORTED = ("Supported: single-device strategies, strategy='ddp' (also 'ddp_find_unused_parameters_true') and "
              "ModelParallelStrategy(tensor_parallel_size=1) with fully_shard (FSDP2) in configure_model.")
_EXAMPLE_HINT = ("Set `self.example_input_array` in your LightningModule's __init__ to one input for forward(): a "
                 "tensor, a tuple of positional arguments or a dict of keyword arguments (Lightning's convention).")


def refuse_unsupported(trainer: pl.Trainer) -> None:
    """Raise for a strategy the callback cannot work under (sharded, process-spawning, sync_batchnorm), naming
    what is supported."""
    strategy = trainer.strategy
    if isinstance(strategy, _SHARDED):
        raise PruningConfigError(
            f"StructuredPruning does not support {type(strategy).__name__}: it shards parameters its own way, so masks "
            f"and fusion cannot see whole weights. {_SUPPORTED}"
        )
    tensor_parallel = getattr(strategy, "_tensor_parallel_size", 1)
    if isinstance(strategy, ModelParallelStrategy) and tensor_parallel != 1:
        raise PruningConfigError(
            f"StructuredPruning does not support ModelParallelStrategy(tensor_parallel_size={tensor_parallel}): "
            "tensor parallelism splits a layer's rows or columns across ranks inside one forward, which masks "
            "and fusion do not follow. Use tensor_parallel_size=1 (data parallel FSDP2). " + _SUPPORTED
        )
    if isinstance(strategy.launcher, _MultiProcessingLauncher):
        raise PruningConfigError(
            f"StructuredPruning does not support {type(strategy).__name__} with processes started by "
            "torch.multiprocessing (strategy='ddp_spawn', 'ddp_fork', 'ddp_notebook'): after fit Lightning copies "
            "the workers' weights into the main process's module with a load that cannot change layer widths, so the "
            f"pruned model cannot come back. {_SUPPORTED} In a notebook, train on one device or run a script."
        )
    if getattr(strategy, "_layer_sync", None) is not None:
        raise PruningConfigError(
            "StructuredPruning does not support Trainer(sync_batchnorm=True): Lightning swaps the BatchNorm "
            "layers after setup, dropping their masks. Use sync_batchnorm=False (the default)."
        )


def example_input(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    """The module's ``example_input_array``, else one from the first training batch; checked by running forward."""
    name = type(pl_module).__name__
    example, source = pl_module.example_input_array, f"{name}.example_input_array"
    if example is None:
        source = "the first training batch (batch[0] of a tuple batch)"
        try:
            batch = inputs.first_batch(trainer.fit_loop._data_source.dataloader())
        except Exception as error:
            raise PruningConfigError(f"StructuredPruning could not draw the first training batch at setup "
                                     f"({type(error).__name__}: {error}). {_EXAMPLE_HINT}") from error
        example = inputs.from_batch(batch)
        if example is None:
            raise PruningConfigError(f"StructuredPruning cannot tell {name}.forward's input in a training batch of "
                                     f"type {type(batch).__name__}. {_EXAMPLE_HINT}")
    example = inputs.detached(example)
    _, error = try_forward(pl_module, inputs.to_device(example, pl_module.device), eval_mode=True)
    if error:
        raise PruningConfigError(f"{name}.forward cannot run on {source}: {error}. {_EXAMPLE_HINT}")
    return example
