"""What a rule sees of the walk: a :class:`Visit` of one node, through which it reads its inputs (layouts,
:class:`~.records.TensorRef` reads of parameters and buffers, shapes) and records what the node does to channels
(the output layout, couplings, blocks, bindings, producers, silences, actions) in the :class:`~.records.Walk`.

It sits below both the rules and the walk (:mod:`.walk`), which hands every node to its rule through one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from lightning_prune.fusion.graph import module_path
from lightning_prune.fusion.layout import FIXED, Layout
from lightning_prune.fusion.records import Binding, Producer, Silence, TensorRef, Walk


def labels_of(value: Any) -> torch.Tensor:
    """Every channel id in a value (a layout or a nested tuple of them)."""
    if isinstance(value, Layout):
        return value.labels.reshape(-1)
    if isinstance(value, (tuple, list)):
        parts = [labels_of(v) for v in value]
        parts = [p for p in parts if p.numel()]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    return torch.empty(0, dtype=torch.long)


def freeze_refs(state: Walk, visit: Visit, why: str, unbound_only: bool = False) -> None:
    """Parameters and buffers this node reads directly keep their shape, except those its rule narrows with the
    channels (``unbound_only``): a read the rule did not bind (``self.gain.mean()``, ``self.fc.weight.norm()``)
    would see a different tensor once the channels go."""
    for node in visit.node.all_input_nodes:
        ref = state.values.get(node.name)
        if isinstance(ref, TensorRef) and not (unbound_only and id(ref.tensor) in visit.bound_ids):
            state.frozen.setdefault(id(ref.tensor), f"'{ref.fqn}' {why} {visit.where}, which keeps its shape")


class Visit:
    """What a rule sees of one node, and how it records what the node does to channels."""

    def __init__(self, state: Walk, node: fx.Node, modules: dict[str, nn.Module]):
        self.state = state
        self.node = node
        self.module: nn.Module | None = modules.get(node.target) if node.op == "call_module" else None
        self.rule: Any = None
        self.bound_ids: set[int] = set()  # ids of the tensors this node's rule bound

    # -- reading ------------------------------------------------------------------------------------------------
    @property
    def where(self) -> str:
        node = self.node
        if node.op == "call_module":
            what = f"{type(self.module).__name__} '{node.target}'"
        else:
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
            what = f"{'method' if node.op == 'call_method' else 'function'} '{name}'"
        source = node.meta.get("source")
        return f"{what} at node '{node.name}' ({source})" if source else f"{what} at node '{node.name}'"

    @property
    def shapes(self) -> bool:
        return self.state.traced.shapes

    def arg(self, index: int, name: str | None = None, default: Any = None) -> Any:
        """Positional argument ``index`` or keyword ``name``."""
        if index < len(self.node.args):
            return self.node.args[index]
        if name is not None and name in self.node.kwargs:
            return self.node.kwargs[name]
        return default

    def value(self, arg: Any) -> Any:
        return self.state.values.get(arg.name) if isinstance(arg, fx.Node) else None

    def layout(self, arg: Any) -> Layout | None:
        value = self.value(arg)
        return value if isinstance(value, Layout) else None

    def shape(self, arg: Any = None) -> tuple[int, ...] | None:
        """The shape of ``arg`` (default: this node's output), when shapes are known."""
        node = self.node if arg is None else arg
        val = node.meta.get("val") if isinstance(node, fx.Node) else None
        if isinstance(val, torch.Tensor):
            return tuple(int(s) for s in val.shape)
        if isinstance(arg, torch.Tensor):
            return tuple(arg.shape)
        return None

    def ndim(self, arg: Any = None) -> int | None:
        shape = self.shape(arg)
        return None if shape is None else len(shape)

    def assume_rank(self, ndim: int | None) -> int | None:
        """Record that this module call was read as getting a batched input of rank ``ndim`` without shapes to say so
        (an unbatched conv input has its channels on dim 0); prune() checks it against the rank forward saw."""
        if ndim is not None and self.module is not None:
            self.state.assumed_ranks.append((self.module, self.where, ndim))
        return ndim

    @property
    def front_end(self) -> str:
        """The front end that made the graph: "fx" or "export"."""
        return self.state.traced.front_end

    def output(self) -> Any:
        """The value recorded for this node so far (its layout once :meth:`set`; None before)."""
        return self.state.values.get(self.node.name)

    def lost(self, arg: Any) -> str | None:
        """The op where the channels ``arg`` (a node) is computed from were lost, if any."""
        return self.state.lost.get(arg.name) if isinstance(arg, fx.Node) else None

    def note(self) -> Any:
        """What the rule of an earlier node left for this one (:meth:`leave_note`), or None."""
        return self.state.notes.get(self.node.name)

    def holder(self, tensor: torch.Tensor) -> tuple[nn.Module, str, str] | None:
        """The first (module, module FQN, name) holding ``tensor`` as a parameter or buffer; None for a tensor no
        module holds (a constant made in forward)."""
        holders = self.state.holders.get(id(tensor))
        return holders[0] if holders else None

    def submodule(self, target: str) -> nn.Module:
        """The model's submodule at ``target`` (a ``call_module`` node's target)."""
        return self.state.model.get_submodule(target)

    def channel_inputs(self) -> list[Any]:
        """The values of every input node that carries channels."""
        values = [self.state.values.get(a.name) for a in self.node.all_input_nodes]
        return [v for v in values if labels_of(v).numel()]

    def tensor(self, name: str, module: nn.Module | None = None) -> torch.Tensor | None:
        module = module if module is not None else self.module
        return module._parameters.get(name, module._buffers.get(name)) if module is not None else None

    def owner(self) -> nn.Module:
        """The innermost module whose forward made this node (the model itself at top level): for a function node,
        the module that holds the attributes its code reads (an attention block's head count)."""
        stack = self.node.meta.get("nn_module_stack") or {}
        modules = dict(self.state.model.named_modules())
        for path, _type in reversed(list(stack.values())):
            fqn = module_path(path, modules)
            if fqn is not None:
                return modules[fqn]
        return self.state.model

    def module_fqn(self, module: nn.Module) -> str:
        holders = [h for hs in self.state.holders.values() for h in hs if h[0] is module]
        if holders:
            return holders[0][1]
        for fqn, m in self.state.model.named_modules():
            if m is module:
                return fqn
        return "?"

    # -- recording ----------------------------------------------------------------------------------------------
    def set(self, value: Any) -> None:
        self.state.values[self.node.name] = value

    def fresh(self, n: int) -> torch.Tensor:
        return self.state.groups.fresh(n)

    def block(self, value: Any, reason: str, retain: bool = False) -> None:
        """Channels in ``value`` (a layout, tuple or label tensor) can never be removed, because of ``reason``."""
        labels = value if isinstance(value, torch.Tensor) else labels_of(value)
        self.state.groups.block(labels, reason, retain)

    def block_inputs(self, reason: str, skip: Any = None) -> None:
        for arg in self.node.all_input_nodes:
            if arg is not skip:
                self.block(self.value(arg), f"{self.where} {reason}")
        freeze_refs(self.state, self, "is read")

    def unknown(self) -> None:
        if self.module is not None:
            self.block_inputs(f"is unknown to fusion; register a rule for {type(self.module).__name__} with "
                              "lightning_prune.register_layer")
        else:
            self.block_inputs("is not known to keep channels apart; register a rule for it with "
                              "lightning_prune.register_function")

    def couple(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Channels at the same positions of ``a`` and ``b`` are one (same shapes)."""
        self.state.groups.couple(a, b, self.where)

    def bind(self, tensor: torch.Tensor | None, dim: int, labels: torch.Tensor) -> None:
        """``tensor`` is narrowed along ``dim`` with ``labels`` (a second binding of the same dim is coupled)."""
        if tensor is None:
            return
        key = (id(tensor), dim % tensor.dim())
        self.bound_ids.add(id(tensor))
        previous = self.state.bindings.get(key)
        if previous is None:
            self.state.bindings[key] = Binding(tensor, dim % tensor.dim(), labels.reshape(-1), self.where)
        elif previous.labels.numel() != labels.numel():
            reason = f"{self.where} and {previous.where} use one tensor with differently pruned channels"
            self.block(previous.labels, reason)
            self.block(labels, reason)
        else:
            self.couple(previous.labels, labels)

    def hold(self, tensor: torch.Tensor | None, dim: int) -> None:
        """This use of ``tensor`` reads every index along ``dim`` (an input no configured layer produces, or one the
        rule cannot follow): a binding of FIXED labels, so another use cannot narrow it."""
        if tensor is not None:
            self.bind(tensor, dim, torch.full((tensor.shape[dim],), FIXED, dtype=torch.long))

    def bound(self, tensor: torch.Tensor, dim: int) -> torch.Tensor | None:
        binding = self.state.bindings.get((id(tensor), dim % tensor.dim()))
        return None if binding is None else binding.labels

    def produce(self, module: nn.Module, tensor_name: str, dim: int, rows_per_channel: int = 1,
                channels: int | None = None, follows: bool = False) -> torch.Tensor:
        """The output channel ids of ``module.<tensor_name>``'s rows along ``dim`` (new on first use, the same on
        every later call of the module or use of the tensor), registering it as a candidate producer.

        ``follows``: the rows are channels another producer makes (a depthwise conv's rows, coupled to its input),
        so the tensor may be configured with them but leaving it out does not block them."""
        tensor = self.tensor(tensor_name, module)
        rows = tensor.shape[dim]
        existing = self.bound(tensor, dim)
        if existing is None:
            ids = self.fresh(channels if channels is not None else rows // rows_per_channel)
            existing = ids.repeat(rows_per_channel)
            self.bind(tensor, dim, existing)
        key = (id(tensor), dim % tensor.dim())
        if key not in self.state.producers:
            self.state.producers[key] = Producer(module, self.module_fqn(module), tensor_name, dim % tensor.dim(),
                                                 existing, self.rule, follows)
        return existing

    def silence(self, module: nn.Module, tensor_name: str, labels: torch.Tensor, always: bool = False,
                dim: int = 0, statistics: bool = False) -> None:
        """With ``prune_bias`` (or ``always``), ``module.<tensor_name>`` (per channel along ``dim``) is masked with the
        channels in ``labels``; ``statistics``: a norm's masked statistics span them, so every tensor silenced with
        any of these channels is masked whatever ``prune_bias`` says."""
        if self.tensor(tensor_name, module) is not None:
            self.state.silences.append(Silence(module, tensor_name, labels.reshape(-1), always, dim, statistics))

    def leave_note(self, node: fx.Node, data: Any) -> None:
        """Leave ``data`` for the rule of a later ``node`` (read there with :meth:`note`)."""
        self.state.notes[node.name] = data

    def consumer(self, module: nn.Module, labels: torch.Tensor, rule: Any = None) -> None:
        """This call of ``module`` reads channels: ``labels`` gives the channel of each input feature (fusion folds
        the constants of removed ones into its bias). ``rule`` defaults to the node's own."""
        self.state.consumers.append((self.node, module, self.rule if rule is None else rule, labels))

    def action(self, data: Any, module: nn.Module | None = None) -> None:
        """A rule-specific narrowing record, handed back to ``rule.narrow(module, data, ctx)`` at prune time; ``module``
        defaults to the node's own module (a function rule names the module whose attributes it narrows)."""
        self.state.actions.append((module if module is not None else self.module, self.rule, data))
