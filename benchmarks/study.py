"""Which pruning criterion to use under a MACs budget: test accuracy against MACs on the digits data.

    nice python benchmarks/study.py                 # the full study (5 seeds), about 25 min on 2 busy CPUs
    python benchmarks/study.py --quick              # 1 seed, 1 budget, 2 methods: a smoke run of a few seconds
    python benchmarks/study.py --render             # table and plot again from docs/results/study.json

The protocol is the same for every method; only the choice of channels differs:

1. Dense training: the app's network (DigitsCNN, DigitsResNet, or the transformers ViT of ``model=hf_vit_digits``)
   trains with AdamW as the app trains it (15 epochs at 1e-2; the ViT 30 at 2e-3), once per seed; every method starts
   from that model.
2. Iterative pruning: ``ticks`` pruning steps, each after ``steps_per_tick`` fine-tuning steps, ramping to the budget
   (the fraction of the dense MACs that may remain). Ours ramp the MACs removed linearly through the groups'
   ``sparsity_level`` and mask; Torch-Pruning ramps its channel ratio linearly (``iterative_steps``, its README's
   loop) and removes channels at each step, with the ratio calibrated so that its final MACs meet the same budget.
3. Fine-tuning: ``finetune_steps`` more steps; ours then fuse. Every phase uses a fresh AdamW at 0.3 times the dense
   learning rate and, within a seed, the same batches for every method.

The ViT is pruned to 0.5 and 0.25 only: its residual stream is LayerNorm'd, which exact fusion cannot narrow, so with
every head and MLP width down to one the MACs stay at 0.13 of dense. Torch-Pruning prunes it anyway (its README's
ViT recipe: ``num_heads``, whole heads, the hidden width too), changing the function and letting fine-tuning recover.
Its iterative mode fails on the heads (ZeroDivisionError in ``BasePruner._prune``), so it prunes the ViT in one step,
at the first pruning step, and fine-tunes for the same number of steps.

Methods: our Saliency (L1), FPGM, Taylor (first-order, EMA over the training steps) and Activation (mean |output|),
each with ``allocation="uniform"`` (the same fraction of every coupled set) and ``"global"`` (classes ranked across
layers by normalised score per MAC saved); Torch-Pruning 1.6.1 with its README's ``MetaPruner`` and
``MagnitudeImportance(p=1, group_reduction="first", normalizer=None)`` (L1 of the layer's own filters),
``TaylorImportance()`` (one training batch's gradients before each step, as its README computes a loss before
``pruner.step()``) and ``GroupMagnitudeImportance(p=2)`` (the group L2 norm once called ``GroupNormImportance``).
Each run records the test accuracy and the MACs per sample the pruned model really has.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lightning_prune.app.data import DigitsDataModule  # noqa: E402
from lightning_prune.app.hf import vit_digits  # noqa: E402
from lightning_prune.app.models import DigitsCNN, DigitsResNet  # noqa: E402
from lightning_prune.measure import count_macs  # noqa: E402
from lightning_prune.sparsifier import ActivationPruner, FPGMPruner, SaliencyPruner, TaylorPruner  # noqa: E402


@dataclass(frozen=True)
class Spec:
    """A network of the study: how to build it, train it dense, find its classifier, and the budgets it can reach."""

    build: Callable[[], nn.Module]
    epochs: int
    lr: float
    classifier: Callable[[nn.Module], nn.Module]
    budgets: tuple[float, ...] = (0.5, 0.25, 0.1)


MODELS = {
    "CNN": Spec(DigitsCNN, 15, 1e-2, lambda m: m.classifier),
    "ResNet": Spec(DigitsResNet, 15, 1e-2, lambda m: m.classifier),
    "ViT": Spec(vit_digits, 30, 2e-3, lambda m: m.model.classifier, (0.5, 0.25)),
}
OURS = {"Saliency": SaliencyPruner, "FPGM": FPGMPruner, "Taylor": TaylorPruner, "Activation": ActivationPruner}
THEIRS: dict[str, Callable[[], tp.importance.Importance]] = {
    "TP Magnitude": lambda: tp.importance.MagnitudeImportance(p=1, group_reduction="first", normalizer=None),
    "TP Taylor": tp.importance.TaylorImportance,
    "TP GroupNorm": lambda: tp.importance.GroupMagnitudeImportance(p=2),
}
METHODS = [f"{name} {allocation}" for name in OURS for allocation in ("uniform", "global")] + list(THEIRS)


@dataclass(frozen=True)
class Protocol:
    ticks: int = 5
    steps_per_tick: int = 20
    finetune_steps: int = 60
    batch_size: int = 64
    finetune_lr_scale: float = 0.3  # of the dense learning rate
    epochs_scale: float = 1.0  # of each network's dense epochs


class Digits:
    """The app's fixed train/test split of scikit-learn's digits as tensors, with seeded shuffled batches."""

    def __init__(self, batch_size: int):
        module = DigitsDataModule(seed=0)
        module.setup()
        self.train = [torch.stack(t) for t in zip(*module.train_set, strict=True)]
        self.test = [torch.stack(t) for t in zip(*module.test_set, strict=True)]
        self.batch_size = batch_size
        self.example = self.test[0][:1]

    def batches(self, generator: torch.Generator):
        """Batches from a fresh permutation each epoch, forever."""
        while True:
            order = torch.randperm(len(self.train[0]), generator=generator)
            for start in range(0, len(order) - self.batch_size + 1, self.batch_size):
                index = order[start:start + self.batch_size]
                yield self.train[0][index], self.train[1][index]

    def accuracy(self, model: nn.Module) -> float:
        model.eval()
        with torch.no_grad():
            return float((model(self.test[0]).argmax(1) == self.test[1]).float().mean())


def train(model: nn.Module, batches, steps: int, lr: float) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        x, y = next(batches)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def pretrain(spec: Spec, seed: int, data: Digits, protocol: Protocol) -> nn.Module:
    torch.manual_seed(seed)
    model = spec.build()
    steps_per_epoch = len(data.train[0]) // data.batch_size
    batches = data.batches(torch.Generator().manual_seed(seed))
    train(model, batches, round(spec.epochs * protocol.epochs_scale * steps_per_epoch), spec.lr)
    return model


def run_ours(method: str, model: nn.Module, budget: float, data: Digits, protocol: Protocol, batches,
             lr: float) -> None:
    name, allocation = method.rsplit(" ", 1)
    pruner = OURS[name](target={"macs": budget, "allocation": allocation})
    pruner.prepare(model, None, exclude_output=True, example_inputs=data.example)
    for tick in range(1, protocol.ticks + 1):
        train(model, batches, protocol.steps_per_tick, lr)
        for group in pruner.groups:
            group["sparsity_level"] = (1 - budget) * tick / protocol.ticks
        pruner.step()
    train(model, batches, protocol.finetune_steps, lr)
    pruner.prune()


def tp_pruner(spec: Spec, model: nn.Module, example: torch.Tensor, importance, ratio: float, steps: int = 1):
    """Torch-Pruning's MetaPruner as its README sets it up; for attention, its ViT recipe (whole heads)."""
    heads = {module: module_heads for name, module in model.named_modules() for module_heads in [_heads(model, name)]
             if module_heads}
    extra = {"num_heads": heads, "prune_num_heads": True, "prune_head_dims": False, "head_pruning_ratio": ratio} \
        if heads else {}
    return tp.pruner.MetaPruner(model, example, importance=importance, pruning_ratio=ratio, iterative_steps=steps,
                                ignored_layers=[spec.classifier(model)], **extra)


def _heads(model: nn.Module, name: str) -> int | None:
    """The head count of a query/key/value projection of the transformers ViT, else None."""
    if name.rpartition(".")[2] not in ("q_proj", "k_proj", "v_proj"):
        return None
    return model.model.config.num_attention_heads


def run_theirs(method: str, model: nn.Module, ratio: float, data: Digits, protocol: Protocol, batches,
               seed: int, spec: Spec) -> None:
    importance = THEIRS[method]()
    # its iterative head pruning fails (ZeroDivisionError in BasePruner._prune): the ViT goes in one step, at the first
    one_shot = any(_heads(model, name) for name, _ in model.named_modules())
    pruner = tp_pruner(spec, model, data.example, importance, ratio, 1 if one_shot else protocol.ticks)
    lr = spec.lr * protocol.finetune_lr_scale
    gradients = data.batches(torch.Generator().manual_seed(10_000 + seed))  # Taylor's batch, apart from training's
    for tick in range(protocol.ticks):
        train(model, batches, protocol.steps_per_tick, lr)
        if one_shot and tick:
            continue
        if isinstance(importance, tp.importance.GroupTaylorImportance):
            x, y = next(gradients)
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
        pruner.step()
    train(model, batches, protocol.finetune_steps, lr)


def tp_ratio(spec: Spec, budget: float, example: torch.Tensor) -> float:
    """The smallest Torch-Pruning channel ratio whose one-shot result has at most ``budget`` of the dense MACs (the
    MACs of uniform, non-global pruning do not depend on the importance)."""
    dense = count_macs(spec.build(), example)

    def macs_at(ratio: float) -> float:
        model = spec.build()
        tp_pruner(spec, model, example, tp.importance.MagnitudeImportance(), ratio).step()
        return count_macs(model, example) / dense

    low, high = 0.0, 0.99
    for _ in range(14):
        middle = (low + high) / 2
        low, high = (low, middle) if macs_at(middle) <= budget else (middle, high)
    return high


def study(seeds: list[int], budgets: tuple[float, ...], methods: list[str], protocol: Protocol,
          log: Callable[[str], None] = print, models: tuple[str, ...] = tuple(MODELS)) -> list[dict]:
    data = Digits(protocol.batch_size)
    rows = []
    for model_name in models:
        spec = MODELS[model_name]
        reachable = [budget for budget in budgets if budget in spec.budgets]
        ratios = {budget: tp_ratio(spec, budget, data.example) for budget in reachable}
        dense_macs = count_macs(spec.build(), data.example)
        for seed in seeds:
            dense = pretrain(spec, seed, data, protocol)
            dense_accuracy = data.accuracy(dense)
            for budget in reachable:
                for method in methods:
                    started = time.perf_counter()
                    model = copy.deepcopy(dense)
                    batches = data.batches(torch.Generator().manual_seed(1_000 + seed))
                    if method in THEIRS:
                        run_theirs(method, model, ratios[budget], data, protocol, batches, seed, spec)
                    else:
                        run_ours(method, model, budget, data, protocol, batches, spec.lr * protocol.finetune_lr_scale)
                    row = {"model": model_name, "method": method, "budget": budget, "seed": seed,
                           "accuracy": data.accuracy(model), "macs": count_macs(model, data.example) / dense_macs,
                           "dense_accuracy": dense_accuracy, "seconds": time.perf_counter() - started}
                    rows.append(row)
                    log(f"{model_name} {method:<20} budget {budget:<4} seed {seed}: accuracy {row['accuracy']:.4f}, "
                        f"MACs {row['macs']:.3f} ({row['seconds']:.1f} s)")
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary(rows: list[dict]) -> dict[tuple[str, str, float], dict[str, float]]:
    """Mean and std of accuracy and MACs per (model, method, budget)."""
    cells: dict[tuple[str, str, float], list[dict]] = {}
    for row in rows:
        cells.setdefault((row["model"], row["method"], row["budget"]), []).append(row)
    result = {}
    for key, runs in cells.items():
        accuracy, accuracy_std = _mean_std([r["accuracy"] for r in runs])
        macs, _ = _mean_std([r["macs"] for r in runs])
        result[key] = {"accuracy": accuracy, "accuracy_std": accuracy_std, "macs": macs, "runs": len(runs)}
    return result


def markdown(rows: list[dict]) -> str:
    """One table per model: a row per method, a column per budget (test accuracy % mean ± std, MACs reached)."""
    cells = summary(rows)
    budgets = sorted({r["budget"] for r in rows}, reverse=True)
    lines = []
    for model_name in dict.fromkeys(r["model"] for r in rows):
        dense = _mean_std([r["dense_accuracy"] for r in rows if r["model"] == model_name and r["method"] == METHODS[0]]
                          or [r["dense_accuracy"] for r in rows if r["model"] == model_name])
        lines += [f"**{model_name}** (dense: {100 * dense[0]:.1f} ± {100 * dense[1]:.1f} %)", "",
                  "| method | " + " | ".join(f"MACs ≤ {b:g}" for b in budgets) + " |",
                  "|---|" + "---:|" * len(budgets)]
        for method in dict.fromkeys(r["method"] for r in rows):
            entries = []
            for budget in budgets:
                cell = cells.get((model_name, method, budget))
                entries.append("" if cell is None else
                               f"{100 * cell['accuracy']:.1f} ± {100 * cell['accuracy_std']:.1f} ({cell['macs']:.2f})")
            lines.append(f"| {method} | " + " | ".join(entries) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy against the MACs reached, one line per method, a panel per model, the dense accuracy dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    cells = summary(rows)
    colors = plt.get_cmap("tab20")
    models = list(dict.fromkeys(r["model"] for r in rows))
    figure, panels = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for axes, model_name in zip(panels[0], models, strict=True):
        for k, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
            points = sorted((c["macs"], c["accuracy"], c["accuracy_std"]) for (m, name, _), c in cells.items()
                            if m == model_name and name == method)
            style = "--" if method in THEIRS else ("-" if method.endswith("global") else ":")
            axes.errorbar([p[0] for p in points], [100 * p[1] for p in points], yerr=[100 * p[2] for p in points],
                          linestyle=style, marker="os^D"[k % 4], capsize=2, label=method, color=colors(k))
        dense = statistics.mean(r["dense_accuracy"] for r in rows if r["model"] == model_name)
        axes.axhline(100 * dense, color="gray", linestyle="--", linewidth=1, label="dense")
        axes.set(xscale="log", xlabel="MACs of the pruned model / dense (log)", ylabel="test accuracy (%)",
                 title=f"Digits {model_name}", xticks=[0.07, 0.1, 0.25, 0.5],
                 xticklabels=["0.07", "0.1", "0.25", "0.5"])
        axes.minorticks_off()
        axes.grid(alpha=0.3)
    panels[0][-1].legend(fontsize=7, ncol=2, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 seed, budget 0.5, two methods, short phases")
    parser.add_argument("--render", action="store_true", help="table and plot from --out, no training")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "study.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "study.png")
    args = parser.parse_args(argv)
    if args.render:
        rows = json.loads(args.out.read_text())["rows"]
    else:
        torch.set_num_threads(1)
        protocol = Protocol(epochs_scale=0.1, ticks=2, steps_per_tick=3, finetune_steps=3) if args.quick \
            else Protocol()
        seeds, budgets = ([0], (0.5,)) if args.quick else (list(range(args.seeds)), (0.5, 0.25, 0.1))
        methods = ["Taylor global", "TP Taylor"] if args.quick else METHODS
        started = time.perf_counter()
        rows = study(seeds, budgets, methods, protocol)
        record = {"protocol": asdict(protocol), "torch": torch.__version__, "torch_pruning": tp.__version__,
                  "minutes": (time.perf_counter() - started) / 60, "rows": rows}
        args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(markdown(rows))
    plot(rows, args.plot)
    print(f"wrote {args.out} and {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
