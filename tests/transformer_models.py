"""Tiny transformers for the attention tests: Hugging Face models built from configs (no download) and hand-written
blocks. Each builder returns (model in eval mode, example inputs as a tuple of positional arguments)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
    LlamaConfig,
    LlamaModel,
    ViTConfig,
    ViTModel,
)

from lightning_prune import ContainerRule


def bert(**kwargs):
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16, **kwargs)
    return BertModel(config, add_pooling_layer=False).eval(), (torch.randint(0, 50, (2, 8)),)


def gpt2():
    config = GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                        bos_token_id=0, eos_token_id=0)
    return GPT2Model(config).eval(), (torch.randint(0, 50, (2, 8)),)


def llama(**kwargs):
    """Grouped-query attention: 4 query heads share 2 key/value heads; SwiGLU MLP; rotary embeddings."""
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                         **kwargs)
    return LlamaModel(config).eval(), (torch.randint(0, 50, (2, 8)),)


def vit():
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64)
    return ViTModel(config, add_pooling_layer=False).eval(), (torch.randn(2, 1, 8, 8),)


class MHABlock(nn.Module):
    """A pre-norm block around ``nn.MultiheadAttention`` (the residual stays whole, the heads go)."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x, padding):
        h = self.norm(x) if self.batch_first else self.norm(x).transpose(0, 1)
        a, _ = self.attn(h, h, h, key_padding_mask=padding)
        x = x + (a if self.batch_first else a.transpose(0, 1))
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def mha(batch_first: bool = True):
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    return MHABlock(batch_first).eval(), (torch.randn(2, 6, 16), padding)


class HandAttention(nn.Module):
    """A pre-norm block with packed qkv, written by hand: SDPA or matmul-softmax-matmul."""

    def __init__(self, sdpa: bool = True):
        super().__init__()
        self.sdpa, self.head_dim = sdpa, 8
        self.norm = nn.LayerNorm(16)
        self.qkv, self.proj = nn.Linear(16, 96), nn.Linear(32, 16)
        self.fc1, self.fc2 = nn.Linear(16, 48), nn.Linear(48, 16)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (part.view(b, t, -1, self.head_dim).transpose(1, 2) for part in self.qkv(self.norm(x)).chunk(3, -1))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim**-0.5, dim=-1) @ v
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, -1))
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def hand(sdpa: bool = True):
    return HandAttention(sdpa).eval(), (torch.randn(2, 5, 16),)


class ExportOnlyAttention(nn.Module):
    """fx cannot trace it (it branches on a size), so it is read through torch.export, where every size is an int.
    The head count is the attribute ``n_heads`` (rewritten at prune time) or, with ``literal``, the number 4."""

    def __init__(self, literal: bool = False):
        super().__init__()
        self.literal, self.n_heads, self.head_dim = literal, 4, 4
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.head = nn.Linear(16, 7)

    def forward(self, x):
        if x.shape[0] > 1:
            x = x * 2.0
        b, t, _ = x.shape
        heads = 4 if self.literal else self.n_heads
        q, k, v = (layer(x).view(b, t, heads, self.head_dim).transpose(1, 2) for layer in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, heads * self.head_dim)
        return self.head(torch.relu(self.o(y)))


class ExportOnlyHeads(ContainerRule):
    """What a user registers for a hand-written block whose forward reads a head count: ``load_pruned`` then sets it
    from the narrowed projection (pruning sets it too, from the heads it removed). test_transformers.py registers
    it for each of its tests."""

    def sync(self, module: ExportOnlyAttention) -> None:
        module.n_heads = module.q.weight.shape[0] // module.head_dim


def export_only(literal: bool = False):
    return ExportOnlyAttention(literal).eval(), (torch.randn(2, 5, 16),)


def output(result) -> torch.Tensor:
    """The tensor a model returns (a Hugging Face output's last hidden state)."""
    return result.last_hidden_state if hasattr(result, "last_hidden_state") else result


def llama_padded():
    """Llama with a padding mask: SDPA gets a mask, so the key/value heads are repeated (repeat_kv: expand + reshape)
    instead of ``enable_gqa``."""
    model, (ids,) = llama()
    return model, (ids, torch.tensor([[1] * 8, [1] * 6 + [0] * 2]))
