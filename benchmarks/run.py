"""Speed, memory and exactness of lightning_prune side by side with torch.ao's pruner and Torch-Pruning.

    python benchmarks/run.py [--quick] [--out benchmarks/results.json]

Sections (each printed as a markdown table and stored in the JSON):
1. ``step()`` time of Saliency and FPGM on the MLP and VGG-11, ours vs the reference
   (``torch.ao.pruning._experimental.pruner``).
2. Training-step overhead (forward + backward + SGD) with masks attached, vs the dense model and the reference.
3. ``prepare()`` / ``prune()`` time on VGG-11, ResNet-18, ResNet-50 (ours without and with example inputs) vs the
   reference and Torch-Pruning's dependency-graph build + step, and the peak RSS of pruning ResNet-50 in a fresh
   process.
4. Forward latency of the pruned model vs dense at 25/50/75% channel sparsity, beside the MAC reduction.
5. Size after pruning vs Torch-Pruning (from ``benchmarks/sizes.py``).
6. Exactness: max |masked - pruned| for ours and for the reference where it runs.

Every timing is a median over rounds in which the compared variants run alternately, so a load spike on a shared
machine hits all of them rather than one.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn
from torch.ao.pruning._experimental import pruner as reference
from torch.utils import benchmark

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import sizes  # noqa: E402
from benchmarks.tools import (  # noqa: E402
    MODELS,
    TOOLS,
    ModelFactory,
    SparsifierTool,
    example,
    fresh,
    phase_seconds,
    prunable_config,
    reference_config,
    seconds,
    with_options,
)
from lightning_prune.measure import count_macs  # noqa: E402
from lightning_prune.sparsifier import FPGMPruner, SaliencyPruner  # noqa: E402

Row = dict[str, object]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and repeat counts; ``quick`` fits the whole run in a few minutes on 2 cores."""

    threads: int = 2
    rounds: int = 15  # interleaved timing rounds (the median is reported)
    prune_repeats: int = 5  # fresh models per tool for prepare/prune timing
    train_batch: int = 32
    latency_batch: int = 16
    sparsities: tuple[float, ...] = (0.25, 0.5, 0.75)
    latency_models: tuple[str, ...] = ("VGG-11", "ResNet-18", "ResNet-50")
    size_models: tuple[str, ...] = tuple(sizes.MODELS)

    @classmethod
    def quick(cls) -> Settings:
        return cls(rounds=3, prune_repeats=2, train_batch=4, latency_batch=2, latency_models=("VGG-11", "ResNet-18"),
                   size_models=("VGG-11 (bias)", "ResNet-18 (CIFAR)", "MLP 8x1024"))


# -- timing --------------------------------------------------------------------------------------------------
def interleaved_ms(fns: dict[str, Callable[[], object]], settings: Settings, number: int = 1) -> dict[str, float]:
    """Median milliseconds per call of each function; every round runs all of them once, in turn."""
    timers = {name: benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=settings.threads)
              for name, fn in fns.items()}
    for timer in timers.values():  # warm-up: lazy inits, allocator growth, oneDNN primitive caches
        timer.timeit(1)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(settings.rounds):
        for name, timer in timers.items():
            samples[name].append(timer.timeit(number).mean * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def _error(exc: Exception) -> str:
    """One table-sized line: the exception type, the message's start and its end (where the reason usually is)."""
    message = " ".join(str(exc).split())
    if len(message) > 100:
        message = f"{message[:40]} ... {message[-55:]}"
    return f"{type(exc).__name__}: {message}"


# -- 1. step() -----------------------------------------------------------------------------------------------
def section_step(names: list[str], settings: Settings, factories: dict[str, ModelFactory] = MODELS) -> list[Row]:
    """``step()`` time of each pruner kind, ours vs the reference, on the same weights and config."""
    kinds = {
        "Saliency": (lambda: SaliencyPruner(sparsity_level=0.5),
                     lambda: reference.SaliencyPruner({"sparsity_level": 0.5})),
        "FPGM": (lambda: FPGMPruner(sparsity_level=0.5), lambda: reference.FPGMPruner(0.5)),
    }
    rows = []
    for name in names:
        steps = {}
        for kind, makers in kinds.items():
            for tool, make in zip(("ours", "reference"), makers, strict=True):
                model = fresh(factories[name])
                pruner = make()
                pruner.prepare(model, reference_config(model))
                steps[kind, tool] = pruner.step
        ms = interleaved_ms({f"{kind}/{tool}": fn for (kind, tool), fn in steps.items()}, settings)
        for kind in kinds:
            ours, ref = ms[f"{kind}/ours"], ms[f"{kind}/reference"]
            rows.append({"model": name, "pruner": kind, "ours_ms": ours, "reference_ms": ref,
                         "ours_over_reference": ours / ref})
    return rows


# -- 2. training step with masks -----------------------------------------------------------------------------
def section_train(names: list[str], settings: Settings, factories: dict[str, ModelFactory] = MODELS) -> list[Row]:
    """Forward + backward + SGD with masks attached (50% pruned), vs dense and vs the reference's masked model.

    ``ours`` masks biases as parametrizations (they train); ``ours, prune_bias=False`` leaves biases unmasked, so the
    difference is what bias masking costs; the reference always routes biases through a forward hook (frozen).
    """
    rows = []
    for name in names:
        variants: dict[str, nn.Module] = {}
        for variant, make, options in (
            ("dense", None, {}),
            ("ours", SaliencyPruner, {}),
            ("ours, prune_bias=False", SaliencyPruner, {"prune_bias": False}),
            ("reference", reference.SaliencyPruner, {}),
        ):
            model = fresh(factories[name])
            if make is not None:
                pruner = make({"sparsity_level": 0.5})
                pruner.prepare(model, with_options(reference_config(model), **options))
                pruner.step()
            variants[variant] = model.train()
        x = example(variants["dense"], settings.train_batch)
        target = torch.randint(0, 10, (settings.train_batch,))
        ms = interleaved_ms({variant: _train_step(model, x, target) for variant, model in variants.items()}, settings)
        for variant, value in ms.items():
            rows.append({"model": name, "variant": variant, "batch": settings.train_batch, "ms": value,
                         "overhead_vs_dense": value / ms["dense"] - 1})
    return rows


def _train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()
        optimizer.step()

    return step


# -- 3. prepare() / prune() ----------------------------------------------------------------------------------
def section_prune(names: list[str], settings: Settings, factories: dict[str, ModelFactory] = MODELS) -> list[Row]:
    """Median prepare/prune seconds per tool over fresh models, tools alternating; a tool that fails is recorded."""
    rows = []
    for name in names:
        samples: dict[str, list[dict[str, float]]] = {tool: [] for tool in TOOLS}
        failures: dict[str, str] = {}
        for _ in range(settings.prune_repeats):
            for tool, make_tool in TOOLS.items():
                if tool in failures:
                    continue
                model = fresh(factories[name])
                try:
                    samples[tool].append(phase_seconds(make_tool(), model))
                except Exception as exc:  # the reference cannot prune ResNets; its failure is a result
                    failures[tool] = _error(exc)
                del model
        for tool in TOOLS:
            row: Row = {"model": name, "tool": tool}
            if tool in failures:
                row["error"] = failures[tool]
            else:
                for phase in ("prepare", "prune"):
                    row[f"{phase}_s"] = statistics.median(s[phase] for s in samples[tool])
                row["total_s"] = row["prepare_s"] + row["prune_s"]
            rows.append(row)
        ref = next(r for r in rows if r["model"] == name and r["tool"] == "reference")
        ours = next(r for r in rows if r["model"] == name and r["tool"] == "ours")
        if "total_s" in ref:
            ours["over_reference"] = ours["total_s"] / ref["total_s"]
    return rows


def peak_rss(tool: str, name: str = "ResNet-50") -> Row:
    """Prune ``name`` with ``tool`` in a fresh interpreter, so no earlier section's memory is counted."""
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks import run; "
            f"print(json.dumps(run.rss_child({tool!r}, {name!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def rss_child(tool_name: str, name: str) -> Row:
    """Runs inside ``peak_rss``'s subprocess. The RSS high-water mark (VmHWM) is reset before each phase, so each
    growth is what that phase needed beyond what the process already held (the model, torch)."""
    torch.set_num_threads(2)
    model = fresh(MODELS[name])
    tool = TOOLS[tool_name]()
    row: Row = {"model": name, "tool": tool_name,
                "model_mb": sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20}
    for phase, run_phase in (("prepare_step", lambda: (tool.prepare(model), tool.step())), ("prune", tool.prune)):
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS
        before = _proc_status_mb("VmRSS")
        row[f"{phase}_s"] = seconds(run_phase)
        row[f"{phase}_growth_mb"] = _proc_status_mb("VmHWM") - before
    row["prune_growth_over_model"] = row["prune_growth_mb"] / row["model_mb"]
    row["rss_end_mb"] = _proc_status_mb("VmRSS")
    return row


def _proc_status_mb(field: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


# -- 4. latency vs MACs --------------------------------------------------------------------------------------
def _pruned_by(tool_name: str, dense: nn.Module, sparsity: float) -> nn.Module:
    """A pruned copy of ``dense``; ours prunes every layer but the head, the reference what it can fuse."""
    model = copy.deepcopy(dense)
    ours = tool_name == "ours"
    tool = SparsifierTool(SaliencyPruner, sparsity, prunable_config) if ours else TOOLS[tool_name](sparsity)
    tool.prepare(model)
    tool.step()
    tool.prune()
    return getattr(tool.pruner, "traced", model)  # the reference's prune() builds a GraphModule


#: the tools whose pruned models differ (with example inputs ours prunes these models to the same widths)
PRUNED_MODELS = ("ours", "reference", "torch_pruning")


def section_latency(names: list[str], settings: Settings, factories: dict[str, ModelFactory] = MODELS) -> list[Row]:
    """Eval forward latency of each pruned model vs dense, with the MAC reduction it should buy."""
    rows = []
    for name in names:
        dense = fresh(factories[name]).eval()
        x = example(dense, settings.latency_batch)
        variants: dict[tuple[str, float], nn.Module] = {("dense", 0.0): dense}
        for sparsity in settings.sparsities:
            for tool in PRUNED_MODELS:
                try:
                    variants[tool, sparsity] = _pruned_by(tool, dense, sparsity).eval()
                except Exception as exc:
                    rows.append({"model": name, "tool": tool, "sparsity": sparsity, "error": _error(exc)})
        ms = interleaved_ms({key: _forward(model, x) for key, model in variants.items()}, settings)
        dense_macs = count_macs(dense, x[:1])
        for (tool, sparsity), model in variants.items():
            macs = count_macs(model, x[:1])
            mac_reduction, speedup = dense_macs / macs, ms["dense", 0.0] / ms[tool, sparsity]
            rows.append({"model": name, "tool": tool, "sparsity": sparsity, "macs": macs,
                         "mac_reduction": mac_reduction, "ms": ms[tool, sparsity], "speedup": speedup,
                         "speedup_over_mac_reduction": speedup / mac_reduction})
    return rows


def _forward(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def forward() -> object:
        with torch.no_grad():
            return model(x)

    return forward


# -- 5. sizes vs Torch-Pruning -------------------------------------------------------------------------------
def section_sizes(settings: Settings) -> list[Row]:
    return [sizes.measure(name) for name in settings.size_models]


# -- 6. exactness --------------------------------------------------------------------------------------------
def section_exactness(names: list[str], factories: dict[str, ModelFactory] = MODELS) -> list[Row]:
    """max |masked - pruned| at 50% in eval mode, both bias settings, for ours and the reference."""
    makers = {"ours": (SaliencyPruner, prunable_config), "reference": (reference.SaliencyPruner, reference_config)}
    rows = []
    for name in names:
        for tool, (make, config_of) in makers.items():
            for prune_bias in (True, False):
                model = fresh(factories[name]).eval()
                x = example(model, 2)
                row: Row = {"model": name, "tool": tool, "prune_bias": prune_bias}
                try:
                    pruner = make({"sparsity_level": 0.5})
                    pruner.prepare(model, with_options(config_of(model), prune_bias=prune_bias))
                    pruner.step()
                    with torch.no_grad():
                        masked = model(x)
                        pruned = (pruner.prune() or model).eval()
                        diff = (pruned(x) - masked).abs().max().item()
                    row.update(max_abs_diff=diff, relative=diff / masked.abs().max().item())
                except Exception as exc:
                    row["error"] = _error(exc)
                rows.append(row)
    return rows


# -- output --------------------------------------------------------------------------------------------------
def markdown(rows: list[Row], columns: list[str]) -> str:
    """A markdown table; a row's ``error`` fills the cells it has no value for."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_cell(row[col]) if col in row else "" for col in columns]
        if "error" in row:
            first_empty = cells.index("")
            cells[first_empty] = f"fails: {row['error']}"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:.2e}"
    return f"{value:.3g}"


COLUMNS = {
    "step": ["model", "pruner", "ours_ms", "reference_ms", "ours_over_reference"],
    "train": ["model", "variant", "batch", "ms", "overhead_vs_dense"],
    "prune": ["model", "tool", "prepare_s", "prune_s", "total_s", "over_reference"],
    "rss": ["model", "tool", "model_mb", "prepare_step_s", "prepare_step_growth_mb", "prune_s", "prune_growth_mb",
            "prune_growth_over_model", "rss_end_mb"],
    "latency": ["model", "tool", "sparsity", "macs", "mac_reduction", "ms", "speedup", "speedup_over_mac_reduction"],
    "exactness": ["model", "tool", "prune_bias", "max_abs_diff", "relative"],
}


def machine() -> dict[str, object]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu, "nproc": os.cpu_count(),
            "torch": torch.__version__, "torch_pruning": tp.__version__, "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches, fewer repeats, no ResNet-50 latency")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    torch.set_num_threads(settings.threads)

    results: dict[str, object] = {"machine": machine(), "settings": dataclasses.asdict(settings)}
    sections: list[tuple[str, str, Callable[[], list[Row]]]] = [
        ("step", "1. step() time (ms)", lambda: section_step(["MLP", "VGG-11"], settings)),
        ("train", "2. training step with masks attached (ms)", lambda: section_train(["MLP", "VGG-11"], settings)),
        ("prune", "3. prepare() and prune() (s)",
         lambda: section_prune(["VGG-11", "ResNet-18", "ResNet-50"], settings)),
        ("rss", "3b. peak RSS while pruning ResNet-50 (fresh process, MiB)",
         lambda: [peak_rss(tool) for tool in ("ours", "ours, example inputs", "torch_pruning")]),
        ("latency", f"4. pruned forward latency vs MACs (batch {settings.latency_batch})",
         lambda: section_latency(list(settings.latency_models), settings)),
        ("sizes", "5. size after 50% pruning vs Torch-Pruning", lambda: section_sizes(settings)),
        ("exactness", "6. exactness, max |masked - pruned| at 50%",
         lambda: section_exactness(["MLP", "VGG-11", "ResNet-18"])),
    ]
    for key, title, run_section in sections:
        start = time.perf_counter()
        results[key] = run_section()
        print(f"[{key}: {time.perf_counter() - start:.1f} s]", file=sys.stderr)
        table = sizes.table(results[key]) if key == "sizes" else markdown(results[key], COLUMNS[key])
        print(f"\n### {title}\n\n{table}", flush=True)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
