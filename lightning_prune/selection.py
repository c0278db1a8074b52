"""Checks of what a user gives StructuredPruning and the pruners: config entries, include/exclude regexes, and
argument combinations.

They need no model, so bad values fail when the callback is built, with what a good value looks like.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_prune.errors import PruningConfigError

_EXAMPLE = "[{'tensor_fqn': 'net.0.weight'}, {'tensor_fqn': 'net.3.weight', 'sparsity_level': 0.3}]"


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
