"""Prune attention heads, MLP widths and the hidden size of a Hugging Face Llama (grouped-query attention) exactly,
without Lightning.

Run: python examples/transformer_heads.py   (a few seconds on 2 CPU cores; needs transformers)

A tiny LlamaForCausalLM is built from a config (nothing is downloaded): 4 query heads share 2 key/value heads, the
MLP is SwiGLU. torch.fx cannot trace transformers, so the example inputs let the analysis read it through
torch.export. The plan shows the channel groups (a key/value head is a group-of-k with its query heads; the residual
stream is one group from the embedding to the LM head, its RMSNorms rescaled at fusion); half of them go, the pruned
model computes what the masked one did, its config says the new head counts and widths (the hidden size key keeps
the dense width), and the pruned state dict reloads into a fresh dense model.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lightning_prune as lp


def build() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, use_cache=False)
    return LlamaForCausalLM(config).eval()


def main() -> None:
    torch.manual_seed(0)
    model = build()
    tokens = torch.randint(0, 128, (2, 16))
    print(lp.explain(model, example_inputs=(tokens,)))  # nothing changes yet

    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, None, exclude_output=True, example_inputs=(tokens,))
    pruner.step()
    with torch.no_grad():
        masked = model(tokens).logits
    dense_params, dense_heads = sum(p.numel() for p in model.parameters()), model.config.num_attention_heads
    pruner.prune()  # every layer alike, so the config follows: save_pretrained output loads with from_pretrained
    with torch.no_grad():
        pruned = model(tokens).logits
    attention = model.model.layers[0].self_attn
    print(f"params {dense_params:,} -> {sum(p.numel() for p in model.parameters()):,}; "
          f"query heads per layer {dense_heads} -> {attention.q_proj.out_features // 16} "
          f"(config: {model.config.num_attention_heads}), "
          f"hidden size {model.config.hidden_size} -> {model.model.embed_tokens.embedding_dim}, "
          f"max |masked - pruned| {(masked - pruned).abs().max().item():.2e}")

    reloaded = lp.load_pruned(build(), model.state_dict())  # a fresh dense model narrowed to the saved shapes
    with torch.no_grad():
        print(f"reloaded into a fresh model: same logits = {torch.equal(reloaded(tokens).logits, pruned)}")


if __name__ == "__main__":
    main()
