"""Attention heads and FFN widths, pruned exactly: Hugging Face BERT, GPT-2, Llama (GQA), ViT, nn.MultiheadAttention
and hand-written attention, each built tiny. Every case checks exactness, that heads were removed, the q/k/v and FFN
widths at sparsity 0.5, and that ``load_pruned`` rebuilds the pruned model from a fresh dense one."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from lightning_prune import FPGMPruner, SaliencyPruner, load_pruned, register_layer
from lightning_prune.errors import UnsupportedPatternError
from lightning_prune.fusion.rules.mha import PrunedMultiheadAttention
from lightning_prune.measure import count_macs
from tests import transformer_models as tm
from tests.checks import assert_outputs_match


@pytest.fixture(autouse=True)
def _export_only_heads(rules) -> None:
    """The rule a user registers for the hand-written ExportOnlyAttention, for each test here only."""
    register_layer(tm.ExportOnlyAttention, tm.ExportOnlyHeads())


def _layers(model: nn.Module, kind: str) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__ == kind]


@dataclass
class Case:
    build: Callable
    #: weights whose rows are q/k/v outputs or FFN widths (rows along ``row_dim``)
    rows: str
    #: each attention layer's (query heads, key/value heads), from the module's attributes
    heads: Callable[[nn.Module], list[tuple[int, int]]]
    row_dim: int = 0


def _llama_heads(model: nn.Module) -> list[tuple[int, int]]:
    return [(a.q_proj.out_features // a.head_dim, a.k_proj.out_features // a.head_dim)
            for a in _layers(model, "LlamaAttention")]


def _bert_heads(model: nn.Module) -> list[tuple[int, int]]:
    return [(a.num_attention_heads,) * 2 for a in _layers(model, "BertSelfAttention")]


BERT_ROWS = r".*\.(query|key|value|intermediate\.dense)\.weight"
LLAMA_ROWS = r".*\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight"
MHA_ROWS = r"(attn\.in_proj_weight|fc1\.weight)"
CASES = {
    "bert": Case(tm.bert, BERT_ROWS, _bert_heads),
    "bert-eager-matmul": Case(lambda: tm.bert(attn_implementation="eager"), BERT_ROWS, _bert_heads),
    "gpt2": Case(tm.gpt2, r".*\.(c_attn|c_fc)\.weight",
                 lambda m: [(a.num_heads,) * 2 for a in _layers(m, "GPT2Attention")], row_dim=1),
    "llama": Case(tm.llama, LLAMA_ROWS, _llama_heads),
    "llama-eager-matmul": Case(lambda: tm.llama(attn_implementation="eager"), LLAMA_ROWS, _llama_heads),
    "llama-padding-repeat-kv": Case(tm.llama_padded, LLAMA_ROWS, _llama_heads),
    "vit": Case(tm.vit, r".*\.(q_proj|k_proj|v_proj|fc1)\.weight",
                lambda m: [(a.num_attention_heads,) * 2 for a in _layers(m, "ViTAttention")]),
    "mha": Case(tm.mha, MHA_ROWS, lambda m: [(m.attn.num_heads,) * 2]),
    "mha-seq-first": Case(lambda: tm.mha(batch_first=False), MHA_ROWS, lambda m: [(m.attn.num_heads,) * 2]),
    "hand-sdpa": Case(tm.hand, r"(qkv|fc1)\.weight", lambda m: [(m.qkv.out_features // 24,) * 2]),
    "hand-matmul": Case(lambda: tm.hand(sdpa=False), r"(qkv|fc1)\.weight",
                        lambda m: [(m.qkv.out_features // 24,) * 2]),
    "hand-export": Case(tm.export_only, r"(q|k|v)\.weight", lambda m: [(m.n_heads,) * 2]),
}


def _run(model: nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return tm.output(model(*inputs))


def _prune(case: Case, pruner=None):
    """Prepare (config=None, classifier excluded), step, prune; returns model, inputs, dense, masked, pruned."""
    model, inputs = case.build()
    dense = _run(model, inputs)
    pruner = pruner or SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, None, example_inputs=inputs, exclude_output=True)
    pruner.step()
    masked = _run(model, inputs)
    assert pruner.prune() is model
    return model, inputs, dense, masked, _run(model, inputs)


@pytest.mark.parametrize("name", list(CASES))
def test_heads_and_ffn_pruned_exactly_and_reloaded(name):
    case = CASES[name]
    model, _ = case.build()
    rows = {n: p.shape[case.row_dim] for n, p in model.named_parameters() if re.fullmatch(case.rows, n)}
    heads = case.heads(model)
    model, inputs, dense, masked, pruned = _prune(case)
    assert not torch.allclose(dense, masked), "the masks changed nothing"
    assert_outputs_match(masked, pruned, rtol=1e-4)
    params = dict(model.named_parameters())
    for fqn, before in rows.items():
        assert params[fqn].shape[case.row_dim] <= 0.6 * before, f"{fqn} kept {params[fqn].shape} of {before}"
    after = case.heads(model)
    assert all(a[0] < b[0] and a[1] <= b[1] for a, b in zip(after, heads, strict=True)), (heads, after)

    torch.manual_seed(1)
    fresh, _ = case.build()
    assert load_pruned(fresh, model.state_dict()) is fresh
    assert case.heads(fresh) == after
    assert_outputs_match(pruned, _run(fresh.eval(), inputs), rtol=1e-6)


def test_layers_keep_their_own_head_counts_through_save_and_reload(tmp_path):
    model, inputs = tm.bert()
    config = [{"tensor_fqn": f"encoder.layer.{i}.attention.self.{p}.weight", "sparsity_level": level}
              for i, level in ((0, 0.5), (1, 0.25)) for p in ("query", "key", "value")]
    pruner = SaliencyPruner()
    pruner.prepare(model, config, example_inputs=inputs)
    pruner.step()
    masked = _run(model, inputs)
    pruner.prune()
    attention = _layers(model, "BertSelfAttention")
    assert [(a.num_attention_heads, a.all_head_size) for a in attention] == [(2, 16), (3, 24)]
    assert_outputs_match(masked, _run(model, inputs), rtol=1e-4)
    torch.save(model.state_dict(), tmp_path / "pruned.pt")
    fresh, _ = tm.bert()
    load_pruned(fresh, tmp_path / "pruned.pt")
    assert [(a.num_attention_heads, a.all_head_size) for a in _layers(fresh, "BertSelfAttention")] == [(2, 16), (3, 24)]
    assert_outputs_match(masked, _run(fresh, inputs), rtol=1e-4)


@pytest.mark.parametrize("name", ["bert", "bert-eager-matmul", "gpt2"])
def test_without_bias_masking_a_removed_head_folds_its_value_bias(name):
    model, inputs = CASES[name].build()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(-1.0, 1.0)  # biases far from zero, so a missed fold shows
    pruner = SaliencyPruner(sparsity_level=0.5, prune_bias=False)
    pruner.prepare(model, None, example_inputs=inputs, exclude_output=True)
    pruner.step()
    masked = _run(model, inputs)
    pruner.prune()
    assert CASES[name].heads(model)[0][0] == 2
    assert_outputs_match(masked, _run(model, inputs), rtol=1e-4)


@pytest.mark.parametrize("pruner", [SaliencyPruner, FPGMPruner])
def test_pruners_remove_whole_heads_and_whole_gqa_groups(pruner):
    model, inputs = tm.llama()
    p = pruner(sparsity_level=0.5)
    p.prepare(model, None, example_inputs=inputs, exclude_output=True)
    attention = next(g for g in p.plan.channel_groups() if any("q_proj" in m.tensor_fqn for m in g.members))
    assert len(attention.classes) == 2  # two GQA groups: each = one kv head and its two query heads
    p.step()
    masks = {g["tensor_fqn"].split(".")[-2]: p.state[g["tensor_fqn"]]["mask"] for g in p.groups
             if ".layers.0." in f".{g['tensor_fqn']}"}
    q = masks["q_proj"].view(4, 8)  # 4 query heads of 8 rows
    kv = [masks[k].view(2, 8) for k in ("k_proj", "v_proj")]
    assert (q == q[:, :1]).all() and all((m == m[:, :1]).all() for m in kv), "a head was split"
    assert torch.equal(q[:, 0], kv[0][:, 0].repeat_interleave(2)) and torch.equal(kv[0], kv[1])
    assert int(q[:, 0].sum()) == 2


def test_dry_run_refuses_a_literal_head_count_in_an_exported_graph_and_leaves_the_model_alone():
    model, inputs = tm.export_only(literal=True)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(UnsupportedPatternError, match=r"breaks the model's forward at .*transformer_models\.py"):
        SaliencyPruner().prepare(model, [{"tensor_fqn": "q.weight"}, {"tensor_fqn": "k.weight"},
                                         {"tensor_fqn": "v.weight"}], example_inputs=inputs)
    after = model.state_dict()
    assert all(after[n].device.type == "cpu" and torch.equal(after[n], t) for n, t in before.items())
    pruner = SaliencyPruner()
    pruner.prepare(model, None, example_inputs=inputs, exclude_output=True)
    assert "q.weight" in pruner.plan.dropped and "o.weight" not in pruner.plan.dropped


def test_pruned_multihead_attention_matches_the_masked_one_for_every_option():
    model, inputs = tm.mha()
    pruner = SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, None, example_inputs=inputs, exclude_output=True)
    pruner.step()
    x = torch.randn(2, 6, 16)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    padding = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    calls = [{}, {"need_weights": False}, {"attn_mask": causal}, {"attn_mask": causal.float() * -1e4},
             {"key_padding_mask": padding, "need_weights": False}, {"attn_mask": causal, "is_causal": True}]

    def run():
        with torch.no_grad():
            return [model.attn(x, x, x, **kwargs)[0] for kwargs in calls] + [model.attn(x[0], x[0], x[0])[0]]

    masked = run()
    pruner.prune()
    attn = model.attn
    assert type(attn) is PrunedMultiheadAttention and isinstance(attn, nn.MultiheadAttention)
    assert (attn.num_heads, attn.head_dim, attn.embed_dim) == (2, 4, 16)
    for expected, got in zip(masked, run(), strict=True):
        assert_outputs_match(expected, got)
    assert attn(x, x, x, average_attn_weights=False)[1].shape == (2, 2, 6, 6)


def test_attention_weights_that_are_used_keep_the_heads():
    class ReturnsWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, x):
            out, weights = self.attn(x, x, x)
            return out, weights

    model = ReturnsWeights()
    with pytest.raises(UnsupportedPatternError, match="averaged over its heads"):
        SaliencyPruner().prepare(model, [{"tensor_fqn": "attn.in_proj_weight"}])


def test_vit_digits_trains_with_the_callback_and_is_pruned_exactly_at_fit_end():
    """The app's model=hf_vit_digits: a transformers ViT read through torch.export from the module's
    example_input_array; heads and MLP widths go at fit end, checked by verify=True."""
    from lightning.pytorch import Trainer

    from lightning_prune import StructuredPruning
    from lightning_prune.app import DigitsDataModule, LitClassifier
    from lightning_prune.app.hf import vit_digits

    datamodule = DigitsDataModule(batch_size=32)
    datamodule.setup()
    module = LitClassifier(vit_digits(hidden_size=32, num_layers=1, intermediate_size=64),
                           lambda params: torch.optim.AdamW(params, lr=3e-3))
    module.example_input_array = datamodule.example_input(8)
    pruning = StructuredPruning(SaliencyPruner(sparsity_level=0.5), schedule="oneshot", start_step=2, verify=True)
    trainer = Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[pruning])
    trainer.fit(module, datamodule=datamodule)
    layer = module.net.model.vit.layers[0]
    assert pruning.fused and layer.attention.num_attention_heads == 2 and layer.mlp.fc1.out_features == 32
    assert module.net.model.classifier.out_features == 10
    assert module(datamodule.example_input(4)).shape == (4, 10)


def test_a_per_head_mask_computed_at_run_time_keeps_the_heads():
    class PerHeadMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = nn.Linear(16, 48), nn.Linear(16, 16)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (p.view(b, t, -1, 4).transpose(1, 2) for p in self.qkv(x).chunk(3, -1))
            bias = torch.arange(4.0).view(1, 4, 1, 1) * torch.ones(t, t)  # one bias per head, made at run time
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            return self.out(y.transpose(1, 2).reshape(b, t, -1))

    with pytest.raises(UnsupportedPatternError, match="per-head mask"):
        SaliencyPruner().prepare(PerHeadMask(), [{"tensor_fqn": "qkv.weight"}], example_inputs=torch.randn(2, 5, 16))


def test_the_transformer_example_prunes_heads_exactly_and_reloads(capsys):
    import runpy

    runpy.run_path("examples/transformer_heads.py", run_name="__main__")
    printed = capsys.readouterr().out
    assert "group-of-32/16" in printed and "query heads per layer 4 -> 2" in printed
    assert "hidden size 64 -> 32" in printed and "same logits = True" in printed
    assert float(re.search(r"max \|masked - pruned\| (\S+)", printed).group(1)) < 1e-5


@pytest.mark.parametrize("build", [tm.gpt2, tm.llama], ids=["gpt2", "llama"])
def test_decoders_with_their_default_cache_are_read_without_it_and_run_with_it_after(build):
    """``use_cache=True`` (the configs' default) makes forward return a cache object export cannot return: the
    analysis reads the forward without one, and the pruned model still fills and uses a cache."""
    model, (ids,) = build()
    assert model.config.use_cache
    pruner = SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, None, example_inputs=(ids,), exclude_output=True)
    pruner.step()
    with torch.no_grad():
        masked = model(ids).last_hidden_state
    pruner.prune()
    with torch.no_grad():
        first = model(ids[:, :-1], use_cache=True)
        last = model(ids[:, -1:], past_key_values=first.past_key_values, use_cache=True).last_hidden_state
    assert_outputs_match(masked[:, -1:], last, rtol=1e-4)


class TorchEncoder(nn.Module):
    """torch's own transformer blocks, as a classifier over a padded batch of sequences."""

    def __init__(self, kind: str):
        super().__init__()
        self.embed, self.head = nn.Linear(8, 16), nn.Linear(16, 3)
        def layer(**options):
            return nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, **options)
        self.blocks = {"layer": lambda: layer(), "norm_first": lambda: layer(norm_first=True, activation="gelu"),
                       "stack": lambda: nn.TransformerEncoder(layer(), 2),  # nested tensors on by default
                       "decoder": lambda: nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)}[kind]()
        self.kind = kind

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = self.blocks(h, h) if self.kind == "decoder" else self.blocks(h, src_key_padding_mask=padding)
        return self.head(h.mean(1))


@pytest.mark.parametrize("kind", ["layer", "norm_first", "stack", "decoder"])
def test_torch_transformer_blocks_lose_heads_ffn_width_and_hidden_size_exactly(kind):
    """Read op by op through torch.export; in eval mode without grad torch runs a fused kernel (and, in a stack with
    a padding mask, nested tensors) that only takes full width: the masked and pruned models both leave it."""
    torch.manual_seed(0)
    model, x = TorchEncoder(kind).eval(), torch.randn(2, 5, 8)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    pruner = SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, None, exclude_output=True, example_inputs=(x, padding))
    pruner.plan.sparsity_level = 0.5
    plan = pruner.plan.to_dict()
    assert {g["granularity"] for g in plan["groups"] if g["removable"]} == {"group-of-12", "channel"}
    pruner.step()
    with torch.no_grad():
        masked = model(x, padding)
    pruner.prune()
    with torch.no_grad():
        assert_outputs_match(masked, model(x, padding))
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    stream = 16 if kind == "decoder" else 8  # cross-attention reads memory apart from its queries: the stream stays
    assert attention and all(a.num_heads == 2 and a.embed_dim == stream for a in attention)
    assert model.embed.out_features == stream and model.head.in_features == stream  # the LayerNorms' stream
    assert all(m.linear1.out_features == 16 for m in model.modules() if hasattr(m, "linear1"))
    assert plan["macs"]["pruned"] == count_macs(model, (x, padding))  # attention's MACs follow its heads
    fresh = load_pruned(TorchEncoder(kind).eval(), model.state_dict())
    with torch.no_grad():
        assert_outputs_match(masked, fresh(x, padding))


def test_torch_transformer_blocks_without_example_inputs_are_one_call_and_say_why():
    model = TorchEncoder("stack")
    with pytest.raises(UnsupportedPatternError, match=r"TransformerEncoder 'blocks' .* is read as one call without "
                                                      r"example inputs .*pass example_inputs to prune inside it"):
        SaliencyPruner().prepare(model, [{"tensor_fqn": "embed.weight"}])
