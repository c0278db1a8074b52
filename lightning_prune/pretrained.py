"""Hugging Face round trips of a pruned model: ``save_pretrained`` output back into a model.

A model pruned alike in every layer, its hidden size kept, needs nothing from here: its config says what it is
(:mod:`lightning_prune.fusion.hf_config`) and ``AutoModel*.from_pretrained(path)`` loads it. A model whose layers
differ (or whose residual stream is narrower than ``hidden_size``) carries their sizes under
``config.lightning_prune_layers``; :func:`from_pretrained` loads the architecture the
standard keys describe and narrows it to the saved weights (:func:`~lightning_prune.load_pruned`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from lightning_prune.checkpoint import load_pruned
from lightning_prune.checkpoint.files import read_checkpoint
from lightning_prune.errors import PruningConfigError
from lightning_prune.fusion.hf_config import LAYERS_KEY, is_pretrained
from lightning_prune.masks import has_masks_anywhere


def save_pretrained(model: nn.Module, path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """``save_pretrained(path, **kwargs)`` (safetensors) of the one Hugging Face model inside ``model`` (itself, or
    a child of a LightningModule); returns that model.

    Raises:
        PruningConfigError: ``model`` holds no Hugging Face model, or more than one outside each other, or it still
            carries pruning masks (transformers would store the masked weights under names no model has, and a
            ``from_pretrained`` of them would re-initialise those layers).
    """
    found = [m for m in model.modules() if is_pretrained(m)]
    outer = [m for m in found if not any(m is not o and any(c is m for c in o.modules()) for o in found)]
    if len(outer) != 1:
        raise PruningConfigError(f"save_pretrained needs exactly one Hugging Face model in {type(model).__name__}, "
                                 f"found {len(outer)}")
    if has_masks_anywhere(outer[0]):
        raise PruningConfigError(
            f"save_pretrained: the {type(outer[0]).__name__} still carries pruning masks, and a from_pretrained of "
            "what transformers would write re-initialises every masked layer; prune it first (pruner.prune(), or "
            "StructuredPruning's fusion at the end of fit with prune_on_fit_end=True)")
    outer[0].save_pretrained(path, **kwargs)
    return outer[0]


def from_pretrained(path: str | os.PathLike, model_class: Any = None, **kwargs: Any) -> nn.Module:
    """Load a pruned model written by ``save_pretrained``, whether its layers are alike or not, in eval mode.

    When the config carries per-layer sizes (``lightning_prune_layers``), transformers loads what fits the standard
    keys (converted weights such as Mixtral's experts included; its report of the narrowed weights is silenced), then
    the narrowed weights are read from the files under the model's names (:func:`model_names`) and
    :func:`~lightning_prune.load_pruned` narrows the model to them.

    Args:
        path: the ``save_pretrained`` directory.
        model_class: what to build, e.g. ``AutoModelForCausalLM`` or ``LlamaForCausalLM`` (default ``AutoModel``).
        kwargs: passed to ``model_class.from_pretrained`` (model arguments such as BERT's ``add_pooling_layer``).

    Raises:
        PruningConfigError: ``path`` is not a directory with a ``config.json``, a narrowed weight is stored in a
            converted form, or the weights do not fit the config (see :func:`~lightning_prune.load_pruned`).
    """
    from transformers import AutoConfig, AutoModel  # optional dependency
    from transformers.utils import logging as hf_logging

    path = Path(path)
    if not (path / "config.json").is_file():
        raise PruningConfigError(f"from_pretrained needs a directory written by save_pretrained; {str(path)!r} "
                                 "has no config.json")
    model_class = model_class or AutoModel
    if not hasattr(AutoConfig.from_pretrained(path), LAYERS_KEY):
        return model_class.from_pretrained(path, **kwargs).eval()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = model_class.from_pretrained(path, ignore_mismatched_sizes=True, output_loading_info=True,
                                                  **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    narrowed = model_names(model, read_checkpoint(path))
    lost = sorted(key for key in _keys(info.get("mismatched_keys", ())) if key not in narrowed)
    if lost:
        raise PruningConfigError(f"{lost[:3]} are narrowed and stored in a converted form; lightning_prune."
                                 "from_pretrained rebuilds per-layer sizes of weights stored as the model names them")
    current = model.state_dict(keep_vars=True)
    tied = {id(current[key]): tensor for key, tensor in narrowed.items() if key in current}
    # a weight tied to a narrowed one (GPT-2's LM head, which save_pretrained leaves out) takes its narrowed value
    load_pruned(model, {**{key: tied.get(id(tensor), tensor.detach()) for key, tensor in current.items()}, **narrowed})
    return model.eval()


def _keys(entries) -> list[str]:
    """Parameter names from transformers' loading info (names, or tuples that start with one)."""
    return [entry if isinstance(entry, str) else entry[0] for entry in entries]


def model_names(model: nn.Module, state: dict) -> dict:
    """The weights of ``state`` (as ``save_pretrained`` wrote it) that transformers only renames, under ``model``'s
    parameter names (ViT's ``q_proj`` is written as ``attention.attention.query``); weights it converts (split or
    merged, e.g. Mixtral's experts, one file key per expert) are left out."""
    from transformers.conversion_mapping import get_model_conversion_mapping  # optional dependency
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = model.state_dict()
    renamed = {}
    for key, tensor in state.items():
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
        if converted is None and name in names:
            renamed[name] = tensor
    return renamed
