"""Attention heads as channel structures: ``scaled_dot_product_attention`` and ``matmul`` / ``bmm``.

A head is one class of channels:

- its features (the last dim of q, k and v) are coupled: q and k's head dim feeds the dot product and the scale, and
  every head must stay as wide as the others;
- q, k and v heads at the same head position are coupled (a removed head's v rows are zero, so its output is zero);
- a key/value head shared by a group of query heads (GQA: ``enable_gqa``, or ``repeat_kv``'s expand + reshape, which
  the label algebra follows) is coupled with its whole group;
- the merge back (``transpose`` + ``reshape``) carries the heads' labels to the output projection, which is narrowed
  with them.

Softmax over the keys is per head (a reduction away from the channels), so removing a head changes no other head.
Broadcasting stays exact where it can: keys shared by every head (multi-query attention) do not stop query heads from
being removed, but a head's values must be its own. The module whose forward runs the attention gets its head-count
attributes (``num_heads``, ``num_key_value_heads``...) rewritten at prune time (:func:`set_head_counts`).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_prune.fusion.layout import FIXED, Layout, expand_to, from_full
from lightning_prune.fusion.rules.base import Rule, RuleKind
from lightning_prune.fusion.rules.registry import active, aten, register_functions
from lightning_prune.fusion.rules.scores import follow

#: a position broadcast from size 1 (or a dim the operand lacks): it joins with nothing
NONE = -2
#: attributes holding a module's query-head count, and its key/value-head count
HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
KV_HEAD_COUNTS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head")


def set_head_counts(module: nn.Module, heads: tuple[int | None, int], kv_heads: tuple[int | None, int]) -> None:
    """Rewrite the head-count attributes of ``module``; ``heads`` and ``kv_heads`` are (old, new), and only
    attributes holding the old count change (any, when it is None). ``num_key_value_groups`` follows."""
    for names, (old, new) in ((HEAD_COUNTS, heads), (KV_HEAD_COUNTS, kv_heads)):
        for name in names:
            value = getattr(module, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and old in (None, value):
                setattr(module, name, new)
    groups = getattr(module, "num_key_value_groups", None)
    if isinstance(groups, int) and kv_heads[1] and heads[1] % kv_heads[1] == 0:
        module.num_key_value_groups = heads[1] // kv_heads[1]


class Operand:
    """One tensor argument: its node, layout (or None), shape, and ``small``: the label of every element with the
    unlabelled dims at size 1."""

    def __init__(self, v, arg):
        self.arg = arg
        self.shape = v.shape(arg)
        self.known = True  # whether its values are a channel-carrying input's (constants) rather than run-time
        self._label(v.layout(arg))

    def _label(self, layout: Layout | None) -> None:
        self.layout = layout
        self.small = None if layout is None or self.shape is None else expand_to(
            layout, tuple(s if d in layout.axes else 1 for d, s in enumerate(self.shape)))

    def weigh(self, labels: torch.Tensor, normalised: bool) -> None:
        """Attention weights whose scores carried ``labels`` (see :mod:`.scores`): they take the heads' labels, and a
        removed head's weights sum to one over the keys when ``normalised``."""
        self._label(_output(labels))
        self.known = normalised

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def has(self, dim: int) -> bool:
        return self.layout is not None and dim % self.ndim in self.layout.axes

    def whole(self, v, dims: tuple[int, ...]) -> None:
        """Positions along each of ``dims`` are one class at every other position (a head's features stay whole)."""
        for dim in dims:
            if self.has(dim):
                dim %= self.ndim
                v.couple(self.small.narrow(dim, 0, 1).expand_as(self.small), self.small)

    def rep(self, rank: int, heads: set[int], broadcast_ok: bool) -> torch.Tensor | None:
        """The labels over the batch dims at rank ``rank`` (aligned from the right; the two matrix dims reduced to
        their first position). None when the operand cannot follow the labelled batch dims ``heads``: it does not
        carry them yet has them at size > 1, or is broadcast over them where that is not allowed."""
        offset = rank - self.ndim
        for d in heads:
            if d >= offset and self.has(d - offset):
                continue
            size = self.shape[d - offset] if d >= offset else 1
            if size > 1 or not broadcast_ok:
                return None
        if self.small is None:
            return torch.full([1] * rank, NONE, dtype=torch.long)
        small = self.small.narrow(self.ndim - 1, 0, 1).narrow(self.ndim - 2, 0, 1)
        return small.reshape((1,) * offset + tuple(small.shape))

    def values(self, v, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """This operand's constants (``inputs`` holds one per channel-carrying input node) at its ``small`` shape,
        or ones for a run-time tensor."""
        if self.layout is None or not self.known:
            return torch.ones([1] * self.ndim, dtype=torch.float64)
        if not isinstance(v.value(self.arg), Layout):  # normalised weights: each query's sum to one over the keys
            return torch.full([1] * self.ndim, 1.0 / self.shape[-1], dtype=torch.float64)
        nodes = [a for a in v.node.all_input_nodes if isinstance(v.value(a), Layout)]
        values = inputs[nodes.index(self.arg)]
        view = [1] * self.ndim
        for axis, size in zip(self.layout.axes, self.layout.labels.shape, strict=True):
            view[axis] = size
        return values.reshape(view).to(torch.float64).expand(self.small.shape)


def _join(v, a: torch.Tensor, b: torch.Tensor) -> None:
    """Couple ``a`` and ``b`` (broadcast against each other) where neither is a broadcast position."""
    a, b = torch.broadcast_tensors(a, b)
    live = (a != NONE) & (b != NONE)
    v.couple(a[live], b[live])


def _head_dims(operands: list[Operand], rank: int) -> set[int]:
    """The batch dims (counted at ``rank``, the output's) that carry labels in any operand."""
    found = set()
    for op in operands:
        if op.layout is not None:
            found |= {a + rank - op.ndim for a in op.layout.axes if a < op.ndim - 2}
    return found


def _gqa(rep: torch.Tensor, groups: int) -> torch.Tensor:
    """A key/value operand's labels repeated for each query head of its group (dim -3)."""
    return rep if groups == 1 or rep.shape[-3] == 1 else rep.repeat_interleave(groups, dim=-3)


def _output(full: torch.Tensor) -> Layout | None:
    """The output's layout from the label of every element (NONE and FIXED positions carry no channel)."""
    return from_full(torch.where(full >= 0, full, torch.full_like(full, FIXED)))


def _at(layout: Layout, full_shape: torch.Size, values: torch.Tensor) -> torch.Tensor:
    """``values`` (broadcastable to ``full_shape``) at the positions of ``layout`` (``from_full`` keeps the dims where
    the labels vary)."""
    values = values.expand(full_shape)
    for d in reversed(range(len(full_shape))):
        if d not in layout.axes:
            values = values.select(d, 0)
    return values


def _distinct_heads(rep: torch.Tensor | None) -> torch.Tensor:
    """The distinct channel ids along the head dim (-3) of a representative, for the owner's head counts."""
    if rep is None or rep.dim() < 3 or rep.shape[-3] == 1:
        return torch.empty(0, dtype=torch.long)
    heads = rep.movedim(-3, 0).reshape(rep.shape[-3], -1)[:, 0]
    return heads[heads >= 0].unique()


class AttentionRule(Rule):
    """Shared by the attention ops: the refusal, and the head counts of the module that runs them."""

    kind = RuleKind.ATTENTION

    def refuse(self, v, operands: list[Operand], why: str) -> None:
        for op in operands:
            if op.layout is not None:
                v.block(op.layout, f"{v.where} {why}")

    def record(self, v, queries: torch.Tensor | None, keys: torch.Tensor | None) -> None:
        q, kv = _distinct_heads(queries), _distinct_heads(keys)
        if q.numel() > 1 or kv.numel() > 1:
            v.action((q, kv), module=v.owner())

    def narrow(self, module, data, ctx) -> None:
        q, kv = ((ids.numel(), int(ctx.kept[ctx.root[ids]].sum())) for ids in data)
        set_head_counts(module, q, kv)


def _lift(part: torch.Tensor, rank: int) -> torch.Tensor:
    """Prepend size-1 dims up to ``rank`` (broadcasting aligns from the right)."""
    return part.reshape((1,) * (rank - part.dim()) + tuple(part.shape))


class SdpaRule(AttentionRule):
    """``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=..., enable_gqa=...)``."""

    def operands(self, v) -> tuple[Operand, Operand, Operand]:
        return tuple(Operand(v, v.arg(i, name)) for i, name in enumerate(("query", "key", "value")))

    def groups(self, v, q: Operand, k: Operand) -> int:
        """Query heads per key/value head under ``enable_gqa`` (1 otherwise)."""
        if v.arg(7, "enable_gqa", False) and min(q.ndim, k.ndim) >= 3 and q.shape[-3] != k.shape[-3]:
            return q.shape[-3] // k.shape[-3]
        return 1

    def visit(self, v) -> None:
        q, k, val = operands = self.operands(v)
        mask = v.arg(3, "attn_mask")
        tracked = [*operands, Operand(v, mask)] if isinstance(mask, fx.Node) else list(operands)
        if all(op.layout is None for op in tracked):
            return
        if not v.shapes or any(op.shape is None for op in tracked):
            self.refuse(v, tracked, "attends over pruned channels whose shapes are not known; pass example_inputs")
            return
        if any(op.has(-2) for op in tracked) or (len(tracked) == 4 and tracked[3].has(-1)):
            self.refuse(v, tracked, "attends along the pruned channels (they lie on the sequence dims)")
            return
        for op in operands:
            op.whole(v, (-1,))
        rank, groups = v.ndim(), self.groups(v, q, k)
        heads = _head_dims(tracked, rank)
        reps = [q.rep(rank, heads, True), k.rep(rank, heads, True), val.rep(rank, heads, False)]
        reps += [op.rep(rank, heads, True) for op in tracked[3:]]  # a mask may be per head, if it is narrowed too
        if any(r is None for r in reps):
            self.refuse(v, tracked, "mixes the pruned heads with a tensor that has heads of its own but is not "
                                    "narrowed with them (values shared by several query heads, a per-head mask "
                                    "computed at run time)")
            return
        _join(v, reps[0], _gqa(reps[1], groups))
        _join(v, reps[0], _gqa(reps[2], groups))
        for rep in reps[3:]:
            _join(v, reps[0], rep)
        self.record(v, reps[0], reps[1])
        if val.layout is not None:
            v.set(_output(self._spread(val.small, val, rank, groups)))

    def _spread(self, small: torch.Tensor, val: Operand, rank: int, groups: int) -> torch.Tensor:
        """Per-element values of the value operand at the output's positions: repeated for each query head of a
        group, one position along the queries."""
        return _gqa(_lift(small.narrow(val.ndim - 2, 0, 1), rank), groups)

    def const(self, v, *inputs):
        """A removed head emits its values' constant: each query's attention weights sum to one."""
        q, k, val = self.operands(v)
        rank, groups = v.ndim(), self.groups(v, q, k)
        labels = self._spread(val.small, val, rank, groups)
        values = self._spread(val.values(v, inputs), val, rank, groups)
        return _at(v.output(), labels.shape, values), False


class MatmulRule(AttentionRule):
    """``a @ b`` (``matmul``, ``bmm``): the batch dims carry heads (coupled between the operands), the contracted dim
    stays whole (a head's dot product and its scale), the rows of ``a`` and the columns of ``b`` pass through."""

    def operands(self, v) -> tuple[Operand, Operand]:
        second = v.arg(1, "other")
        a, b = Operand(v, v.arg(0, "input")), Operand(v, second if second is not None else v.arg(1, "mat2"))
        weights = v.note()
        if weights is not None and a.layout is None:
            a.weigh(*weights)
        return a, b

    @staticmethod
    def second(node) -> bool:
        """Whether ``node`` is a matmul (the one that weights the values)."""
        rule = active().function_rule(node.target) if node.op in ("call_function", "call_method") else None
        return isinstance(rule, MatmulRule)

    def visit(self, v) -> None:
        a, b = operands = self.operands(v)
        if a.layout is None and b.layout is None:
            return
        if not v.shapes or a.shape is None or b.shape is None:
            self.refuse(v, operands, "multiplies pruned channels whose shapes are not known; pass example_inputs")
            return
        if a.ndim < 2 or b.ndim < 2:
            self.refuse(v, operands, "multiplies a vector with pruned channels")
            return
        rank = v.ndim()
        heads = _head_dims(operands, rank)
        for op in operands:
            if any(a < op.ndim - 2 for a in op.layout.axes) if op.layout is not None else False:
                op.whole(v, (-2, -1))  # a head's rows and columns stay together
        a.whole(v, (-1,))
        b.whole(v, (-2,))
        reps = [a.rep(rank, heads, True), b.rep(rank, heads, True)]
        contracted = a.has(-1) or b.has(-2)
        if any(r is None for r in reps) or (contracted and not (a.has(-1) and b.has(-2))):
            self.refuse(v, operands, "multiplies the pruned channels with a tensor that cannot be narrowed with them")
            return
        _join(v, *reps)
        if contracted:
            self.record(v, reps[0], reps[1])
        part_a, part_b = self._parts(a, b, rank)
        _join(v, part_a, part_b)
        part_a, part_b = torch.broadcast_tensors(part_a, part_b)
        labels = torch.where(part_b >= 0, part_b, part_a)
        if contracted and heads:
            found = follow(v, v.node, heads, self.second)
            if found is not None:  # scores whose every use is per head (rules/scores.py): no labels of their own
                v.leave_note(found[0], (labels, found[1]))
                return
        v.set(_output(labels))

    @staticmethod
    def _parts(a: Operand, b: Operand, rank: int) -> list[torch.Tensor]:
        """Each operand's labels at the output's positions: ``a``'s rows and ``b``'s columns, the contracted dim
        reduced to its first position (NONE for an operand without labels)."""
        parts = []
        for op, contracted in ((a, -1), (b, -2)):
            if op.small is None:
                parts.append(torch.full([1] * rank, NONE, dtype=torch.long))
            else:
                parts.append(_lift(op.small.narrow(op.ndim + contracted, 0, 1), rank))
        return parts

    def const(self, v, *inputs):
        """The constants multiplied out; a run-time operand (ones here) makes a non-zero result position-dependent."""
        a, b = self.operands(v)
        rank = v.ndim()
        sa, sb = (_lift(op.values(v, inputs), rank) for op in (a, b))
        length = max(sa.shape[-1], sb.shape[-2])
        out = sa.expand(*sa.shape[:-1], length) @ sb.expand(*sb.shape[:-2], length, sb.shape[-1])
        if length == 1:
            out = out * a.shape[-1]
        part_a, part_b = torch.broadcast_tensors(*self._parts(a, b, rank))
        result = _at(v.output(), part_a.shape, out)
        runtime = not (a.known and b.known) or a.layout is None or b.layout is None
        return result, (result != 0) if runtime else False


_SDPA = SdpaRule()
register_functions([F.scaled_dot_product_attention, aten("scaled_dot_product_attention")], _SDPA)
register_functions([torch.matmul, operator.matmul, "matmul", "__matmul__", aten("matmul"), torch.bmm, "bmm",
                    aten("bmm")], MatmulRule())
