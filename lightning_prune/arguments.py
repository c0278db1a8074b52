"""Checking what users pass, before any training: config entries, tensor FQNs, sparsity levels and flags,
include/exclude regexes, and combinations of StructuredPruning's arguments; used by both the callback and the pruners.

Each check raises :class:`~lightning_prune.errors.PruningConfigError` naming the bad value and what is accepted; the
checks that need no model run when the callback or pruner is built.
"""

from __future__ import annotations

import difflib
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_prune.errors import PruningConfigError

DEFAULTS = {"sparsity_level": 0.5, "prune_bias": True}
#: keys of a group dict that name the tensor rather than a hyper-parameter
RESERVED = ("module", "module_fqn", "tensor_name", "tensor_fqn")
_EXAMPLE = "[{'tensor_fqn': 'net.0.weight'}, {'tensor_fqn': 'net.3.weight', 'sparsity_level': 0.3}]"


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


def checked_config(config: Any) -> list[dict[str, Any]] | None:
    """``config`` as a list of plain dicts (Hydra's ListConfig/DictConfig included), or None.

    Raises:
        PruningConfigError: not a list of dicts each holding a ``tensor_fqn`` string; the message shows one.
    """
    if config is None:
        return None
    if isinstance(config, (str, Mapping)) or not isinstance(config, Sequence):
        raise PruningConfigError(f"config must be None or a list of dicts such as {_EXAMPLE}, got {config!r}")
    for entry in config:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("tensor_fqn"), str):
            raise PruningConfigError(
                "each config entry is a dict with a 'tensor_fqn' string (and optional hyper-parameters), such as "
                f"{_EXAMPLE}; got {entry!r}"
            )
    return [dict(entry) for entry in config]


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


def checked_patterns(label: str, patterns: Any) -> list[str] | None:
    """``patterns`` as a list of regex strings, or None.

    Raises:
        PruningConfigError: a single string instead of a list, or a pattern that does not compile.
    """
    if patterns is None:
        return None
    if isinstance(patterns, str) or not isinstance(patterns, Sequence):
        raise PruningConfigError(f"{label} must be a list of regexes over tensor FQNs, e.g. [r'net\\.0\\.'], "
                                 f"got {patterns!r}")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as error:
            raise PruningConfigError(f"{label} pattern {pattern!r} is not a valid regex: {error}") from None
    return list(patterns)


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


def check_patterns_match(include: list[str] | None, model: Any) -> None:
    """Raise when ``include`` patterns match no weight of ``model`` at all (a typo, not a blocked layer).

    Raises:
        PruningConfigError: naming the patterns and the model's weights.
    """
    weights = [name for name, p in model.named_parameters() if p.dim() >= 2]
    if include is not None and not any(re.search(p, w) for p in include for w in weights):
        raise PruningConfigError(
            f"include={include} matches no weight of {type(model).__name__}; its weights: "
            f"{', '.join(weights[:8])}{', ...' if len(weights) > 8 else ''}"
        )


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


def check_arguments(config: Any, include: Any, exclude: Any, shrink_every_n_steps: Any, target: Any) -> None:
    """Combinations of StructuredPruning's arguments that cannot work together.

    Raises:
        PruningConfigError: both an explicit ``config`` and include/exclude patterns; a budget with mid-fit shrinking
            (a budget is relative to the dense model, which a shrink replaces); a bad ``shrink_every_n_steps``.
    """
    if config is not None and (include is not None or exclude is not None):
        raise PruningConfigError("give either config (explicit tensors) or include/exclude patterns, not both")
    if target is not None and shrink_every_n_steps is not None:
        raise PruningConfigError("target and shrink_every_n_steps cannot be combined yet: a budget is relative to "
                                 "the dense model, which a shrink replaces")
    if shrink_every_n_steps is not None and (isinstance(shrink_every_n_steps, bool) or
                                             not isinstance(shrink_every_n_steps, int) or shrink_every_n_steps < 1):
        raise PruningConfigError(f"shrink_every_n_steps must be None or an int >= 1, got {shrink_every_n_steps!r}")
