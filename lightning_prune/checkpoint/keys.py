"""What a state dict holds: masked or fused, its tensors under the unmasked names, the share of rows its masks
drop, and the pruner config that wrote it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

_MASK_KEY = re.compile(r"^(?P<module>.+)\.parametrizations\.(?P<tensor>[^.]+)\.0\.mask$")


def is_masked(state_dict: Mapping[str, Any]) -> bool:
    """Whether ``state_dict`` was written with pruning masks attached (before fusion)."""
    return any(".parametrizations." in key for key in state_dict)


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


def masked_sparsity(state_dict: Mapping[str, torch.Tensor]) -> float | None:
    """Fraction of the masked rows in a masked state dict (None for a state dict without masks)."""
    masks = [value for key, value in state_dict.items() if _MASK_KEY.match(key)]
    total = sum(mask.numel() for mask in masks)
    return sum(int((~mask.bool()).sum()) for mask in masks) / total if total else None


def masked_config(state_dict: Mapping[str, torch.Tensor]) -> tuple[list[dict[str, Any]], set[str]]:
    """The pruner config that wrote a masked state dict: one entry per row mask, with ``prune_bias`` read from whether
    the layer's bias was masked too. Returns the config and the tensors whose ``prune_bias`` could not be told (a
    layer without bias)."""
    config, unknown = [], set()
    for key in state_dict:
        match = _MASK_KEY.match(key)
        if not match:
            continue
        module, tensor = match["module"], match["tensor"]
        fqn = f"{module}.{tensor}"
        others = [k for k in state_dict if k.startswith(f"{module}.parametrizations.") and k.endswith(".original")
                  and not k.startswith(f"{module}.parametrizations.{tensor}.")]
        if others:
            prune_bias = True
        elif f"{module}.bias" in state_dict:
            prune_bias = False
        else:
            prune_bias = True
            unknown.add(fqn)
        config.append({"tensor_fqn": fqn, "prune_bias": prune_bias})
    return config, unknown
