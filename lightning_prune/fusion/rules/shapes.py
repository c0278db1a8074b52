"""Ops that move or regroup dims: view / reshape / flatten / unflatten / squeeze / unsqueeze / expand, and permute /
transpose / movedim.

With shapes (example inputs given) a reshape is followed exactly by comparing the input and output shapes, whatever
the arguments look like. A size written as a literal on the only dim that carries channels is refused, since it
would not follow the pruned width; a literal on one of several such dims (``view(b, groups, c // groups, h, w)``)
ties the positions along it, so its extent never changes and the other dims take up the pruning. Without shapes
only the flatten idioms are known.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from lightning_prune.fusion import layout as L
from lightning_prune.fusion.layout import Layout
from lightning_prune.fusion.rules.base import Rule, RuleKind, input_layout, tie_axis
from lightning_prune.fusion.rules.registry import aten, register_functions, register_layer


def sequence_arg(v, start: int, name: str | None = None) -> list | None:
    """Sizes or dims given as varargs (``x.view(a, b)``) or one sequence (``x.view((a, b))``, ATen's lists)."""
    args = list(v.node.args[start:])
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return list(args[0])
    if not args and name is not None and name in v.node.kwargs:
        value = v.node.kwargs[name]
        return list(value) if isinstance(value, (tuple, list, torch.Size)) else [value]
    return args if args else None


def _literal(item) -> bool:
    return isinstance(item, int) and not isinstance(item, bool) and item != -1


class ReshapeRule(Rule):
    """A view that regroups dims. ``sizes_from``: where the size arguments start (None: the op derives its sizes,
    as flatten and squeeze do)."""

    kind = RuleKind.LAYOUT

    def __init__(self, sizes_from: int | None = None, flatten: bool = False, unflatten: bool = False):
        self.sizes_from = sizes_from
        self.flatten = flatten
        self.unflatten = unflatten

    def visit(self, v) -> None:
        flow = input_layout(v)
        if flow is None:
            return
        if v.shapes and not flow.pending:
            self._with_shapes(v, flow)
        else:
            self._without_shapes(v, flow)

    def _with_shapes(self, v, flow: Layout) -> None:
        old, new = v.shape(v.arg(0, "input")), v.shape()
        try:
            result, touched = L.reshape(flow, old, new)
        except ValueError:
            v.block(flow, f"{v.where} reshapes the pruned channels in a way fusion cannot follow")
            return
        if result is None:
            return
        sizes = self._sizes(v, len(old), len(new))
        if sizes is not None and v.front_end == "fx" and len(sizes) == len(new):
            literal = [k for k, a in enumerate(result.axes) if _literal(sizes[a])]
            if len(literal) == len(result.axes):
                v.block(flow, f"{v.where} writes the size of a pruned dim as a literal "
                              f"({sizes[result.axes[literal[0]]]}), which would not follow the narrower layer; "
                              "compute it from x.shape or use -1")
                return
            for k in literal:  # another channel dim takes up the change (a channel shuffle's groups)
                tie_axis(v, result.labels, k)
        v.set(result)

    def _sizes(self, v, old_ndim: int, new_ndim: int) -> list | None:
        """The size argument written for each output dim (None where the op derives it), to find literals."""
        if self.sizes_from is not None:
            return sequence_arg(v, self.sizes_from, "shape")
        if not self.unflatten:
            return None
        if v.module is not None:
            dim, given = v.module.dim, v.module.unflattened_size
        else:
            dim, given = v.arg(1, "dim"), v.arg(2, "sizes")
        if not isinstance(dim, int) or not isinstance(given, (tuple, list, torch.Size)):
            return None
        dim %= old_ndim
        return [None] * dim + list(given) + [None] * (new_ndim - dim - len(given))

    def _without_shapes(self, v, flow: Layout) -> None:
        if self.flatten:
            if v.module is not None:
                start, end = v.module.start_dim, v.module.end_dim
            else:
                start, end = v.arg(1, "start_dim", 0), v.arg(2, "end_dim", -1)
            self._flatten(v, flow, start, end)
            return
        sizes = sequence_arg(v, self.sizes_from or 1, "shape") or []
        if len(sizes) == 2 and sizes[1] == -1 and _is_batch_size(sizes[0], v.arg(0)):
            self._flatten(v, flow, 1, -1)
            return
        v.block(flow, f"{v.where} reshapes the pruned channels; pass example_inputs so shapes are known, or use "
                      "torch.flatten(x, 1) or x.view(x.size(0), -1)")

    def _flatten(self, v, flow: Layout, start: int, end: int) -> None:
        """flatten(start, end) when ranks may be unknown (the no-shape path)."""
        axis, ndim = flow.single_axis(), flow.ndim
        pos = axis if axis is not None and axis >= 0 else (None if ndim is None or axis is None else ndim + axis)
        if pos is not None and ndim is not None and start >= 0 and end in (-1, ndim - 1) and start > pos:
            v.set(Layout((pos,), flow.labels, start + 1, flow.pending))
            return
        if pos is not None and start == pos and end in (-1, (ndim or 0) - 1) and not flow.pending:
            if pos == (ndim or 0) - 1:
                v.set(Layout((pos,), flow.labels, pos + 1))
            else:
                v.set(Layout((pos,), flow.labels, pos + 1, pending=True))
            return
        v.block(flow, f"{v.where} flattens dims around the pruned channels in a way that is not known without "
                      "shapes; pass example_inputs")


def _is_batch_size(value, tensor) -> bool:
    """Whether ``value`` is ``tensor.size(0)`` / ``tensor.shape[0]`` / ``tensor.size()[0]`` in the traced graph."""
    if not isinstance(value, fx.Node):
        return False
    if value.op == "call_method" and value.target == "size" and value.args[0] is tensor:
        dim = value.args[1] if len(value.args) > 1 else value.kwargs.get("dim")
        return dim == 0
    if value.op == "call_function" and value.target is operator.getitem and value.args[1] == 0:
        shape = value.args[0]
        if not isinstance(shape, fx.Node):
            return False
        if shape.target is getattr and shape.args == (tensor, "shape"):
            return True
        return shape.op == "call_method" and shape.target == "size" and shape.args[0] is tensor and len(
            shape.args) == 1
    return False


class ExpandRule(Rule):
    """``expand`` / ``broadcast_to``: new leading dims and size-1 dims repeated; the channels stay where they were."""

    kind = RuleKind.LAYOUT

    def visit(self, v) -> None:
        flow = input_layout(v)
        ref = v.value(v.arg(0))
        if flow is None and isinstance(getattr(ref, "tensor", None), torch.Tensor):
            v.set(ref)  # a parameter broadcast over the batch (a class token): read as if unexpanded
            v.bound_ids.add(id(ref.tensor))
            return
        if flow is None:
            return
        old, new = v.ndim(v.arg(0)), v.ndim()
        if old is None or new is None:
            v.block(flow, f"{v.where} expands the pruned channels; pass example_inputs so shapes are known")
            return
        shift = new - old
        v.set(Layout(tuple(a + shift for a in flow.axes), flow.labels, new, flow.pending,
                     tuple(a + shift for a in flow.stable)))


class PermuteRule(Rule):
    """Moves dims: ``permute``, ``transpose``/``swapaxes``, ``t``, ``mT``, ``movedim``."""

    kind = RuleKind.LAYOUT

    def __init__(self, how: str):
        self.how = how

    def perm(self, v, ndim: int) -> tuple[int, ...] | None:
        if self.how == "permute":
            dims = sequence_arg(v, 1, "dims")
            return tuple(d % ndim for d in dims) if dims and all(isinstance(d, int) for d in dims) else None
        order = list(range(ndim))
        if self.how == "transpose":
            d0, d1 = v.arg(1, "dim0"), v.arg(2, "dim1")
            if not (isinstance(d0, int) and isinstance(d1, int)):
                return None
            d0, d1 = d0 % ndim, d1 % ndim
            order[d0], order[d1] = order[d1], order[d0]
            return tuple(order)
        if self.how in ("t", "mT"):
            if ndim < 2:
                return tuple(order)
            order[-1], order[-2] = order[-2], order[-1]
            return tuple(order)
        if self.how == "movedim":
            src, dst = v.arg(1, "source"), v.arg(2, "destination")
            src = [src] if isinstance(src, int) else list(src or [])
            dst = [dst] if isinstance(dst, int) else list(dst or [])
            if not src or len(src) != len(dst):
                return None
            src, dst = [s % ndim for s in src], [d % ndim for d in dst]
            rest = iter(d for d in order if d not in src)
            result = [None] * ndim
            for s, d in zip(src, dst, strict=True):
                result[d] = s
            return tuple(r if r is not None else next(rest) for r in result)
        return None

    def visit(self, v) -> None:
        flow = input_layout(v)
        if flow is None:
            return
        ndim = v.ndim(v.arg(0)) if v.shapes else flow.ndim
        if ndim is None and self.how == "permute":  # permute names every dim: its length is the rank
            ndim = len(sequence_arg(v, 1, "dims") or []) or None
        perm = self.perm(v, ndim) if ndim is not None else None
        axes = tuple(a % ndim for a in flow.axes) if ndim is not None else None
        if perm is None or axes is None or flow.pending:
            v.block(flow, f"{v.where} moves dims around the pruned channels in a way that is not known; pass "
                          "example_inputs so shapes are known")
            return
        v.set(L.permute(Layout(axes, flow.labels, ndim, flow.pending, flow.stable), perm))


class FlattenModuleRule(ReshapeRule):
    """nn.Flatten / nn.Unflatten modules."""

    def __init__(self):
        super().__init__(flatten=True)


register_functions([torch.reshape, "reshape", "view", aten("view"), aten("reshape"), aten("_unsafe_view")],
                   ReshapeRule(sizes_from=1))
register_functions([torch.flatten, "flatten", aten("flatten")], ReshapeRule(flatten=True))
register_functions([torch.unflatten, "unflatten", aten("unflatten")], ReshapeRule(unflatten=True))
register_functions([torch.squeeze, "squeeze", aten("squeeze"), torch.unsqueeze, "unsqueeze", aten("unsqueeze"),
                    "view_as", "reshape_as", aten("view_as")], ReshapeRule())
register_functions([torch.broadcast_to, "expand", "expand_as", "broadcast_to", aten("expand"),
                    aten("expand_as"), aten("broadcast_to")], ExpandRule())
register_functions([torch.permute, "permute", aten("permute")], PermuteRule("permute"))
register_functions([torch.transpose, torch.swapaxes, torch.swapdims, "transpose", "swapaxes", "swapdims",
                    aten("transpose"), aten("swapaxes")], PermuteRule("transpose"))
register_functions([torch.t, "t", aten("t"), "mT", aten("numpy_T")], PermuteRule("t"))
register_functions([torch.movedim, torch.moveaxis, "movedim", "moveaxis", aten("movedim")], PermuteRule("movedim"))
register_layer(torch.nn.Flatten, FlattenModuleRule())
register_layer(torch.nn.Unflatten, ReshapeRule(unflatten=True))
