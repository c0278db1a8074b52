"""Hugging Face transformers layers, registered by name (transformers stays optional).

- ``Conv1D`` (GPT-2): a linear layer whose weight is stored transposed, (in, out).
- Container rules for the attention and MLP blocks: their forward is read op by op (the heads come from the attention
  rules), and after their projections were narrowed the rule rewrites the attributes that hold head counts and widths
  (``num_attention_heads``, ``all_head_size``, ``split_size``, ``num_key_value_groups``, ``intermediate_size``...),
  from the projections' shapes, so it works the same at prune time and when ``load_pruned`` rebuilds a checkpoint.
  Head counts may differ from layer to layer; every per-layer count lives on the layer, and the shared ``config``
  follows them where its keys can say them (:mod:`lightning_prune.fusion.hf_config`).
"""

from __future__ import annotations

from torch import nn

from lightning_prune.fusion.rules.attention import set_head_counts
from lightning_prune.fusion.rules.base import ContainerRule, LayerRule
from lightning_prune.fusion.rules.registry import active, register_by_name


class Conv1DRule(LayerRule):
    """``transformers.pytorch_utils.Conv1D(nf, nx)``: ``y = x @ weight + bias`` with ``weight`` (nx, nf)."""

    channel_dim = -1

    def channel_dim_of_weight(self, module) -> int:
        return 1

    def in_channels(self, module) -> int:
        return module.nx

    def out_channels(self, module) -> int:
        return module.nf

    def fold(self, module, removed, values):
        return module.weight[removed].T.to(values.dtype) @ values

    def sync(self, module) -> None:
        module.nx, module.nf = module.weight.shape


def width(module: nn.Module) -> int:
    """A layer's output width, read from its weight (its size attributes may not be synced yet)."""
    rule = active().module_rule(module)
    return module.weight.shape[rule.channel_dim_of_weight(module)]


class AttentionBlockRule(ContainerRule):
    """An attention block whose query (and key) projections are children.

    Args:
        query: the query projection's name; ``packed`` of its output blocks are q (then k, v) when it packs them.
        key: the key projection's name, when key/value heads are counted apart (GQA).
        head_dim: the attribute holding the (unchanged) head size.
        widths: attributes holding the attention's inner width (heads x head size).
    """

    def __init__(self, query: str, key: str | None = None, packed: int = 1, head_dim: str = "head_dim",
                 widths: tuple[str, ...] = ()):
        self.query, self.key, self.packed, self.head_dim, self.width_attributes = query, key, packed, head_dim, widths

    def query_width(self, module: nn.Module) -> int:
        return width(getattr(module, self.query)) // self.packed

    def counts(self, module: nn.Module) -> tuple[int, int, int]:
        """(query heads, key/value heads, head size), read from the projections' widths."""
        size = getattr(module, self.head_dim)
        heads = self.query_width(module) // size
        return heads, width(getattr(module, self.key)) // size if self.key else heads, size

    def sync(self, module: nn.Module) -> None:
        heads, kv, size = self.counts(module)
        set_head_counts(module, (None, heads), (None, kv))
        for name in self.width_attributes:
            if isinstance(getattr(module, name, None), int):
                setattr(module, name, heads * size)


class GPT2AttentionRule(AttentionBlockRule):
    """GPT-2: ``c_attn`` packs q, k, v (k, v only in cross-attention, where ``q_attn`` holds q)."""

    def __init__(self):
        super().__init__("c_attn", packed=3, widths=("embed_dim", "split_size"))

    def query_width(self, module):
        if getattr(module, "is_cross_attention", False):
            return width(module.q_attn)
        return super().query_width(module)


class WidthRule(ContainerRule):
    """A block whose ``attribute`` holds the output width of its child ``layer`` (an MLP's intermediate size)."""

    def __init__(self, layer: str, attribute: str):
        self.layer, self.attribute = layer, attribute

    def sync(self, module: nn.Module) -> None:
        setattr(module, self.attribute, width(getattr(module, self.layer)))


_MODELS = "transformers.models"
register_by_name("transformers.pytorch_utils.Conv1D", Conv1DRule())
_BERT = AttentionBlockRule("query", head_dim="attention_head_size", widths=("all_head_size",))
for _name in ("bert.modeling_bert.BertSelfAttention", "bert.modeling_bert.BertCrossAttention",
              "roberta.modeling_roberta.RobertaSelfAttention", "roberta.modeling_roberta.RobertaCrossAttention"):
    register_by_name(f"{_MODELS}.{_name}", _BERT)
register_by_name(f"{_MODELS}.gpt2.modeling_gpt2.GPT2Attention", GPT2AttentionRule())
_PROJ = AttentionBlockRule("q_proj", key="k_proj")
for _name in ("vit.modeling_vit.ViTAttention", "deit.modeling_deit.DeiTAttention"):
    register_by_name(f"{_MODELS}.{_name}", _PROJ)
_SWIGLU = WidthRule("up_proj", "intermediate_size")
for _family in ("llama.modeling_llama.Llama", "mistral.modeling_mistral.Mistral", "qwen2.modeling_qwen2.Qwen2",
                "qwen3.modeling_qwen3.Qwen3", "gemma.modeling_gemma.Gemma"):
    register_by_name(f"{_MODELS}.{_family}Attention", _PROJ)
    register_by_name(f"{_MODELS}.{_family}MLP", _SWIGLU)
# Mixtral's experts are 3-D parameters (experts x width x hidden) no rule narrows: its heads go, its experts stay
register_by_name(f"{_MODELS}.mixtral.modeling_mixtral.MixtralAttention", _PROJ)
