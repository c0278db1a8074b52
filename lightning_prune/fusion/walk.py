"""The walk: one pass over the analysed graph that hands every node to its rule.

The walk knows no layer types. It keeps each node's *value* (a :class:`~.layout.Layout` for a tensor that carries
channels, a :class:`~.records.TensorRef` for a parameter or buffer read directly, a tuple for tuple outputs, None
otherwise) and gives rules a :class:`~.visit.Visit` through which they read their inputs and record what they do:
the output layout, couplings, blocks, the tensor dims that must be narrowed with a layout (*bindings*), candidate
producers, and the per-channel tensors that must be masked with the channels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from lightning_prune.errors import PruningConfigError
from lightning_prune.fusion.graph import Traced
from lightning_prune.fusion.records import TensorRef, Walk, computed_tensors
from lightning_prune.fusion.rules import registry
from lightning_prune.fusion.visit import Visit, freeze_refs, labels_of


def walk(model: nn.Module, traced: Traced) -> Walk:
    """Visit every node of ``traced`` in order with its rule."""
    state = Walk(model, traced)
    for fqn, module in model.named_modules(remove_duplicate=False):
        for kind in (module._parameters, module._buffers):
            for name, tensor in kind.items():
                if tensor is not None:
                    holders = state.holders.setdefault(id(tensor), [])
                    if not any(h[0] is module and h[2] == name for h in holders):
                        holders.append((module, fqn, name))
    modules = dict(model.named_modules(remove_duplicate=False))
    rules = registry.active()
    for node in traced.graph.nodes:
        visit = Visit(state, node, modules)
        if node.op == "placeholder":
            state.values[node.name] = None
        elif node.op == "get_attr" and node.target in traced.constants:
            ref = TensorRef(traced.constants[node.target], node.target)
            state.values[node.name] = ref
            state.frozen[id(ref.tensor)] = (f"a tensor made in forward{_at(node)} has the channels' size written "
                                            "there, so it cannot follow the narrower layer (a buffer registered "
                                            "in __init__ can)")
        elif node.op == "get_attr":
            state.values[node.name] = _attr(model, node.target)
        elif node.op == "output":
            for value in visit.channel_inputs():
                state.groups.mark_output(labels_of(value))
            freeze_refs(state, visit, "is returned by forward from")
        else:
            rule = rules.call_rule(visit.module) if node.op == "call_module" else rules.function_rule(node.target)
            if rule is not None and rule.transparent:  # a block read as one call (its forward needs shapes)
                visit.block_inputs("is read as one call without example inputs (its forward branches on its "
                                   "input); pass example_inputs to prune inside it")
                state.values[node.name] = None
                _note_lost(state, node, visit, True)
                continue
            visit.rule = rule
            state.values[node.name] = None
            blocks = len(state.groups.blocks)
            computed = computed_tensors(visit.module) if visit.module is not None else []
            if rule is not None and computed:
                visit.block_inputs(f"computes {computed} at run time (weight_norm, spectral_norm or another "
                                   "parametrization), which fusion cannot narrow; remove it before pruning "
                                   "(torch.nn.utils.parametrize.remove_parametrizations)")
            elif rule is None:
                visit.unknown()
            else:
                _visit_or_refuse(state, visit, rule)
                if labels_of(state.values.get(node.name)).numel():
                    state.steps.append((node, rule))
            freeze_refs(state, visit, "is read whole by", unbound_only=True)
            _note_lost(state, node, visit, len(state.groups.blocks) > blocks)
    for key, binding in state.bindings.items():
        reason = state.frozen.get(key[0])
        if reason is not None:
            state.groups.block(binding.labels, reason)
    return state


def _visit_or_refuse(state: Walk, visit: Visit, rule: Any) -> None:
    """Hand the node to its rule. A rule that raises on it (an input it was not written for, a bug in a user's rule)
    refuses the node instead of crashing the analysis: what it recorded for this node is dropped, and the channels
    reaching the node and those its tensors were bound to are blocked, naming the op, its source line and the error.
    The project's own errors (a rule that refuses on purpose) pass through."""
    before = (len(state.consumers), len(state.silences), len(state.actions), len(state.assumed_ranks))
    bound = set(state.bindings)
    try:
        rule.visit(visit)
    except PruningConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of a rule is a refusal of the node, never a crash
        del state.consumers[before[0]:], state.silences[before[1]:], state.actions[before[2]:]
        del state.assumed_ranks[before[3]:]
        state.values[visit.node.name] = None
        reason = (f"{visit.where} could not be read: {type(rule).__name__}.visit raised {type(error).__name__}: "
                  f"{error}; its channels are kept (a rule for an input it was not written for: register one with "
                  "lightning_prune.register_function / register_layer, or report it)")
        visit.block_inputs(reason.removeprefix(f"{visit.where} "))
        for key in set(state.bindings) - bound:
            state.groups.block(state.bindings[key].labels, reason)


def _note_lost(state: Walk, node: fx.Node, visit: Visit, blocked: bool) -> None:
    """A node without channels whose input lost track of them (an op that refused, or anything computed from its
    output) is remembered with that op, so a later refusal can name it rather than blame its own input."""
    if state.values.get(node.name) is not None:
        return
    lost = [state.lost[a.name] for a in node.all_input_nodes if a.name in state.lost]
    if lost:
        state.lost[node.name] = lost[0]
    elif blocked:
        state.lost[node.name] = visit.where


def _at(node: fx.Node) -> str:
    source = node.meta.get("source")
    return f" ({source})" if source else ""


def _attr(model: nn.Module, target: str) -> Any:
    value = model
    for part in target.split("."):
        value = getattr(value, part)
    return TensorRef(value, target) if isinstance(value, torch.Tensor) else None
