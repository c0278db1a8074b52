"""The seed's structured-sparsifier API: prepare(), step(), prune(), with groups and state.

``prepare`` validates the configuration, traces the model and refuses what fusion cannot honour before any mask is
attached; ``step`` updates the masks; ``prune`` narrows the same model object in place.
"""

from __future__ import annotations

import abc
import copy
import difflib
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_prune.errors import PrunerStateError, PruningConfigError
from lightning_prune.fusion.apply import fuse
from lightning_prune.fusion.attach import attach_masks
from lightning_prune.fusion.plan import Member, PruningPlan, analyse
from lightning_prune.fusion.rules import Rule, rules_scope
from lightning_prune.masks import has_masks

DEFAULTS = {"sparsity_level": 0.5, "prune_bias": True}
_RESERVED = ("module", "module_fqn", "tensor_name", "tensor_fqn")


def check_sparsity(value: Any, where: str) -> None:
    """Raise unless ``value`` is a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise PruningConfigError(f"{where}: sparsity_level must be a number in [0, 1), got {value!r}")


class BaseStructuredSparsifier(abc.ABC):
    """Prunes whole output channels (rows) of the configured weights; subclasses decide which in ``update_mask``.

    Args:
        defaults: hyper-parameters merged into every group (``sparsity_level``, ``prune_bias``, anything a
            custom ``update_mask`` reads). Keyword arguments are merged on top, so configs can say
            ``SaliencyPruner(sparsity_level=0.5)``.

    Raises:
        PruningConfigError: ``defaults`` is not a dict, ``sparsity_level`` is outside [0, 1), or a key is not in
            :attr:`hyperparameters` (when the class declares them, as the built-in pruners do).
    """

    #: the group keys ``update_mask`` reads. ``None`` (the default, as in the seed) accepts any key; a pruner that
    #: declares its keys gets unknown ones (typos such as ``sparsity_levl``) refused at construction and prepare().
    hyperparameters: ClassVar[frozenset[str] | None] = None

    def __init__(self, defaults: dict[str, Any] | None = None, *, rules: dict[Any, Rule] | None = None,
                 **kwargs: Any):
        if defaults is not None and not isinstance(defaults, dict):
            raise PruningConfigError(f"defaults must be a dict or None, got {type(defaults).__name__}")
        self.defaults = {**DEFAULTS, **(defaults or {}), **kwargs}
        self._check_keys(self.defaults, type(self).__name__)
        check_sparsity(self.defaults["sparsity_level"], type(self).__name__)
        #: fusion rules for this pruner only (module types or functions -> rules), on top of the registered ones
        self.rules = dict(rules or {})
        self.groups: list[dict[str, Any]] = []
        self.state: dict[str, dict[str, Any]] = {}
        self.enable_mask_update = True
        self.model: nn.Module | None = None
        self.example_inputs: tuple[tuple, dict] | None = None
        self.plan: PruningPlan | None = None
        self.pruned = False
        #: after prune(): the warnings fusion gave, and (new tensor, id of the old one, {dim: kept indices})
        self.notes: list[str] = []
        self.lineage: list = []

    def _check_keys(self, entry: Mapping[str, Any], where: str) -> None:
        if self.hyperparameters is None:
            return
        unknown = sorted(set(entry) - self.hyperparameters - set(_RESERVED))
        if unknown:
            close = {k: difflib.get_close_matches(k, self.hyperparameters, n=1) for k in unknown}
            hints = "".join(f" ('{k}': did you mean '{c[0]}'?)" for k, c in close.items() if c)
            raise PruningConfigError(
                f"{where}: unknown hyper-parameter(s) {unknown}{hints}; {type(self).__name__} accepts "
                f"{sorted(self.hyperparameters)}"
            )

    @abc.abstractmethod
    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        """Set ``module.parametrizations[tensor_name][0].mask`` (one bool per row) for this group."""

    # -- prepare ------------------------------------------------------------------------------------------------
    def prepare(
        self,
        model: nn.Module,
        config: list[dict[str, Any]] | None,
        *,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        exclude_output: bool = False,
        example_inputs: Any = None,
    ) -> None:
        """Check ``config`` against ``model``, trace it, and attach masks; the model is untouched on error.

        ``config=None`` takes every supported weight (Linear, ConvNd, LSTM) whose channels fusion can remove
        exactly, optionally narrowed by ``include``/``exclude`` regexes over tensor FQNs and, with
        ``exclude_output``, leaving out layers whose channels reach the model's output (a classifier keeps its
        classes). An explicit ``config`` is honoured exactly or refused; with ``exclude_output`` it is also refused
        when it names a layer whose channels reach the output.

        ``example_inputs`` are the arguments of one ``model.forward`` call: a tuple of positional arguments, a dict
        of keyword arguments, or a single tensor.

        Raises:
            PruningConfigError: a bad config entry, an unknown tensor, a bad hyper-parameter, bad example inputs.
            UnsupportedPatternError: a configured tensor whose channels fusion cannot remove exactly.
            PrunerStateError: the pruner is already prepared.
        """
        if not isinstance(model, nn.Module):
            raise PruningConfigError(f"prepare() needs an nn.Module, got {type(model).__name__}")
        if self.model is not None and not self.pruned:
            raise PrunerStateError("this pruner is already prepared; create a new pruner for another model")
        if has_masks_anywhere(model):
            raise PruningConfigError("the model already carries pruning masks; prepare a fresh copy of the model")
        self.example_inputs = normalize_example_inputs(example_inputs)
        explicit = config is not None
        entries = self._groups_from_config(model, config) if explicit else None
        select = fqn_filter(include, exclude)
        with rules_scope(self.rules):
            plan = analyse(model, [g["tensor_fqn"] for g in entries] if explicit else None,
                           example_inputs=self.example_inputs, exclude_output=exclude_output, select=select)
            if explicit:
                by_fqn = {g["tensor_fqn"]: g for g in entries}
                groups = [by_fqn[m.tensor_fqn] for m in plan.members]
            else:
                groups = [{**self.defaults, "module": m.module, "module_fqn": m.module_fqn,
                           "tensor_name": m.tensor_name, "tensor_fqn": m.tensor_fqn} for m in plan.members]
            masks = attach_masks(plan, {g["tensor_fqn"]: bool(g["prune_bias"]) for g in groups})
        self.groups = groups
        self.state = {fqn: {"mask": parametrization.mask} for fqn, parametrization in masks.items()}
        self.model, self.plan, self.pruned = model, plan, False

    def _groups_from_config(self, model: nn.Module, config: Any) -> list[dict[str, Any]]:
        if not isinstance(config, (list, tuple)):
            raise PruningConfigError(f"config must be a list of {{'tensor_fqn': ...}} dicts or None, got {config!r}")
        groups, seen = [], set()
        for entry in config:
            if not isinstance(entry, dict) or not isinstance(entry.get("tensor_fqn"), str):
                raise PruningConfigError(f"each config entry needs a 'tensor_fqn' string, got {entry!r}")
            fqn = entry["tensor_fqn"]
            if fqn in seen:
                raise PruningConfigError(f"tensor_fqn '{fqn}' is configured twice")
            seen.add(fqn)
            module, module_fqn, tensor_name = _resolve(model, fqn)
            self._check_keys(entry, f"config entry for '{fqn}'")
            group = {**self.defaults, **{k: v for k, v in entry.items() if k not in _RESERVED}}
            check_sparsity(group["sparsity_level"], f"tensor '{fqn}'")
            groups.append({**group, "module": module, "module_fqn": module_fqn, "tensor_name": tensor_name,
                           "tensor_fqn": fqn})
        return groups

    # -- step ---------------------------------------------------------------------------------------------------
    def step(self) -> None:
        """Update every group's mask (when ``enable_mask_update``)."""
        self._require_prepared("step()")
        if not self.enable_mask_update:
            return
        with torch.no_grad():
            self.update_masks()
        for group in self.groups:  # a custom update_mask may rebind the buffer rather than edit it
            self.state[group["tensor_fqn"]]["mask"] = _mask_of(group)

    def update_masks(self) -> None:
        """One mask update of all groups; built-in pruners decide coupled tensors together."""
        for group in self.groups:
            self.update_mask(**group)

    def coupled_sets(self) -> list[list[tuple[dict[str, Any], Member]]]:
        """Groups whose channels are coupled (residual streams, depthwise blocks, attention heads, an LSTM layer),
        each as (group dict, plan member) pairs; a member's ``labels`` give the channel of each of its rows."""
        by_fqn = {g["tensor_fqn"]: g for g in self.groups}
        return [[(by_fqn[m.tensor_fqn], m) for m in members] for members in self.plan.coupled_members()]

    # -- prune --------------------------------------------------------------------------------------------------
    def prune(self) -> nn.Module:
        """Remove the masked channels for real; returns the same model object, narrowed in place.

        Raises:
            PrunerStateError: called before ``prepare()`` or twice.
            UnsupportedPatternError: the masks cannot be honoured (an LSTM's gates keep different unit counts);
                the model is left exactly as it was, as on any other error.
        """
        self._require_prepared("prune()")
        with rules_scope(self.rules):
            result = fuse(self.plan)
        self.pruned = True
        self.notes, self.lineage = result.notes, result.lineage
        return self.model

    def forget_model(self) -> None:
        """Let go of the prepared model once its masks have been removed by other means (e.g. a checkpoint load)."""
        self.model, self.plan, self.groups, self.state, self.pruned = None, None, [], {}, False

    def _require_prepared(self, what: str) -> None:
        if self.model is None:
            raise PrunerStateError(f"{what} called before prepare(model, config)")
        if self.pruned:
            raise PrunerStateError(f"{what} called after prune(); the masks are gone. prepare() the model again")

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "state": {fqn: {"mask": s["mask"].detach().clone()} for fqn, s in self.state.items()},
            "groups": [{k: copy.deepcopy(v) for k, v in g.items() if k != "module"} for g in self.groups],
            "pruned": self.pruned,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore masks and group hyper-parameters into the prepared model's existing mask buffers."""
        self._require_prepared("load_state_dict()")
        unknown = set(state_dict.get("state", {})) - set(self.state)
        if unknown:
            raise PruningConfigError(f"state holds masks for tensors this pruner does not prune: {sorted(unknown)}")
        with torch.no_grad():
            for fqn, entry in state_dict.get("state", {}).items():
                target = self.state[fqn]["mask"]
                if entry["mask"].shape != target.shape:
                    raise PruningConfigError(f"mask for '{fqn}' has shape {tuple(entry['mask'].shape)}, "
                                             f"expected {tuple(target.shape)}")
                target.copy_(entry["mask"])
        saved = {g["tensor_fqn"]: g for g in state_dict.get("groups", [])}
        for group in self.groups:
            for key, value in saved.get(group["tensor_fqn"], {}).items():
                if key not in _RESERVED:
                    group[key] = value

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for group in self.groups:
            params = {k: v for k, v in group.items() if k not in _RESERVED}
            lines.append(f"    {group['tensor_fqn']}: {params}")
        return "\n".join(lines + [")"])


def normalize_example_inputs(example_inputs: Any) -> tuple[tuple, dict] | None:
    """``(args, kwargs)`` for ``model.forward`` from a tensor, a tuple/list of positional arguments or a dict of
    keyword arguments (Lightning's ``example_input_array`` convention); ``None`` stays ``None``."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Mapping) and all(isinstance(k, str) for k in example_inputs):
        return (), dict(example_inputs)
    raise PruningConfigError(
        f"example_inputs must be a tensor, a tuple of positional arguments or a dict of keyword arguments for "
        f"model.forward, got {type(example_inputs).__name__}"
    )


def fqn_filter(include: list[str] | None, exclude: list[str] | None) -> Callable[[str], bool]:
    """Whether a tensor FQN matches an ``include`` regex (any, if None) and no ``exclude`` regex.

    Raises:
        PruningConfigError: a pattern is not a valid regex.
    """
    patterns = {}
    for pattern in (include or []) + (exclude or []):
        try:
            patterns[pattern] = re.compile(pattern)
        except re.error as exc:
            raise PruningConfigError(f"include/exclude pattern {pattern!r} is not a valid regex: {exc}") from None

    def select(fqn: str) -> bool:
        return (include is None or any(patterns[p].search(fqn) for p in include)) and not any(
            patterns[p].search(fqn) for p in exclude or [])

    return select


def _mask_of(group: dict[str, Any]) -> torch.Tensor:
    return getattr(group["module"].parametrizations, group["tensor_name"])[0].mask


def has_masks_anywhere(model: nn.Module) -> bool:
    return any(has_masks(m) for m in model.modules())


def _resolve(model: nn.Module, fqn: str) -> tuple[nn.Module, str, str]:
    """The module, its fqn and the tensor name of ``fqn``, with a clear error naming close valid names."""
    module_fqn, _, tensor_name = fqn.rpartition(".")
    names = [n for n, p in model.named_parameters() if p.dim() >= 2]
    try:
        module = model.get_submodule(module_fqn)
        tensor = getattr(module, tensor_name)
    except AttributeError:
        close = difflib.get_close_matches(fqn, names, n=3, cutoff=0.4) or names[:3]
        raise PruningConfigError(
            f"unknown tensor_fqn '{fqn}'; closest weights in {type(model).__name__}: {', '.join(close)}"
        ) from None
    if not isinstance(tensor, torch.Tensor):
        raise PruningConfigError(f"tensor_fqn '{fqn}' is not a tensor but {type(tensor).__name__}")
    if tensor.dim() < 2:
        raise PruningConfigError(
            f"tensor_fqn '{fqn}' is {tensor.dim()}-D; structured pruning removes rows of weights with 2 or more dims "
            f"(for example '{module_fqn + '.weight' if module_fqn else 'weight'}')"
        )
    return module, module_fqn, tensor_name
