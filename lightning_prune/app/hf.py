"""Hugging Face models for the app, built from configs (nothing is downloaded): a vision transformer over the 8x8
digits and a small Llama over bytes.

``transformers.ViTForImageClassification`` with 2x2 patches on the 1-channel 8x8 images (16 patches and a class
token). torch.fx cannot trace transformers, so pruning reads it through torch.export from example inputs: set the
LightningModule's ``example_input_array`` (the app uses a batch of digits), which ``StructuredPruning`` passes on.
Pruning removes attention heads (query, key and value rows with the output projection's columns) and MLP widths;
the residual stream stays whole (LayerNorm), and so does the classifier.
"""

from __future__ import annotations

from torch import Tensor, nn


class HFImageClassifier(nn.Module):
    """A transformers image classifier whose ``forward(images)`` returns the logits tensor.

    Tensor names: ``model.vit.layers.{i}.attention.q_proj.weight`` (and ``k_proj``, ``v_proj``, ``o_proj``),
    ``model.vit.layers.{i}.mlp.fc1.weight``, ``model.classifier.weight``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(pixel_values=images).logits


def vit_digits(hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 128,
               patch_size: int = 2, num_classes: int = 10) -> HFImageClassifier:
    """ViT for (N, 1, 8, 8) digits; every size can be set from a Hydra config.

    Raises:
        ImportError: transformers is not installed (``pip install 'lightning_prune[test]'``).
    """
    try:  # transformers is optional (the test extra): only this demo model needs it
        from transformers import ViTConfig, ViTForImageClassification
    except ImportError as error:
        raise ImportError("model=hf_vit_digits needs transformers: pip install 'lightning_prune[test]'") from error
    config = ViTConfig(image_size=8, patch_size=patch_size, num_channels=1, hidden_size=hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads,
                       intermediate_size=intermediate_size, num_labels=num_classes, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return HFImageClassifier(ViTForImageClassification(config))


class HFCausalLM(nn.Module):
    """A transformers causal LM whose ``forward(input_ids)`` returns the logits, ``(B, T) -> (B, T, V)``.

    It runs without a key/value cache (``use_cache=False``): training needs none, and the cache's concatenations
    are generation state, not part of what the model computes. Tensor names: ``model.model.layers.{i}.self_attn.
    q_proj.weight`` (``k_proj``, ``v_proj``, ``o_proj``), ``model.model.layers.{i}.mlp.gate_proj.weight``
    (``up_proj``, ``down_proj``), ``model.lm_head.weight``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def llama_bytes(hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2,
                intermediate_size: int = 384, vocab_size: int = 256, max_positions: int = 512) -> HFCausalLM:
    """A ``LlamaForCausalLM`` over a byte vocabulary (256), grouped-query attention, untied embeddings.

    Raises:
        ImportError: transformers is not installed (``pip install 'lightning_prune[test]'``).
    """
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as error:
        raise ImportError("model=llama_bytes needs transformers: pip install 'lightning_prune[test]'") from error
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=False)
    return HFCausalLM(LlamaForCausalLM(config))
