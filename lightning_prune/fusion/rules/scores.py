"""Attention scores between their two matmuls: the ops a head's weights may pass through and stay per head.

In ``softmax(q @ k^T * scale + mask) @ v`` a removed head's scores only ever weight that head's values, which are zero
(or, without bias masking, a constant that weights summing to one pass on unchanged). So scaling the scores, adding a
mask shared by every head, masking them, a softmax over the keys, a dtype cast or dropout are all exact, even though
the removed head's scores are not zero. :func:`follow` walks from the first matmul to the second through such ops
only; the matmul rule then gives the scores no channel labels of their own and couples the heads at the second one.
Anything else on the way (a mean over heads, a per-head bias, the weights returned or reused) stops the walk, and the
scores keep their labels, which the ordinary rules then refuse where they must.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Number

import torch
from torch import fx, nn

from lightning_prune.fusion.rules.base import ElementwiseRule
from lightning_prune.fusion.rules.combine import CombineRule
from lightning_prune.fusion.rules.elementwise import ApplyRule
from lightning_prune.fusion.rules.reduce import ShapeQueryRule, SoftmaxRule
from lightning_prune.fusion.rules.registry import active, aten

_MASKED_FILL = {"masked_fill", "masked_fill_", torch.masked_fill, aten("masked_fill")}


def follow(v, start: fx.Node, heads: set[int], is_second: Callable[[fx.Node], bool]) -> tuple[fx.Node, bool] | None:
    """From the scores made at ``start`` (labelled on the batch dims ``heads``), the matmul that weights the values
    with them and whether the weights reaching it sum to one over the keys (softmax); None when an op on the way
    could mix heads or the scores are used anywhere else."""
    rank = len(v.shape(start))
    node, normalised = start, False
    while True:
        users = [u for u in node.users if not _reads_shape(u)]
        if len(users) != 1:
            return None
        user = users[0]
        if is_second(user) and user.args[0] is node and user.args[1] is not node:
            return user, normalised
        kind = _per_head(v, node, user, rank, heads)
        if kind is None:
            return None
        normalised = kind == "softmax" or (normalised and kind == "same")
        node = user


def _reads_shape(user: fx.Node) -> bool:
    """``x.shape``, ``x.size()``, export's metadata asserts: they read no values."""
    rule = active().function_rule(user.target) if user.op in ("call_function", "call_method") else None
    return isinstance(rule, ShapeQueryRule) and not (user.target is getattr and user.args[1] in ("T", "mT", "H", "mH"))


def _per_head(v, node: fx.Node, user: fx.Node, rank: int, heads: set[int]) -> str | None:
    """How ``user`` treats the scores ``node``: "softmax" (over the keys), "same" (values unchanged: a cast, dropout),
    "pointwise", or None when it may mix heads."""
    if user.op == "call_module":
        module = v.submodule(user.target)
        if isinstance(module, nn.Softmax):
            return "softmax" if module.dim is not None and module.dim % rank == rank - 1 else None
        rule = active().call_rule(module)
        return "same" if type(rule) is ElementwiseRule else None
    if user.op not in ("call_function", "call_method"):
        return None
    if getattr(user.target, "overloadpacket", user.target) in _MASKED_FILL:
        return "pointwise" if user.args[0] is node and _shared(v, user.args[1], rank, heads) else None
    rule = active().function_rule(user.target)
    if isinstance(rule, SoftmaxRule):
        dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
        softmax = "log" not in str(user.target) and "cum" not in str(user.target)
        return ("softmax" if softmax else "pointwise") if isinstance(dim, int) and dim % rank == rank - 1 else None
    if type(rule) is ElementwiseRule:
        return "same" if all(not isinstance(a, fx.Node) or a is node for a in user.args) else None
    if type(rule) is ApplyRule:
        return "pointwise" if all(not isinstance(a, fx.Node) or a is node for a in user.args) else None
    if isinstance(rule, CombineRule):
        others = [a for a in (user.args[:2]) if a is not node]
        if len(others) == 1 and (others[0] is None or isinstance(others[0], Number)
                                 or _shared(v, others[0], rank, heads)):
            return "pointwise"
    return None


def _shared(v, other, rank: int, heads: set[int]) -> bool:
    """Whether ``other`` (a tensor node) is the same for every head: size 1 (or absent) on each head dim."""
    shape = v.shape(other) if isinstance(other, fx.Node) else None
    if shape is None or v.layout(other) is not None:
        return False
    offset = rank - len(shape)
    return all(d < offset or shape[d - offset] == 1 for d in heads)
