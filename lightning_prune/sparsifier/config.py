"""Checking what users pass: config entries, tensor FQNs, sparsity levels, include/exclude regexes, example inputs.

Each check raises :class:`~lightning_prune.errors.PruningConfigError` naming the bad value and what is accepted.
"""

from __future__ import annotations

import difflib
import numbers
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_prune.errors import PruningConfigError
from lightning_prune.selection import checked_config, checked_patterns

DEFAULTS = {"sparsity_level": 0.5, "prune_bias": True}
#: keys of a group dict that name the tensor rather than a hyper-parameter
RESERVED = ("module", "module_fqn", "tensor_name", "tensor_fqn")


def check_sparsity(value: Any, where: str) -> None:
    """Raise unless ``value`` is a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise PruningConfigError(f"{where}: sparsity_level must be a number in [0, 1), got {value!r}")


def check_flag(value: Any, name: str, where: str) -> bool:
    """Return ``value`` if it is a bool, else raise: a string such as "false" would otherwise read as True."""
    if not isinstance(value, bool):
        raise PruningConfigError(f"{where}: {name} must be True or False, got {value!r}")
    return value


def check_group(group: dict[str, Any], where: str) -> None:
    """Raise unless the group's built-in hyper-parameters are valid: ``sparsity_level`` in [0, 1), ``prune_bias`` a
    bool."""
    check_sparsity(group["sparsity_level"], where)
    check_flag(group["prune_bias"], "prune_bias", where)


def config_fqns(config: Any) -> list[str]:
    """The tensor FQNs of a config (``[{"tensor_fqn": ...}, ...]``), checked for shape and duplicates.

    Raises:
        PruningConfigError: not a list of dicts with a ``tensor_fqn`` string (the message shows one), or a tensor
            named twice.
    """
    if config is None:
        raise PruningConfigError("config must be a list of {'tensor_fqn': ...} dicts here, got None")
    fqns = []
    for entry in checked_config(config):
        if entry["tensor_fqn"] in fqns:
            raise PruningConfigError(f"tensor_fqn '{entry['tensor_fqn']}' is configured twice")
        fqns.append(entry["tensor_fqn"])
    return fqns


def fqn_filter(include: list[str] | None, exclude: list[str] | None) -> Callable[[str], bool]:
    """Whether a tensor FQN matches an ``include`` regex (any, if None) and no ``exclude`` regex.

    Raises:
        PruningConfigError: a pattern is not a valid regex, or the patterns are not lists.
    """
    include, exclude = checked_patterns("include", include), checked_patterns("exclude", exclude)
    patterns = {p: re.compile(p) for p in (include or []) + (exclude or [])}

    def select(fqn: str) -> bool:
        return (include is None or any(patterns[p].search(fqn) for p in include)) and not any(
            patterns[p].search(fqn) for p in exclude or [])

    return select


def resolve_tensor(model: nn.Module, fqn: str) -> tuple[nn.Module, str, str]:
    """The module, its fqn and the tensor name of ``fqn``, with a clear error naming close valid names."""
    module_fqn, _, tensor_name = fqn.rpartition(".")
    try:
        module = model.get_submodule(module_fqn)
        tensor = getattr(module, tensor_name)
    except AttributeError:
        names = [n for n, p in model.named_parameters() if p.dim() >= 2]
        close = difflib.get_close_matches(fqn, names, n=3, cutoff=0.4) or names[:3]
        raise PruningConfigError(
            f"unknown tensor_fqn '{fqn}'; closest weights in {type(model).__name__}: {', '.join(close)}"
        ) from None
    if not isinstance(tensor, torch.Tensor):
        raise PruningConfigError(f"tensor_fqn '{fqn}' is not a tensor but {type(tensor).__name__}")
    if tensor.dim() < 2:
        before = None  # the last weight of 2+ dims before it: the layer whose channels a norm's weight follows
        for name, param in model.named_parameters():
            if name == fqn:
                break
            before = name if param.dim() >= 2 else before
        example = before or next((n for n, p in model.named_parameters() if p.dim() >= 2), None)
        raise PruningConfigError(
            f"tensor_fqn '{fqn}' is {tensor.dim()}-D; structured pruning removes rows of weights with 2 or more dims, "
            "and a per-channel tensor (a norm's weight, a bias) follows the layer that makes its channels"
            + (f": configure that layer instead, e.g. '{example}'" if example else "")
        )
    return module, module_fqn, tensor_name
