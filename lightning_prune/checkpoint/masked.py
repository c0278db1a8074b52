"""A masked state dict (written mid-schedule) made into the pruned model it stands for: its widths, its saved masks
attached with the config that wrote them, then fused."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_prune.checkpoint.keys import dense_view, masked_config
from lightning_prune.checkpoint.resize import resize_to, strip_masks
from lightning_prune.errors import PruningConfigError
from lightning_prune.fusion.ranks import remove_rank_probes
from lightning_prune.sparsifier import BaseStructuredSparsifier


class KeepLoadedMasks(BaseStructuredSparsifier):
    """A sparsifier that decides nothing: its masks are the ones loaded from a checkpoint."""

    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        """Keep the mask as loaded."""


def fuse_masked(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, config: list[dict] | None = None,
                example_inputs: Any = None, strict: bool = True) -> BaseStructuredSparsifier:
    """Make ``model`` (any width, masks or not) the pruned model that a masked ``state_dict`` stands for, in place:
    widths as saved, the saved masks attached and loaded, then fused. Returns the pruner that fused it.

    ``config`` is the pruner config that wrote the state dict (read from its keys when None).

    Raises:
        PruningConfigError: the state dict's keys do not fit the model prepared with that config.
    """
    strip_masks(model)
    resize_to(model, dense_view(state_dict))
    pruner = _prepare_like(model, state_dict, config, example_inputs)
    try:
        model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as error:  # a mask or tensor of another size than its layer's
        strip_masks(model)
        raise PruningConfigError(f"this masked state dict does not fit {type(model).__name__}: "
                                 f"{' '.join(str(error).split())[:400]}") from error
    except Exception:
        strip_masks(model)
        raise
    # no forward runs between this prepare and prune, so the rank probes would warn that none confirmed the batched
    # reading; the saved masks came from a run whose forward did
    remove_rank_probes(pruner.rank_probes)
    pruner.prune()
    return pruner


def fused_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], **kwargs: Any) -> dict[str, Any]:
    """The fused state dict of a masked ``state_dict``, computed on a copy of ``model`` (left as it is)."""
    scratch = copy.deepcopy(model)
    fuse_masked(scratch, state_dict, **kwargs)
    return scratch.state_dict()


def _prepare_like(model: nn.Module, state_dict: Mapping[str, Any], config: list[dict] | None,
                  example_inputs: Any) -> BaseStructuredSparsifier:
    attempts = [config] if config is not None else []
    if config is None:
        guessed, unknown = masked_config(state_dict)
        attempts.append(guessed)
        if unknown:  # a layer without bias: whether the BatchNorm after it was masked tells prune_bias
            attempts.append([{**e, "prune_bias": False} if e["tensor_fqn"] in unknown else e for e in guessed])
    for attempt in attempts:
        pruner = KeepLoadedMasks()
        pruner.prepare(model, [dict(entry) for entry in attempt], example_inputs=example_inputs)
        differ = sorted(set(model.state_dict()) ^ set(state_dict))
        if not differ:
            return pruner
        strip_masks(model)
    raise PruningConfigError(
        f"this masked state dict does not fit {type(model).__name__} prepared with the masks it holds "
        f"({', '.join(e['tensor_fqn'] for e in attempts[-1])}): keys differ, e.g. {differ[:4]}"
    )
