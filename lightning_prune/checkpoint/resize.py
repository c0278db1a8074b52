"""Changing a model's widths to a plain state dict's shapes: masks stripped, tensors resized, size attributes and
container head counts synced by the rules."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lightning_prune.fusion.rules import registry, rule_for
from lightning_prune.masks import bake_masks


def strip_masks(model: nn.Module) -> None:
    """Remove every pruning parametrization, keeping the unmasked tensors (they are about to be overwritten)."""
    for module in model.modules():
        bake_masks(module, keep_masked_values=False)


def resize_to(model: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> list[str]:
    """Give ``model``'s parameters and buffers the shapes in a plain (unmasked) ``state_dict``; returns the changed
    modules. Layers keep their class; their size attributes (``in_features``, ``out_channels``, ``hidden_size``...)
    follow the new tensors. A bias that fusion created (or removed) is created (or removed) too. A tensor that
    several modules hold (an embedding tied to the LM head) is replaced by one new tensor, so the tie holds."""
    changed = []
    replaced: dict[int, torch.Tensor] = {}  # id of a tensor resized -> its replacement
    for name, module in model.named_modules():
        base = f"{prefix}{name}." if name else prefix
        resized = False
        rule = rule_for(module)
        before = rule.widths(module) if rule is not None else None
        for kind in ("_parameters", "_buffers"):
            for tensor_name, tensor in list(getattr(module, kind).items()):
                incoming = state_dict.get(base + tensor_name)
                if incoming is None:
                    if tensor is not None and tensor_name == "bias" and base + "weight" in state_dict:
                        getattr(module, kind)[tensor_name] = None  # the checkpoint's layer has no bias
                        resized = True
                    continue
                if tensor is not None and tensor.shape == incoming.shape:
                    continue
                tied = replaced.get(id(tensor)) if tensor is not None else None
                if tied is not None and tied.shape == incoming.shape:
                    getattr(module, kind)[tensor_name] = tied
                    resized = True
                    continue
                like = tensor if tensor is not None else next(iter(module.parameters()), incoming)
                fresh = torch.empty(incoming.shape, dtype=like.dtype, device=like.device)
                fresh = nn.Parameter(fresh) if kind == "_parameters" else fresh
                getattr(module, kind)[tensor_name] = fresh
                if tensor is not None:
                    replaced[id(tensor)] = fresh
                resized = True
        if resized:
            if rule is not None:
                rule.resized(module, before)
            changed.append(name)
    synced = registry.sync_containers(model, [model.get_submodule(name) for name in changed])  # head counts
    return changed + [name for name, module in model.named_modules() if module in synced and name not in changed]
