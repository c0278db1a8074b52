"""The public loading entry points: :func:`load_pruned` (a fresh dense model into the pruned model a checkpoint stands
for) and :func:`narrow_to_state_dict` (a model shaped for a strict load), and the checks they make before anything
changes."""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import nn

from lightning_prune.checkpoint.files import read_checkpoint, state_dict_of
from lightning_prune.checkpoint.keys import dense_view, is_masked
from lightning_prune.checkpoint.masked import fuse_masked, fused_state_dict
from lightning_prune.checkpoint.resize import resize_to
from lightning_prune.errors import PruningConfigError
from lightning_prune.fusion.hf_config import follow_config
from lightning_prune.fusion.rules import LayerRule, rule_for
from lightning_prune.fusion.surgery import Surgery
from lightning_prune.masks import has_masks_anywhere


def _refuse_widening(model: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str, what: str) -> None:
    """Raise, before anything changes, for a tensor wider than the model's or with another number of dims."""
    current = {prefix + key: value for key, value in model.state_dict().items()}
    for key, incoming in state_dict.items():
        have = current.get(key)
        if have is None or not isinstance(incoming, torch.Tensor):
            continue
        if have.dim() != incoming.dim():
            raise PruningConfigError(
                f"{what} holds '{key}' with shape {tuple(incoming.shape)} where the model has "
                f"{tuple(have.shape)}: a different number of dims, so it is not a checkpoint of this architecture "
                "(pruning only narrows dims)")
        if any(new > old for new, old in zip(incoming.shape, have.shape, strict=True)):
            raise PruningConfigError(
                f"{what} holds '{key}' with shape {tuple(incoming.shape)}, wider than the model's "
                f"{tuple(have.shape)}: it stands for a less pruned model than this one, and loading never widens a "
                f"pruned model. Load it into a freshly built model instead: load_pruned({type(model).__name__}(...), "
                "path)"
            )


def load_plain(model: nn.Module, state_dict: MutableMapping[str, torch.Tensor], prefix: str = "") -> list[str]:
    """Shape a model without masks for ``model.load_state_dict(state_dict)``; returns the changed modules.

    A fused state dict: the model is narrowed to it. A masked one: it is fused (on a copy of the model) and replaced,
    in ``state_dict`` itself, by the fused state dict it stands for, so the strict load that follows gives exactly
    that pruned model.

    Raises:
        PruningConfigError: the state dict stands for a model wider than this one.
    """
    own = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if is_masked(own):
        fused = fused_state_dict(model, own, example_inputs=getattr(model, "example_input_array", None))
        _refuse_widening(model, fused, "", "this masked checkpoint, once fused,")
        for key in own:
            del state_dict[prefix + key]
        state_dict.update({prefix + key: value for key, value in fused.items()})
        own = fused
    else:
        _refuse_widening(model, own, "", "this checkpoint")
    return resize_to(model, own, prefix="")


def narrow_to_state_dict(
    model: nn.Module, state_dict: MutableMapping[str, torch.Tensor], prefix: str = ""
) -> list[str]:
    """Shape ``model`` like the pruned model that ``state_dict`` stands for, before a strict load; returns the
    modules it changed. The hook for ``MyLitModule.load_from_checkpoint`` (and resuming) in the README::

        def on_load_checkpoint(self, checkpoint):
            lightning_prune.narrow_to_state_dict(self, checkpoint["state_dict"])

    - a fused state dict: the model's layers are narrowed to its shapes;
    - a masked state dict (written mid-schedule): it is fused into the pruned model it stands for, and ``state_dict``
      is replaced in place by that model's fused state dict;
    - a model that carries masks (``StructuredPruning`` is training it, e.g. resuming mid-schedule): nothing to do
      here, the callback's load pre-hook shapes it.

    Raises:
        PruningConfigError: ``state_dict`` is not a mutable mapping of tensors (a path: use :func:`load_pruned`),
            the state dict stands for a model wider than ``model`` (loading never widens a pruned model), or a masked
            state dict does not fit the model.
    """
    if not isinstance(model, nn.Module):
        raise PruningConfigError(f"narrow_to_state_dict(model, state_dict): model must be an nn.Module, got {model!r}")
    if not isinstance(state_dict, MutableMapping):
        hint = " (for a file, load_pruned(model, path) reads it)" if isinstance(state_dict, (str, os.PathLike)) else ""
        raise PruningConfigError(f"narrow_to_state_dict(model, state_dict): state_dict must be the checkpoint's "
                                 f"state dict (checkpoint['state_dict']), got {type(state_dict).__name__}{hint}")
    state_dict_of(state_dict, "narrow_to_state_dict")
    if has_masks_anywhere(model):
        return []
    return load_plain(model, state_dict, prefix)


def load_pruned(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any], strict: bool = True,
                weights_only: bool = True) -> nn.Module:
    """Turn a freshly built dense ``model`` into the pruned model a checkpoint stands for, in place, and return it.

    ``checkpoint`` is a Lightning checkpoint path, a loaded checkpoint dict, or a plain state dict; fused (written
    after fusion) or masked (written mid-schedule, e.g. ModelCheckpoint's best file). A path is read by
    :func:`~lightning_prune.checkpoint.files.read_checkpoint`: a ``.ckpt``/``.pt`` file with
    ``torch.load(weights_only=True)`` (pass ``weights_only=False`` only for a checkpoint you trust that holds other
    objects), a ``.safetensors`` file, a shard index (``model.safetensors.index.json``) or a ``save_pretrained``
    directory. A Hugging Face model's ``config`` then follows its layers (:mod:`lightning_prune.fusion.hf_config`).

    Raises:
        PruningConfigError: ``model`` or ``checkpoint`` of the wrong type, a value that is not a tensor, the
            checkpoint stands for a model wider than ``model``, or (``strict``) its keys are not the model's; raised
            before the model changes. Any other error on the way puts the model's structure back as it was.
    """
    if not isinstance(model, nn.Module):
        raise PruningConfigError(f"load_pruned(model, checkpoint): model must be an nn.Module, got {model!r}")
    if not isinstance(checkpoint, (str, os.PathLike, Mapping)):
        raise PruningConfigError("load_pruned(model, checkpoint): checkpoint must be a path, a loaded checkpoint dict "
                                 f"or a state dict, got {type(checkpoint).__name__}")
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = read_checkpoint(checkpoint, weights_only=weights_only)
    state_dict = state_dict_of(checkpoint, "load_pruned")
    if has_masks_anywhere(model):
        raise PruningConfigError("load_pruned needs a model without pruning masks; build a fresh one")
    masked = is_masked(state_dict)
    _refuse_widening(model, dense_view(state_dict) if masked else state_dict, "",
                     "this masked checkpoint" if masked else "this checkpoint")
    if strict and not masked:
        _refuse_other_keys(model, state_dict)
    with Surgery() as surgery:  # any error puts the model's structure back
        for module in model.modules():
            surgery.keep_structure(module)
        if masked:
            fuse_masked(model, state_dict, example_inputs=getattr(model, "example_input_array", None), strict=strict)
        else:
            resize_to(model, state_dict)
            model.load_state_dict(state_dict, strict=strict)
    follow_config(model)
    return model


def _refuse_other_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """``strict``: the checkpoint names exactly the model's tensors, plus biases fusion created on layers without."""
    have = set(model.state_dict())
    created = {}
    for name, module in model.named_modules():
        weight = state_dict.get(f"{name}.weight")
        if "bias" in module._parameters and module._parameters["bias"] is None and weight is not None:
            rule = rule_for(module)
            rows = rule.channel_dim_of_weight(module) if isinstance(rule, LayerRule) else 0
            created[f"{name}.bias"] = weight.shape[rows]
    for key, width in created.items():
        if key in state_dict and tuple(state_dict[key].shape) != (width,):
            raise PruningConfigError(
                f"this checkpoint's '{key}' has shape {tuple(state_dict[key].shape)}; a bias fusion created has one "
                f"value per output channel of its layer, ({width},) here (nothing was changed)")
    missing, unexpected = sorted(have - set(state_dict)), sorted(set(state_dict) - have - set(created))
    if missing or unexpected:
        differ = "; ".join(f"{what} {keys[:5]}" for what, keys in (("missing", missing), ("unexpected", unexpected))
                           if keys)
        raise PruningConfigError(
            f"this checkpoint's keys do not fit {type(model).__name__}: {differ} (nothing was changed). Build the "
            "model with the architecture that wrote it, or pass strict=False to load the keys that fit")
