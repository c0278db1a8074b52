"""The analysis: trace and walk a model, then settle which configured tensors can be pruned (a
:class:`~.plan.PruningPlan`).

Explicit tensors are honoured exactly or refused with the reason; with ``config=None`` every producer the walk found
that can be pruned exactly is taken and the rest left out with the reason. An export-mode plan is checked by a dry run
(:mod:`.dryrun`), which may block more groups; the members are then settled again. This module sits above both the
plan (data) and :mod:`.apply` (the mutation code the dry run narrows a meta copy with).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lightning_prune.errors import OutputReachedError, UnsupportedPatternError
from lightning_prune.fusion.dryrun import dry_run
from lightning_prune.fusion.plan import Member, PruningPlan
from lightning_prune.fusion.records import Producer, Walk, computed_tensors
from lightning_prune.fusion.rules import registry
from lightning_prune.fusion.trace import trace
from lightning_prune.fusion.walk import walk


def analyse(
    model: nn.Module,
    configured: list[str] | None,
    *,
    example_inputs: tuple[tuple, dict] | None = None,
    exclude_output: bool = False,
    select: Callable[[str], bool] | None = None,
    strict: bool = True,
    sparsity_level: float = 0.5,
) -> PruningPlan:
    """Trace and walk ``model``, then settle the members.

    ``configured``: explicit tensor FQNs, honoured exactly or refused (``strict=False``: left out with the reason,
    as :func:`explain` shows them); None: every producer the walk found (for which ``select(fqn)`` holds) that can be
    pruned exactly, leaving out the rest (and, with ``exclude_output``, those whose channels reach the output).
    ``sparsity_level``: the level the plan's table shows sizes at.

    Raises:
        UnsupportedPatternError: an explicit tensor cannot be pruned exactly (every such tensor and reason listed).
        OutputReachedError: with ``exclude_output``, an explicit tensor whose channels reach the model's output.
    """
    state = walk(model, trace(model, example_inputs))
    producers = _by_fqn(state)
    explicit = configured is not None
    if explicit:
        missing = {fqn: _never_produced(model, state, fqn) for fqn in configured if fqn not in producers}
        if missing and strict:
            raise UnsupportedPatternError("\n".join(missing.values()))
        chosen = [fqn for fqn in configured if fqn not in missing]
    else:
        order = {id(m): k for k, m in enumerate(model.modules())}
        found = sorted(state.producers.values(), key=lambda p: order.get(id(p.module), len(order)))
        chosen = [p.tensor_fqn for p in found if select is None or select(p.tensor_fqn)]
    chosen_keys = {id(producers[fqn]) for fqn in chosen}
    for producer in state.producers.values():
        if id(producer) not in chosen_keys and not producer.follows:
            state.groups.block(producer.labels, f"its channels are tied to those of '{producer.tensor_fqn}', which "
                                                "is not configured (configure both)")
    dropped: dict[str, str] = dict(missing) if explicit else {}
    retained: dict[str, str] = {}
    while True:  # an export-mode plan is checked by a dry run, which may block more (then settle again)
        chosen = _settle(state, producers, chosen, explicit, exclude_output, dropped, retained, strict)
        members = []
        for fqn in chosen:
            producer = producers[fqn]
            module_fqn, _, name = fqn.rpartition(".")
            module = model.get_submodule(module_fqn)
            members.append(Member(module, module_fqn, name, fqn, producer.dim, producer.labels, producer.rule))
        plan = PruningPlan(model, state, members, dropped, retained, example_inputs=example_inputs,
                           sparsity_level=sparsity_level)
        if state.traced.front_end != "export" or not dry_run(plan, example_inputs):
            return plan


def _settle(state: Walk, producers: dict[str, Producer], chosen: list[str], explicit: bool, exclude_output: bool,
            dropped: dict[str, str], retained: dict[str, str], strict: bool) -> list[str]:
    """The configured tensors that stay members: refuse (explicit config) or leave out (config=None, recorded in
    ``dropped``) those with no removable channel or, with ``exclude_output``, whose channels reach the output."""
    while True:
        blocked = state.groups.blocked_classes()
        outputs = state.groups.output_classes() if exclude_output else set()
        problems: dict[str, str] = {}
        for fqn in chosen:
            producer = producers[fqn]
            classes = [c for c in state.groups.classes(producer.labels).unique().tolist() if c >= 0]
            if classes and all(c in blocked for c in classes):
                reasons = [r for r in dict.fromkeys(r for c in classes for r in blocked[c])
                           if not r.startswith(f"its channels are tied to those of '{fqn}'")]
                if getattr(producer.rule, "retain_blocked", False) and explicit:
                    retained[fqn] = _summary(reasons)
                    continue
                problems[fqn] = _summary(reasons) or "no channel of it can be removed"
            elif outputs and any(c in outputs for c in classes):
                problems[fqn] = "its channels reach the model's output"
        if explicit and strict and any(r == "its channels reach the model's output" for r in problems.values()):
            reaching = [f for f, r in problems.items() if r == "its channels reach the model's output"]
            raise OutputReachedError(
                f"config names {reaching}, whose channels reach the model's output: pruning them changes the output's "
                "width (a classifier would lose classes). Leave them out of the config, or opt in to narrowing the "
                "output explicitly.")
        if not problems:
            return chosen
        if explicit and strict:
            raise UnsupportedPatternError("\n".join(f"cannot prune '{fqn}' exactly: {reason}"
                                                     for fqn, reason in problems.items()))
        for fqn, reason in problems.items():
            dropped[fqn] = reason
            state.groups.block(producers[fqn].labels, f"'{fqn}' is left out ({reason})")
        chosen = [fqn for fqn in chosen if fqn not in dropped]


def _summary(reasons: list[str], shown: int = 2) -> str:
    """The first reasons in full, then how many more (a residual stream can meet a dozen norms)."""
    text = "; and ".join(reasons[:shown])
    return text + (f" (and {len(reasons) - shown} more like it)" if len(reasons) > shown else "")


def _by_fqn(state: Walk) -> dict[str, Producer]:
    """Producers by the FQN of every name their tensor goes by (a tied weight has several)."""
    found: dict[str, Producer] = {}
    for producer in state.producers.values():
        tensor = producer.module._parameters.get(producer.tensor_name)
        for _module, fqn, name in state.holders.get(id(tensor), []):
            found.setdefault(f"{fqn}.{name}" if fqn else name, producer)
    found.update({p.tensor_fqn: p for p in state.producers.values()})
    return found


def _never_produced(model: nn.Module, state: Walk, fqn: str) -> str:
    module_fqn, _, name = fqn.rpartition(".")
    module = model.get_submodule(module_fqn)
    called = any(node.op == "call_module" and node.target == module_fqn for node in state.traced.graph.nodes)
    if computed_tensors(module):
        return (f"'{fqn}' cannot be pruned: {type(module).__name__} '{module_fqn}' computes {computed_tensors(module)} "
                "at run time (weight_norm, spectral_norm or another parametrization); remove it before pruning "
                "(torch.nn.utils.parametrize.remove_parametrizations)")
    found = registry.active().registered(module)
    if not called and found is not None and registry.active().call_rule(module) is None:
        kind, base = type(module).__name__, found[0].__name__
        return (f"'{fqn}' is never used as a layer's output channels in forward: {kind} '{module_fqn}' overrides "
                f"{base}.forward, so fusion follows its forward op by op, and there the weight is not a layer's "
                f"weight; if {kind}'s channels map as {base}'s do, say so with "
                f"lightning_prune.register_layer({kind}, {base})")
    if not called:
        return (f"'{fqn}' is never used as a layer's output channels in forward: {type(module).__name__} "
                f"'{module_fqn}' is not called as a module in the traced graph (it is used inside another module or "
                "function that fusion cannot see into)")
    return f"'{fqn}' is not a tensor whose rows fusion prunes (its layer's rule does not produce channels from it)"
