"""What feeds a residual stream besides layers: embeddings read as functions, and parameters joined to the tokens.

- ``F.embedding`` / ``torch.embedding`` / ATen's ``embedding`` on a module's weight (an ``nn.Embedding`` subclass
  whose forward scales its output, such as transformers' ``*ScaledWordEmbedding``): like ``nn.Embedding``'s own call
  it produces channels along the weight's dim 1 and reads indices, not channels; the owner is synced by its rule.
- A parameter concatenated beside the tokens (a ViT's class token, :func:`parameter_part`): narrowed with the
  channels and masked with them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

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


def parameter_part(v, node, channel_axes: tuple[int, ...], labels: torch.Tensor) -> bool:
    """Whether ``node`` is a module's parameter (maybe expanded over the batch: a ViT's class token) holding one
    value per channel along the channel axis: it is then narrowed with the channels and silenced with them (always:
    it must read zero on a removed channel, whatever sits beside it)."""
    while isinstance(node, fx.Node) and getattr(node.target, "overloadpacket", node.target) in (
            torch.ops.aten.expand, "expand"):
        node = node.args[0]
    ref = v.value(node)
    tensor = getattr(ref, "tensor", None)
    holder = v.holder(tensor) if isinstance(tensor, torch.Tensor) else None
    if holder is None or len(channel_axes) != 1 or tensor.dim() != (v.ndim() or 0):
        return False
    axis = channel_axes[0]
    if tensor.shape[axis] != labels.numel():
        return False
    v.bind(tensor, axis, labels.reshape(-1))
    owner, _fqn, name = holder
    v.silence(owner, name, labels.reshape(-1), always=True, dim=axis)
    return True


register_function(F.embedding, FunctionalEmbeddingRule(weight_first=False))
for _target in (torch.embedding, aten("embedding")):
    if _target is not None:
        register_function(_target, FunctionalEmbeddingRule(weight_first=True))
