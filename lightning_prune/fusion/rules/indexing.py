"""Ops that pick, join or split positions: indexing and slicing, concat / stack, split / chunk / unbind.

Picking positions of the channel dim with literal bounds (``x[:, :n]``, ``x[:, 0]``) is exact only if the picked
channels keep their places, so the channels before the pick are kept; along one of several channel dims (a head's
features) the positions are tied together instead. Concatenating along the channels lays the inputs side by side
(an input no configured layer produces is a fixed part); splitting them into equal parts ties the parts position by
position, so every part stays the same size.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from lightning_prune.fusion.layout import FIXED, Layout
from lightning_prune.fusion.rules.base import Rule, RuleKind, tie_axis
from lightning_prune.fusion.rules.registry import aten, register_functions
from lightning_prune.fusion.rules.stream import parameter_part


def pick(v, flow: Layout, axis_index: int, index, strict: bool = False) -> torch.Tensor | None:
    """The labels after taking ``index`` (an int or a slice) along label axis ``axis_index`` (kept as a size-1 axis
    for an int), recording what keeps the picked channels in place; None (and the channels blocked) if it cannot.
    ``strict``: the slice's stop must stay in range (``narrow``'s length), where Python slicing would clamp it."""
    axis = flow.axes[axis_index]
    size = flow.labels.shape[axis_index]
    if isinstance(index, slice):
        start, stop, step = index.indices(size)
        if step != 1:
            v.block(flow, f"{v.where} takes one channel in every {step}; a narrower layer would shift the pattern")
            return None
        positions = torch.arange(start, stop)
    elif isinstance(index, int):
        positions = torch.tensor([index % size])
    else:
        v.block(flow, f"{v.where} picks channels with a run-time index")
        return None
    picked = flow.labels.index_select(axis_index, positions)
    if axis in flow.stable or positions.numel() == size:
        return picked
    if flow.labels.dim() > 1:  # several channel dims: positions along this one must never disappear
        tie_axis(v, flow.labels, axis_index)
        return picked
    # the channels that keep their places: those before the pick (bounds counted from the start), those from it
    # on (counted from the end), or all of them (one bound from each end)
    first, last = (index, index) if isinstance(index, int) else (index.start or 0, index.stop)
    if first < 0 and (last is None or last < 0 or isinstance(index, int)):
        held, side = flow.labels[positions[0]:], "from the pick on"
    elif first >= 0 and (last is None or (last >= size and not strict)):
        held, side = flow.labels[: positions[0]], "before the pick"
    elif first >= 0 and last >= 0:
        held, side = flow.labels[: positions[-1] + 1], "up to the end of the pick"
    else:
        held, side = flow.labels, "on both sides"
    v.block(held, f"{v.where} picks channels by position with literal bounds, so the channels {side} keep their "
                  "places")
    return picked


def rebuild(flow: Layout, labels: torch.Tensor, mapping: dict[int, int | None], ndim: int | None) -> Layout | None:
    """A layout whose label axes moved to ``mapping[axis]`` (None: indexed away, size 1 in ``labels``)."""
    for k in reversed(range(len(flow.axes))):
        if mapping.get(flow.axes[k]) is None:
            labels = labels.select(k, 0)
    axes = tuple(mapping[a] for a in flow.axes if mapping.get(a) is not None)
    if not axes:
        return None
    stable = tuple(mapping[a] for a in flow.stable if mapping.get(a) is not None)
    return Layout(axes, labels, ndim, flow.pending, stable)


class GetItemRule(Rule):
    """``x[...]`` on a tensor (ints, slices, None, ..., one tensor index away from the channels), or an item of a
    tuple output."""

    kind = RuleKind.LAYOUT

    def visit(self, v) -> None:
        value, index = v.value(v.arg(0)), v.arg(1)
        if isinstance(value, (tuple, list)):
            if isinstance(index, int):
                v.set(value[index])
            elif isinstance(index, slice):
                v.set(tuple(value[index]))
            else:
                v.block(value, f"{v.where} picks a tuple item by a run-time index")
            return
        if not isinstance(value, Layout):
            return
        index = index if isinstance(index, tuple) else (index,)
        ndim = v.ndim(v.arg(0)) if v.shapes else value.ndim
        if ndim is None or value.front_axes() is None:
            self._rank_unknown(v, value, index)
            return
        flow = Layout(value.front_axes(), value.labels, ndim, value.pending, value.stable)
        advanced = [i for i in index if isinstance(i, (fx.Node, torch.Tensor, list))]
        if flow.pending or sum(i is Ellipsis for i in index) > 1 or len(advanced) > 1:
            v.block(flow, f"{v.where} indexes the pruned channels in a way fusion cannot follow")
            return
        explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
        items = []
        for i in index:
            items += [slice(None)] * (ndim - explicit) if i is Ellipsis else [i]
        items += [slice(None)] * (ndim - sum(1 for i in items if i is not None))
        out_ndim = v.ndim() if v.shapes else None
        mapping: dict[int, int | None] = {}
        labels = flow.labels
        in_dim = out_dim = 0
        for item in items:
            if item is None:
                out_dim += 1
                continue
            if isinstance(item, (fx.Node, torch.Tensor, list)):
                if in_dim in flow.axes:
                    v.block(flow, f"{v.where} picks channels with a run-time index")
                    return
                if out_ndim is None:
                    v.block(flow, f"{v.where} indexes with a tensor; pass example_inputs so shapes are known")
                    return
                mapping[in_dim] = None
                plain = sum(1 for x in items if x is None or isinstance(x, slice))
                out_dim += out_ndim - plain
                in_dim += 1
                continue
            if in_dim in flow.axes and item != slice(None):
                k = flow.axes.index(in_dim)
                picked = pick(v, Layout(flow.axes, labels, ndim, flow.pending, flow.stable), k, item)
                if picked is None:
                    return
                labels = picked
            if isinstance(item, int):
                mapping[in_dim] = None
            else:
                mapping[in_dim] = out_dim
                out_dim += 1
            in_dim += 1
        v.set(rebuild(flow, labels, mapping, out_ndim if out_ndim is not None else out_dim))

    def _rank_unknown(self, v, flow: Layout, index: tuple) -> None:
        """Rank unknown: safe if the index stops before the channels or keeps them whole (channels count from the
        end), or picks along a stable leading axis (an LSTM state's layer)."""
        full = slice(None)
        if any(i is Ellipsis or i is None or isinstance(i, (fx.Node, torch.Tensor, list)) for i in index):
            v.block(flow, f"{v.where} indexes the pruned channel dimension")
            return
        if len(index) == 1 and isinstance(index[0], int) and flow.axes[0] == 0 and 0 in flow.stable:
            picked = pick(v, flow, 0, index[0])
            rest = tuple(a for a in flow.axes[1:])
            v.set(Layout(rest, picked.squeeze(0), None, flow.pending, ()) if rest else None)
            return
        if any(a >= 0 for a in flow.axes) or flow.pending or not (len(index) == 1 or index[-1] == full):
            v.block(flow, f"{v.where} indexes the pruned channel dimension")
            return
        v.set(Layout(flow.axes, flow.labels, None, flow.pending, ()))


def _dim(v, flow: Layout, dim) -> int | None:
    ndim = v.ndim(v.arg(0)) if v.shapes else flow.ndim
    if not isinstance(dim, int) or ndim is None or flow.front_axes() is None:
        return None
    return dim % ndim


class SliceRule(Rule):
    """``narrow(x, dim, start, length)``, ATen's ``slice(x, dim, start, end, step)`` and ``select(x, dim, i)``."""

    kind = RuleKind.LAYOUT

    def __init__(self, how: str):
        self.how = how

    def visit(self, v) -> None:
        flow = v.layout(v.arg(0))
        if flow is None:
            return
        dim = _dim(v, flow, v.arg(1, "dim", 0))
        if dim is None:
            v.block(flow, f"{v.where} picks positions along a dim that is not known; pass example_inputs")
            return
        if self.how == "select":
            index = v.arg(2, "index")
        elif self.how == "narrow":
            start, length = v.arg(2, "start"), v.arg(3, "length")
            index = slice(start, (start + length) or None) if isinstance(start, int) and isinstance(length, int) \
                else None
        else:
            start, end, step = v.arg(2, "start"), v.arg(3, "end"), v.arg(4, "step", 1)
            index = slice(start, end if end is None or end < 2**62 else None, step)
        front = Layout(flow.front_axes(), flow.labels, v.ndim(v.arg(0)) if v.shapes else flow.ndim, flow.pending,
                       flow.stable)
        if index is None or isinstance(index, fx.Node):
            if dim in front.axes:
                v.block(flow, f"{v.where} picks channels with run-time bounds")
                return
            index = slice(None)
        labels = front.labels
        if dim in front.axes:
            labels = pick(v, front, front.axes.index(dim), index, strict=self.how == "narrow")
            if labels is None:
                return
        mapping = {d: (None if self.how == "select" and d == dim else (d - 1 if self.how == "select" and d > dim
                                                                         else d)) for d in range(front.ndim)}
        out_ndim = front.ndim - (1 if self.how == "select" else 0)
        v.set(rebuild(front, labels, mapping, out_ndim))


def sequence(v, arg) -> tuple[list[Layout | None], list[tuple[int, ...] | None]]:
    """The layout and shape of each tensor in a list argument: a list of nodes, or one node holding a tuple (a slice
    of a split's parts)."""
    if not isinstance(arg, fx.Node):
        return [v.layout(t) for t in arg], [v.shape(t) for t in arg]
    value, val = v.value(arg), arg.meta.get("val")
    values = list(value) if isinstance(value, (tuple, list)) else []
    shapes = [tuple(t.shape) for t in val] if isinstance(val, (tuple, list)) else [None] * len(values)
    return [x if isinstance(x, Layout) else None for x in values], shapes


class CatRule(Rule):
    """``torch.cat`` / ``concat`` along the channels (inputs side by side; an untracked input is a fixed part), or
    along another dim (the inputs' channels coupled position by position)."""

    kind = RuleKind.LAYOUT

    def visit(self, v) -> None:
        flows, shapes = sequence(v, v.arg(0, "tensors"))
        dim = v.arg(1, "dim", 0)
        tracked = [f for f in flows if f is not None]
        if not tracked:
            return
        first = tracked[0]
        ndim = v.ndim() if v.shapes else first.ndim
        axes = [f.front_axes() if f is not None and ndim is not None and f.ndim == ndim else None for f in flows]
        if ndim is None or not isinstance(dim, int) or any(a is None for a, f in zip(axes, flows, strict=True)
                                                           if f is not None) or any(f.pending for f in tracked):
            self._fail(v, tracked, "along a dim that is not known; pass example_inputs")
            return
        dim %= ndim
        known = {a for a, f in zip(axes, flows, strict=True) if f is not None}
        if len(known) != 1:
            self._fail(v, tracked, "whose channels lie in different dims")
            return
        channel_axes = known.pop()
        parts = []
        nodes = v.arg(0, "tensors")
        nodes = list(nodes) if isinstance(nodes, (list, tuple)) else [None] * len(flows)
        for node, shape, f in zip(nodes, shapes, flows, strict=True):
            if f is not None:
                parts.append(f.labels)
                continue
            if dim not in channel_axes and parameter_part(v, node, channel_axes, first.labels):
                parts.append(first.labels)
                continue
            if shape is None:
                self._fail(v, tracked, "with tensors of unknown shape; pass example_inputs")
                return
            if shape == (0,) and ndim != 1:  # torch.cat skips 1-D empty tensors (an empty key/value cache)
                continue
            parts.append(torch.full([shape[a] for a in channel_axes], FIXED, dtype=torch.long))
        if dim in channel_axes:
            k = channel_axes.index(dim)
            others = {p.shape[:k] + p.shape[k + 1:] for p in parts}
            if len(others) != 1:
                self._fail(v, tracked, "whose other channel dims differ")
                return
            v.set(Layout(channel_axes, torch.cat(parts, k), ndim, False, ()))
            return
        if len({p.shape for p in parts}) != 1:
            self._fail(v, tracked, "with differently sized channels")
            return
        for part in parts[1:]:
            v.couple(parts[0], part)
        v.set(Layout(channel_axes, first.labels, ndim, False, first.stable))

    def _fail(self, v, tracked, why: str) -> None:
        for flow in tracked:
            v.block(flow, f"{v.where} concatenates the pruned channels {why}")

    def const(self, v, *inputs):
        """Along another dim, a parameter part (silenced) emits zeros where the channels' part may emit a constant:
        such a channel stays."""
        dim, flows = v.arg(1, "dim", 0), sequence(v, v.arg(0, "tensors"))[0]
        if len(inputs) == 1 and len(flows) > 1 and isinstance(dim, int):
            out = v.layout(v.node)
            if out is not None and dim % out.ndim not in out.axes:
                return inputs[0], inputs[0] != 0
        return None



class StackRule(Rule):
    """``torch.stack``: a new dim, along which the inputs' channels lie side by side."""

    kind = RuleKind.LAYOUT

    def visit(self, v) -> None:
        flows, _shapes = sequence(v, v.arg(0, "tensors"))
        tracked = [f for f in flows if f is not None]
        if not tracked:
            return
        ndim = v.ndim()
        dim = v.arg(1, "dim", 0)
        first = tracked[0]
        if ndim is None or not isinstance(dim, int) or any(f.front_axes() != first.front_axes() or
                                                           f.labels.shape != first.labels.shape for f in tracked):
            for f in tracked:
                v.block(f, f"{v.where} stacks the pruned channels in a way fusion cannot follow")
            return
        dim %= ndim
        parts = [f.labels if f is not None else torch.full_like(first.labels, FIXED) for f in flows]
        axes = [a + 1 if a >= dim else a for a in first.front_axes()]
        labels = torch.stack(parts)
        order = sorted(range(len(axes) + 1), key=lambda k: ([dim] + axes)[k])
        all_axes = [dim] + axes
        v.set(Layout(tuple(all_axes[k] for k in order), labels.permute(order).contiguous(), ndim, False, ()))


class SplitRule(Rule):
    """``split`` / ``chunk`` / ``unbind`` / ``tensor_split``: outside the channels every part keeps the layout; along
    them equal parts are tied position by position (so they stay equal) and unequal or literal sizes are refused."""

    kind = RuleKind.LAYOUT

    def __init__(self, how: str):
        self.how = how

    def visit(self, v) -> None:
        flow = v.layout(v.arg(0))
        if flow is None:
            return
        dim_arg = v.arg(2, "dim", 0) if self.how != "unbind" else v.arg(1, "dim", 0)
        dim = _dim(v, flow, dim_arg)
        val = v.node.meta.get("val")
        count = len(val) if isinstance(val, (tuple, list)) else None
        if dim is None or count is None:
            v.block(flow, f"{v.where} splits the pruned channels; pass example_inputs so shapes are known")
            return
        ndim = v.ndim(v.arg(0))
        front = Layout(flow.front_axes(), flow.labels, ndim, flow.pending, flow.stable)
        if dim not in front.axes:
            out = front if self.how != "unbind" else rebuild(
                front, front.labels, {d: None if d == dim else (d - 1 if d > dim else d) for d in range(ndim)},
                ndim - 1)
            v.set(tuple(out for _ in range(count)))
            return
        k = front.axes.index(dim)
        sizes = [int(t.shape[dim]) for t in val] if self.how != "unbind" else [1] * count
        if len(set(sizes)) != 1:
            v.block(flow, f"{v.where} splits the pruned channels into unequal parts")
            return
        if v.front_end == "fx" and self._literal(v.arg(1)):
            v.block(flow, f"{v.where} splits the pruned channels at literal sizes ({v.arg(1)}), which would not "
                          "follow the narrower layer; use chunk() or compute them from x.shape")
            return
        parts = front.labels.split(sizes[0], k)
        for part in parts[1:]:
            v.couple(parts[0], part)
        if self.how == "unbind":
            mapping = {d: None if d == dim else (d - 1 if d > dim else d) for d in range(ndim)}
            v.set(tuple(rebuild(front, p, mapping, ndim - 1) for p in parts))
        else:
            v.set(tuple(Layout(front.axes, p, ndim, False, front.stable) for p in parts))

    def _literal(self, sizes) -> bool:
        """Whether the split sizes (``split``) or indices (``tensor_split``) are written as literals; a count of
        parts (``chunk``, ``tensor_split``'s int) follows the narrower layer."""
        if self.how == "split":
            return isinstance(sizes, int) or (isinstance(sizes, (list, tuple))
                                              and any(isinstance(s, int) for s in sizes))
        return self.how == "tensor_split" and isinstance(sizes, (list, tuple))


class IndexSelectRule(Rule):
    """``index_select(x, dim, index)``: fine away from the channels; a run-time pick of channels is refused."""

    kind = RuleKind.LAYOUT

    def visit(self, v) -> None:
        flow = v.layout(v.arg(0))
        if flow is None:
            return
        dim = _dim(v, flow, v.arg(1, "dim"))
        if dim is None or dim in flow.front_axes():
            v.block(flow, f"{v.where} picks channels with a run-time index")
            return
        v.set(flow)


register_functions([operator.getitem], GetItemRule())
register_functions([torch.narrow, "narrow", aten("narrow")], SliceRule("narrow"))
register_functions([aten("slice")], SliceRule("slice"))
register_functions([torch.select, "select", aten("select")], SliceRule("select"))
register_functions([torch.cat, torch.concat, torch.concatenate, aten("cat"), aten("concat")], CatRule())
register_functions([torch.stack, aten("stack")], StackRule())
register_functions([torch.split, "split", aten("split"), aten("split_with_sizes")], SplitRule("split"))
register_functions([torch.chunk, "chunk", aten("chunk")], SplitRule("chunk"))
register_functions([torch.unbind, "unbind", aten("unbind")], SplitRule("unbind"))
register_functions([torch.tensor_split, "tensor_split", aten("tensor_split")], SplitRule("tensor_split"))
register_functions([torch.index_select, "index_select", aten("index_select")], IndexSelectRule())
