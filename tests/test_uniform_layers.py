"""``allocation="uniform_layers"``: every layer of a stack keeps the same widths, with ``sparsity_level`` or a budget,
in every built-in pruner, the Hydra app and ``explain()``; a Hugging Face model so pruned loads with plain
``from_pretrained``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lightning_prune as lp
from lightning_prune.errors import PruningConfigError
from lightning_prune.fusion.alike import common_removals, signature
from lightning_prune.fusion.hf_config import LAYERS_KEY
from tests.checks import assert_outputs_match

CONF_DIR = Path(__file__).resolve().parents[1] / "lightning_prune" / "app" / "conf"


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class SlicedBlock(Block):
    """Its first 16 hidden channels also feed the residual stream, so only the other 16 can go."""

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return x + self.fc2(h) + h[:, :16]


class Stack(nn.Module):
    """Three residual MLP blocks with a head: their hidden widths are alike across layers (the middle one, when
    ``sliced``, has fewer channels that can go)."""

    def __init__(self, sliced: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Block(), SlicedBlock() if sliced else Block(), Block()])
        with torch.no_grad():  # layers of different magnitude, so a global ranking would treat them differently
            for i, block in enumerate(self.layers):
                block.fc1.weight.mul_(1 + 2 * i)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.head(x)


CONFIG = [{"tensor_fqn": f"layers.{i}.fc1.weight"} for i in range(3)]


def _widths(model: Stack) -> list[int]:
    return [block.fc1.out_features for block in model.layers]


def _prune(pruner, model=None):
    model = model or Stack().eval()
    x = torch.randn(8, 16)
    pruner.prepare(model, CONFIG, example_inputs=(x,))
    pruner.step()
    masked = model(x)
    pruner.prune()
    assert_outputs_match(masked, model(x))
    return model


def test_signatures_ignore_layer_indices_only():
    assert signature(["model.layers.3.mlp.up_proj.weight", "model.layers.3.mlp.gate_proj.weight"], 24) == \
        signature(["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"], 24)
    assert signature(["0.weight"], 8) == signature(["2.weight"], 8) != signature(["2.weight"], 4)
    assert signature(["layers.0.fc1.weight"], 8) != signature(["layers.0.fc2.weight"], 8)
    assert common_removals([4, 2, 3], [("a",), ("a",), ("b",)]) == [2, 2, 3]


def test_with_a_sparsity_level_each_family_removes_what_its_most_constrained_layer_can():
    assert _widths(_prune(lp.SaliencyPruner(sparsity_level=0.5), Stack(sliced=True).eval())) == [16, 24, 16]
    model = _prune(lp.SaliencyPruner(sparsity_level=0.5, allocation="uniform_layers"), Stack(sliced=True).eval())
    assert _widths(model) == [24, 24, 24]  # half of the middle layer's 16 removable channels, from every layer
    levels = [{**entry, "sparsity_level": level} for level, entry in zip((0.5, 0.25, 0.75), CONFIG, strict=True)]
    model, x = Stack().eval(), torch.randn(8, 16)
    pruner = lp.SaliencyPruner(allocation="uniform_layers")
    pruner.prepare(model, levels, example_inputs=(x,))
    pruner.step()
    pruner.prune()
    assert _widths(model) == [24, 24, 24]  # 0.25 of 32 from each, the least any layer asked for


@pytest.mark.parametrize("make", [
    lambda **kw: lp.SaliencyPruner(**kw), lambda **kw: lp.FPGMPruner(**kw),
    lambda **kw: lp.LSTMSaliencyPruner(tie_gates=True, **kw),
], ids=["saliency", "fpgm", "lstm_saliency"])
def test_a_budget_keeps_every_layer_alike_and_lands_at_the_target(make):
    model = _prune(make(target={"params": 0.6}, allocation="uniform_layers"))
    widths = _widths(model)
    assert len(set(widths)) == 1 and widths[0] < 32
    dense = sum(p.numel() for p in Stack().parameters())
    assert 0.5 < sum(p.numel() for p in model.parameters()) / dense <= 0.6


def test_a_global_budget_differs_per_layer_where_uniform_layers_does_not():
    global_widths = _widths(_prune(lp.SaliencyPruner(target={"params": 0.6, "allocation": "global"})))
    assert len(set(global_widths)) > 1, global_widths  # what uniform_layers exists to prevent
    assert len(set(_widths(_prune(lp.SaliencyPruner(target={"params": 0.6, "allocation": "uniform_layers"}))))) == 1


@pytest.mark.parametrize("make", [lp.TaylorPruner, lp.ActivationPruner])
def test_pruners_that_learn_from_the_run_keep_layers_alike(make):
    model, x = Stack(), torch.randn(8, 16)
    pruner = make(target={"params": 0.6}, allocation="uniform_layers")
    pruner.prepare(model, CONFIG, example_inputs=(x,))
    model(x).square().mean().backward()  # one training-mode sample for the hooks
    pruner.step()
    pruner.prune()
    assert len(set(_widths(model))) == 1 and _widths(model)[0] < 32


def test_bad_allocations_are_refused_naming_the_choices():
    with pytest.raises(PruningConfigError, match=r"allocation must be one of \['auto', 'global', 'uniform', "
                                                 r"'uniform_layers'\], got 'layers'"):
        lp.SaliencyPruner(sparsity_level=0.5, allocation="layers")
    with pytest.raises(PruningConfigError, match="'global' ranks classes across layers under a cost budget"):
        lp.FPGMPruner(sparsity_level=0.5, allocation="global")
    with pytest.raises(PruningConfigError, match="contradicts the target's allocation='global'"):
        lp.SaliencyPruner(target={"macs": 0.5, "allocation": "global"}, allocation="uniform_layers")
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    with pytest.raises(PruningConfigError, match=r"remove it from the config entries for \['layers.0.fc1.weight'\]"):
        pruner.prepare(Stack(), [{**CONFIG[0], "allocation": "uniform_layers"}], example_inputs=(torch.randn(2, 16),))


def test_the_hydra_app_passes_it_to_the_pruner_and_the_budget(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+pruner.allocation=uniform_layers", "+target.params=0.5",
                                           f"output_dir={tmp_path}"])
    callback = instantiate(cfg.callbacks.pruning)
    assert callback.pruner.budget == lp.Budget(params=0.5, allocation="uniform_layers")


def test_explain_sizes_follow_uniform_layers():
    def planned(allocation):
        plan = lp.explain(Stack(sliced=True), CONFIG, example_inputs=torch.randn(2, 16), allocation=allocation,
                          exclude_output=False)
        return plan, plan.to_dict()["params"]["pruned"]

    def pruned(allocation):
        model = _prune(lp.SaliencyPruner(sparsity_level=0.5, allocation=allocation), Stack(sliced=True).eval())
        return sum(p.numel() for p in model.parameters())

    plan, alike = planned("uniform_layers")
    assert "sparsity 0.5, uniform_layers" in str(plan) and plan.to_dict()["allocation"] == "uniform_layers"
    assert alike == pruned("uniform_layers") > planned("auto")[1] == pruned("auto")
    with pytest.raises(PruningConfigError, match="allocation"):
        lp.explain(Stack(), CONFIG, allocation="global")


def test_a_budgeted_llama_loads_with_plain_from_pretrained(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    x = torch.randint(0, 100, (2, 8))
    pruner = lp.SaliencyPruner(target={"macs": 0.6}, allocation="uniform_layers")
    stream = [r".*\.(embed_tokens|o_proj|down_proj)\.weight", r"lm_head\.weight"]  # hidden_size says no narrower one
    pruner.prepare(model.eval(), None, exclude=stream, example_inputs=(x,), exclude_output=True)
    pruner.step()
    pruner.prune()
    assert pruner.budget_reached <= 0.6
    assert not hasattr(model.config, LAYERS_KEY)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_outputs_match(model(x).logits, loaded(x).logits, rtol=1e-6)
    assert torch.equal(model.generate(x, max_new_tokens=4, do_sample=False),
                       loaded.generate(x, max_new_tokens=4, do_sample=False))
