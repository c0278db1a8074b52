"""A Hugging Face model's ``config`` follows its pruned layers, so ``save_pretrained`` writes what the model now is.

Fusion narrows each layer and rewrites that layer's own head counts and widths (:mod:`.rules.hf`); this module then
reads every layer's sizes (query heads, key/value heads, head size, MLP width) and rewrites the shared config:

- **uniform** (every layer alike) and sayable by the family's keys: the standard keys (``num_attention_heads``,
  ``num_key_value_heads``, ``head_dim``, ``intermediate_size``; GPT-2's ``n_head``/``n_inner``) are set, so a plain
  ``AutoModel*.from_pretrained(path)`` rebuilds the pruned model with no lightning_prune import. GPT-2 and BERT derive
  the head size from ``hidden_size // heads``, so their keys can say a narrower MLP but not fewer heads.
- otherwise the per-layer sizes are written under the config key :data:`LAYERS_KEY` (one dict per layer, in the
  family's own key names plus ``head_dim``) and the standard keys keep the widest architecture the layers were cut
  from. A plain ``from_pretrained`` then finds weights narrower than those keys say and transformers raises
  (``ignore_mismatched_sizes=False``, its default); ``lightning_prune.from_pretrained(path, cls)`` rebuilds the model.

The layer count never changes, and neither does ``hidden_size``, also when the residual stream is pruned (a narrower
embedding): Gemma's embedding scale is ``sqrt`` of the dense hidden size, GPT-2's and BERT's head size derive from it,
and a stream norm's epsilon was rescaled to the dense width (:mod:`.rules.norms`), so no standard key says a
narrower stream. Such a model is written per layer as above, so a plain ``from_pretrained`` raises on the narrower
embedding and ``lightning_prune.from_pretrained`` rebuilds it from the weights' shapes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from lightning_prune.fusion.rules.hf import AttentionBlockRule, width
from lightning_prune.fusion.rules.registry import active

#: the config key holding each layer's sizes when the standard keys cannot say them
LAYERS_KEY = "lightning_prune_layers"


@dataclass(frozen=True)
class Spelling:
    """How a family's config names the sizes pruning changes.

    Args:
        heads: the query-head count's key.
        kv_heads: the key/value-head count's key (None: as many as query heads).
        head_dim: the key the model reads for the head size (None: it computes ``hidden_size // heads``).
        ffn: the MLP width's key (None: the family's MLPs are not pruned, e.g. Mixtral's experts).
    """

    heads: str
    kv_heads: str | None
    head_dim: str | None
    ffn: str | None


_DECODER = Spelling("num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size")
_ENCODER = Spelling("num_attention_heads", None, None, "intermediate_size")
#: config ``model_type`` -> its spelling
SPELLINGS = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma"), _DECODER),
    "mixtral": Spelling("num_attention_heads", "num_key_value_heads", "head_dim", None),
    **dict.fromkeys(("vit", "deit"), Spelling("num_attention_heads", None, "head_dim", "intermediate_size")),
    **dict.fromkeys(("bert", "roberta"), _ENCODER),
    "gpt2": Spelling("n_head", None, None, "n_inner"),
}
#: MLP module class -> the child whose output width is the MLP's
FFN_LAYERS = {"GPT2MLP": "c_fc", "ViTMLP": "fc1", "DeiTMLP": "fc1", "BertIntermediate": "dense",
              "RobertaIntermediate": "dense"}


def is_pretrained(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers ``PreTrainedModel`` (duck-typed: transformers stays optional)."""
    return hasattr(module, "save_pretrained") and hasattr(getattr(module, "config", None), "to_json_string")


def layer_sizes(model: nn.Module, spelling: Spelling) -> list[dict[str, int]]:
    """Each layer's sizes in ``spelling``'s key names (plus ``head_dim``), in layer order; [] when the attention
    and MLP modules found do not pair up one per layer."""
    rules = active()
    attention = [(m, rules.module_rule(m)) for m in model.modules()]
    attention = [(m, r) for m, r in attention if isinstance(r, AttentionBlockRule)]
    ffn = [width(getattr(m, child)) for m in model.modules()
           for child in [FFN_LAYERS.get(type(m).__name__, "up_proj" if type(m).__name__.endswith("MLP") else None)]
           if child is not None and isinstance(getattr(m, child, None), nn.Module)]
    if spelling.ffn is None:
        ffn = [None] * len(attention)
    if not attention or len(attention) != len(ffn):
        return []
    layers = []
    for (module, rule), mlp in zip(attention, ffn, strict=True):
        heads, kv, size = rule.counts(module)
        sizes = {spelling.heads: heads, "head_dim": size}
        for key, value in ((spelling.kv_heads, kv), (spelling.ffn, mlp)):
            if key is not None:
                sizes[key] = value
        layers.append(sizes)
    return layers


def sayable(config, spelling: Spelling, layers: list[dict[str, int]]) -> bool:
    """Whether the standard keys can describe ``layers``: every layer alike and, for a family that derives the head
    size from the hidden size, the heads still filling it."""
    if any(layer != layers[0] for layer in layers):
        return False
    first = layers[0]
    return spelling.head_dim is not None or first[spelling.heads] * first["head_dim"] == config.hidden_size


def stream_width(model: nn.Module) -> int | None:
    """The residual stream's width now, read from the input embedding (a token embedding's columns, a patch
    projection's output channels); None when the model has no such embedding."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # a PreTrainedModel without an input embedding raises
        return None
    weight = getattr(embedding, "weight", None)
    if isinstance(embedding, nn.Embedding) and isinstance(weight, torch.Tensor):
        return int(weight.shape[1])
    projection = getattr(embedding, "projection", None)  # ViT's patch embedding
    return int(projection.weight.shape[0]) if isinstance(projection, nn.Conv2d) else None


def own_config(model: nn.Module):
    """Give ``model`` (and each of its modules that shares it) a copy of its config, and return the copy: the
    caller's config object, which other models built from it still read, is never rewritten."""
    shared = model.config
    copied = copy.deepcopy(shared)
    for module in model.modules():
        if getattr(module, "config", None) is shared:
            module.config = copied
    return copied


def follow_config(root: nn.Module) -> None:
    """Rewrite the config of every Hugging Face model in ``root`` (itself or a child, e.g. inside a
    LightningModule) to its layers' sizes, as the module docstring says, on a copy of it the model then holds (see
    :func:`own_config`). Models of other families, and configs whose layers cannot be read, are left alone."""
    seen: set[int] = set()
    for module in root.modules():
        config = getattr(module, "config", None)
        if not is_pretrained(module) or id(config) in seen:
            continue
        seen.add(id(config))
        spelling = SPELLINGS.get(getattr(config, "model_type", None))
        layers = layer_sizes(module, spelling) if spelling is not None else []
        if len(layers) != getattr(config, "num_hidden_layers", None):
            continue
        config = own_config(module)
        seen.add(id(config))
        stream = stream_width(module)
        if sayable(config, spelling, layers) and stream in (None, getattr(config, "hidden_size", None)):
            for key, value in layers[0].items():
                if key != "head_dim" or spelling.head_dim is not None:
                    setattr(config, key, value)
            if hasattr(config, LAYERS_KEY):
                delattr(config, LAYERS_KEY)
        else:
            setattr(config, LAYERS_KEY, layers)
