"""The seed's structured-sparsifier API: prepare(), step(), prune(), with groups and state.

``prepare`` validates the configuration, traces the model and refuses what fusion cannot honour before any mask is
attached; ``step`` updates the masks; ``prune`` narrows the same model object in place.
"""

from __future__ import annotations

import abc
import copy
import difflib
import inspect
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_prune.arguments import (
    DEFAULTS,
    RESERVED,
    check_flag,
    check_group,
    check_patterns_match,
    config_fqns,
    fqn_filter,
    resolve_tensor,
)
from lightning_prune.errors import PrunerStateError, PruningConfigError
from lightning_prune.fusion.analysis import analyse
from lightning_prune.fusion.apply import fuse
from lightning_prune.fusion.attach import attach_masks
from lightning_prune.fusion.plan import Member, PruningPlan
from lightning_prune.fusion.ranks import attach_rank_probes, remove_rank_probes
from lightning_prune.fusion.rules import Rule, rules_scope
from lightning_prune.inputs import as_call
from lightning_prune.masks import has_masks_anywhere


class BaseStructuredSparsifier(abc.ABC):
    """Prunes whole output channels (rows) of the configured weights; subclasses decide which in ``update_mask``.

    Args:
        defaults: hyper-parameters merged into every group (``sparsity_level``, ``prune_bias``, anything a
            custom ``update_mask`` reads), as in torch.ao. The keywords below are merged on top, so configs can say
            ``SaliencyPruner(sparsity_level=0.5)``.
        sparsity_level: the fraction of each tensor's output channels to prune, in [0, 1). ``None``: the
            ``defaults`` dict's, else 0.5.
        prune_bias: also mask (and at ``prune()`` remove) the bias and the per-channel affine after each pruned
            channel. ``None``: the ``defaults`` dict's, else True.
        rules: fusion rules for this pruner only (module types or functions -> :class:`Rule`), on top of the
            registered ones.
        **kwargs: further hyper-parameters for a custom ``update_mask`` (refused by pruners that declare
            :attr:`hyperparameters`, naming the closest known one).

    Raises:
        PruningConfigError: ``defaults`` is not a dict, ``sparsity_level`` is outside [0, 1), ``prune_bias`` is not
            a bool, a key is not in :attr:`hyperparameters` (when the class declares them, as the built-in pruners
            do), or ``rules`` is not a mapping of module types or functions to rules.
    """

    #: the group keys ``update_mask`` reads. ``None`` (the default, as in the seed) accepts any key; a pruner that
    #: declares its keys gets unknown ones (typos such as ``sparsity_levl``) refused at construction and prepare().
    hyperparameters: ClassVar[frozenset[str] | None] = None
    #: the declared keys that decide across layers (a scoring pruner's ``allocation``): the pruner's only, so a
    #: config entry's list of accepted keys does not offer them
    pruner_wide: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, defaults: dict[str, Any] | None = None, *, sparsity_level: float | None = None,
                 prune_bias: bool | None = None, rules: dict[Any, Rule] | None = None, **kwargs: Any):
        if defaults is not None and not isinstance(defaults, dict):
            hint = (f"; for a sparsity pass sparsity_level={defaults!r} (the first positional argument is the "
                    "defaults dict, as in torch.ao)") if isinstance(defaults, (int, float)) else ""
            raise PruningConfigError(f"defaults must be a dict or None, got {type(defaults).__name__}{hint}")
        given = {name: value for name, value in (("sparsity_level", sparsity_level), ("prune_bias", prune_bias))
                 if value is not None}
        self.defaults = {**DEFAULTS, **(defaults or {}), **given, **kwargs}
        self._check_keys(self.defaults, type(self).__name__)
        check_group(self.defaults, type(self).__name__)
        #: fusion rules for this pruner only (module types or functions -> rules), on top of the registered ones
        with rules_scope(rules):  # checked now (each key a module type or function, each value a rule)
            self.rules = dict(rules or {})
        self.groups: list[dict[str, Any]] = []
        self.state: dict[str, dict[str, Any]] = {}
        self.enable_mask_update = True
        self.model: nn.Module | None = None
        self.example_inputs: tuple[tuple, dict] | None = None
        self.plan: PruningPlan | None = None
        #: each module's parameter order before the masks (by id), restored by prune()
        self.param_orders: dict[int, list[str]] = {}
        #: (RankProbe, hook handle) of each layer whose input rank the analysis assumed: see fusion/ranks.py
        self.rank_probes: list = []
        self.pruned = False
        #: after prune(): the warnings fusion gave, and (new tensor, id of the old one, {dim: kept indices})
        self.notes: list[str] = []
        self.lineage: list = []
        self.edits = 0

    def _check_keys(self, entry: Mapping[str, Any], where: str) -> None:
        if self.hyperparameters is None:
            return
        unknown = sorted(set(entry) - self.hyperparameters - set(RESERVED))
        if unknown:
            constructing = where == type(self).__name__  # else a config entry, where only group keys go
            keywords = self._constructor_keywords() - self.hyperparameters if constructing else frozenset()
            accepted = self.hyperparameters if constructing else self.hyperparameters - self.pruner_wide
            close = {k: difflib.get_close_matches(k, accepted | keywords, n=1) for k in unknown}
            hints = "".join(f" ('{k}': did you mean '{c[0]}'?)" for k, c in close.items() if c)
            also = f", and as constructor keywords {sorted(keywords)}" if keywords else ""
            inside = "" if constructing else " in a config entry"
            raise PruningConfigError(
                f"{where}: unknown hyper-parameter(s) {unknown}{hints}; {type(self).__name__} accepts{inside} "
                f"{sorted(accepted)}{also}"
            )

    @classmethod
    def _constructor_keywords(cls) -> frozenset[str]:
        """Named arguments of the constructors in the class's MRO (``beta``, ``target``, ``rules``...)."""
        names: set[str] = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            for name, parameter in inspect.signature(init).parameters.items():
                if parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY) and \
                        name not in ("self", "defaults"):
                    names.add(name)
        return frozenset(names)

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
            PruningConfigError: a bad config entry, an unknown tensor, a bad hyper-parameter, bad example inputs,
                ``include`` patterns that match no weight of the model.
            UnsupportedPatternError: a configured tensor whose channels fusion cannot remove exactly.
            PrunerStateError: the pruner is already prepared.
        """
        if not isinstance(model, nn.Module):
            raise PruningConfigError(f"prepare() needs an nn.Module, got {type(model).__name__}")
        if self.model is not None and not self.pruned:
            raise PrunerStateError("this pruner is already prepared; create a new pruner for another model")
        check_flag(exclude_output, "exclude_output", "prepare()")
        if config is None:
            check_patterns_match(include, model)
        if has_masks_anywhere(model):
            raise PruningConfigError("the model already carries pruning masks; prepare a fresh copy of the model")
        self.example_inputs = None if example_inputs is None else as_call(example_inputs)
        explicit = config is not None
        entries = self._groups_from_config(model, config) if explicit else None
        select = fqn_filter(include, exclude)
        with rules_scope(self.rules):
            plan = analyse(model, [g["tensor_fqn"] for g in entries] if explicit else None,
                           example_inputs=self.example_inputs, exclude_output=exclude_output, select=select,
                           sparsity_level=self.defaults["sparsity_level"])
            if explicit:
                by_fqn = {g["tensor_fqn"]: g for g in entries}
                groups = [by_fqn[m.tensor_fqn] for m in plan.members]
            else:
                groups = [{**self.defaults, "module": m.module, "module_fqn": m.module_fqn,
                           "tensor_name": m.tensor_name, "tensor_fqn": m.tensor_fqn} for m in plan.members]
            self.check_plan(plan, groups)
            for fqn, why in plan.retained.items():
                warnings.warn(f"'{fqn}' will keep its channels (zeroed where masked) to stay exact: {why}",
                              UserWarning, stacklevel=2)
            masks, self.param_orders = attach_masks(plan, {g["tensor_fqn"]: g["prune_bias"] for g in groups})
            self.rank_probes = attach_rank_probes(plan)
        self.groups = groups
        self.state = {fqn: {"mask": parametrization.mask} for fqn, parametrization in masks.items()}
        self.model, self.plan, self.pruned = model, plan, False

    def use_budget(self, target: Any) -> None:
        """Prune to a cost budget instead of ``sparsity_level``: only pruners that score channels can (see
        :meth:`ScoringPruner.use_budget`).

        Raises:
            PruningConfigError: always, here.
        """
        raise PruningConfigError(f"{type(self).__name__} cannot prune to a budget (target={target!r}): use a pruner "
                                 "that scores channels (SaliencyPruner, FPGMPruner, TaylorPruner, ActivationPruner)")

    def budget_landing(self) -> dict[str, Any] | None:
        """Where the last ``step()`` landed under a cost budget (see :meth:`ScoringPruner.budget_landing`); None
        here: this pruner prunes no budget."""
        return None

    def check_plan(self, plan: PruningPlan, groups: list[dict[str, Any]]) -> None:
        """Refuse, before any mask is attached, a plan this pruner cannot work with (raise PruningConfigError or
        UnsupportedPatternError naming the fix). The default accepts every plan."""
        return None

    def _groups_from_config(self, model: nn.Module, config: Any) -> list[dict[str, Any]]:
        groups = []
        for fqn, entry in zip(config_fqns(config), config, strict=True):
            module, module_fqn, tensor_name = resolve_tensor(model, fqn)
            self._check_keys(entry, f"config entry for '{fqn}'")
            group = {**self.defaults, **{k: v for k, v in entry.items() if k not in RESERVED}}
            check_group(group, f"tensor '{fqn}'")
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

    def channels_of(self, group: dict[str, Any]) -> int:
        """How many units of pruning a configured tensor has now: the classes of its rows (a channel, an LSTM's
        hidden unit over its 4 gate rows, a head, a GroupNorm group)."""
        member = next(m for m in self.plan.members if m.tensor_fqn == group["tensor_fqn"])
        classes = self.plan.classes(member.labels)
        return int(classes[classes >= 0].unique().numel())

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
            result = fuse(self.plan, self.param_orders, self.rank_probes)
        self.pruned = True
        self.notes, self.lineage, self.edits = result.notes, result.lineage, result.edits
        return self.model

    def forget_model(self) -> None:
        """Let go of the prepared model once its masks have been removed by other means (e.g. a checkpoint load)."""
        remove_rank_probes(self.rank_probes)
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
                if key not in RESERVED:
                    group[key] = value

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for group in self.groups:
            params = {k: v for k, v in group.items() if k not in RESERVED}
            lines.append(f"    {group['tensor_fqn']}: {params}")
        return "\n".join(lines + [")"])


def _mask_of(group: dict[str, Any]) -> torch.Tensor:
    return getattr(group["module"].parametrizations, group["tensor_name"])[0].mask
