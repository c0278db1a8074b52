"""Trace a model with torch.fx and work out where each configured layer's output channels go.

Every configured layer produces a *space* of channels. Following each tensor through the graph, we record which
spaces make up its channel dimension (a concat stacks several), where that dimension sits, and what each op does to a
constant channel. Ops that add or multiply two spaces couple them: they must keep the same channels. Anything that
mixes channels, or that we do not know, *blocks* the spaces that reach it. The result drives both ``prepare()``
(refuse, or attach the masks that keep the masked model equal to the final one) and ``prune()`` (narrow the layers).
"""

from __future__ import annotations

import linecache
import operator
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_prune.errors import UnsupportedPatternError
from lightning_prune.fusion import rules as R


@dataclass(frozen=True)
class Segment:
    """A run of channels from one space; ``block`` is how many features each channel became after a flatten."""

    space: int
    size: int
    block: int | None = 1


@dataclass(frozen=True)
class Flow:
    """The channel dimension of a tensor: its segments, where it sits, and the tensor's rank if known."""

    segments: tuple[Segment, ...]
    dim: int
    ndim: int | None

    @property
    def width(self) -> int:
        return sum(s.size for s in self.segments)

    def position(self) -> int | None:
        """The channel dim counted from the front, if it can be known."""
        if self.dim >= 0:
            return self.dim
        return None if self.ndim is None else self.ndim + self.dim


@dataclass(frozen=True)
class TupleFlow:
    items: tuple


@dataclass(frozen=True)
class LayerStack:
    """An LSTM's h_n or c_n: layer k's hidden units are space ``spaces[k]``."""

    spaces: tuple[int, ...]
    size: int


@dataclass
class Member:
    """A configured weight whose rows are a space's channels (``rows_per_channel`` rows each, gate-major)."""

    module: nn.Module
    tensor_name: str
    tensor_fqn: str
    rows_per_channel: int = 1
    dim: int = 0


@dataclass
class Space:
    size: int
    members: list[Member] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    keep_all: list[str] = field(default_factory=list)
    lstm: tuple[nn.LSTM, int] | None = None
    reaches_output: bool = False


@dataclass
class Consumer:
    """A layer that takes a flow as input and must lose the removed input features."""

    node: str
    module: nn.Module
    rule: R.LayerRule
    source: str
    flow: Flow


@dataclass
class Step:
    """How a node maps constant channels: ``fn(consts of inputs) -> (const, position_independent)``."""

    node: str
    inputs: tuple[str, ...]
    fn: Callable[..., tuple[torch.Tensor, bool]]


class _Tracer(fx.Tracer):
    """Treats every module with a fusion rule as a leaf and notes the user's source line of each node.

    (fx's own ``record_stack_traces`` costs a second of imports on first use; one frame walk is enough here.)
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return R.rule_for(m) is not None or super().is_leaf_module(m, module_qualified_name)

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["source"] = _user_frame()
        return node


def _user_frame() -> str | None:
    """The innermost calling frame outside torch and this package: the line of the user's forward."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if f"{os.sep}torch{os.sep}" not in path and f"{os.sep}lightning_prune{os.sep}fusion{os.sep}" not in path:
            return f"{path}:{frame.f_lineno}: {linecache.getline(path, frame.f_lineno).strip()}"
        frame = frame.f_back
    return None


def trace(model: nn.Module) -> fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as exc:  # fx raises many types; surface them as one clear config error
        raise UnsupportedPatternError(
            f"torch.fx could not trace {type(model).__name__}.forward ({type(exc).__name__}: {exc}). Structured "
            "fusion needs a traceable forward: no data-dependent control flow. Register custom layers with "
            "lightning_prune.register_layer so they are treated as leaves."
        ) from exc


_BINARY = {
    operator.add: operator.add, operator.iadd: operator.add, torch.add: operator.add, "add": operator.add,
    "add_": operator.add, operator.sub: operator.sub, operator.isub: operator.sub, torch.sub: operator.sub,
    "sub": operator.sub, operator.mul: operator.mul, operator.imul: operator.mul, torch.mul: operator.mul,
    "mul": operator.mul, "mul_": operator.mul, operator.truediv: operator.truediv, torch.div: operator.truediv,
    "div": operator.truediv,
}
_FLATTEN = {torch.flatten, "flatten"}
_RESHAPE = {torch.reshape, "reshape", "view"}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_MEANS = {torch.mean, "mean", torch.amax, "amax"}
_SHAPE_QUERIES = {"size", "dim", "numel", getattr}


def _where(node: fx.Node) -> str:
    source = node.meta.get("source")
    return f"node '{node.name}' ({source})" if source else f"node '{node.name}'"


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} '{node.target}'"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{'method' if node.op == 'call_method' else 'function'} '{target}'"


class ChannelGraph:
    """The channel dependency analysis of one model for one set of configured weights."""

    def __init__(self, model: nn.Module, graph: fx.Graph, configured: dict[str, tuple[nn.Module, str]]):
        self.model = model
        self.modules = dict(model.named_modules())
        self.module_names = {id(m): n for n, m in self.modules.items()}
        self.configured = configured  # tensor_fqn -> (module, tensor_name)
        self.spaces: list[Space] = []
        self._parent: list[int] = []
        self.flows: dict[str, object] = {}
        self.steps: list[Step] = []
        self.consumers: list[Consumer] = []
        self.channelwise: list[tuple[str, nn.Module, R.ChannelwiseRule, Flow]] = []
        self.norms: list[tuple[nn.Module, Flow]] = []
        self.producers: list[tuple[nn.Module, R.LayerRule, int]] = []
        self._module_space: dict[int, int] = {}
        #: each masked module's parameter order before masks were attached, restored when they are baked
        self.param_orders: dict[int, list[str]] = {}
        self._consumed: dict[int, Flow] = {}
        for node in graph.nodes:
            self._visit(node)

    # -- spaces -------------------------------------------------------------------------------------------------
    def find(self, space: int) -> int:
        while self._parent[space] != space:
            self._parent[space] = self._parent[self._parent[space]]
            space = self._parent[space]
        return space

    def space(self, space: int) -> Space:
        return self.spaces[self.find(space)]

    def _new_space(self, size: int, lstm: tuple[nn.LSTM, int] | None = None) -> int:
        self.spaces.append(Space(size=size, lstm=lstm))
        self._parent.append(len(self._parent))
        return len(self.spaces) - 1

    def _union(self, a: int, b: int, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        sa, sb = self.spaces[ra], self.spaces[rb]
        self._parent[rb] = ra
        sa.members += sb.members
        sa.blocked += sb.blocked
        sa.keep_all += sb.keep_all
        sa.reaches_output |= sb.reaches_output
        if sa.size != sb.size:
            sa.blocked.append(f"{where} combines {sa.size} and {sb.size} channels")
        if sa.lstm or sb.lstm:
            sa.blocked.append(f"{where} couples an LSTM's hidden units with other channels")

    def roots(self) -> list[int]:
        return sorted({self.find(i) for i in range(len(self.spaces))})

    def _block(self, value: object, reason: str) -> None:
        for space in _spaces_in(value):
            self.space(space).blocked.append(reason)

    # -- the walk -----------------------------------------------------------------------------------------------
    def _visit(self, node: fx.Node) -> None:
        inputs = [a for a in node.all_input_nodes if self.flows.get(a.name) is not None]
        if node.op in ("placeholder", "get_attr"):
            self.flows[node.name] = None
        elif node.op == "output":
            for a in inputs:
                for space in _spaces_in(self.flows[a.name]):
                    self.space(space).reaches_output = True
        elif node.op == "call_module":
            self._visit_module(node, inputs)
        elif node.op in ("call_function", "call_method"):
            self._visit_function(node, inputs)

    def _first_flow(self, node: fx.Node, inputs: list[fx.Node]) -> Flow | None:
        """The flow of the node's first argument; any other argument carrying channels blocks them."""
        first = node.args[0] if node.args else None
        for a in inputs:
            if a is not first:
                self._block(self.flows[a.name], f"{_describe(node, self.modules)} at {_where(node)} takes "
                                               "pruned channels as a secondary argument")
        flow = self.flows.get(first.name) if isinstance(first, fx.Node) else None
        return flow

    def _pass(self, node: fx.Node, flow, fn, source: fx.Node | None = None) -> None:
        self.flows[node.name] = flow
        if isinstance(flow, Flow):
            src = source if source is not None else node.args[0]
            self.steps.append(Step(node.name, (src.name,), fn))

    def _visit_module(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        module = self.modules[node.target]
        rule = R.rule_for(module)
        flow = self._first_flow(node, inputs)
        self.flows[node.name] = None
        where = f"{_describe(node, self.modules)} at {_where(node)}"
        if rule is None:
            if flow is not None:
                self._block(flow, f"{where} is unknown to fusion; register a rule for "
                                  f"{type(module).__name__} with lightning_prune.register_layer")
            return
        kind = rule.kind(module)
        reason = rule.blocked_reason(module) if kind != "elementwise" else None
        if kind == "blocked" or reason:
            self._block(flow, f"{where}: {reason}")
            self._block_members(module, f"{where}: {reason}")
            return
        if kind == "flatten":
            self._flatten(node, flow, module.start_dim, module.end_dim)
        elif kind == "layer":
            self._visit_layer(node, module, rule, flow, where)
        elif kind == "channelwise":
            self._visit_channelwise(node, module, rule if isinstance(rule, R.ChannelwiseRule) else R.DEPTHWISE,
                                    flow, where)
        elif kind == "elementwise":
            self._visit_elementwise(node, module, rule, flow, where)
        elif kind == "norm":
            self._visit_norm(node, module, rule, flow, where)

    def _block_members(self, module: nn.Module, reason: str) -> None:
        """A configured weight on a layer fusion cannot narrow: block it with a space of its own."""
        for fqn, (mod, _name) in self.configured.items():
            if mod is module:
                space = self._new_space(0)
                self.spaces[space].members.append(Member(module, _name, fqn))
                self.spaces[space].blocked.append(reason)

    def _check_channel_dim(self, flow: Flow, expected_last: bool, where: str) -> bool:
        pos = flow.position()
        ok = (flow.dim == -1 or (pos is not None and flow.ndim is not None and pos == flow.ndim - 1)) \
            if expected_last else pos == 1
        if not ok:
            self._block(flow, f"{where} does not take the pruned channels on its channel dimension")
        return ok

    def _visit_layer(self, node, module, rule: R.LayerRule, flow: Flow | None, where: str) -> None:
        if flow is not None:
            self._consume(node, module, rule, flow, where)
        members = [(fqn, name) for fqn, (m, name) in self.configured.items() if m is module]
        if isinstance(module, nn.LSTM):
            self._produce_lstm(node, module, members)
            return
        if not members:
            return
        if id(module) in self._module_space:
            space = self._module_space[id(module)]
        else:
            space = self._new_space(rule.out_channels(module))
            self._module_space[id(module)] = space
            for fqn, name in members:
                self.space(space).members.append(Member(module, name, fqn, dim=rule.channel_dim_of_weight(module)))
            self.producers.append((module, rule, space))
        out = Flow((Segment(space, rule.out_channels(module)),), rule.channel_dim, rule.output_ndim(module))
        self.flows[node.name] = out
        self.steps.append(Step(node.name, (), _producer_const(module)))

    def _consume(self, node, module, rule: R.LayerRule, flow: Flow, where: str) -> None:
        if not self._check_channel_dim(flow, rule.channel_dim == -1, where):
            return
        expected = rule.in_channels(module)
        blocks = {s.block for s in flow.segments}
        if blocks == {None} and expected % flow.width == 0:
            flow = Flow(tuple(Segment(s.space, s.size, expected // flow.width) for s in flow.segments),
                        flow.dim, flow.ndim)
        features = sum(s.size * (s.block or 0) for s in flow.segments)
        if None in {s.block for s in flow.segments} or features != expected:
            self._block(flow, f"{where} expects {expected} input features but the pruned channels give {features}")
            return
        if rule.channel_dim == 1 and any(s.block != 1 for s in flow.segments):
            self._block(flow, f"{where} takes flattened channels")
            return
        previous = self._consumed.get(id(module))
        if previous is not None and previous != flow:
            self._block(flow, f"{where} is called on differently pruned inputs")
            self._block(previous, f"{where} is called on differently pruned inputs")
            return
        if previous is None:
            self._consumed[id(module)] = flow
            self.consumers.append(Consumer(node.name, module, rule, node.args[0].name, flow))

    def _produce_lstm(self, node, module: nn.LSTM, members: list[tuple[str, str]]) -> None:
        if not members:
            return
        names = {name for _, name in members}
        wanted = set(R.LSTMRule().prunable_tensors(module))
        if names != wanted:
            missing = ", ".join(sorted(wanted - names))
            self._block_members(module, f"LSTM '{node.target}' must have all of its weights configured together "
                                        f"(missing: {missing}) so every layer keeps the same hidden units")
            return
        if id(module) not in self._module_space:
            first = None
            for layer in range(module.num_layers):
                space = self._new_space(module.hidden_size, lstm=(module, layer))
                first = space if first is None else first
                for fqn, name in members:
                    if name.endswith(f"_l{layer}"):
                        self.spaces[space].members.append(Member(module, name, fqn, rows_per_channel=4))
            self._module_space[id(module)] = first
        first = self._module_space[id(module)]
        layers = tuple(range(first, first + module.num_layers))
        h = module.hidden_size
        # batch_first only makes sense for batched (3-D) input, so then the rank is known and out[:, -1] is safe
        out = Flow((Segment(layers[-1], h),), -1, 3 if module.batch_first else None)
        self.flows[node.name] = TupleFlow((out, TupleFlow((LayerStack(layers, h), LayerStack(layers, h)))))
        self.steps.append(Step(node.name, (), lambda: (torch.zeros(h, dtype=torch.float64), True)))

    def _visit_channelwise(self, node, module, rule: R.ChannelwiseRule, flow: Flow | None, where: str) -> None:
        members = [(fqn, name) for fqn, (m, name) in self.configured.items() if m is module]
        if flow is None:
            if members:
                self._block_members(module, f"{where} ties its output channels to input channels that no "
                                            "configured layer produces; configure the layer feeding it too")
            return
        lstm = any(self.space(s.space).lstm for s in flow.segments)
        bn1d_after_linear = isinstance(module, nn.BatchNorm1d) and flow.dim == -1 and flow.ndim is None and not lstm
        if not (bn1d_after_linear or self._check_channel_dim(flow, False, where)) or \
                len(flow.segments) != 1 and members:
            if members:
                self._block_members(module, f"{where} cannot follow concatenated channels when configured")
            return
        for fqn, name in members:
            self.space(flow.segments[0].space).members.append(Member(module, name, fqn))
        self.channelwise.append((node.name, module, rule, flow))
        self._pass(node, flow, lambda v: rule.const(module, v))

    def _visit_elementwise(self, node, module, rule: R.ElementwiseRule, flow: Flow | None, where: str) -> None:
        if flow is None:
            return
        if rule.spatial_dims:
            pos = flow.position()
            if pos is None or flow.ndim is None or pos >= flow.ndim - rule.spatial_dims:
                self._block(flow, f"{where} pools over the pruned channel dimension")
                return
        self._pass(node, flow, lambda v: rule.const(module, v))

    def _visit_norm(self, node, module: nn.LayerNorm, rule, flow: Flow | None, where: str) -> None:
        if flow is None:
            return
        spaces = [self.space(s.space) for s in flow.segments]
        reason = f"{where} normalises over the pruned channels, so its statistics change when they are removed"
        if all(s.lstm is not None for s in spaces) and len(spaces) == 1:
            spaces[0].keep_all.append(reason)
            self.norms.append((module, flow))
            self._pass(node, flow, lambda v: (v, True))
        else:
            self._block(flow, reason)

    # -- functions and methods ----------------------------------------------------------------------------------
    def _visit_function(self, node: fx.Node, inputs: list[fx.Node]) -> None:
        target = node.target
        self.flows[node.name] = None
        if not inputs:
            return
        where = f"{_describe(node, self.modules)} at {_where(node)}"
        if target in _BINARY:
            self._binary(node, _BINARY[target], where)
        elif target is operator.getitem:
            self._getitem(node, where)
        elif target in _SHAPE_QUERIES:
            return
        elif target in R.ELEMENTWISE_FUNCTIONS:
            flow = self._first_flow(node, inputs)
            if flow is not None and len(inputs) == 1:
                self._pass(node, flow, _function_const(node))
        elif target in _FLATTEN:
            flow = self._first_flow(node, inputs)
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            self._flatten(node, flow, start, end)
        elif target in _RESHAPE:
            self._reshape(node, self._first_flow(node, inputs), where)
        elif target in _CAT:
            self._cat(node, where)
        elif target in _MEANS:
            self._reduce(node, self._first_flow(node, inputs), where)
        elif target in R.POOL_FUNCTIONS:
            self._pool_function(node, self._first_flow(node, inputs), where)
        else:
            for a in inputs:
                self._block(self.flows[a.name], f"{where} is not known to keep channels apart")

    def _binary(self, node: fx.Node, op, where: str) -> None:
        lhs, rhs = (node.args + (node.kwargs.get("other"),))[:2]
        lflow = self.flows.get(lhs.name) if isinstance(lhs, fx.Node) else None
        rflow = self.flows.get(rhs.name) if isinstance(rhs, fx.Node) else None
        if lflow is not None and rflow is not None:
            if not (isinstance(lflow, Flow) and isinstance(rflow, Flow)) or \
                    [s.size for s in lflow.segments] != [s.size for s in rflow.segments]:
                self._block(lflow, f"{where} combines differently laid-out channels")
                self._block(rflow, f"{where} combines differently laid-out channels")
                return
            for a, b in zip(lflow.segments, rflow.segments, strict=True):
                self._union(a.space, b.space, where)
            self.flows[node.name] = lflow
            self.steps.append(Step(node.name, (lhs.name, rhs.name), lambda a, b: (op(a, b), True)))
            return
        flow, other, flow_node = (lflow, rhs, lhs) if lflow is not None else (rflow, lhs, rhs)
        if isinstance(other, fx.Node) or not isinstance(flow, Flow):
            self._block(flow, f"{where} mixes the pruned channels with a tensor that no configured layer "
                              "produces; configure both sides of a residual connection")
            if isinstance(flow, Flow):  # follow on, so blockers further down are reported too
                self._pass(node, flow, lambda v: (v, True), flow_node)
            return
        if flow is lflow:
            self._pass(node, flow, lambda v: (op(v, other), True), flow_node)
        else:
            self._pass(node, flow, lambda v: (op(other, v), True), flow_node)

    def _getitem(self, node: fx.Node, where: str) -> None:
        value, index = node.args
        flow = self.flows.get(value.name)
        if isinstance(flow, TupleFlow) and isinstance(index, int):
            self.flows[node.name] = flow.items[index]
            item = flow.items[index]
            if isinstance(item, Flow):
                self.steps.append(Step(node.name, (), lambda: (torch.zeros(item.width, dtype=torch.float64), True)))
            return
        if isinstance(flow, LayerStack) and isinstance(index, int):
            item = Flow((Segment(flow.spaces[index], flow.size),), -1, None)
            self.flows[node.name] = item
            self.steps.append(Step(node.name, (), lambda: (torch.zeros(item.width, dtype=torch.float64), True)))
            return
        if isinstance(flow, Flow):
            out = _index_flow(flow, index)
            if out is not None:
                self._pass(node, out, lambda v: (v, True))
                return
        self._block(flow, f"{where} indexes the pruned channel dimension")

    def _flatten(self, node: fx.Node, flow: Flow | None, start: int, end: int) -> None:
        if flow is None:
            return
        pos = flow.position()
        ndim = flow.ndim
        if pos is not None and ndim is not None and start >= 0 and end in (-1, ndim - 1) and start > pos:
            self._pass(node, Flow(flow.segments, flow.dim, start + 1), lambda v: (v, True))
            return
        if pos is not None and start == pos and end in (-1, (ndim or 0) - 1) and \
                all(s.block == 1 for s in flow.segments):
            flat = pos == (ndim or 0) - 1
            segments = tuple(Segment(s.space, s.size, 1 if flat else None) for s in flow.segments)
            self._pass(node, Flow(segments, pos, pos + 1), lambda v: (v, True))
            return
        self._block(flow, f"flatten({start}, {end}) at {_where(node)} interleaves the pruned channels")

    def _reshape(self, node: fx.Node, flow: Flow | None, where: str) -> None:
        """``x.view(x.size(0), -1)`` is ``flatten(x, 1)``; any other reshape may mix the channels."""
        if flow is None:
            return
        shape = node.args[1:] if isinstance(node.target, str) else node.args[1]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = shape[0]
        if len(shape) == 2 and shape[1] == -1 and _is_batch_size(shape[0], node.args[0]):
            self._flatten(node, flow, 1, -1)
        else:
            self._block(flow, f"{where} reshapes the pruned channels; use torch.flatten(x, 1) or x.view(x.size(0), -1)")

    def _cat(self, node: fx.Node, where: str) -> None:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        flows = [self.flows.get(t.name) if isinstance(t, fx.Node) else None for t in tensors]
        ok = all(isinstance(f, Flow) for f in flows) and len({(f.position(), f.ndim) for f in flows}) == 1
        if ok:
            first = flows[0]
            pos = first.position()
            ok = pos is not None and first.ndim is not None and dim in (pos, pos - first.ndim)
        if not ok:
            for f in flows:
                self._block(f, f"{where} concatenates the pruned channels with tensors no configured layer "
                               "produces, or along another dimension")
            return
        segments = tuple(s for f in flows for s in f.segments)
        self.flows[node.name] = Flow(segments, first.dim, first.ndim)
        self.steps.append(Step(node.name, tuple(t.name for t in tensors), lambda *vs: (torch.cat(vs), True)))

    def _reduce(self, node: fx.Node, flow: Flow | None, where: str) -> None:
        if flow is None:
            return
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        pos, ndim = flow.position(), flow.ndim
        if dims is None or pos is None or ndim is None:
            self._block(flow, f"{where} reduces over the pruned channel dimension")
            return
        dims = {d % ndim for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
        if pos in dims:
            self._block(flow, f"{where} reduces over the pruned channel dimension")
            return
        if keepdim:
            out = flow
        else:
            new_pos = pos - sum(d < pos for d in dims)
            out = Flow(flow.segments, new_pos, ndim - len(dims))
        self._pass(node, out, lambda v: (v, True))

    def _pool_function(self, node: fx.Node, flow: Flow | None, where: str) -> None:
        if flow is None:
            return
        dims, zero_pads = R.POOL_FUNCTIONS[node.target]
        pos = flow.position()
        if pos is None or flow.ndim is None or pos >= flow.ndim - dims:
            self._block(flow, f"{where} pools over the pruned channel dimension")
            return
        bound = _bound_args(node)
        padding = bound.get("padding", 0)
        padding = padding if isinstance(padding, (tuple, list)) else (padding,)
        independent = not (zero_pads and bound.get("count_include_pad", True) and any(p > 0 for p in padding))
        self._pass(node, flow, lambda v: (v, independent))


def _is_batch_size(value: object, tensor: fx.Node) -> bool:
    """Whether ``value`` is ``tensor.size(0)`` or ``tensor.shape[0]`` in the traced graph."""
    if not isinstance(value, fx.Node):
        return False
    if value.op == "call_method" and value.target == "size":
        dim = value.args[1] if len(value.args) > 1 else value.kwargs.get("dim")
        return value.args[0] is tensor and dim == 0
    if value.op == "call_function" and value.target is operator.getitem and value.args[1] == 0:
        shape = value.args[0]
        return isinstance(shape, fx.Node) and shape.target is getattr and shape.args == (tensor, "shape")
    return False


def _bound_args(node: fx.Node) -> dict:
    names = {
        F.avg_pool1d: ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
        F.avg_pool2d: ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
        F.avg_pool3d: ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    }.get(node.target, ())
    bound = dict(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    return bound


def _index_flow(flow: Flow, index) -> Flow | None:
    """The flow after ``tensor[index]``, or None if the index touches the channel dimension."""
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis or i is None or isinstance(i, (fx.Node, torch.Tensor, list)) for i in index):
        return None
    pos = flow.position()
    full = slice(None)
    if pos is None:  # channels are last, rank unknown: safe if the index ends before them or keeps them whole
        if not (len(index) == 1 or index[-1] == full):
            return None
    elif pos < len(index) and index[pos] != full:
        return None
    dropped = [k for k, i in enumerate(index) if isinstance(i, int)]
    ndim = None if flow.ndim is None else flow.ndim - len(dropped)
    dim = flow.dim if flow.dim < 0 else flow.dim - sum(k < flow.dim for k in dropped)
    return Flow(flow.segments, dim, ndim)


def _spaces_in(value: object) -> list[int]:
    if isinstance(value, Flow):
        return [s.space for s in value.segments]
    if isinstance(value, TupleFlow):
        return [s for item in value.items for s in _spaces_in(item)]
    if isinstance(value, LayerStack):
        return list(value.spaces)
    return []


def _producer_const(module: nn.Module) -> Callable[[], tuple[torch.Tensor, bool]]:
    """A removed output channel emits its (masked) bias, or 0."""

    def const():
        bias = getattr(module, "bias", None)
        if bias is None:
            return torch.zeros(R.rule_for(module).out_channels(module), dtype=torch.float64), True
        return bias.detach().to(torch.float64), True

    return const


def _function_const(node: fx.Node) -> Callable[[torch.Tensor], tuple[torch.Tensor, bool]]:
    fn = R.ELEMENTWISE_FUNCTIONS[node.target]
    args, kwargs = node.args[1:], dict(node.kwargs)
    if fn is None:
        return lambda v: (v, True)
    kwargs.pop("inplace", None)
    if isinstance(fn, str):
        return lambda v: (getattr(v.clone(), fn)(*args, **kwargs), True)
    return lambda v: (fn(v.clone(), *args, **kwargs), True)


def blocked_tensors(graph: ChannelGraph) -> dict[str, str]:
    """Configured tensors that fusion cannot narrow exactly, with every reason for each."""
    blocked = {}
    for root in graph.roots():
        space = graph.spaces[root]
        reasons = "; and ".join(dict.fromkeys(space.blocked))
        for member in space.members if space.blocked else []:
            blocked.setdefault(member.tensor_fqn, reasons)
    return blocked
