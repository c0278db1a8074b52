"""Shipping pruned Hugging Face models: ``save_pretrained`` -> plain ``from_pretrained`` when every layer is alike (the
config says what the model is), -> ``lightning_prune.from_pretrained`` when layers differ (plain loading fails loudly),
with equal outputs and greedy ``generate()`` tokens. Tiny models from configs; nothing is downloaded."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cache

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    ViTConfig,
    ViTModel,
)

import lightning_prune as lp
from lightning_prune.fusion.hf_config import LAYERS_KEY
from tests.checks import assert_outputs_match

VOCAB = 100


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def _qwen2():
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def _mixtral():
    """Experts are fused 3-D parameters no rule narrows (issue 19): the heads go, the experts stay."""
    return MixtralForCausalLM(MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2, max_position_embeddings=32))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


def _bert():
    return BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=16), add_pooling_layer=False)


def _vit():
    return ViTModel(ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=64), add_pooling_layer=False)


@dataclass
class Family:
    build: Callable
    auto: type
    #: what plain from_pretrained can say of a uniform prune: every layer's sizes, or the MLP only
    include: list[str] | None = None
    image: bool = False
    #: model arguments the saved weights need (BERT saved without its pooler)
    kwargs: dict = field(default_factory=dict)
    #: tensors left out of a prune: the residual stream's producers, so the hidden size stays (a pruned stream is
    #: written per layer: test_a_pruned_stream_keeps_the_dense_hidden_size_and_loads_with_the_loader)
    exclude: list[str] | None = None

    @property
    def generates(self) -> bool:
        return self.auto is AutoModelForCausalLM

    def inputs(self) -> torch.Tensor:
        torch.manual_seed(3)
        return torch.randn(2, 1, 8, 8) if self.image else torch.randint(1, VOCAB, (2, 8))


#: a decoder's residual stream producers (Mixtral's stream stays anyway: its experts are not narrowed)
STREAM = [r"model\.embed_tokens\.weight", r"lm_head\.weight", r".*\.(o_proj|down_proj)\.weight"]
FAMILIES = {
    "llama-gqa": Family(_llama, AutoModelForCausalLM, exclude=STREAM),
    "qwen2": Family(_qwen2, AutoModelForCausalLM, exclude=STREAM),
    "mixtral-heads": Family(_mixtral, AutoModelForCausalLM),
    "vit": Family(_vit, AutoModel, image=True, kwargs={"add_pooling_layer": False}),
    # GPT-2 and BERT derive the head size from hidden_size // heads: their keys say a narrower MLP, not fewer heads
    "gpt2": Family(_gpt2, AutoModelForCausalLM, include=[r".*\.mlp\.c_fc\.weight"]),
    "bert": Family(_bert, AutoModel, include=[r".*\.intermediate\.dense\.weight"],
                       kwargs={"add_pooling_layer": False}),
}
#: (family, include): some layers pruned, or all alike with fewer heads than GPT-2's and BERT's keys can say
UNEVEN = {
    "llama-gqa": ("llama-gqa", (r"model\.layers\.0\..*",)),
    "qwen2": ("qwen2", (r"model\.layers\.1\..*",)),
    "mixtral-heads": ("mixtral-heads", (r"model\.layers\.0\..*",)),
    "gpt2-heads": ("gpt2", None),
    "bert-heads": ("bert", None),
    "vit": ("vit", (r"layers\.0\..*",)),
}


def _output(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _generate(model, x):
    return model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)


@cache
def _pruned_once(name: str, include: tuple | None):
    """A pruned model shared by the tests that only read it (each prune exports the model: seconds)."""
    return _pruned(FAMILIES[name], None if include is None else list(include))


def _pruned(family: Family, include):
    torch.manual_seed(0)
    model = family.build().eval()
    x = family.inputs()
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, None, include=include, exclude=family.exclude if include is None else None,
                   example_inputs=(x,), exclude_output=True)
    pruner.step()
    masked = _output(model, x)
    pruner.prune()
    assert_outputs_match(masked, _output(model, x), rtol=1e-5)
    return model, x


def family_heads(name: str) -> str:
    return "n_head" if name == "gpt2" else "num_attention_heads"


def _saved_config(path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_uniform_prune_loads_with_plain_from_pretrained(name, tmp_path):
    family = FAMILIES[name]
    model, x = _pruned_once(name, None if family.include is None else tuple(family.include))
    dense = family.build().config
    model.save_pretrained(tmp_path)
    saved = _saved_config(tmp_path)
    assert LAYERS_KEY not in saved
    if family.include is None:  # heads, key/value heads and MLP width all said by the standard keys
        assert saved["num_attention_heads"] == dense.num_attention_heads // 2 and saved["head_dim"] == 8
        experts = name == "mixtral-heads"  # the experts keep their width
        assert saved["intermediate_size"] == dense.intermediate_size // (1 if experts else 2)
        assert saved.get("num_key_value_heads", 2) * 2 == getattr(dense, "num_key_value_heads", 4)
    else:
        key, width = ("n_inner", 4 * dense.n_embd) if name == "gpt2" else ("intermediate_size", dense.intermediate_size)
        assert saved[key] == width // 2 and saved[family_heads(name)] == 4
    loaded = family.auto.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert_outputs_match(_output(model, x), _output(loaded, x), rtol=1e-6)
    if family.generates:
        assert torch.equal(_generate(model, x), _generate(loaded, x))
    by_loader = lp.from_pretrained(tmp_path, family.auto)  # the loader takes what plain from_pretrained takes
    assert_outputs_match(_output(model, x), _output(by_loader, x), rtol=1e-6)


def test_a_uniform_prune_loads_in_a_process_that_never_imports_lightning_prune(tmp_path):
    model, x = _pruned_once("llama-gqa", None)
    model.save_pretrained(tmp_path / "model")
    torch.save({"x": x, "tokens": _generate(model, x)}, tmp_path / "expected.pt")
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'model')!r}).eval()\n"
        f"e = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "assert torch.equal(m.generate(e['x'], max_new_tokens=6, do_sample=False, pad_token_id=0), e['tokens'])\n"
        "assert 'lightning_prune' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("name", list(UNEVEN))
def test_layers_that_differ_are_written_per_layer_and_rebuilt_by_the_loader(name, tmp_path):
    family_name, include = UNEVEN[name]
    family = FAMILIES[family_name]
    model, x = _pruned_once(family_name, include)
    model.save_pretrained(tmp_path)
    saved = _saved_config(tmp_path)
    layers = saved[LAYERS_KEY]
    assert len(layers) == 2 and all("head_dim" in layer for layer in layers)
    if include is not None:
        assert layers[0] != layers[1]
    else:  # every layer alike, but fewer heads than hidden_size // head_dim: the keys cannot say it
        assert layers[0] == layers[1] and layers[0][family_heads(family_name)] == 2
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # loud, never a silent re-init
        family.auto.from_pretrained(tmp_path)
    loaded = lp.from_pretrained(tmp_path, family.auto, **family.kwargs)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.config.to_dict()[LAYERS_KEY] == layers
    assert_outputs_match(_output(model, x), _output(loaded, x), rtol=1e-6)
    if family.generates:
        assert torch.equal(_generate(model, x), _generate(loaded, x))


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_a_pruned_stream_keeps_the_dense_hidden_size_and_loads_with_the_loader(name, tmp_path):
    """The hidden size pruned too: no standard key says a narrower stream (GPT-2's head size and Gemma's embedding
    scale read hidden_size), so the config keeps it, plain loading fails loudly and the loader rebuilds the model,
    GPT-2's LM head still tied to its embedding."""
    family = FAMILIES[name]
    model, x = _pruned(replace(family, exclude=None, include=None), None)
    dense = family.build().config
    assert model.get_input_embeddings().weight.shape[1] == dense.hidden_size // 2
    model.save_pretrained(tmp_path)
    saved = _saved_config(tmp_path)
    assert saved["n_embd" if name == "gpt2" else "hidden_size"] == dense.hidden_size and LAYERS_KEY in saved
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # loud, never a silent re-init
        family.auto.from_pretrained(tmp_path)
    loaded = lp.from_pretrained(tmp_path, family.auto)
    assert_outputs_match(_output(model, x), _output(loaded, x), rtol=1e-6)
    assert torch.equal(_generate(model, x), _generate(loaded, x))
    if name == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_the_loader_refuses_a_directory_without_a_config(tmp_path):
    with pytest.raises(lp.PruningConfigError, match="config.json"):
        lp.from_pretrained(tmp_path)


def test_a_later_uniform_prune_clears_the_per_layer_record(tmp_path):
    model, x = _pruned(FAMILIES["llama-gqa"], [r"model\.layers\.0\..*"])
    assert hasattr(model.config, LAYERS_KEY)
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, None, include=[r"model\.layers\.1\..*"], example_inputs=(x,), exclude_output=True)
    pruner.step()
    pruner.prune()
    assert not hasattr(model.config, LAYERS_KEY)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    model.save_pretrained(tmp_path)
    assert_outputs_match(_output(model, x), _output(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), x))


def test_pruning_rewrites_a_copy_of_the_config_and_leaves_the_callers_object_alone():
    """A Hugging Face model holds the very config object it was built from: rewriting it in place narrowed every
    model built from it afterwards (and misdescribed dense ones built before)."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    before = config.to_dict()
    dense, model = LlamaForCausalLM(config), LlamaForCausalLM(config)
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, None, example_inputs=(torch.randint(0, VOCAB, (1, 8)),), exclude_output=True)
    pruner.step()
    pruner.prune()
    assert config.to_dict() == before and dense.config is config
    assert model.config is not config and model.model.config is model.config
    assert all(m.config is model.config for m in model.modules() if hasattr(m, "config"))
    assert getattr(model.config, LAYERS_KEY)[0]["num_attention_heads"] == 2
    fresh = LlamaForCausalLM(config)
    assert fresh.model.layers[0].mlp.gate_proj.weight.shape == (48, 32)
