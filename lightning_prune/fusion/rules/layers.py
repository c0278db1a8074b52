"""Layers with their own input and output channels: Linear, ConvNd, ConvTransposeNd, Embedding, LSTM, and
``F.linear`` / ``F.convNd`` called on a module's weight."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune.errors import UnsupportedPatternError
from lightning_prune.fusion.layout import Layout
from lightning_prune.fusion.records import TensorRef
from lightning_prune.fusion.rules.base import LayerRule, features_at, input_layout, tie_axis
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


def _pads_with_zeros(conv: nn.Module) -> bool:
    if conv.padding_mode != "zeros":
        return False
    if conv.padding == "same":
        return any(k > 1 for k in conv.kernel_size)
    if conv.padding == "valid":
        return False
    return any(p > 0 for p in conv.padding)


class ConvRule(LayerRule):
    """ConvNd. ``groups == 1`` is a layer; a depthwise conv (``groups == in_channels``) ties each output channel to
    its input channel.

    A grouped conv (1 < groups < in_channels) keeps its ``groups``: its input channels and its output channels each
    fall into ``groups`` equal parts that are coupled position by position, so the same positions go in every group
    (as Torch-Pruning does) and the widths stay divisible by ``groups``. Its weight's input dim holds one part.
    Each output row keeps its own channel id, so a removed row's bias is its own constant.
    """

    channel_dim = 1

    def output_ndim(self, module) -> int:
        return len(module.kernel_size) + 2

    def in_channels(self, module):
        return module.in_channels

    def out_channels(self, module):
        return module.out_channels

    def channel_dim_for(self, v) -> int:
        if v.shapes and v.ndim(v.arg(0, "input")) == len(v.module.kernel_size) + 1:
            return 0  # an unbatched input (C, *spatial)
        return self.channel_dim

    def constant_input_is_constant(self, module) -> bool:
        return not _pads_with_zeros(module)

    def fold(self, module, removed, values):
        """Input channel i reads through column ``i % per_group`` of the rows of group ``i // per_group``."""
        groups = module.groups
        taps = module.weight.flatten(2).sum(-1).to(values.dtype)  # (out, in / groups)
        per_group = taps.shape[1]
        group, column = removed // per_group, removed % per_group
        contribution = taps.reshape(groups, -1, per_group)[group, :, column] * values[:, None]
        return torch.zeros(groups, taps.shape[0] // groups, dtype=values.dtype,
                           device=values.device).index_add_(0, group, contribution).reshape(-1)

    def visit(self, v) -> None:
        if _depthwise(v.module):
            self._visit_depthwise(v, v.module)
        else:
            super().visit(v)

    def consume(self, v, module, flow, dim) -> None:
        labels = features_at(v, flow, dim, module.in_channels)
        if labels is None:
            return
        parts = labels.reshape(module.groups, -1)
        tie_axis(v, parts, 0)
        name, weight_dim = self.input_tensor(module)
        v.bind(v.tensor(name), weight_dim, parts[0])
        v.state.consumers.append((v.node, module, self, labels))

    def produce(self, v, module, dim) -> Layout:
        out = super().produce(v, module, dim)
        tie_axis(v, out.labels.reshape(module.groups, -1), 0)
        return out

    def _visit_depthwise(self, v, module) -> None:
        """Output channel o reads input channel o // k (k = out / in): they are coupled, so leaving the conv out of
        the config blocks nothing. Each output row keeps its own id (its constant differs from its input's)."""
        flow = input_layout(v)
        dim = self.channel_dim_for(v)
        labels = features_at(v, flow, dim, module.in_channels) if flow is not None else None
        if labels is None:
            labels = v.fresh(module.in_channels)
            v.block(labels, f"{v.where} ties its output channels to input channels that no configured layer "
                            "produces; configure the layer feeding it too")
        ids = v.produce(module, "weight", 0, follows=True)
        v.couple(ids, labels.repeat_interleave(module.out_channels // module.in_channels))
        if module.bias is not None:
            v.bind(module.bias, 0, ids)
            v.silence(module, "bias", ids)
        v.set(Layout.vector(ids, dim, self.out_ndim(v, module)))

    def const(self, v, *inputs):
        module = v.module
        if not _depthwise(module) or not inputs:
            return super().const(v)
        multiplier = module.out_channels // module.in_channels
        out = module.weight.detach().flatten(1).sum(1).to(torch.float64).cpu() * inputs[0].repeat_interleave(
            multiplier)
        if module.bias is not None:
            out = out + module.bias.detach().to(torch.float64).cpu()
        return out, _pads_with_zeros(module) & (out != 0)

    def sync(self, module):
        if _depthwise(module):  # whole groups went
            module.groups = module.weight.shape[0] // (module.out_channels // module.groups)
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups


def _depthwise(conv: nn.Module) -> bool:
    return 1 < conv.groups == conv.in_channels


class ConvTransposeRule(ConvRule):
    """ConvTransposeNd (groups == 1): the weight is (in, out, *kernel), so output channels are weight dim 1.

    A constant input does not give a constant output (border positions receive fewer taps), so removed input
    channels that still emit a non-zero constant are kept.
    """

    def visit(self, v) -> None:
        if v.module.groups == 1:
            LayerRule.visit(self, v)
            return
        reason = f"{v.where} is a grouped transposed convolution (groups={v.module.groups}); only groups=1 is supported"
        v.block(input_layout(v), reason)
        ids = v.produce(v.module, "weight", 1)
        v.block(ids, reason)
        v.set(Layout.vector(ids, self.channel_dim_for(v), self.out_ndim(v, v.module)))

    def channel_dim_of_weight(self, module) -> int:
        return 1

    def constant_input_is_constant(self, module) -> bool:
        return False

    def const(self, v, *inputs):
        return LayerRule.const(self, v)

    def sync(self, module):
        module.in_channels, module.out_channels = module.weight.shape[:2]
        module.out_channels *= module.groups


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


class LSTMRule(LayerRule):
    """nn.LSTM: each layer's hidden units are channels; its weights pack 4 gate rows per unit (gate-major).

    Layer k's ``weight_ih_lk`` and ``weight_hh_lk`` rows, gate biases, ``weight_hh_lk`` columns and the next layer's
    input columns are all the same units. Gate biases are always masked with their rows, so a pruned unit's state
    stays exactly zero (from a zero initial state). ``h_n``/``c_n`` carry layer k's units at index k.
    """

    channel_dim = -1
    #: units that fusion cannot remove exactly (a LayerNorm over them) stay, zeroed, instead of refusing the config
    retain_blocked = True

    def in_channels(self, module):
        return module.input_size

    def out_channels(self, module):
        return module.hidden_size

    def fold(self, module, removed, values):
        return module.weight_ih_l0[:, removed].to(values.dtype) @ values

    def input_tensor(self, module):
        return "weight_ih_l0", 1

    def fold_target(self, module):
        return "bias_ih_l0", "weight_ih_l0", 0

    def visit(self, v) -> None:
        module = v.module
        flow = input_layout(v)
        batch_first = module.batch_first
        ndim = v.ndim(v.arg(0, "input")) if v.shapes else (3 if batch_first else None)
        units = []
        for k in range(module.num_layers):
            rows = v.produce(module, f"weight_ih_l{k}", 0, rows_per_channel=4)
            v.bind(getattr(module, f"weight_hh_l{k}"), 0, rows)
            v.produce(module, f"weight_hh_l{k}", 0, rows_per_channel=4)
            ids = rows[: module.hidden_size]
            v.bind(getattr(module, f"weight_hh_l{k}"), 1, ids)
            if k:
                v.bind(getattr(module, f"weight_ih_l{k}"), 1, units[-1])
            for kind in ("ih", "hh"):
                name = f"bias_{kind}_l{k}"
                if module.bias:
                    v.bind(getattr(module, name), 0, rows)
                    v.silence(module, name, rows, always=True)
            units.append(ids)
        if module.bidirectional or module.proj_size:
            v.block(torch.cat(units), f"{v.where} is bidirectional or projected (only unidirectional LSTMs without "
                                      "proj_size are supported)")
            v.block(flow, f"{v.where} is bidirectional or projected")
            return
        if v.arg(1, "hx") is not None:  # often zeros sized from hidden_size in forward, which would not follow
            v.block(torch.cat(units), f"{v.where} is given an initial state (h_0, c_0), whose units fusion does not "
                                      "narrow; without one nn.LSTM starts from zeros")
        if flow is not None:
            self.consume(v, module, flow, -1)
        else:
            v.hold(module.weight_ih_l0, 1)
        v.action(units)
        out = Layout.vector(units[-1], -1, ndim)
        # h_n / c_n: (num_layers, [batch,] hidden); the layer axis never loses a position
        axes = (0, -1) if ndim is None else (0, ndim - 1)
        stack = Layout(axes, torch.stack(units), ndim, stable=(0,))
        v.set((out, (stack, stack)))

    def const(self, v, *inputs):
        return torch.zeros(v.module.hidden_size, dtype=torch.float64)

    def sync(self, module):
        module.hidden_size = module.weight_hh_l0.shape[1]
        module.input_size = module.weight_ih_l0.shape[1]
        module._init_flat_weights()

    # -- fusion -------------------------------------------------------------------------------------------------
    def adjust_kept(self, module, units, ctx) -> str | None:
        """One hidden size for every layer: a layer keeping fewer units keeps extra ones (zeroed). Gate masks that
        disagree (the seed's per-gate pruner) are sliced per gate as torch.ao does, which is only approximate."""
        masks = _gate_masks(module, ctx)
        if masks is not None and not all((g[kind] == g["ih"][0]).all() for g in masks for kind in ("ih", "hh")):
            counts = {int(g[kind][i].sum()) for g in masks for kind in ("ih", "hh") for i in range(4)}
            if len(counts) != 1:
                raise UnsupportedPatternError(
                    f"LSTM gate masks keep different numbers of units ({sorted(counts)}); nn.LSTM needs one hidden "
                    "size. Use LSTMSaliencyPruner(tie_gates=True) or prune the same count in every gate.")
            ctx.store[id(module)] = masks
            for ids, g in zip(units, masks, strict=True):
                ctx.kept[ctx.root[ids]] = g["hh"][3]
            return (f"LSTM '{ctx.name(module)}' has gate masks that differ between gates or between weight_ih and "
                    "weight_hh; fusion slices each gate by its own mask as torch.ao does, so the pruned LSTM only "
                    "approximates the masked one. Use LSTMSaliencyPruner(tie_gates=True) for an exact result.")
        counts = [int(ctx.kept[ctx.root[ids]].sum()) for ids in units]
        width = max(1, max(counts))
        for ids, count in zip(units, counts, strict=True):
            for j in (~ctx.kept[ctx.root[ids]]).nonzero().flatten()[: width - count]:
                ctx.kept[ctx.root[ids[j]]] = True
        return None

    def owned_tensors(self, module, units, ctx):
        if id(module) not in ctx.store:
            return []
        return [ctx.plan.tensor(module, name) for name in module._flat_weights_names]

    def narrow(self, module, units, ctx) -> None:
        """torch.ao's per-gate slicing (untied masks only): each gate block keeps its own rows and columns."""
        masks = ctx.store.get(id(module))
        if masks is None:
            return
        for k, g in enumerate(masks):
            for kind in ("ih", "hh"):
                rows = g[kind].reshape(-1).nonzero().flatten()
                for name in [f"weight_{kind}_l{k}"] + ([f"bias_{kind}_l{k}"] if module.bias else []):
                    old = module._parameters[name]
                    new = old.detach().index_select(0, rows.to(old.device))
                    if name == f"weight_hh_l{k}":
                        blocks = new.split(int(g["hh"][0].sum()))
                        new = torch.cat([b[:, g["hh"][i].to(b.device)] for i, b in enumerate(blocks)])
                    if k and name == f"weight_ih_l{k}":
                        new = new[:, masks[k - 1]["hh"][3].to(new.device)]
                    ctx.surgery.set_entry(module._parameters, name,
                                          nn.Parameter(new.clone(), requires_grad=old.requires_grad))


def _gate_masks(module: nn.LSTM, ctx) -> list[dict[str, torch.Tensor]] | None:
    """Each layer's ih/hh row masks as (4, hidden), or None when the LSTM's weights are not masked."""
    found = []
    for k in range(module.num_layers):
        layer = {}
        for kind in ("ih", "hh"):
            mask = ctx.mask_of(module, f"weight_{kind}_l{k}")
            if mask is None:
                return None
            layer[kind] = mask.cpu().reshape(4, module.hidden_size)
        found.append(layer)
    return found


class FunctionalLayerRule(LayerRule):
    """``F.linear(x, w, b)`` / ``F.convNd(x, w, b, ...)`` on a parameter read directly (a weight used outside its
    module's call, as in a functional attention block). The weight's owner is narrowed and synced."""

    def __init__(self, conv_dims: int = 0):
        self.conv_dims = conv_dims
        self.channel_dim = 1 if conv_dims else -1

    def visit(self, v) -> None:
        weight_ref, bias_ref = v.value(v.arg(1, "weight")), v.value(v.arg(2, "bias"))
        groups = v.arg(6, "groups", 1) if self.conv_dims else 1
        held = v.state.holders
        if (not isinstance(weight_ref, TensorRef) or id(weight_ref.tensor) not in held or groups != 1
                or (bias_ref is not None and not (isinstance(bias_ref, TensorRef) and id(bias_ref.tensor) in held))):
            v.block_inputs("computes its weight at run time (or is grouped), which fusion cannot narrow")
            return
        owner, _fqn, name = v.state.holders[id(weight_ref.tensor)][0]
        flow = v.layout(v.arg(0, "input"))
        dim = 1 if self.conv_dims and not (v.shapes and v.ndim(v.arg(0)) == self.conv_dims + 1) else (
            0 if self.conv_dims else -1)
        labels = features_at(v, flow, dim, weight_ref.tensor.shape[1]) if flow is not None else None
        if labels is not None:
            v.bind(weight_ref.tensor, 1, labels)
            v.state.consumers.append((v.node, owner, self, labels))
        else:
            v.hold(weight_ref.tensor, 1)
        ids = v.produce(owner, name, 0)
        if bias_ref is not None:
            bias_owner, _, bias_name = v.state.holders[id(bias_ref.tensor)][0]
            v.bind(bias_ref.tensor, 0, ids)
            v.silence(bias_owner, bias_name, ids)
        v.set(Layout.vector(ids, dim, v.ndim() if v.shapes else None))

    def const(self, v, *inputs):
        bias_ref = v.value(v.arg(2, "bias"))
        weight_ref = v.value(v.arg(1, "weight"))
        if isinstance(bias_ref, TensorRef):  # read through its module: masked with the channels
            owner, _fqn, name = v.state.holders[id(bias_ref.tensor)][0]
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
_CONV = ConvRule()
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer(_cls, _CONV)
_CONV_T = ConvTransposeRule()
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_layer(_cls, _CONV_T)
register_layer(nn.Embedding, EmbeddingRule())
register_layer(nn.LSTM, LSTMRule())
register_functions([F.linear, aten("linear")], FunctionalLayerRule())
for _dims, (_fn, _op) in enumerate(((F.conv1d, "conv1d"), (F.conv2d, "conv2d"), (F.conv3d, "conv3d")), start=1):
    register_functions([_fn, aten(_op)], FunctionalLayerRule(conv_dims=_dims))

