"""Attach the masks that keep the masked model equal to the final one, and later shrink the layers in place.

``fuse`` works in three passes so that it never leaves a model half-modified: it first follows the constant that each
removed channel still emits (its bias, or ``sigmoid(0)``), then decides every layer's kept channels and the constants
to fold into the next biases, checking everything, and only then bakes the masks and narrows the modules.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from lightning_prune.errors import UnsupportedPatternError
from lightning_prune.fusion import rules as R
from lightning_prune.fusion.graph import ChannelGraph, Flow, Member
from lightning_prune.masks import (
    ChannelMask,
    FakeStructuredSparsity,
    attach_channel_mask,
    attach_row_mask,
    bake_masks,
    has_masks,
)


def attach_masks(graph: ChannelGraph, prune_bias: dict[str, bool]) -> dict[str, FakeStructuredSparsity]:
    """Attach a row mask to every configured weight, and the bias/affine masks that silence pruned channels.

    With ``prune_bias`` a pruned channel's bias and the BatchNorm affine after it are masked too; an LSTM's gate
    biases are always masked with their rows, so a pruned unit's state stays exactly zero.
    """
    masks: dict[str, FakeStructuredSparsity] = {}
    members = [m for root in graph.roots() for m in graph.spaces[root].members]
    for module in [m.module for m in members] + [entry[1] for entry in graph.channelwise]:
        graph.param_orders.setdefault(id(module), list(module._parameters))
    for member in members:
        masks[member.tensor_fqn] = attach_row_mask(member.module, member.tensor_name, member.dim)
    for member in members:
        rule = R.rule_for(member.module)
        if isinstance(member.module, nn.LSTM) or prune_bias[member.tensor_fqn]:
            rows = masks[member.tensor_fqn].mask.numel()
            for name in rule.bias_names(member.module, member.tensor_name):
                attach_channel_mask(member.module, name, ChannelMask([([masks[member.tensor_fqn]], rows)]))
    for _node, module, rule, flow in graph.channelwise:
        spaces = [graph.space(s.space) for s in flow.segments]
        if not all(prune_bias[m.tensor_fqn] for sp in spaces for m in sp.members):
            continue
        segments = [([masks[m.tensor_fqn] for m in sp.members], sp.size) for sp in spaces]
        for name in rule.affine_names(module):
            if not any(m.module is module for sp in spaces for m in sp.members):
                attach_channel_mask(module, name, ChannelMask(segments))
    return masks


def _member_channels(member: Member) -> torch.Tensor:
    """A member's kept channels: a channel is kept if any of its rows is."""
    mask = getattr(member.module.parametrizations, member.tensor_name)[0].mask
    return mask.reshape(member.rows_per_channel, -1).any(0)


@dataclass
class FusionResult:
    """What fusion did: the warnings it emitted, and where each new tensor came from (to carry optimizer state)."""

    notes: list[str]
    #: (new tensor, id of the tensor it replaced, {dim: kept indices of the old one})
    lineage: list[tuple[torch.Tensor, int, dict[int, torch.Tensor]]]


def live_inputs(graph: ChannelGraph, module: nn.Module) -> torch.Tensor | None:
    """Which input features of ``module`` still carry a channel under the current masks (None: not a consumer).

    Weights that only ever see a masked channel's silence should not count when scoring the layer's own channels.
    """
    for consumer in graph.consumers:
        if consumer.module is module:
            kept = {}
            for seg in consumer.flow.segments:
                root = graph.find(seg.space)
                if root not in kept:
                    members = graph.spaces[root].members
                    kept[root] = torch.stack([_member_channels(m).cpu() for m in members]).any(0) if members \
                        else torch.ones(seg.size, dtype=torch.bool)
            return _expand(graph, consumer.flow, kept)
    return None


def fuse(graph: ChannelGraph) -> FusionResult:
    """Shrink the model in place."""
    consts, must_keep = _propagate_constants(graph)
    keep, lstm_plans, notes = _decide(graph, must_keep)
    folds = _folds(graph, consts, keep)
    lineage: dict = {}
    token = R.LINEAGE.set(lineage)
    try:
        _mutate(graph, keep, lstm_plans, folds)
    finally:
        R.LINEAGE.reset(token)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=3)
    tensors = {id(t): t for m in graph.model.modules() for t in list(m._parameters.values()) + list(m._buffers.values())
               if t is not None}
    return FusionResult(notes, [(tensors[i], root, index) for i, (root, index) in lineage.items() if i in tensors])


def _propagate_constants(graph: ChannelGraph) -> tuple[dict[str, torch.Tensor], dict[int, torch.Tensor]]:
    """Follow each removed channel's constant through the graph.

    Returns the constant at every node and, per space, the channels that must stay because their constant turns
    position-dependent (zero padding) on the way.
    """
    consts: dict[str, torch.Tensor] = {}
    must_keep = {r: torch.zeros(graph.spaces[r].size, dtype=torch.bool) for r in graph.roots()}
    with torch.no_grad():
        for step in graph.steps:
            inputs = [consts[name] for name in step.inputs]
            value, independent = step.fn(*inputs)
            if not independent:
                _mark(graph, must_keep, graph.flows[step.node], inputs[0] != 0)
            consts[step.node] = value.detach().to(torch.float64).reshape(-1)
        for consumer in graph.consumers:
            if not consumer.rule.constant_input_is_constant(consumer.module):
                _mark(graph, must_keep, consumer.flow, consts[consumer.source] != 0)
    return consts, must_keep


def _mark(graph: ChannelGraph, must_keep, flow: Flow, channels: torch.Tensor) -> None:
    offset = 0
    for seg in flow.segments:
        must_keep[graph.find(seg.space)] |= channels[offset:offset + seg.size].cpu()
        offset += seg.size


def _decide(graph: ChannelGraph, must_keep) -> tuple[dict[int, torch.Tensor], dict, list[str]]:
    keep: dict[int, torch.Tensor] = {}
    notes: list[str] = []
    lstms: dict[int, list[int]] = {}
    for root in graph.roots():
        space = graph.spaces[root]
        if space.lstm is not None:
            lstms.setdefault(id(space.lstm[0]), []).append(root)
            continue
        kept = must_keep[root].clone()
        for member in space.members:
            kept |= _member_channels(member).cpu()
        if not kept.any():
            kept[0] = True  # a layer needs one channel; a zeroed one keeps the model exact
        keep[root] = kept
    plans = {}
    for roots in lstms.values():
        plan, note = _plan_lstm(graph, roots)
        plans[id(plan["module"])] = plan
        for layer, root in enumerate(roots):
            keep[root] = plan["outputs"][layer]
        if note:
            notes.append(note)
    return keep, plans, notes


def _plan_lstm(graph: ChannelGraph, roots: list[int]) -> tuple[dict, str | None]:
    """Exact when every gate row of a unit is masked together; otherwise torch.ao's per-gate slicing (approximate)."""
    module = graph.spaces[roots[0]].lstm[0]
    name = graph.module_names[id(module)]
    hidden = module.hidden_size
    gate_masks = []
    for root in roots:
        space = graph.spaces[root]
        by_name = {m.tensor_name.split("_")[1]: m for m in space.members}
        gate_masks.append({kind: getattr(module.parametrizations, by_name[kind].tensor_name)[0].mask.cpu()
                           .reshape(4, hidden) for kind in ("ih", "hh")})
    tied = all((g[kind] == g["ih"][0]).all() for g in gate_masks for kind in ("ih", "hh"))
    keep_all = [r for root in roots for r in graph.spaces[root].keep_all]
    if tied:
        units = [torch.ones_like(g["ih"][0]) if keep_all else g["ih"][0].clone() for g in gate_masks]
        width = max(1, max(int(u.sum()) for u in units))
        for u in units:  # nn.LSTM needs one hidden size: keep extra (silent, zeroed) units where a layer has fewer
            for j in (~u).nonzero().flatten()[: width - int(u.sum())]:
                u[j] = True
        layers = [{"ih": u.repeat(4), "hh": u.repeat(4), "cols": u} for u in units]
        note = None
        if keep_all:
            note = (f"LSTM '{name}' keeps all its hidden units (the pruned ones zeroed) to stay exact: {keep_all[0]}. "
                    "Every layer of an nn.LSTM has one hidden size, so no layer of it shrinks.")
        return {"module": module, "layers": layers, "outputs": units}, note
    counts = {int(g[kind][i].sum()) for g in gate_masks for kind in ("ih", "hh") for i in range(4)}
    if len(counts) != 1:
        raise UnsupportedPatternError(
            f"LSTM '{name}': gate masks keep different numbers of units ({sorted(counts)}); nn.LSTM needs one "
            "hidden size. Use LSTMSaliencyPruner(tie_gates=True) or prune the same count in every gate."
        )
    layers = []
    for g in gate_masks:
        hh = g["hh"]
        layers.append({"ih": g["ih"].reshape(-1), "hh": hh.reshape(-1), "cols": _per_gate_columns(hh)})
    note = (f"LSTM '{name}' has gate masks that differ between gates or between weight_ih and weight_hh; fusion "
            "slices each gate by its own mask as torch.ao does, so the pruned LSTM only approximates the masked one. "
            "Use LSTMSaliencyPruner(tie_gates=True) for an exact result.")
    return {"module": module, "layers": layers, "outputs": [g["hh"][3] for g in gate_masks]}, note


def _per_gate_columns(gate_masks: torch.Tensor):
    def select(weight: torch.Tensor) -> torch.Tensor:
        blocks = weight.split(int(gate_masks[0].sum()))
        return torch.cat([block[:, gate_masks[g]] for g, block in enumerate(blocks)])

    return select


def _expand(graph: ChannelGraph, flow: Flow, per_channel: dict[int, torch.Tensor] | torch.Tensor):
    """Per-feature vector for a consumer's input: each segment's channels, repeated by its flatten block."""
    parts = []
    offset = 0
    for seg in flow.segments:
        if isinstance(per_channel, dict):
            part = per_channel[graph.find(seg.space)]
        else:
            part = per_channel[offset:offset + seg.size]
        offset += seg.size
        parts.append(part.repeat_interleave(seg.block))
    return torch.cat(parts)


def _folds(graph: ChannelGraph, consts, keep) -> dict[int, torch.Tensor]:
    """The constant each consumer loses with its removed inputs, to add to its bias."""
    folds = {}
    with torch.no_grad():
        for consumer in graph.consumers:
            kept = _expand(graph, consumer.flow, keep)
            values = _expand(graph, consumer.flow, consts[consumer.source])
            removed = (~kept).nonzero().flatten()
            if removed.numel() and values[removed].abs().max() > 0:
                removed = removed.to(_device(consumer.module))
                folds[id(consumer.module)] = consumer.rule.fold(
                    consumer.module, removed, values[removed.cpu()].to(_device(consumer.module))
                ).detach()
    return folds


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _index(mask: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return mask.nonzero().flatten().to(_device(module))


def _mutate(graph: ChannelGraph, keep, lstm_plans, folds) -> None:
    """Bake and narrow one module at a time, so at most one module's full-size copy exists beside the model."""
    producers = {id(module): (rule, root) for module, rule, root in graph.producers}
    channelwise = {id(module): (rule, flow) for _node, module, rule, flow in graph.channelwise}
    norms = {id(module): flow for module, flow in graph.norms}
    consumers = {id(c.module): c for c in graph.consumers}
    for module in graph.model.modules():
        key = id(module)
        _bake(graph, module)
        out_rows = None
        if key in producers:
            rule, root = producers[key]
            out_rows = keep[graph.find(root)]
            rule.slice_out(module, _index(out_rows, module))
        if key in lstm_plans:
            out_rows = _narrow_lstm(lstm_plans[key])
        if key in channelwise:
            rule, flow = channelwise[key]
            rule.slice_channels(module, _index(_expand(graph, flow, keep), module))
        if key in norms:
            R.rule_for(module).slice_channels(module, _index(_expand(graph, norms[key], keep), module))
        if key in consumers:
            rule = consumers[key].rule
            rule.slice_in(module, _index(_expand(graph, consumers[key].flow, keep), module))
            if key in folds:
                rule.add_to_bias(module, folds[key] if out_rows is None else folds[key][_index(out_rows, module)])
            if isinstance(module, nn.LSTM):
                rule.sync(module)


def _bake(graph: ChannelGraph, module: nn.Module) -> None:
    """Replace the module's masked tensors by plain ones, in the parameter order it had before masking."""
    if not has_masks(module):
        return
    lineage = R.LINEAGE.get()
    originals = {name: plist.original for name, plist in module.parametrizations.items()}
    bake_masks(module)
    for name, original in originals.items():
        lineage[id(getattr(module, name))] = (id(original), {})
    order = graph.param_orders.get(id(module), [])
    module._parameters = dict(sorted(module._parameters.items(),
                                     key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def _narrow_lstm(plan: dict) -> torch.Tensor:
    """Keep each layer's planned gate rows and hidden columns; returns the first layer's kept input-weight rows."""
    module, rule = plan["module"], R.rule_for(plan["module"])
    for layer, spec in enumerate(plan["layers"]):
        rule.slice_units(module, layer, _index(spec["ih"], module), _index(spec["hh"], module),
                         spec["cols"] if callable(spec["cols"]) else _index(spec["cols"], module))
        if layer:
            rule.slice_layer_input(module, layer, _index(plan["outputs"][layer - 1], module))
    rule.sync(module)
    return plan["layers"][0]["ih"]
