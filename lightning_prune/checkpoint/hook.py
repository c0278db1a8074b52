"""The StructuredPruning callback's load pre-hook: shape a module that may carry masks so a checkpoint loads into
it, registered through a hook that a copy or pickle of the module does not carry along."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import nn

from lightning_prune.checkpoint.keys import dense_view, is_masked
from lightning_prune.checkpoint.load import load_plain
from lightning_prune.checkpoint.resize import resize_to, strip_masks
from lightning_prune.masks import has_masks_anywhere


def reshape_for_load(module: nn.Module, state_dict: MutableMapping[str, torch.Tensor], prefix: str = "") -> str:
    """Shape ``module`` so that ``state_dict`` loads into it; the logic of the callback's load pre-hook.

    Returns what it found, for the caller's bookkeeping:

    - ``"same"``: the module carries masks and the checkpoint matches them (the usual resume);
    - ``"dense"``: the module carries masks, the checkpoint is a dense one of the same widths (pretrained weights):
      its tensors are renamed to the masked names in ``state_dict``, the masks stay as they are;
    - ``"fused"``: the module carried masks, the checkpoint was written after fusion: masks removed, module narrowed;
    - ``"shrunk"``: the module carried masks, the checkpoint is masked but narrower (shrunk mid-fit): masks removed,
      module narrowed; the caller attaches masks again;
    - ``"plain"``: the module carries no masks (fused, or never prepared): see :func:`load_plain`.

    Raises:
        PruningConfigError: a module without masks would have to widen (see :func:`load_plain`).
    """
    if not has_masks_anywhere(module):
        load_plain(module, state_dict, prefix)
        return "plain"
    own = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    dense = dense_view(own)
    current = dense_view(module.state_dict())
    if not any(key in dense and tuple(value.shape) != tuple(dense[key].shape) for key, value in current.items()):
        if not is_masked(own):
            _name_as_masked(module, state_dict, prefix)
            return "dense"
        return "same"
    strip_masks(module)
    resize_to(module, dense)
    return "shrunk" if is_masked(own) else "fused"


def _name_as_masked(module: nn.Module, state_dict: MutableMapping[str, torch.Tensor], prefix: str) -> None:
    """Rename a dense state dict's masked tensors to their parametrized names; the masks keep their values."""
    for key, value in module.state_dict().items():
        head, marker, tail = key.partition(".parametrizations.")
        if not marker or prefix + key in state_dict:
            continue
        dense_key = f"{prefix}{head}.{tail.removesuffix('.original')}"
        if tail.endswith(".original"):
            if dense_key in state_dict:
                state_dict[prefix + key] = state_dict.pop(dense_key)
        else:
            state_dict[prefix + key] = value


class DetachingHook:
    """A module hook that calls ``fn`` while attached; a copy or pickle of the module carries a no-op in its place.

    ``StructuredPruning`` registers its load pre-hook through it, so a module deep-copied or pickled mid-fit never
    drags the callback along (its pruner holds an fx graph that cannot be pickled)."""

    def __init__(self, fn: Any):
        self.fn = fn

    def __call__(self, *args: Any) -> None:
        self.fn(*args)

    def __reduce__(self):
        return _NoOpHook, ()


class _NoOpHook:
    def __call__(self, *args: Any) -> None:
        """A module copied while a StructuredPruning callback was attached loads as a plain module."""
