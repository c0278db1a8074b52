"""Size after 50% structured pruning: dense vs lightning_prune vs Torch-Pruning, measured in one run.

    python benchmarks/sizes.py [--quick]

For each model in benchmarks/models.py and each CNN family replica in benchmarks/families.py, every conv/linear
except the final classifier is pruned at 50%: ours with ``SaliencyPruner`` (L1 row norms, coupled sets decided
together, the example input given so shapes are known), Torch-Pruning with its MagnitudePruner and L1 importance.
Prints a markdown table (params, MACs and the MACs kept, our exactness max |masked - pruned|; Torch-Pruning's
failure where it has no result) and writes benchmarks/sizes.json. Then times our prepare/step/prune on ResNet-50
(224 input) against Torch-Pruning's dependency-graph build + step. ``--quick`` leaves out ResNet-50.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import families, models  # noqa: E402
from lightning_prune.measure import count_macs, count_params  # noqa: E402
from lightning_prune.sparsifier import SaliencyPruner  # noqa: E402

SPARSITY = 0.5
#: model name -> factory; each model's final classifier is called ``head``
MODELS: dict[str, Callable[[], nn.Module]] = {
    "ResNet-18 (CIFAR)": models.ResNet18,
    "ResNet-50 (224)": models.ResNet50,
    "VGG-11 (bias)": models.VGG11,
    "MobileNetV2-ish": models.MobileNetV2ish,
    "Inception block": models.InceptionNet,
    "Temporal Conv1d": models.TemporalConvNet,
    "Transformer MLP": models.TransformerMLP,
    "Grouped conv": models.GroupedConvNet,
    "ConvTranspose U-Net": models.ConvTransposeNet,
    "MLP 8x1024": models.MLP,
    **families.FAMILIES,
}
TIMED_MODEL = "ResNet-50 (224)"
#: why ours keeps more than Torch-Pruning on a model, or why Torch-Pruning has no result
NOTES = {
    "Transformer MLP": "both narrow the residual stream; Torch-Pruning's narrowed LayerNorms change the output, ours "
                       "took their statistics over the kept channels while masked.",
    "ShuffleNetV2": "Torch-Pruning's pruning step fails on chunk + channel shuffle (IndexError), so it has no "
                    "result.",
    "CSP": "Torch-Pruning's pruning step fails on C2f's chunk and concatenation (IndexError), so it has no result.",
    "GhostNet": "Torch-Pruning leaves most ghost modules (the concatenation and slice of a primary and a cheap conv) "
                "whole; ours halves every one.",
}


def randomize_batchnorm(model: nn.Module) -> None:
    """Statistics and affine values far from 0/1, as a trained network has them."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-1.0, 1.0)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-1.0, 1.0)


def prune_ours(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, float], float]:
    """Prune in place with our pruner; returns the phase timings and max |masked - pruned| on ``x``."""
    pruner = SaliencyPruner(sparsity_level=SPARSITY)
    start = time.perf_counter()
    pruner.prepare(model, None, exclude_output=True, example_inputs=(x,))
    prepared = time.perf_counter()
    pruner.step()
    stepped = time.perf_counter()
    with torch.no_grad():
        masked = model(x)
    resumed = time.perf_counter()
    pruner.prune()
    pruned = time.perf_counter()
    with torch.no_grad():
        drift = (model(x) - masked).abs().max().item()
    timings = {"prepare": prepared - start, "step": stepped - prepared, "prune": pruned - resumed}
    return timings, drift


def prune_torch_pruning(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Prune in place with Torch-Pruning (L1 magnitude, classifier ignored); returns the phase timings."""
    start = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(
        model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=SPARSITY,
        ignored_layers=[model.head],
    )
    built = time.perf_counter()
    pruner.step()
    return {"graph": built - start, "step": time.perf_counter() - built}


def measure(name: str) -> dict[str, object]:
    torch.manual_seed(0)
    dense = MODELS[name]()
    randomize_batchnorm(dense)
    dense.eval()
    x = dense.example_input()
    with torch.no_grad():
        reference = dense(x)
    ours, theirs = copy.deepcopy(dense), copy.deepcopy(dense)
    our_times, drift = prune_ours(ours, x)
    row: dict[str, object] = {
        "model": name,
        "params": {"dense": count_params(dense), "ours": count_params(ours)},
        "macs": {"dense": count_macs(dense, x), "ours": count_macs(ours, x)},
        "ours_max_abs_drift": drift,
        "ours_relative_drift": drift / max(1.0, reference.abs().max().item()),
        "seconds": {"ours": our_times},
    }
    try:
        row["seconds"]["torch_pruning"] = prune_torch_pruning(theirs, x)
        with torch.no_grad():
            theirs(x)
    except Exception as exc:  # noqa: BLE001 - its failure is a result: ours is the only pruned model
        row["torch_pruning_error"] = f"{type(exc).__name__}: {exc}"
        return row
    row["params"]["torch_pruning"] = count_params(theirs)
    row["macs"]["torch_pruning"] = count_macs(theirs, x)
    return row


def _warm_up() -> None:
    """Run both tools once on a tiny model, so one-time imports (fx, torch.export) do not land in a timing."""
    tiny = models.GroupedConvNet()
    prune_ours(copy.deepcopy(tiny), tiny.example_input())
    prune_torch_pruning(tiny, tiny.example_input())


def _human(n: float) -> str:
    """3 significant digits with a k/M/G suffix."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def table(rows: list[dict[str, object]]) -> str:
    """Params and MACs per tool, and the MACs each keeps (lower is smaller); 'fails' where Torch-Pruning has none."""
    lines = [
        "| model | params dense | ours 50% | Torch-Pruning 50% | MACs dense | MACs kept, ours | MACs kept, TP "
        "| ours / TP (MACs) | ours max rel. drift |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        params, macs = row["params"], row["macs"]
        ours = macs["ours"] / macs["dense"]
        if "torch_pruning" in macs:
            theirs = macs["torch_pruning"] / macs["dense"]
            tp_cells = f"{_human(params['torch_pruning'])} | {_human(macs['dense'])} | {ours:.2f} | {theirs:.2f} " \
                       f"| {ours / theirs:.2f}"
        else:
            tp_cells = f"fails | {_human(macs['dense'])} | {ours:.2f} | fails | -"
        lines.append(f"| {row['model']} | {_human(params['dense'])} | {_human(params['ours'])} | {tp_cells} "
                     f"| {row['ours_relative_drift']:.1e} |")
    return "\n".join(lines)


def timing_summary(row: dict[str, object]) -> dict[str, float]:
    ours, theirs = row["seconds"]["ours"], row["seconds"]["torch_pruning"]
    ours_total, tp_total = sum(ours.values()), sum(theirs.values())
    return {
        "ours_prepare_plus_prune_s": ours["prepare"] + ours["prune"],
        "ours_total_s": ours_total,
        "torch_pruning_total_s": tp_total,
        "ours_over_torch_pruning": ours_total / tp_total,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="leave out ResNet-50 (size row and timing)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("sizes.json"))
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    _warm_up()
    names = [n for n in MODELS if not (args.quick and n == TIMED_MODEL)]
    rows = []
    for name in names:
        rows.append(measure(name))
        print(f"measured {name}", file=sys.stderr)
    print(table(rows))
    for row in rows:
        if row["model"] in NOTES:
            print(f"- {row['model']}: {NOTES[row['model']]}")
    result: dict[str, object] = {"sparsity": SPARSITY, "torch_pruning_version": tp.__version__, "rows": rows,
                                 "notes": NOTES}
    if not args.quick:
        timing = timing_summary(next(r for r in rows if r["model"] == TIMED_MODEL))
        result["resnet50_timing"] = timing
        print(
            f"\nResNet-50 (224): ours prepare+prune {timing['ours_prepare_plus_prune_s']:.2f} s, "
            f"prepare+step+prune {timing['ours_total_s']:.2f} s; Torch-Pruning graph+step "
            f"{timing['torch_pruning_total_s']:.2f} s; ratio {timing['ours_over_torch_pruning']:.2f}"
        )
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
