"""A pruned Hugging Face model out of a Lightning run: every ``ModelCheckpoint`` file (masked mid-run, fused at the
end) reloads through ``load_pruned``, and ``lightning_prune.save_pretrained(module, path)`` writes safetensors that
plain ``from_pretrained`` loads (or that ``load_pruned`` reads back, one file or shards)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lightning_prune as lp
from tests.checks import assert_outputs_match

CONFIG = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32)


class LitLM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = LlamaForCausalLM(LlamaConfig(**CONFIG))
        self.example_input_array = torch.randint(0, 100, (2, 8))

    def forward(self, input_ids):
        return self.net(input_ids, use_cache=False).logits

    def training_step(self, batch, batch_idx):
        return self.net(batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _logits(module, x):
    with torch.no_grad():
        return module.eval()(x)


def test_checkpoints_of_a_pruned_llama_reload_and_save_pretrained_ships_it(tmp_path):
    module = LitLM()
    tokens = torch.randint(0, 100, (16, 8), generator=torch.Generator().manual_seed(1))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True)
    stream = [r".*\.(embed_tokens|o_proj|down_proj)\.weight", r".*lm_head\.weight"]  # the hidden size stays, so
    # plain from_pretrained loads it (a pruned stream ships through lp.from_pretrained: tests/test_ship_hf.py)
    pruning = lp.StructuredPruning(lp.SaliencyPruner(sparsity_level=0.5), schedule="oneshot", start_step=2,
                                   exclude=stream)
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[pruning, checkpoints])
    trainer.fit(module, DataLoader(list(tokens), batch_size=4))
    assert pruning.fused and module.net.config.num_attention_heads == 2
    x = module.example_input_array
    expected = _logits(module, x)

    for name in ("epoch=0-step=4.ckpt", "last.ckpt"):  # masked (before fit-end fusion), then fused
        reloaded = lp.load_pruned(LitLM(), tmp_path / "ckpt" / name)
        assert (reloaded.net.config.num_attention_heads, reloaded.net.config.num_key_value_heads) == (2, 1)
        assert_outputs_match(expected, _logits(reloaded, x), rtol=1e-5)

    shipped = lp.save_pretrained(module, tmp_path / "hf")  # the documented one-liner after fit
    assert shipped is module.net and (tmp_path / "hf" / "model.safetensors").is_file()
    with torch.no_grad():
        assert_outputs_match(expected, AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(x).logits)

    module.net.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    index = tmp_path / "shards" / "model.safetensors.index.json"
    assert index.is_file() and len(list((tmp_path / "shards").glob("*.safetensors"))) > 1
    for path in (tmp_path / "hf", index):
        fresh = lp.load_pruned(LlamaForCausalLM(LlamaConfig(**CONFIG)), path)
        with torch.no_grad():
            assert_outputs_match(expected, fresh.eval()(x).logits)


def test_save_pretrained_refuses_a_model_that_still_carries_masks(tmp_path):
    """transformers would write the masked weights under parametrization names, and from_pretrained would silently
    re-initialise those layers: the one-liner refuses before writing anything."""
    module = LitLM()
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(module, None, example_inputs=(module.example_input_array,), exclude_output=True)
    pruner.step()
    with pytest.raises(lp.PruningConfigError, match="still carries pruning masks.*prune it first"):
        lp.save_pretrained(module, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    pruner.prune()
    lp.save_pretrained(module, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
