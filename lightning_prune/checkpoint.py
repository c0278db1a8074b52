"""Loading checkpoints of pruned models: the narrowed shapes in the state dict are the structure record.

A pruned model's ``state_dict`` already says how wide every layer is, so a freshly built dense model can be narrowed
to match it before a strict load: no separate record to keep in sync.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_prune.errors import PruningConfigError
from lightning_prune.fusion.rules import registry
from lightning_prune.masks import bake_masks


def narrow_to_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> list[str]:
    """Resize ``model``'s parameters and buffers to the shapes in ``state_dict``; returns the changed modules.

    Layers keep their class; their size attributes (``in_features``, ``out_channels``, ``hidden_size``...) follow
    the new tensors. A bias that fusion created where the layer had none is created too.
    """
    if any(".parametrizations." in key for key in state_dict):
        raise PruningConfigError(
            "this state dict holds pruning masks (it was saved before fusion); load it into a model prepared by the "
            "same pruner configuration, or resume training with the StructuredPruning callback"
        )
    changed = []
    for name, module in model.named_modules():
        base = f"{prefix}{name}." if name else prefix
        resized = False
        for kind in ("_parameters", "_buffers"):
            for tensor_name, tensor in list(getattr(module, kind).items()):
                incoming = state_dict.get(base + tensor_name)
                if incoming is None or (tensor is not None and tensor.shape == incoming.shape):
                    continue
                like = tensor if tensor is not None else next(iter(module.parameters()), incoming)
                fresh = torch.empty(incoming.shape, dtype=like.dtype, device=like.device)
                getattr(module, kind)[tensor_name] = nn.Parameter(fresh) if kind == "_parameters" else fresh
                resized = True
        if resized:
            rule = registry.active().module_rule(module)
            if hasattr(rule, "sync"):
                rule.sync(module)
            changed.append(name)
    synced = registry.sync_containers(model, [model.get_submodule(name) for name in changed])
    return changed + [name for name, module in model.named_modules() if module in synced]


def dense_view(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict as the unmasked model would name it: ``a.parametrizations.weight.original`` -> ``a.weight``,
    mask buffers dropped."""
    dense = {}
    for key, value in state_dict.items():
        head, marker, tail = key.partition(".parametrizations.")
        if not marker:
            dense[key] = value
        elif tail.endswith(".original"):
            dense[f"{head}.{tail.removesuffix('.original')}"] = value
    return dense


def strip_masks(model: nn.Module) -> None:
    """Remove every pruning parametrization, keeping the unmasked tensors (they are about to be overwritten)."""
    for module in model.modules():
        bake_masks(module, keep_masked_values=False)


def load_pruned(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any], strict: bool = True) -> nn.Module:
    """Narrow a freshly built dense ``model`` to a checkpoint written after pruning, then load it strictly.

    ``checkpoint`` is a Lightning checkpoint path, a loaded checkpoint dict, or a plain state dict.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state_dict = checkpoint.get("state_dict", checkpoint)
    narrow_to_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=strict)
    return model
