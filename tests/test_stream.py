"""The residual stream (the hidden size) pruned exactly: one channel group from the embedding to the head, through
RMSNorms (rescaled at fusion) and LayerNorms (masked statistics while masked). Tiny Hugging Face models with their
heads (the stream must not be the output), torch's and a ConvNeXt-style block; each is exact, halves the hidden size
and reloads with ``load_pruned``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

import lightning_prune as lp
from lightning_prune.errors import UnsupportedPatternError
from tests.checks import assert_outputs_match

DECODER = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=16)


def _ids():
    return (torch.randint(0, 50, (2, 8)),)


def _bert():
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(config), _ids()


def _gpt2():  # its LM head is tied to the token embedding
    config = GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config), _ids()


def _vit():  # class token and position embeddings join the patch embedding's channels
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=64, num_labels=10)
    return ViTForImageClassification(config), (torch.randn(2, 1, 8, 8),)


BUILDS = {
    "llama-gqa": lambda: (LlamaForCausalLM(LlamaConfig(**DECODER)), _ids()),
    "qwen2": lambda: (Qwen2ForCausalLM(Qwen2Config(**DECODER)), _ids()),
    "gemma": lambda: (GemmaForCausalLM(GemmaConfig(**DECODER, head_dim=8)), _ids()),  # (1 + weight), scaled embedding
    "mistral": lambda: (MistralForCausalLM(MistralConfig(**DECODER)), _ids()),
    "bert": _bert,
    "gpt2-tied": _gpt2,
    "vit": _vit,
}


def _build(name):
    torch.manual_seed(0)
    model, inputs = BUILDS[name]()
    with torch.no_grad():  # norms far from their init, so a wrong rescale or offset shows
        for module in model.modules():
            if "Norm" in type(module).__name__ and isinstance(getattr(module, "weight", None), torch.Tensor):
                module.weight.uniform_(0.5, 1.5)
                if isinstance(getattr(module, "bias", None), torch.Tensor):
                    module.bias.uniform_(-0.5, 0.5)
    return model.eval(), inputs


def _out(model, inputs):
    with torch.no_grad():
        return model(*inputs).logits


def _hidden(model) -> int:
    """The stream's width, read from the embedding (a ViT's patch projection)."""
    embedding = model.get_input_embeddings()
    return embedding.embedding_dim if isinstance(embedding, nn.Embedding) else embedding.projection.out_channels


@pytest.mark.parametrize("name", list(BUILDS))
def test_the_stream_is_one_group_pruned_exactly_and_reloaded(name):
    model, inputs = _build(name)
    hidden = _hidden(model)
    plan = lp.explain(model, example_inputs=inputs).to_dict()
    stream = [g for g in plan["groups"] if any(
        p.endswith(("embed_tokens.weight", "word_embeddings.weight", "wte.weight", "projection.weight"))
        for p in g["producers"])]
    assert len(stream) == 1 and stream[0]["removable"] == hidden, stream  # one group, wholly removable
    assert len(stream[0]["producers"]) >= 5  # the embedding, every block's output and down projections
    assert len(stream[0]["norms"]) == 5  # two per layer and the final norm: RMSNorms or LayerNorms

    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, None, example_inputs=inputs, exclude_output=True)
    pruner.step()
    masked = _out(model, inputs)
    dense_macs = plan["macs"]["dense"]
    assert pruner.prune() is model
    pruned = _out(model, inputs)
    assert_outputs_match(masked, pruned)
    assert _hidden(model) <= 0.55 * hidden
    assert lp.measure.count_macs(model, inputs) <= 0.30 * dense_macs
    if name == "gpt2-tied":
        assert model.lm_head.weight is model.transformer.wte.weight  # the tie survives, narrowed once
    assert not any(model._forward_hooks for model in model.modules())  # the LayerNorms' hooks are gone

    fresh, _ = _build(name)
    assert lp.load_pruned(fresh, model.state_dict()) is fresh
    assert_outputs_match(pruned, _out(fresh, inputs), rtol=1e-6)


class LayerNorm2d(nn.LayerNorm):
    """timm's / torchvision's LayerNorm2d: normalises the channels of (N, C, H, W)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """timm's ConvNeXtBlock (conv_mlp=False): depthwise 7x7, channels-last LayerNorm, MLP, layer scale, residual."""

    def __init__(self, c: int):
        super().__init__()
        self.conv_dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        h = self.conv_dw(x).permute(0, 2, 3, 1)
        h = self.fc2(F.gelu(self.fc1(self.norm(h)))) * self.gamma
        return x + h.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 2, stride=2), LayerNorm2d(16))
        self.blocks = nn.Sequential(ConvNeXtBlock(16), ConvNeXtBlock(16))
        self.norm, self.head = nn.LayerNorm(16), nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.stem(x)).mean((2, 3))))


@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "keep_bias"])
def test_a_convnext_stream_through_layernorm2d_and_channels_last_layernorms_is_pruned_exactly(prune_bias):
    """With ``prune_bias=False`` too: a LayerNorm's stream masks its producers' biases anyway (a removed channel's
    bias would meet the depthwise conv's zero padding and have to stay, inside statistics that left it out)."""
    torch.manual_seed(0)
    model, x = ConvNeXt().eval(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    rules = {LayerNorm2d: lp.LayerNormRule(channel_dim=1)}  # a LayerNorm2d of your own, as timm's is registered
    pruner = lp.SaliencyPruner(sparsity_level=0.5, rules=rules, prune_bias=prune_bias)
    pruner.prepare(model, None, example_inputs=(x,), exclude_output=True)
    pruner.step()
    with torch.no_grad():
        masked = model(x)
    pruner.prune()
    with torch.no_grad():
        assert_outputs_match(masked, model(x))
    assert model.stem[0].out_channels == 8 and model.stem[1].normalized_shape == (8,)
    assert model.blocks[1].conv_dw.groups == 8 and model.head.in_features == 8 and model.blocks[0].gamma.numel() == 8


class NormedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


def test_a_masked_layernorm_takes_its_statistics_over_the_kept_channels_while_training():
    torch.manual_seed(0)
    model, x = NormedMLP(), torch.randn(6, 8)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.uniform_(-0.5, 0.5)
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, [{"tensor_fqn": "fc1.weight"}], example_inputs=(x,))
    pruner.step()
    keep = pruner.state["fc1.weight"]["mask"].clone()
    assert 0 < keep.sum() < 16
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    spy = model.norm.register_forward_hook(lambda m, a, out: seen.append(
        (a[0].detach(), out.detach(), m.weight.detach().clone(), m.bias.detach().clone())))
    for _ in range(2):  # training steps: the statistics stay over the kept channels, masked channels at zero
        model.train()
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
        h, out, weight, bias = seen[-1]
        assert torch.equal(out[:, ~keep], torch.zeros_like(out[:, ~keep]))
        assert torch.equal(h[:, ~keep], torch.zeros_like(h[:, ~keep]))
        expected = F.layer_norm(h[:, keep], (int(keep.sum()),), weight[keep], bias[keep])
        assert_outputs_match(expected, out[:, keep], rtol=1e-6)
    spy.remove()
    assert set(model.norm.state_dict()) == {"parametrizations.weight.original", "parametrizations.bias.original"}

    twin = NormedMLP()  # masks are state: a state_dict restores them, and with them the statistics
    twin_pruner = lp.SaliencyPruner(sparsity_level=0.5)
    twin_pruner.prepare(twin, [{"tensor_fqn": "fc1.weight"}], example_inputs=(x,))
    twin.load_state_dict(model.state_dict())
    model.eval(), twin.eval()
    with torch.no_grad():
        masked = model(x)
        assert_outputs_match(masked, twin(x), rtol=1e-7)
    pruner.prune()
    with torch.no_grad():
        assert_outputs_match(masked, model(x))
    assert model.norm.normalized_shape == (int(keep.sum()),) and not model.norm._forward_hooks


@pytest.mark.parametrize("eps", [None, 1e-5])
def test_an_rmsnorm_over_zeros_equals_the_narrower_rescaled_one(eps):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.RMSNorm(16, eps=eps), nn.Linear(16, 4))
    x = torch.randn(5, 8) * 1e-3  # small activations, so epsilon matters
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, [{"tensor_fqn": "0.weight"}], example_inputs=(x,))
    pruner.step()
    with torch.no_grad():
        masked = model(x)
    pruner.prune()
    with torch.no_grad():
        assert_outputs_match(masked, model(x), rtol=1e-6)
    assert model[1].normalized_shape == (8,)
    assert model[1].eps == pytest.approx((eps or torch.finfo(torch.float32).eps) * 2)


def test_a_norm_over_more_than_the_channels_is_still_refused_naming_it():
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.LayerNorm([8, 6]), nn.Flatten(), nn.Linear(48, 2))
    with pytest.raises(UnsupportedPatternError, match="LayerNorm"):
        lp.SaliencyPruner().prepare(model, [{"tensor_fqn": "0.weight"}], example_inputs=(torch.randn(2, 4, 8),))
