"""Reading a checkpoint: a file into a checkpoint dict, and the state dict of a Lightning checkpoint or a plain one."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from lightning_prune.checkpoint.weights import is_weights, read_weights
from lightning_prune.errors import PruningConfigError


def read_checkpoint(path: str | os.PathLike, weights_only: bool = True, mmap: bool = False) -> Any:
    """The object a checkpoint file holds (a Lightning checkpoint dict or a state dict), its tensors on the CPU.

    ``weights_only``: ``torch.load``'s safe unpickler (tensors and plain containers only); ``mmap``: map the file's
    storages instead of reading them (a quick look at a large file).

    A ``.safetensors`` file, a shard index or a ``save_pretrained`` directory is read by
    :func:`~lightning_prune.checkpoint.weights.read_weights` (tensors only: ``weights_only`` and ``mmap`` do not apply).

    Raises:
        Whatever ``torch.load`` raises for a missing, unreadable or (``weights_only``) unsafe file;
        PruningConfigError for a safetensors path that holds no weights (see ``read_weights``).
    """
    if is_weights(path):
        return read_weights(path)
    return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)


def state_dict_of(checkpoint: Mapping[str, Any], caller: str) -> dict[str, torch.Tensor]:
    """The state dict of a Lightning checkpoint or a plain one; every value must be a tensor.

    Raises:
        PruningConfigError: a value that is not a tensor (``_extra_state`` entries may hold anything), naming
            ``caller``.
    """
    state_dict = dict(checkpoint.get("state_dict", checkpoint))
    bad = [key for key, value in state_dict.items()
           if not isinstance(value, torch.Tensor) and not key.endswith("_extra_state")]  # get_extra_state(): any
    if bad:
        raise PruningConfigError(f"{caller}: a state dict maps names to tensors; {bad[:3]} hold "
                                 f"{[type(state_dict[k]).__name__ for k in bad[:3]]}")
    return state_dict
