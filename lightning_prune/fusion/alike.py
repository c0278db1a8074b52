"""Layers alike: coupled sets of channels that play the same part in different layers of a stack.

Two coupled sets are alike when their tensors' names are equal once layer indices (numeric path components such as
the ``3`` of ``model.layers.3.mlp.up_proj.weight``) are ignored, and they hold as many classes (heads, key/value
groups, channels). ``allocation="uniform_layers"`` removes as many classes from every set of such a family, so each
layer keeps the same heads, key/value heads and FFN width, and a Hugging Face config can say the pruned model with its
standard keys (:mod:`lightning_prune.fusion.hf_config`), as vLLM and TGI need.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

#: a numeric path component: a layer's index in a ModuleList or Sequential
_INDEX = re.compile(r"(?:(?<=\.)|^)\d+(?=\.)")


def signature(fqns: Iterable[str], classes: int) -> tuple[tuple[str, ...], int]:
    """What a coupled set of tensors ``fqns`` with ``classes`` classes is, whatever layer it sits in."""
    return tuple(sorted(_INDEX.sub("*", fqn) for fqn in fqns)), classes


def families(signatures: Sequence[tuple]) -> list[list[int]]:
    """The positions of equal signatures, one list per family (single sets are families of one)."""
    found: dict[tuple, list[int]] = {}
    for position, key in enumerate(signatures):
        found.setdefault(key, []).append(position)
    return list(found.values())


def common_removals(counts: Sequence[int], signatures: Sequence[tuple]) -> list[int]:
    """Per set, the classes to remove when every family removes as many from each of its sets as the one that can
    remove fewest (``counts``: what each set would remove on its own)."""
    result = list(counts)
    for family in families(signatures):
        fewest = min(counts[i] for i in family)
        for i in family:
            result[i] = fewest
    return result
