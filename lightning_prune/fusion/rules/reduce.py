"""Reductions and normalisations over dims (mean, sum, amax, std, softmax, cumsum, ...) and shape queries.

Over a dim other than the channels they keep each channel apart (a global average pool written as ``mean((2, 3))``);
over the channels they mix them, so the channels are kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_prune.fusion.layout import Layout
from lightning_prune.fusion.rules.base import Rule, RuleKind, input_layout
from lightning_prune.fusion.rules.registry import aten, register_functions
from lightning_prune.fusion.rules.shapes import PermuteRule


class ReduceRule(Rule):
    """A reduction over ``dim`` (all dims when None). ``scale(c, n)``: what a constant channel ``c`` becomes over
    ``n`` reduced elements ("same": unchanged; None: not known, so a non-zero constant channel must stay).
    ``dim_at`` / ``keepdim_at``: the positions of those arguments (``norm(x, p, dim, keepdim)`` has ``p`` first)."""

    kind = RuleKind.LAYOUT

    def __init__(self, scale="same", dim_at: int = 1, keepdim_at: int = 2):
        self.scale = scale
        self.dim_at = dim_at
        self.keepdim_at = keepdim_at

    def dims(self, v, ndim: int) -> list[int] | None:
        dim = v.arg(self.dim_at, "dim")
        if dim is None or isinstance(dim, (torch.fx.Node, bool)):
            return None
        dims = list(dim) if isinstance(dim, (tuple, list)) else [dim]
        if not dims or not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
            return None
        return sorted({d % ndim for d in dims})

    def keepdim(self, v) -> bool:
        out, given = v.ndim(), v.ndim(v.arg(0))
        if out is not None and given is not None:  # shapes known: the ranks tell, whatever the signature
            return out == given
        return bool(v.arg(self.keepdim_at, "keepdim", False))

    def visit(self, v) -> None:
        flow = input_layout(v)
        if flow is None:
            return
        ndim = v.ndim(v.arg(0)) if v.shapes else flow.ndim
        axes = flow.front_axes() if ndim is not None else None
        dims = self.dims(v, ndim) if ndim is not None else None
        if dims is None or axes is None or flow.pending or any(d in axes for d in dims):
            v.block(flow, f"{v.where} reduces over the pruned channel dimension (or a dim that is not known)")
            return
        if self.keepdim(v):
            out = Layout(axes, flow.labels, ndim, False, flow.stable)
        else:
            shift = [a - sum(d < a for d in dims) for a in axes]
            stable = tuple(a - sum(d < a for d in dims) for a in flow.stable)
            out = Layout(tuple(shift), flow.labels, ndim - len(dims), False, stable)
        if v.node.meta.get("val") is not None and isinstance(v.node.meta["val"], (tuple, list)):
            v.set((out, out))  # max / min over a dim: (values, indices)
        else:
            v.set(out)

    def scale_for(self, v):
        return self.scale

    def const(self, v, values):
        scale = self.scale_for(v)
        if scale is None:
            return values, values != 0
        if scale == "same":
            return values, False
        shape = v.shape(v.arg(0))
        dims = self.dims(v, len(shape)) if shape is not None else None
        if dims is None:
            return values, values != 0
        n = math.prod(shape[d] for d in dims)
        return scale(values, n), False


class NormRule(ReduceRule):
    """``norm(x, p, dim, keepdim)`` / ``vector_norm(x, ord, dim, keepdim)``: a constant ``c`` over ``n`` elements has
    the norm ``|c| * n ** (1 / p)`` (``|c|`` for p = inf)."""

    def __init__(self):
        super().__init__(dim_at=2, keepdim_at=3)

    def scale_for(self, v):
        p = v.arg(1, "p", v.node.kwargs.get("ord", 2))
        p = 2 if p in (None, "fro") else p
        if not isinstance(p, (int, float)) or isinstance(p, bool) or p <= 0:
            return None
        return lambda c, n: c.abs() * (1.0 if math.isinf(p) else n ** (1.0 / p))


class SoftmaxRule(ReduceRule):
    """softmax / log_softmax / cumsum over one dim: fine away from the channels."""

    def keepdim(self, v) -> bool:
        return True

    def const(self, v, values):
        shape = v.shape(v.arg(0))
        dims = self.dims(v, len(shape)) if shape is not None else None
        if dims is None or self.scale is None:
            return values, torch.ones_like(values, dtype=torch.bool)
        return self.scale(values, shape[dims[0]]), False


class ShapeQueryRule(Rule):
    """``x.size()``, ``x.shape``, ``x.dim()``, ``x.dtype``...: no channels flow out; ``x.T`` / ``x.mT`` move dims."""

    kind = RuleKind.LAYOUT

    def visit(self, v) -> None:
        attr = v.arg(1)
        if v.node.target is getattr and attr in ("T", "mT", "mH", "H"):
            PermuteRule("t").visit(v)


_SAME = ReduceRule()
register_functions([torch.mean, "mean", aten("mean"), torch.amax, "amax", aten("amax"), torch.amin, "amin",
                    aten("amin"), torch.median, "median", torch.nanmean, "nanmean"], _SAME)
register_functions([torch.max, "max", torch.min, "min", aten("max"), aten("min")], _SAME)
register_functions([torch.sum, "sum", aten("sum"), torch.nansum, "nansum"], ReduceRule(lambda c, n: c * n))
register_functions([torch.std, "std", aten("std"), torch.var, "var", aten("var")],
                   ReduceRule(lambda c, n: torch.zeros_like(c), keepdim_at=3))  # (x, dim, unbiased, keepdim)
register_functions([torch.norm, "norm", torch.linalg.vector_norm, aten("linalg_vector_norm")], NormRule())
register_functions([torch.logsumexp, "logsumexp", aten("logsumexp"), torch.prod, "prod", aten("prod"), torch.all,
                    "all", torch.any, "any"], ReduceRule(scale=None))
register_functions([F.softmax, torch.softmax, "softmax", aten("softmax"), aten("_softmax")],
                   SoftmaxRule(lambda c, n: torch.full_like(c, 1.0 / n)))
register_functions([F.log_softmax, torch.log_softmax, "log_softmax", aten("log_softmax"), aten("_log_softmax")],
                   SoftmaxRule(lambda c, n: torch.full_like(c, -math.log(n))))
register_functions([torch.cumsum, "cumsum", aten("cumsum"), torch.cumprod, "cumprod", aten("cumprod")],
                   SoftmaxRule(scale=None))
register_functions([getattr, "size", "dim", "numel", "nelement", "ndimension", "type", "is_contiguous", "get_device",
                    aten("sym_size"), aten("sym_numel"), aten("sym_stride"), aten("_assert_tensor_metadata"),
                    len], ShapeQueryRule())
