"""``F.embedding`` / ``torch.embedding`` / ATen's ``embedding`` on a module's weight: an embedding read functionally
(an ``nn.Embedding`` subclass whose forward scales its output, such as transformers' ``*ScaledWordEmbedding``).

Like ``nn.Embedding``'s own call it produces channels along the weight's dim 1 (the embedding dim) and reads indices,
not channels; the weight's owner is narrowed and synced by its own rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_prune.fusion.layout import Layout
from lightning_prune.fusion.rules.base import LayerRule
from lightning_prune.fusion.rules.registry import aten, register_function


class FunctionalEmbeddingRule(LayerRule):
    """An embedding lookup on a parameter read directly. ``weight_first``: the weight is the first argument
    (``torch.embedding``, ATen), else the second (``F.embedding(input, weight)``)."""

    def __init__(self, weight_first: bool):
        self.weight_first = weight_first

    def visit(self, v) -> None:
        ref = v.value(v.arg(0, "weight") if self.weight_first else v.arg(1, "weight"))
        tensor = getattr(ref, "tensor", None)
        holder = v.holder(tensor) if isinstance(tensor, torch.Tensor) else None
        if holder is None or tensor.dim() != 2:
            v.block_inputs("looks up a weight computed at run time, which fusion cannot narrow")
            return
        owner, _fqn, name = holder
        ids = v.produce(owner, name, 1)
        v.set(Layout.vector(ids, -1, v.ndim() if v.shapes else None))

    def const(self, v, *inputs):
        ref = v.value(v.arg(0, "weight") if self.weight_first else v.arg(1, "weight"))
        return torch.zeros(ref.tensor.shape[1], dtype=torch.float64)


register_function(F.embedding, FunctionalEmbeddingRule(weight_first=False))
for _target in (torch.embedding, aten("embedding")):
    if _target is not None:
        register_function(_target, FunctionalEmbeddingRule(weight_first=True))
