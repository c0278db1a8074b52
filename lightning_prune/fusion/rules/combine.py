"""Ops that combine tensors position by position: add, sub, mul, div, maximum, minimum, comparisons, ``torch.where``
(three operands), and GLU (the two halves of one tensor).

Two tensors that both carry channels are *coupled*: channel c on one side and channel c on the other are kept or
removed together (a residual connection, a squeeze-and-excitation gate). With a parameter that varies along the
channels (``x * self.gamma``, a learned position embedding) the parameter is narrowed with them. A tensor computed at
run time that has its own values along the channels cannot be narrowed, so the channels are kept.
"""

from __future__ import annotations

import numbers
import operator

import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune.fusion.layout import Layout
from lightning_prune.fusion.records import TensorRef
from lightning_prune.fusion.rules.base import Rule, RuleKind, input_layout
from lightning_prune.fusion.rules.registry import aten, register_functions, register_layer


class CombineRule(Rule):
    """``op(a, b)`` elementwise. ``additive``: a removed (zero) channel does not stay zero when a tensor that does
    not carry it is added; ``numerator_only``: the channels may only be on the left (a division)."""

    kind = RuleKind.COMBINE

    def __init__(self, op, additive: bool, numerator_only: bool = False):
        self.op = op
        self.additive = additive
        self.numerator_only = numerator_only

    def operands(self, v):
        return v.arg(0, "input"), v.arg(1, "other")

    def visit(self, v) -> None:
        a, b = self.operands(v)
        la, lb = v.layout(a), v.layout(b)
        if la is None and lb is None:
            return
        if la is not None and lb is not None:
            self._both(v, la, lb)
            return
        flow, other = (la, b) if la is not None else (lb, a)
        if self.numerator_only and flow is lb:
            v.block(flow, f"{v.where} divides by the pruned channels (a removed channel would divide by zero)")
            return
        if other is None or isinstance(other, (numbers.Number, bool)):
            v.set(flow)
            return
        ref = v.value(other) if isinstance(other, torch.fx.Node) else None
        tensor = ref.tensor if isinstance(ref, TensorRef) else None
        shape = tuple(tensor.shape) if tensor is not None else v.shape(other)
        out_ndim = v.ndim() if v.shapes else flow.ndim
        front = flow.front_axes() if out_ndim is not None else None
        if shape is None or front is None or out_ndim is None:
            v.block(flow, _untracked(v, other))
            return
        shift = out_ndim - (flow.ndim if flow.ndim is not None else out_ndim)  # broadcasting adds leading dims
        axes = tuple(a + shift for a in front)
        out = Layout(axes, flow.labels, out_ndim, flow.pending, tuple(a + shift for a in flow.stable))
        offset = out_ndim - len(shape)
        along = [a - offset for a in axes]  # the other tensor's dim at each channel axis (< 0: absent)
        full = [d >= 0 and shape[d] > 1 for d in along]
        if not any(full):
            if self.additive and (tensor is None or tensor.numel() > 1):
                v.block(flow, f"{v.where} adds the same tensor to every channel, so a removed channel would still "
                              "carry it")
                return
            v.set(out)
            return
        if tensor is None and not self.additive and not all(full):
            # a run-time factor along some channel dims only (a rotary embedding along each head's features): exact
            # when positions along those dims never disappear on their own, so the factor stays aligned
            for k in (k for k, varies in enumerate(full) if varies):
                v.couple(flow.labels.narrow(k, 0, 1).expand_as(flow.labels), flow.labels)
            v.set(Layout(axes, flow.labels, out_ndim, flow.pending, flow.stable))
            return
        if tensor is None or not all(full) or [shape[d] for d in along] != list(flow.labels.shape):
            v.block(flow, f"{v.where} mixes the pruned channels with a tensor computed at run time that has its own "
                          "values per channel and cannot be narrowed; configure the layer producing it too")
            return
        if len(along) != 1:
            v.block(flow, f"{v.where} combines the channels with a parameter along several dims")
            return
        v.bind(tensor, along[0], flow.labels.reshape(-1))
        holder = v.holder(tensor)  # none: a constant made in forward (frozen, so refused)
        if self.additive and holder:  # per channel (a bias (C,) or (C, 1, 1); position embeddings (1, T, C))
            owner, _fqn, name = holder
            v.silence(owner, name, flow.labels.reshape(-1), dim=along[0])
        v.set(out)

    def _both(self, v, la: Layout, lb: Layout) -> None:
        out_ndim = v.ndim() if v.shapes else la.ndim
        aligned = []
        for flow in (la, lb):
            if flow.ndim is not None and out_ndim is not None and not flow.pending:
                aligned.append(tuple(a + out_ndim - flow.ndim for a in flow.axes))
            else:
                aligned.append(flow.axes if flow.ndim == la.ndim else None)
        if (aligned[0] is None or aligned[0] != aligned[1] or la.labels.shape != lb.labels.shape
                or la.pending != lb.pending):
            reason = f"{v.where} combines differently laid-out channels"
            v.block(la, reason)
            v.block(lb, reason)
            return
        v.couple(la.labels, lb.labels)
        v.set(Layout(aligned[0], la.labels, out_ndim, la.pending, tuple(set(la.stable) & set(lb.stable))))

    def const(self, v, *inputs):
        a, b = self.operands(v)
        values = []
        dependent = False
        inputs = list(inputs)
        for operand in (a, b):
            if v.layout(operand) is not None:
                values.append(inputs.pop(0))
                continue
            ref = v.value(operand) if isinstance(operand, torch.fx.Node) else None
            if isinstance(ref, TensorRef):
                holder = v.holder(ref.tensor)  # read through its mask, if a silence put one on it
                tensor = getattr(holder[0], holder[2]) if holder else ref.tensor
                value, varies = _per_position(v, tensor.detach().to(torch.float64).cpu())
                values.append(value)
                dependent = dependent or varies
            elif isinstance(operand, torch.fx.Node):  # a run-time tensor broadcast over the channels
                values.append(torch.ones(()))
                dependent = True
            else:
                values.append(torch.tensor(operand if operand is not None else 0, dtype=torch.float64))
        out = self.op(values[0], values[1]).to(torch.float64)
        return out, (out != 0) if dependent else False


def _untracked(v, other) -> str:
    """Why the channels cannot meet ``other``, a value whose channels (if any) are not known here."""
    lost = v.lost(other)
    if lost is not None:
        return (f"{v.where} mixes the pruned channels with a value computed from the output of {lost}, whose "
                "channels fusion could not follow (see that op's refusal)")
    if isinstance(other, torch.fx.Node) and isinstance(other.meta.get("val"), (int, float, torch.SymInt)):
        return (f"{v.where} combines the pruned channels with a number computed in forward (a size read from "
                "x.shape?), which may change when channels are removed")
    return (f"{v.where} mixes the pruned channels with a tensor that no configured layer produces; configure the "
            "layers producing both operands, or pass example_inputs so shapes are known")


def _per_position(v, tensor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A parameter's value at each position of the output's channel labels (broadcast where it has size 1), and
    whether it also varies along the dims that carry no channels (then a constant channel stops being constant)."""
    if tensor.numel() == 1:
        return tensor.reshape(()), False
    out = v.output()
    dims = [a - out.ndim + tensor.dim() for a in out.axes]  # the parameter's dim at each label axis (< 0: absent)
    along = [d for d in dims if d >= 0]
    rest = [d for d in range(tensor.dim()) if d not in along]
    moved = tensor.permute(along + rest).reshape(*[tensor.shape[d] for d in along], -1)
    varies = not bool((moved == moved[..., :1]).all())
    return moved[..., 0].reshape([tensor.shape[d] if d >= 0 else 1 for d in dims]), varies


class GLURule(Rule):
    """``F.glu(x, dim)`` / ``nn.GLU``: ``a * sigmoid(b)`` of the halves of ``x`` along ``dim``. Along the channels
    the halves are coupled position by position, so they stay equal, and the output carries the first half's."""

    kind = RuleKind.COMBINE

    def axis(self, v, flow: Layout) -> int | None:
        """The label axis that ``dim`` is (-1: a dim without channels), or None when that is not known."""
        dim = v.module.dim if v.module is not None else v.arg(1, "dim", -1)
        ndim = v.ndim(v.arg(0, "input")) if v.shapes else flow.ndim
        axes = flow.axes if ndim is None else tuple(a % ndim for a in flow.axes)
        if ndim is not None:
            dim %= ndim
        elif any((a >= 0) != (dim >= 0) for a in axes):
            return None
        return axes.index(dim) if dim in axes else -1

    def visit(self, v) -> None:
        flow = input_layout(v)
        if flow is None:
            return
        k = self.axis(v, flow)
        if k is None or flow.pending:
            v.block(flow, f"{v.where} halves a dim that is not known to be apart from the channels; pass "
                          "example_inputs")
            return
        labels = flow.labels
        if k >= 0:
            labels, second = labels.chunk(2, k)
            v.couple(labels, second)
        v.set(Layout(flow.axes, labels.contiguous(), flow.ndim, False, flow.stable))

    def const(self, v, values):
        k = self.axis(v, v.layout(v.arg(0, "input")))
        first, second = values.chunk(2, k) if k >= 0 else (values, values)
        return first * torch.sigmoid(second), False


class WhereRule(CombineRule):
    """``torch.where(condition, a, b)``: every operand that carries channels is coupled with the others (the
    condition usually comes from one of them, ``x > 0``); numbers broadcast; a run-time tensor without the channels
    would be selected into a removed channel, so the channels are kept."""

    def __init__(self):
        super().__init__(torch.where, additive=True)

    def operands(self, v):
        return v.arg(0, "condition"), v.arg(1, "input"), v.arg(2, "other")

    def visit(self, v) -> None:
        operands = self.operands(v)
        flows = [v.layout(o) for o in operands]
        live = [f for f in flows if f is not None]
        if not live:
            return
        if operands[2] is None or any(f is None and not isinstance(o, (numbers.Number, bool))
                                      for o, f in zip(operands, flows, strict=True)):
            for flow in live:
                v.block(flow, f"{v.where} selects between the pruned channels and a value that does not carry them "
                              "(or returns indices); configure the layers producing every operand")
            return
        v.set(live[0])
        for flow in live[1:]:
            self._both(v, v.layout(v.node), flow)

    def const(self, v, *inputs):
        inputs = list(inputs)
        values = [inputs.pop(0) if v.layout(o) is not None else torch.tensor(o, dtype=torch.float64)
                  for o in self.operands(v)]
        return torch.where(values[0] != 0, values[1], values[2]).to(torch.float64), False


_ADD = CombineRule(operator.add, additive=True)
_SUB = CombineRule(operator.sub, additive=True)
_MUL = CombineRule(operator.mul, additive=False)
_DIV = CombineRule(operator.truediv, additive=False, numerator_only=True)
register_functions([operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__", aten("add"),
                    aten("add_")], _ADD)
register_functions([operator.sub, operator.isub, torch.sub, torch.subtract, "sub", "sub_", aten("sub"),
                    aten("sub_")], _SUB)
register_functions([operator.mul, operator.imul, torch.mul, torch.multiply, "mul", "mul_", aten("mul"),
                    aten("mul_")], _MUL)
register_functions([operator.truediv, operator.itruediv, torch.div, torch.true_divide, "div", "div_",
                    aten("div"), aten("div_")], _DIV)
register_functions([torch.maximum, "maximum", aten("maximum")], CombineRule(torch.maximum, additive=True))
register_functions([torch.minimum, "minimum", aten("minimum")], CombineRule(torch.minimum, additive=True))
for _op in (operator.gt, operator.ge, operator.lt, operator.le, operator.eq, operator.ne):
    _name = _op.__name__
    register_functions([_op, getattr(torch, _name), _name, f"__{_name}__", aten(_name)],
                       CombineRule(_op, additive=True))
register_functions([torch.where, "where", aten("where")], WhereRule())
register_functions([F.glu, aten("glu")], GLURule())
register_layer(nn.GLU, GLURule())
