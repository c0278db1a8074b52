"""Loading checkpoints of pruned models: every checkpoint a pruning run writes is usable as a pruned model.

A run writes two kinds of state dict:

- **fused** (after ``prune()``: ``last.ckpt`` once fit ends, ``trainer.save_checkpoint`` afterwards): plain tensor
  names, narrowed shapes. The shapes are the structure record: a freshly built model is narrowed to them, then loads.
- **masked** (before fusion: a ``ModelCheckpoint`` top-k or periodic file written mid-schedule): full-width tensors
  under ``<module>.parametrizations.<tensor>.original`` and one bool row mask per pruned tensor. It stands for the
  pruned model those masks describe; :func:`load_pruned` builds that model by attaching the saved masks and fusing.

Loading never widens a model that pruning has already narrowed: a checkpoint that stands for a wider model is refused
with a :class:`PruningConfigError` that says how to load it on its own.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import nn

from lightning_prune.errors import PruningConfigError
from lightning_prune.fusion.rules import LayerRule, registry, rule_for
from lightning_prune.fusion.surgery import Surgery
from lightning_prune.masks import bake_masks, has_masks_anywhere
from lightning_prune.sparsifier import BaseStructuredSparsifier

_MASK_KEY = re.compile(r"^(?P<module>.+)\.parametrizations\.(?P<tensor>[^.]+)\.0\.mask$")


class KeepLoadedMasks(BaseStructuredSparsifier):
    """A sparsifier that decides nothing: its masks are the ones loaded from a checkpoint."""

    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        """Keep the mask as loaded."""


# -- what a state dict holds ------------------------------------------------------------------------------------
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


def masked_sparsity_of_file(path: str | os.PathLike) -> float | None:
    """:func:`masked_sparsity` of a checkpoint file's state dict; None when it holds no masks or cannot be read."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    return masked_sparsity(checkpoint.get("state_dict", checkpoint))


def stale_best_checkpoints(checkpoint_callbacks: list[Any], target: float) -> list[str]:
    """A warning for each ModelCheckpoint whose best checkpoint was written below the sparsity ``target`` (before the
    schedule finished): it stands for a wider model than the fused one."""
    warnings = []
    for callback in checkpoint_callbacks:
        path = getattr(callback, "best_model_path", "")
        if not path or not getattr(callback, "monitor", None) or path == callback.last_model_path:
            continue
        level = masked_sparsity_of_file(path)
        if level is not None and level < target - 1e-6:
            warnings.append(
                f"ModelCheckpoint's best checkpoint {path} was written at sparsity {level:.3f}, below the target "
                f"{target:.3f} (before the schedule finished): it stands for a wider model than the fused one. "
                "trainer.test(ckpt_path='best') refuses to widen this model; load that checkpoint on its own with "
                "lightning_prune.load_pruned(MyModule(...), path)."
            )
    return warnings


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


# -- changing a model to match a state dict ---------------------------------------------------------------------
def strip_masks(model: nn.Module) -> None:
    """Remove every pruning parametrization, keeping the unmasked tensors (they are about to be overwritten)."""
    for module in model.modules():
        bake_masks(module, keep_masked_values=False)


def resize_to(model: nn.Module, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> list[str]:
    """Give ``model``'s parameters and buffers the shapes in a plain (unmasked) ``state_dict``; returns the changed
    modules. Layers keep their class; their size attributes (``in_features``, ``out_channels``, ``hidden_size``...)
    follow the new tensors. A bias that fusion created (or removed) is created (or removed) too."""
    changed = []
    for name, module in model.named_modules():
        base = f"{prefix}{name}." if name else prefix
        resized = False
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
                like = tensor if tensor is not None else next(iter(module.parameters()), incoming)
                fresh = torch.empty(incoming.shape, dtype=like.dtype, device=like.device)
                getattr(module, kind)[tensor_name] = nn.Parameter(fresh) if kind == "_parameters" else fresh
                resized = True
        if resized:
            rule = rule_for(module)
            if rule is not None:
                rule.sync(module)
            changed.append(name)
    synced = registry.sync_containers(model, [model.get_submodule(name) for name in changed])  # head counts
    return changed + [name for name, module in model.named_modules() if module in synced and name not in changed]


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


# -- the public entry points ------------------------------------------------------------------------------------
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
    _state_dict_of(state_dict, "narrow_to_state_dict")
    if has_masks_anywhere(model):
        return []
    return load_plain(model, state_dict, prefix)


def load_pruned(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any], strict: bool = True,
                weights_only: bool = True) -> nn.Module:
    """Turn a freshly built dense ``model`` into the pruned model a checkpoint stands for, in place, and return it.

    ``checkpoint`` is a Lightning checkpoint path, a loaded checkpoint dict, or a plain state dict; fused (written
    after fusion) or masked (written mid-schedule, e.g. ModelCheckpoint's best file). A path is read with
    ``torch.load(weights_only=True)``; pass ``weights_only=False`` only for a checkpoint you trust that holds
    other objects.

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
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=weights_only)
    state_dict = _state_dict_of(checkpoint, "load_pruned")
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
    return model


def _state_dict_of(checkpoint: Mapping[str, Any], caller: str) -> dict[str, torch.Tensor]:
    """The state dict of a Lightning checkpoint or a plain one; every value must be a tensor."""
    state_dict = dict(checkpoint.get("state_dict", checkpoint))
    bad = [key for key, value in state_dict.items()
           if not isinstance(value, torch.Tensor) and not key.endswith("_extra_state")]  # get_extra_state(): any
    if bad:
        raise PruningConfigError(f"{caller}: a state dict maps names to tensors; {bad[:3]} hold "
                                 f"{[type(state_dict[k]).__name__ for k in bad[:3]]}")
    return state_dict


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


# -- the StructuredPruning callback's load pre-hook -------------------------------------------------------------
def reshape_for_load(module: nn.Module, state_dict: MutableMapping[str, torch.Tensor], prefix: str = "") -> str:
    """Shape ``module`` so that ``state_dict`` loads into it; the logic of the callback's load pre-hook.

    Returns what it found, for the caller's bookkeeping:

    - ``"same"``: the module carries masks and the checkpoint matches them (the usual resume);
    - ``"dense"``: the module carries masks, the checkpoint is a dense one of the same widths (pretrained weights):
      its tensors are renamed to the masked names in ``state_dict``, the masks stay as they are;
    - ``"fused"``: the module carried masks, the checkpoint was written after fusion: masks removed, module narrowed;
    - ``"shrunk"``: the module carried masks, the checkpoint is masked but narrower (shrunk mid-fit): masks removed,
      module narrowed; the caller attaches masks again;
    - ``"plain"``: the module carries no masks (fused, or never prepared): see :func:`load_plain`.

    Raises:
        PruningConfigError: a module without masks would have to widen (see :func:`load_plain`).
    """
    if not has_masks_anywhere(module):
        load_plain(module, state_dict, prefix)
        return "plain"
    own = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    dense = dense_view(own)
    current = dense_view(module.state_dict())
    if not any(key in dense and tuple(value.shape) != tuple(dense[key].shape) for key, value in current.items()):
        if not is_masked(own):
            _name_as_masked(module, state_dict, prefix)
            return "dense"
        return "same"
    strip_masks(module)
    resize_to(module, dense)
    return "shrunk" if is_masked(own) else "fused"


def _name_as_masked(module: nn.Module, state_dict: MutableMapping[str, torch.Tensor], prefix: str) -> None:
    """Rename a dense state dict's masked tensors to their parametrized names; the masks keep their values."""
    for key, value in module.state_dict().items():
        head, marker, tail = key.partition(".parametrizations.")
        if not marker or prefix + key in state_dict:
            continue
        dense_key = f"{prefix}{head}.{tail.removesuffix('.original')}"
        if tail.endswith(".original"):
            if dense_key in state_dict:
                state_dict[prefix + key] = state_dict.pop(dense_key)
        else:
            state_dict[prefix + key] = value


class DetachingHook:
    """A module hook that calls ``fn`` while attached; a copy or pickle of the module carries a no-op in its place.

    ``StructuredPruning`` registers its load pre-hook through it, so a module deep-copied or pickled mid-fit never
    drags the callback along (its pruner holds an fx graph that cannot be pickled)."""

    def __init__(self, fn: Any):
        self.fn = fn

    def __call__(self, *args: Any) -> None:
        self.fn(*args)

    def __reduce__(self):
        return _NoOpHook, ()


class _NoOpHook:
    def __call__(self, *args: Any) -> None:
        """A module copied while a StructuredPruning callback was attached loads as a plain module."""
