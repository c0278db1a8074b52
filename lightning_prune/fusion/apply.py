"""Execute a plan: decide every class, check it all, then narrow the user's modules in place, atomically.

1. *Decide*: a class of channels is kept when any configured row in it is kept by its mask, when something blocks
   its removal, when its removed constant would depend on position, or when a layer would otherwise lose all its
   channels.
2. *Fold*: the constant each removed channel still emits is added to the bias of the layer that reads it.
3. *Narrow*: every bound tensor keeps the indices whose channel is kept; masks are removed (masked positions that
   stay are zeroed), biases take their folds, and each rule resets its module's size attributes. All of it goes
   through a :class:`~.surgery.Surgery` journal, so an error anywhere restores the model as it was.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from lightning_prune.fusion.constants import input_node, propagate
from lightning_prune.fusion.hf_config import follow_config
from lightning_prune.fusion.plan import PruningPlan
from lightning_prune.fusion.ranks import check_ranks, remove_rank_probes
from lightning_prune.fusion.records import held
from lightning_prune.fusion.rules import registry
from lightning_prune.fusion.surgery import Surgery
from lightning_prune.masks import ChannelMask, FakeStructuredSparsity


@dataclass
class FuseContext:
    """What rules see while fusion decides and narrows (see the ``Rule`` fusion hooks)."""

    plan: PruningPlan
    root: torch.Tensor
    kept: torch.Tensor  # per class root: whether it stays
    surgery: Surgery | None = None
    store: dict = field(default_factory=dict)  # per-module state a rule keeps between its hooks

    def mask_of(self, module: nn.Module, name: str) -> torch.Tensor | None:
        return _mask_of(module, name)

    def kept_positions(self, labels: torch.Tensor) -> torch.Tensor:
        return (~_removed(labels, self.root, self.kept)).nonzero().flatten()

    def name(self, module: nn.Module) -> str:
        return next((fqn for fqn, m in self.plan.model.named_modules() if m is module), "?")


@dataclass
class FusionResult:
    """What fusion did: the warnings it gave, and where each new tensor came from (to carry optimizer state)."""

    notes: list[str]
    #: (new tensor, id of the tensor it replaced, {dim: kept indices of the old one})
    lineage: list[tuple[torch.Tensor, int, dict[int, torch.Tensor]]]
    edits: int = 0  # journaled edits made (each one a point where a failure would have rolled back)


def fuse(plan: PruningPlan, param_orders: dict[int, list[str]] | None = None,
         rank_probes: list | None = None) -> FusionResult:
    """Shrink the model in place (see the module docstring).

    ``param_orders``: each module's parameter order before masks were attached (by ``id``), restored as they come
    off (what :func:`~.attach.attach_masks` returns); ``rank_probes``: the probes of :func:`~.ranks.attach_rank_probes`,
    checked first and removed once the model is narrowed.

    Raises:
        UnsupportedPatternError: forward gave a probed module another input rank than the walk assumed.
    """
    rank_probes = [] if rank_probes is None else rank_probes
    check_ranks(rank_probes)
    walk, root = plan.current_walk(), plan.groups.solve()
    kept = plan.kept_classes()
    consts, dependent = propagate(walk)
    kept[root[dependent]] = True
    calls: dict[int, int] = {}
    for _node, module, _rule, _labels in walk.consumers:
        calls[id(module)] = calls.get(id(module), 0) + 1
    for node, module, rule, labels in walk.consumers:
        source = input_node(node)
        values = consts[source.name].at(labels) if source is not None and source.name in consts else None
        removed = _removed(labels, root, kept)
        if values is not None and (values[removed] != 0).any() and (
                calls[id(module)] > 1 or not rule.constant_input_is_constant(module)):
            kept[root[labels[removed & (values != 0)]]] = True
    ctx, notes, keeps = decide(plan, root, kept)
    for module, rule, data in walk.actions:
        for tensor in rule.owned_tensors(module, data, ctx):
            keeps.pop(id(tensor), None)
    folds = _folds(plan, consts, root, kept, calls, keeps)
    lineage: list = []
    with Surgery() as surgery:
        ctx.surgery = surgery
        _mutate(ctx, keeps, folds, lineage, param_orders or {})
    follow_config(plan.model)
    remove_rank_probes(rank_probes)
    notes += [f"'{fqn}' keeps its channels (zeroed where masked) to stay exact: {why}"
              for fqn, why in plan.retained.items()]
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=3)
    return FusionResult(notes, lineage, surgery.edits)


def decide(plan: PruningPlan, root: torch.Tensor, kept: torch.Tensor,
           surgery: Surgery | None = None) -> tuple[FuseContext, list[str], dict[int, dict[int, torch.Tensor]]]:
    """Settle ``kept`` (a bool per class root, changed in place) as fusion does before it narrows anything: every
    layer keeps at least one channel and the rules' own constraints hold (an LSTM's one hidden size).

    Returns the context rules narrow with (``rule.narrow(module, data, ctx)``), the notes the rules gave, and per
    tensor (by id), per dim, the indices to keep (only dims that lose something). The dry run narrows a meta copy of
    the model with these.
    """
    ctx = FuseContext(plan, root, kept, surgery)
    notes = _keep_one_each(ctx)
    return ctx, notes, _keeps(plan, root, ctx.kept)


def _removed(labels: torch.Tensor, root: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    live = labels >= 0
    removed = torch.zeros(labels.shape, dtype=torch.bool)
    removed[live] = ~kept[root[labels[live]]]
    return removed


def _mask_of(module: nn.Module, name: str) -> torch.Tensor | None:
    if not parametrize.is_parametrized(module, name):
        return None
    for p in module.parametrizations[name]:
        if isinstance(p, FakeStructuredSparsity):
            return p.mask
    return None


def _keep_one_each(ctx: FuseContext) -> list[str]:
    """Every layer keeps at least one channel, and the rules' own constraints hold (an LSTM's one hidden size)."""
    notes = []
    for module, rule, data in ctx.plan.walk.actions:
        note = rule.adjust_kept(module, data, ctx)
        if note:
            notes.append(note)
    for producer in ctx.plan.walk.producers.values():
        classes = ctx.root[producer.labels[producer.labels >= 0]]
        if classes.numel() and not ctx.kept[classes].any():
            ctx.kept[classes[0]] = True
    return notes


def _keeps(plan: PruningPlan, root: torch.Tensor, kept: torch.Tensor) -> dict[int, dict[int, torch.Tensor]]:
    """Per tensor (by id), per dim: the indices to keep (only dims that lose something)."""
    keeps: dict[int, dict[int, torch.Tensor]] = {}
    for (tensor_id, dim), binding in plan.walk.bindings.items():
        removed = _removed(binding.labels, root, kept)
        if removed.any():
            keeps.setdefault(tensor_id, {})[dim] = (~removed).nonzero().flatten()
    return keeps


def _folds(plan, consts, root, kept, calls, keeps) -> dict[int, torch.Tensor]:
    """The constant each single-call consumer loses with its removed inputs, per kept output row."""
    folds: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for node, module, rule, labels in plan.walk.consumers:
            source = input_node(node)
            if source is None or source.name not in consts or calls[id(module)] > 1:
                continue
            values = consts[source.name].at(labels)
            removed = _removed(labels, root, kept) & (values != 0)
            if removed.any():
                index = removed.nonzero().flatten()
                device = next(iter(module.parameters()), torch.empty(0)).device
                delta = rule.fold(module, index.to(device), values[index].to(device)).detach()
                _name, weight_name, dim = rule.fold_target(module)
                rows = keeps.get(id(held(module, weight_name)), {}).get(dim)
                folds[id(module)] = delta if rows is None else delta[rows.to(delta.device)]
    return folds


def _mutate(ctx: FuseContext, keeps, folds, lineage: list, param_orders: dict[int, list[str]]) -> None:
    plan, surgery = ctx.plan, ctx.surgery
    walk, rules = plan.walk, registry.active()
    modules = list(dict.fromkeys(plan.model.modules()))
    zero: dict[int, tuple[int, torch.Tensor]] = {}
    for module in modules:  # masks off everywhere first: a tied weight's holders share one mask
        for name, positions in _unmask(module, surgery, param_orders.get(id(module))).items():
            zero[id(module._parameters[name])] = positions
    touched: set[int] = set()
    for module in modules:
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is None or (id(tensor) not in keeps and id(tensor) not in zero):
                    continue
                keep = keeps.pop(id(tensor), {})
                new = _narrowed(tensor, keep, zero.pop(id(tensor), None), surgery)
                if new is tensor:
                    continue
                for holder, _fqn, holder_name in walk.holders.get(id(tensor), [(module, "", name)]):
                    surgery.set_entry(holder._parameters if holder_name in holder._parameters else holder._buffers,
                                      holder_name, new)
                    touched.add(id(holder))
                lineage.append((new, id(tensor), keep))
    actions: dict[int, list] = {}
    for module, rule, data in walk.actions:
        actions.setdefault(id(module), []).append((rule, data))
    for module in modules:
        rule = rules.module_rule(module)
        if id(module) in folds:
            _fold(module, rule, folds[id(module)], surgery, lineage)
        if id(module) in touched or id(module) in actions or id(module) in folds:
            surgery.snapshot(module)
            for action_rule, data in actions.get(id(module), []):
                action_rule.narrow(module, data, ctx)
            if rule is not None:
                rule.sync(module)
    changed = [m for m in modules if id(m) in touched or id(m) in actions or id(m) in folds]
    registry.sync_containers(plan.model, changed, before=surgery.snapshot)


def _unmask(module: nn.Module, surgery: Surgery, order: list[str] | None) -> dict[str, tuple[int, torch.Tensor]]:
    """Remove the module's masks (journaled), leaving its original tensors; returns, per tensor, the masked
    positions (dim, indices) that must become zeros."""
    if not parametrize.is_parametrized(module) or not any(
            isinstance(p, (FakeStructuredSparsity, ChannelMask)) for plist in module.parametrizations.values()
            for p in plist):
        return {}  # no mask here (a weight_norm the analysis left alone stays as it is)
    masked: dict[str, tuple[int, torch.Tensor]] = {}
    originals = {}
    for name, plist in module.parametrizations.items():
        ours = [p for p in plist if isinstance(p, (FakeStructuredSparsity, ChannelMask))]
        if len(ours) != len(plist):
            raise RuntimeError(f"{type(module).__name__}.{name} has parametrizations other than pruning masks; "
                               "remove them before prune()")
        originals[name] = plist.original
        for p in ours:
            keep = p.mask.cpu() if isinstance(p, FakeStructuredSparsity) else p.channel_mask(torch.device("cpu"))
            dim = p.dim
            if not keep.all():
                masked[name] = (dim, (~keep).nonzero().flatten())
    surgery.set_entry(module._modules, "parametrizations", None)
    surgery.set_class(module, module.__class__.__bases__[0])
    for name, original in originals.items():
        surgery.set_entry(module._parameters, name, original)
    if order:
        surgery.reorder(module._parameters, order)
    return masked


def _narrowed(tensor: torch.Tensor, keep: dict[int, torch.Tensor], zero, surgery: Surgery) -> torch.Tensor:
    """The narrowed tensor (a new parameter or buffer), with the masked positions that stay set to zero."""
    new = surgery.narrow(tensor, keep) if keep else tensor
    if isinstance(tensor, nn.Parameter) and new is not tensor:
        new = nn.Parameter(new, requires_grad=tensor.requires_grad)
    if new is not tensor:
        surgery.track(tensor, new)
    if zero is not None:
        dim, index = zero
        if dim in keep:  # positions of the narrowed tensor
            position = torch.full((tensor.shape[dim],), -1, dtype=torch.long)
            position[keep[dim].cpu()] = torch.arange(keep[dim].numel())
            index = position[index]
            index = index[index >= 0]
        surgery.zero(new, dim, index)
    return new


def _fold(module: nn.Module, rule, delta: torch.Tensor, surgery: Surgery, lineage: list) -> None:
    """Add ``delta`` (already narrowed to the kept rows) to the layer's bias, creating the bias if it had none."""
    name, weight_name, _dim = rule.fold_target(module)
    bias = module._parameters.get(name)
    if bias is None:
        weight = module._parameters[weight_name]
        new = nn.Parameter(delta.to(weight.dtype).clone(), requires_grad=weight.requires_grad)
        surgery.set_entry(module._parameters, name, new)
        lineage.append((new, -1, {}))
        return
    surgery.add(bias, delta)
