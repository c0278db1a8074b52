"""Weights-only checkpoint files: safetensors files, Hugging Face shard indexes and ``save_pretrained`` directories.

:func:`read_weights` reads what ``safetensors.torch.save_file`` and ``save_pretrained`` write (one
``model.safetensors``, or shards listed by ``model.safetensors.index.json``; a directory holding either may be given)
into a state dict; :func:`~lightning_prune.checkpoint.files.read_checkpoint` sends such paths here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from lightning_prune.errors import PruningConfigError

#: the file names ``save_pretrained`` writes, looked for in a directory (the index first)
PRETRAINED_FILES = ("model.safetensors.index.json", "model.safetensors")


def is_weights(path: str | os.PathLike) -> bool:
    """Whether :func:`read_weights` reads ``path``: a directory, a ``.safetensors`` file or an ``.index.json``."""
    path = Path(path)
    return path.is_dir() or path.suffix == ".safetensors" or path.name.endswith(".index.json")


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict stored at ``path`` (see :func:`is_weights`), on the CPU.

    Raises:
        PruningConfigError: the path does not exist, a directory holds no safetensors weights, or an index has no
            ``weight_map`` or lists a shard that is missing.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in PRETRAINED_FILES if (path / name).is_file()]
        if not found:
            raise PruningConfigError(f"{str(path)!r} is a directory without {' or '.join(PRETRAINED_FILES)}: give a "
                                     "checkpoint file, or a directory written by save_pretrained")
        path = found[0]
    if not path.is_file():
        raise PruningConfigError(f"no checkpoint file at {str(path)!r}")
    if path.name.endswith(".index.json"):
        return read_shards(path)
    return load_file(path, device="cpu")


def read_shards(index: Path) -> dict[str, torch.Tensor]:
    """The state dict spread over the shards an index's ``weight_map`` names (paths relative to the index)."""
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise PruningConfigError(f"{str(index)!r} has no 'weight_map': not a safetensors shard index")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        file = index.parent / shard
        if not file.is_file():
            raise PruningConfigError(f"the shard {shard!r} that {index.name} lists is not in {str(index.parent)!r}")
        state.update(load_file(file, device="cpu"))
    return state
