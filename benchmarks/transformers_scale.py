"""Scale: a Llama-architecture model of about 1B parameters, built from a config in bf16: prepare + step + prune.

    python benchmarks/transformers_scale.py [--layers 16] [--out benchmarks/transformers_scale.json]

The architecture is Llama-3.2-1B's (hidden 2048, 16 layers, 32 query heads, 8 key/value heads, SwiGLU 8192, a tied
128256-token embedding: 1.24B parameters, 2.47 GB in bf16), with random weights; nothing is downloaded.
``SaliencyPruner(sparsity_level=0.5)`` with ``config=None`` and ``exclude_output=True`` takes every attention block's
heads (whole GQA groups) and every SwiGLU width; the residual stream stays (RMSNorm). Reported: wall time of each
phase and the peak resident memory above the built model (sampled every 5 ms), against the model's size. Fewer
``--layers`` give a smaller model of the same shape per layer.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lightning_prune.sparsifier import SaliencyPruner  # noqa: E402


def rss() -> int:
    """Resident set size of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRSS:
    """Samples the resident set size in a thread while the block runs."""

    def __enter__(self):
        self.peak, self._stop = rss(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def build(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, use_cache=False)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    return model


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    started = time.perf_counter()
    model = build(args.layers)
    built_s = time.perf_counter() - started
    params = sum(p.numel() for p in model.parameters())
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    ids = torch.randint(0, 128256, (1, 8))
    baseline = rss()
    times = {}
    with PeakRSS() as peak:
        pruner = SaliencyPruner(sparsity_level=0.5)
        for phase, run in (("prepare", lambda: pruner.prepare(model, None, example_inputs=(ids,),
                                                              exclude_output=True)),
                           ("step", pruner.step), ("prune", pruner.prune)):
            start = time.perf_counter()
            run()
            times[phase] = round(time.perf_counter() - start, 2)
    after = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        logits = model(ids).logits
    result = {
        "layers": args.layers, "params": params, "params_after": after, "model_bytes": size,
        "build_s": round(built_s, 1), **{f"{k}_s": v for k, v in times.items()},
        "total_s": round(sum(times.values()), 2),
        "peak_above_model_bytes": peak.peak - baseline,
        "peak_over_model": round((peak.peak - baseline + size) / size, 3),
        "baseline_rss_bytes": baseline, "members": len(pruner.groups),
        "runs_after": bool(torch.isfinite(logits).all()),
        "heads_layer0": (model.model.layers[0].self_attn.q_proj.out_features // 64,
                         model.model.layers[0].self_attn.k_proj.out_features // 64),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
