"""Dense layers with their own input and output channels: Linear, Embedding, and ``F.linear`` / ``F.convNd``
called on a module's weight (convolutions are in :mod:`.conv`, the LSTM in :mod:`.lstm`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune.fusion.layout import Layout
from lightning_prune.fusion.records import TensorRef
from lightning_prune.fusion.rules.base import LayerRule, features_at
from lightning_prune.fusion.rules.registry import aten, register_functions, register_layer


class LinearRule(LayerRule):
    channel_dim = -1

    def in_channels(self, module: nn.Linear) -> int:
        return module.in_features

    def out_channels(self, module: nn.Linear) -> int:
        return module.out_features

    def fold(self, module, removed, values):
        return module.weight[:, removed].to(values.dtype) @ values

    def sync(self, module):
        module.out_features, module.in_features = module.weight.shape


class EmbeddingRule(LayerRule):
    """nn.Embedding: its columns (weight dim 1) are output channels; it reads indices, not channels."""

    def channel_dim_of_weight(self, module) -> int:
        return 1

    def bias_names(self, module, tensor_name):
        return []

    def in_channels(self, module) -> int:
        return module.num_embeddings

    def out_channels(self, module) -> int:
        return module.embedding_dim

    def visit(self, v) -> None:
        v.set(self.produce(v, v.module, -1))

    def sync(self, module):
        module.num_embeddings, module.embedding_dim = module.weight.shape


class FunctionalLayerRule(LayerRule):
    """``F.linear(x, w, b)`` / ``F.convNd(x, w, b, ...)`` on a parameter read directly (a weight used outside its
    module's call, as in a functional attention block). The weight's owner is narrowed and synced."""

    def __init__(self, conv_dims: int = 0):
        self.conv_dims = conv_dims
        self.channel_dim = 1 if conv_dims else -1

    def visit(self, v) -> None:
        weight_ref, bias_ref = v.value(v.arg(1, "weight")), v.value(v.arg(2, "bias"))
        groups = v.arg(6, "groups", 1) if self.conv_dims else 1
        if (not isinstance(weight_ref, TensorRef) or v.holder(weight_ref.tensor) is None or groups != 1
                or (bias_ref is not None and not (isinstance(bias_ref, TensorRef) and v.holder(bias_ref.tensor)))):
            v.block_inputs("computes its weight at run time (or is grouped), which fusion cannot narrow")
            return
        owner, _fqn, name = v.holder(weight_ref.tensor)
        flow = v.layout(v.arg(0, "input"))
        dim = 1 if self.conv_dims and not (v.shapes and v.ndim(v.arg(0)) == self.conv_dims + 1) else (
            0 if self.conv_dims else -1)
        labels = features_at(v, flow, dim, weight_ref.tensor.shape[1]) if flow is not None else None
        if labels is not None:
            v.bind(weight_ref.tensor, 1, labels)
            v.consumer(owner, labels, self)
        else:
            v.hold(weight_ref.tensor, 1)
        ids = v.produce(owner, name, 0)
        if bias_ref is not None:
            bias_owner, _, bias_name = v.holder(bias_ref.tensor)
            v.bind(bias_ref.tensor, 0, ids)
            v.silence(bias_owner, bias_name, ids)
        v.set(Layout.vector(ids, dim, v.ndim() if v.shapes else None))

    def const(self, v, *inputs):
        bias_ref = v.value(v.arg(2, "bias"))
        weight_ref = v.value(v.arg(1, "weight"))
        if isinstance(bias_ref, TensorRef):  # read through its module: masked with the channels
            owner, _fqn, name = v.holder(bias_ref.tensor)
            return getattr(owner, name).detach().to(torch.float64).cpu()
        return torch.zeros(weight_ref.tensor.shape[0], dtype=torch.float64)

    def in_channels(self, module):
        return module.weight.shape[1]

    def out_channels(self, module):
        return module.weight.shape[0]

    def constant_input_is_constant(self, module) -> bool:
        return not self.conv_dims  # a functional conv's padding is not known here

    def fold(self, module, removed, values):
        return module.weight[:, removed].to(values.dtype) @ values


register_layer(nn.Linear, LinearRule())
register_layer(nn.Embedding, EmbeddingRule())
register_functions([F.linear, aten("linear")], FunctionalLayerRule())
for _dims, (_fn, _op) in enumerate(((F.conv1d, "conv1d"), (F.conv2d, "conv2d"), (F.conv3d, "conv3d")), start=1):
    register_functions([_fn, aten(_op)], FunctionalLayerRule(conv_dims=_dims))
