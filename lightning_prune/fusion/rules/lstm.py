"""The LSTM: hidden units across its four gates and its layers."""

from __future__ import annotations

import torch
from torch import nn

from lightning_prune.errors import UnsupportedPatternError
from lightning_prune.fusion.layout import Layout
from lightning_prune.fusion.rules.base import LayerRule, input_layout
from lightning_prune.fusion.rules.registry import register_layer


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


register_layer(nn.LSTM, LSTMRule())
