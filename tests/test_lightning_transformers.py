"""Hugging Face models inside a LightningModule, pruned by the callback (issue 23, item 4): a causal LM whose
``forward(input_ids)`` returns ``.logits`` (its cache on: the module's forward takes no ``use_cache``), BERT and ViT
classifiers. Each trains two steps, fuses at fit end, and computes on a batch what the masked model computed."""

from __future__ import annotations

import re

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

from lightning_prune import SaliencyPruner, StructuredPruning
from tests.checks import assert_outputs_match


def _llama():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config), torch.randint(0, 64, (4, 8))


def _bert():
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(config), torch.randint(0, 64, (4, 8))


def _vit():
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=4, intermediate_size=64, num_labels=3)
    return ViTForImageClassification(config), torch.randn(4, 1, 8, 8)


class HFModule(pl.LightningModule):
    """What a user writes: the Hugging Face model as an attribute, a forward returning its logits."""

    def __init__(self, build, keyword: str):
        super().__init__()
        self.model, self.data = build()
        self.keyword = keyword
        self.example_input_array = self.data[:2]

    def forward(self, x):
        return self.model(**{self.keyword: x}).logits

    def training_step(self, batch, batch_idx):
        return self(batch[0]).float().pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(self.data), batch_size=2)


class MaskedOutput(pl.Callback):
    """Placed before the pruning callback: records the masked model's output on a batch when training ends."""

    def __init__(self, batch: torch.Tensor):
        self.batch, self.masked = batch, None

    def on_train_end(self, trainer, pl_module):
        pl_module.eval()
        with torch.no_grad():
            self.masked = pl_module(self.batch)
        pl_module.train()


@pytest.mark.parametrize(("build", "keyword", "pruned"), [
    # the residual stream goes too: o_proj and down_proj produce it (the embedding is no Linear)
    (_llama, "input_ids", r"model\.layers\.0\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"),
    (_bert, "input_ids",
     r"bert\.(encoder\.layer\.0\.(attention\.(self\.(query|key|value)|output\.dense)|(intermediate|output)\.dense)"
     r"|pooler\.dense)"),
    (_vit, "pixel_values", r"vit\.layers\.0\.(attention\.[qkvo]_proj|mlp\.fc[12])"),
], ids=["llama-causal-lm", "bert", "vit"])
def test_a_hugging_face_model_in_a_lightning_module_prunes_exactly(build, keyword: str, pruned: str) -> None:
    module = HFModule(build, keyword)
    widths = {n: m.out_features for n, m in module.model.named_modules() if isinstance(m, nn.Linear)}
    batch = module.data[2:]
    probe = MaskedOutput(batch)
    pruning = StructuredPruning(SaliencyPruner(sparsity_level=0.5))
    trainer = pl.Trainer(max_steps=2, callbacks=[probe, pruning], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module)
    assert pruning.fused and probe.masked is not None
    module.eval()
    with torch.no_grad():
        assert_outputs_match(probe.masked, module(batch))
    narrowed = {n for n, m in module.model.named_modules() if isinstance(m, nn.Linear) and m.out_features < widths[n]}
    assert narrowed and all(re.fullmatch(pruned, n) for n in narrowed), sorted(narrowed)
    assert {n for n in widths if re.fullmatch(pruned, n)} == narrowed
