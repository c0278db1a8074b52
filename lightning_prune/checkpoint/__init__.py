"""Loading checkpoints of pruned models: every checkpoint a pruning run writes is usable as a pruned model.

A run writes two kinds of state dict:

- **fused** (after ``prune()``: ``last.ckpt`` once fit ends, ``trainer.save_checkpoint`` afterwards): plain tensor
  names, narrowed shapes. The shapes are the structure record: a freshly built model is narrowed to them, then loads.
- **masked** (before fusion: a ``ModelCheckpoint`` top-k or periodic file written mid-schedule): full-width tensors
  under ``<module>.parametrizations.<tensor>.original`` and one bool row mask per pruned tensor. It stands for the
  pruned model those masks describe; :func:`load_pruned` builds that model by attaching the saved masks and fusing.

Loading never widens a model that pruning has already narrowed: a checkpoint that stands for a wider model is refused
with a :class:`PruningConfigError` that says how to load it on its own.

One concept a module: :mod:`.files` reads a checkpoint file, :mod:`.keys` reads what a state dict holds,
:mod:`.resize` gives a model a state dict's widths, :mod:`.masked` fuses a masked state dict, :mod:`.load` holds the
public entry points, :mod:`.hook` the callback's load pre-hook, :mod:`.stale` spots a best checkpoint written before
the schedule finished.
"""

from lightning_prune.checkpoint.files import read_checkpoint, state_dict_of
from lightning_prune.checkpoint.hook import (
    DetachingHook,
    _NoOpHook,  # noqa: F401  (modules pickled mid-fit before the split name it lightning_prune.checkpoint._NoOpHook)
    reshape_for_load,
)
from lightning_prune.checkpoint.keys import dense_view, is_masked, masked_config, masked_sparsity
from lightning_prune.checkpoint.load import load_plain, load_pruned, narrow_to_state_dict
from lightning_prune.checkpoint.masked import KeepLoadedMasks, fuse_masked, fused_state_dict
from lightning_prune.checkpoint.resize import resize_to, strip_masks
from lightning_prune.checkpoint.stale import masked_sparsity_of_file, stale_best_checkpoints

__all__ = [
    "DetachingHook", "KeepLoadedMasks", "dense_view", "fuse_masked", "fused_state_dict", "is_masked", "load_plain",
    "load_pruned", "masked_config", "masked_sparsity", "masked_sparsity_of_file", "narrow_to_state_dict",
    "read_checkpoint", "reshape_for_load", "resize_to", "stale_best_checkpoints", "state_dict_of", "strip_masks",
]
