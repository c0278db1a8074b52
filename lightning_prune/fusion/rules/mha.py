"""``nn.MultiheadAttention``: its heads, exactly.

The module is a leaf (its forward is one torch kernel). Its packed ``in_proj_weight`` holds q, k and v rows (or
``q/k/v_proj_weight`` when key and value widths differ); each block is ``num_heads`` heads of ``head_dim`` rows. A head
is one class across its q, k and v rows (and their biases, always masked with it, so a removed head's output is
exactly zero) and the matching ``out_proj`` columns. ``out_proj``'s rows are the module's output channels.

After pruning, ``num_heads`` counts the heads left, ``head_dim`` is unchanged and ``embed_dim`` (``kdim``, ``vdim``)
is the width the module reads, which only shrinks when the stream feeding it is pruned. torch's kernel assumes
``num_heads * head_dim == embed_dim``; a module where that no longer holds becomes a :class:`PrunedMultiheadAttention`
(still an ``nn.MultiheadAttention``), whose forward computes the same function for any number of heads.

``nn.TransformerEncoderLayer`` / ``DecoderLayer`` and the ``nn.TransformerEncoder`` / ``Decoder`` / ``Transformer``
stacks are read op by op (their forward branches on the input, so they need example inputs and ``torch.export``):
the heads come from their attention modules, the feed-forward width from ``linear1``; the residual stream is
LayerNorm'd, so it stays. PyTorch's fused inference path (eval mode without grad) needs every head, so a layer that
lost heads turns it off (``activation_relu_or_gelu = 0``) and runs the same math op by op.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_prune.fusion.layout import Layout
from lightning_prune.fusion.rules.base import ContainerRule, LayerRule, features_at
from lightning_prune.fusion.rules.registry import register_layer


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with fewer heads than ``embed_dim // head_dim``: same arguments, same results."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched = query.dim() == 3
        if not batched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        inner = self.num_heads * self.head_dim
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.split(inner)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = self.in_proj_bias.split(inner) if self.in_proj_bias is not None else (None, None, None)
        length, batch = query.shape[:2]
        q, k, v = (F.linear(x, w, b).view(x.shape[0], batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)
                   for x, w, b in zip((query, key, value), weights, biases, strict=True))
        mask = self._mask(attn_mask, key_padding_mask, q, batch)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            attention = F.dropout(scores.softmax(-1), dropout, self.training)
            out = attention @ v
            attention = attention.mean(1) if average_attn_weights else attention
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal and mask is None)
            attention = None
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, inner))
        if not batched:
            return out.squeeze(1), None if attention is None else attention.squeeze(0)
        return out.transpose(0, 1) if self.batch_first else out, attention

    def _mask(self, attn_mask, key_padding_mask, q, batch):
        """One additive float mask for (batch, heads, queries, keys), or None."""
        masks = []
        if attn_mask is not None:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=q.dtype, check_other=False)
            masks.append(attn_mask if attn_mask.dim() == 2 else attn_mask.view(batch, -1, *attn_mask.shape[1:]))
        if key_padding_mask is not None:
            key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                                 other_type=None, other_name="", target_type=q.dtype,
                                                 check_other=False)
            masks.append(key_padding_mask.view(batch, 1, 1, -1))
        return sum(masks[1:], masks[0]) if masks else None


class MultiheadAttentionRule(LayerRule):
    """``nn.MultiheadAttention`` as one layer: reads ``embed_dim`` (every input), writes ``out_proj``'s rows, and
    removes whole heads inside."""

    channel_dim = -1

    def in_channels(self, module):
        return module.embed_dim

    def out_channels(self, module):
        return module.embed_dim

    def input_tensor(self, module):
        return ("in_proj_weight" if module._qkv_same_embed_dim else "q_proj_weight"), 1

    def fold(self, module, removed, values):
        weight = module.in_proj_weight if module._qkv_same_embed_dim else module.q_proj_weight
        return weight[:, removed].to(values.dtype) @ values

    def fold_target(self, module):
        return "in_proj_bias", self.input_tensor(module)[0], 0

    def visit(self, v) -> None:
        module = v.module
        blocks = self._heads(v, module)
        for block in blocks:  # a head's rows are one class
            v.couple(block[:, :1].expand_as(block), block)
        v.couple(blocks[0][:, 0], blocks[1][:, 0])
        v.couple(blocks[0][:, 0], blocks[2][:, 0])
        self._read_inputs(v, module)
        inner = blocks[2].reshape(-1)
        v.bind(module.out_proj.weight, 1, inner)
        out = v.produce(module.out_proj, "weight", 0)
        if module.out_proj.bias is not None:
            v.bind(module.out_proj.bias, 0, out)
            v.silence(module.out_proj, "bias", out)
        reason = self._unsupported(v, module)
        if reason:
            v.block(inner, f"{v.where} {reason}")
        v.action(None)
        layout = Layout.vector(out, -1, v.ndim(v.arg(0, "query")) if v.shapes else None)
        v.set(layout if isinstance(v.node.meta.get("val"), torch.Tensor) else (layout, None))

    def _heads(self, v, module) -> list[torch.Tensor]:
        """The channel ids of the q, k and v rows, each as (heads, head_dim); the biases follow, always masked."""
        shape = (module.num_heads, module.head_dim)
        if module._qkv_same_embed_dim:
            rows = v.produce(module, "in_proj_weight", 0)
            blocks = list(rows.view(3, *shape))
        else:
            blocks = [v.produce(module, f"{kind}_proj_weight", 0).view(shape) for kind in "qkv"]
        if module.in_proj_bias is not None:
            ids = torch.cat([b.reshape(-1) for b in blocks])
            v.bind(module.in_proj_bias, 0, ids)
            v.silence(module, "in_proj_bias", ids, always=True)
        return blocks

    def _read_inputs(self, v, module) -> None:
        """Query, key and value read the input weights' columns (one packed weight: their channels are coupled)."""
        args = [v.arg(i, name) for i, name in enumerate(("query", "key", "value"))]
        names = ["in_proj_weight"] * 3 if module._qkv_same_embed_dim else [f"{k}_proj_weight" for k in "qkv"]
        for k, (arg, name) in enumerate(zip(args, names, strict=True)):
            flow = v.layout(arg)
            if flow is None or (k and arg is args[0]):
                continue
            width = v.tensor(name).shape[1]
            labels = features_at(v, flow, -1, width)
            if labels is None:
                continue
            if k:  # a key/value stream apart from the query: its removed channels' constants are not folded
                v.block(labels, f"{v.where} reads a key/value stream apart from its query stream")
                continue
            v.bind(v.tensor(name), 1, labels)
            v.consumer(module, labels, self)

    def _unsupported(self, v, module) -> str | None:
        if module.bias_k is not None or module.add_zero_attn:
            return "adds learned or zero key/value positions (add_bias_kv / add_zero_attn), which are not supported"
        if any(u.args[1:2] == (1,) and u.users for u in v.node.users):
            return "returns attention weights averaged over its heads, which removing a head changes"
        mask = v.arg(5, "attn_mask")
        shape = v.shape(mask) if mask is not None else None
        if shape is not None and len(shape) == 3:
            return "takes a per-head attention mask, which cannot follow the removed heads"
        return None

    def const(self, v, *inputs):
        bias = v.module.out_proj.bias
        if bias is None:
            return torch.zeros(v.module.embed_dim, dtype=torch.float64)
        return bias.detach().to(torch.float64).cpu()

    def narrow(self, module, data, ctx) -> None:
        heads, embed_dim = _widths(module)
        if heads * module.head_dim != embed_dim:  # torch's kernel cannot run it any more
            ctx.surgery.set_class(module, PrunedMultiheadAttention)

    def sync(self, module) -> None:
        module.num_heads, module.embed_dim = _widths(module)
        if module._qkv_same_embed_dim:
            module.kdim = module.vdim = module.embed_dim
        else:
            module.kdim, module.vdim = module.k_proj_weight.shape[1], module.v_proj_weight.shape[1]
        if module.num_heads * module.head_dim != module.embed_dim and type(module) is nn.MultiheadAttention:
            module.__class__ = PrunedMultiheadAttention


def _widths(module: nn.MultiheadAttention) -> tuple[int, int]:
    """(heads, the query's width) from the (narrowed) input weights."""
    weight = module.in_proj_weight if module._qkv_same_embed_dim else module.q_proj_weight
    return weight.shape[0] // (3 if module._qkv_same_embed_dim else 1) // module.head_dim, weight.shape[1]


class TransformerBlockRule(ContainerRule):
    """torch's transformer layers and stacks: traced through. A layer whose attention lost heads leaves the fused
    inference kernel (which checks ``in_proj_weight`` against ``3 * embed_dim``). A stack with masked layers leaves
    its nested-tensor path from the start: it zeroes padded positions, which the op-by-op path that a pruned layer
    runs computes like any other, so the masked and pruned models would differ there."""

    def on_masked(self, module) -> None:
        if hasattr(module, "use_nested_tensor"):
            module.use_nested_tensor = False

    def sync(self, module) -> None:
        attention = getattr(module, "self_attn", None)
        if attention is not None and attention.num_heads * attention.head_dim != attention.embed_dim:
            module.activation_relu_or_gelu = 0
        self.on_masked(module)


register_layer(nn.MultiheadAttention, MultiheadAttentionRule())
for _block in (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder, nn.TransformerDecoder,
               nn.Transformer):
    register_layer(_block, TransformerBlockRule())
