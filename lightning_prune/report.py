"""Turn a Hydra multirun dir into a table and a plot: ``python -m lightning_prune.report SWEEP_DIR``.

Reads every ``metrics.json`` below SWEEP_DIR, prints a markdown table sorted by sparsity, and writes
``report.csv`` and ``report.png`` (accuracy and latency against sparsity, one line per pruner) into SWEEP_DIR.
Runs whose metrics.json is broken are listed as skipped; the rest are still reported.
"""

import argparse
import csv
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.json"
CSV_FILE = "report.csv"
PLOT_FILE = "report.png"
#: Columns of report.csv after the varied overrides, in order.
METRIC_COLUMNS = (
    "sparsity_level",
    "pruner",
    "params_before",
    "params_after",
    "macs_before",
    "macs_after",
    "latency_ms_before",
    "latency_ms_after",
    "val_acc",
    "test_acc",
    "dense_test_acc",
)
#: The numbers every run's metrics.json must hold; the other columns may be missing.
REQUIRED_KEYS = tuple(key for key in METRIC_COLUMNS if key not in ("pruner", "test_acc", "dense_test_acc"))
#: Overrides that the table shows in their own columns anyway: the sweep's x axis and the pruner. A budget
#: (``+target.macs=r``) is an x axis too: its runs' ``sparsity_level`` is the fraction of the cost removed, 1 - r.
SHOWN_OVERRIDES = {"pruner.sparsity_level", "pruner", "target.macs", "target.params"}


class ReportError(Exception):
    """Nothing could be reported from a sweep dir; the message names the path."""


@dataclass(frozen=True)
class Run:
    """One run's metrics.json, with its overrides parsed into ``{key: value}``."""

    path: Path
    metrics: dict[str, Any]

    @property
    def overrides(self) -> dict[str, str]:
        pairs = (item.split("=", 1) for item in self.metrics.get("overrides", []) if "=" in item)
        return {key.lstrip("+~"): value for key, value in pairs}

    @property
    def pruner(self) -> str:
        return str(self.metrics.get("pruner", "pruner"))


@dataclass(frozen=True)
class Sweep:
    """The runs that could be read, sorted by sparsity, and ``(path, reason)`` for each one skipped."""

    runs: list[Run]
    skipped: list[tuple[Path, str]]

    @property
    def varied_keys(self) -> list[str]:
        """Override keys whose value differs between runs (or is missing in some), bar SHOWN_OVERRIDES."""
        keys = {key for run in self.runs for key in run.overrides}
        varied = {key for key in keys if len({run.overrides.get(key) for run in self.runs}) > 1}
        return sorted(varied - SHOWN_OVERRIDES)


def load_sweep(sweep_dir: Path) -> Sweep:
    """Read every metrics.json below ``sweep_dir``; raise ReportError if none can be read."""
    if not sweep_dir.is_dir():
        raise ReportError(f"sweep dir {sweep_dir} does not exist or is not a directory")
    paths = sorted(sweep_dir.rglob(METRICS_FILE))
    if not paths:
        raise ReportError(f"no {METRICS_FILE} found under {sweep_dir}: is it a finished Hydra multirun dir?")
    runs, skipped = [], []
    for path in paths:
        try:
            runs.append(Run(path, _read_metrics(path)))
        except ValueError as error:
            skipped.append((path, str(error)))
    if not runs:
        reasons = "\n".join(f"  {path}: {reason}" for path, reason in skipped)
        raise ReportError(f"no readable {METRICS_FILE} under {sweep_dir}:\n{reasons}")
    runs.sort(key=lambda run: (run.metrics["sparsity_level"], run.pruner, str(run.path)))
    return Sweep(runs, skipped)


def _read_metrics(path: Path) -> dict[str, Any]:
    try:
        metrics = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    if not isinstance(metrics, dict):
        raise ValueError(f"{path} holds a {type(metrics).__name__}, expected a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in metrics]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}")
    not_numbers = [key for key in REQUIRED_KEYS if not _is_number(metrics[key])]
    if not_numbers:
        raise ValueError(f"{path} has non-numeric {', '.join(not_numbers)}")
    return metrics


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def markdown_table(sweep: Sweep) -> str:
    """One row per run: the varied overrides, then size, speed and accuracy, dense -> pruned."""
    metric_header = ["sparsity", "pruner", "params", "MACs per sample", "latency (ms)", "val acc", "test acc"]
    rows = []
    for run in sweep.runs:
        m = run.metrics
        rows.append(
            [
                *(run.overrides.get(key, "") for key in sweep.varied_keys),
                f"{m['sparsity_level']:g}",
                run.pruner,
                _before_after(m["params_before"], m["params_after"], "{:,}"),
                _before_after(m["macs_before"], m["macs_after"], "{:,}"),
                _before_after(m["latency_ms_before"], m["latency_ms_after"], "{:.3f}"),
                f"{m['val_acc']:.4f}",
                _test_accuracy(m),
            ]
        )
    alignment = ["---"] * len(sweep.varied_keys) + ["---:", "---"] + ["---:"] * (len(metric_header) - 2)
    header = [_row([*sweep.varied_keys, *metric_header]), _row(alignment)]
    return "\n".join(header + [_row(row) for row in rows])


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _before_after(before: float, after: float, fmt: str) -> str:
    return f"{fmt.format(before)} → {fmt.format(after)} ({after / before:.0%})"


def _test_accuracy(metrics: dict[str, Any]) -> str:
    """Pruned test accuracy, with the dense baseline's when the run measured one."""
    test_acc, dense_acc = metrics.get("test_acc"), metrics.get("dense_test_acc")
    if not _is_number(test_acc):
        return ""
    if not _is_number(dense_acc):
        return f"{test_acc:.4f}"
    return f"{test_acc:.4f} (dense {dense_acc:.4f})"


def write_csv(sweep: Sweep, path: Path) -> None:
    """Raw numbers, one row per run: run dir, varied overrides, then METRIC_COLUMNS."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["run", *sweep.varied_keys, *METRIC_COLUMNS])
        for run in sweep.runs:
            writer.writerow(
                [
                    str(run.path.parent),
                    *(run.overrides.get(key, "") for key in sweep.varied_keys),
                    *(run.metrics.get(column, "") for column in METRIC_COLUMNS),
                ]
            )


def plot(sweep: Sweep, path: Path) -> None:
    """Accuracy and latency against sparsity, one line per pruner (per varied override set), dense dashed.

    Accuracy is test accuracy where every run measured it, else validation accuracy.
    """
    # matplotlib is optional (the examples extra): only a plot needs it, so the report's tables work without it
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    lines: dict[str, list[Run]] = {}
    for run in sweep.runs:
        lines.setdefault(_line_label(sweep, run), []).append(run)
    accuracy = "test_acc" if all(_is_number(run.metrics.get("test_acc")) for run in sweep.runs) else "val_acc"
    figure, (accuracy_axes, latency_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for axes, key, dense_key in (
        (accuracy_axes, accuracy, f"dense_{accuracy}"),
        (latency_axes, "latency_ms_after", "latency_ms_before"),
    ):
        for label, runs in lines.items():
            sparsity = [run.metrics["sparsity_level"] for run in runs]
            axes.plot(sparsity, [run.metrics[key] for run in runs], marker="o", label=label)
        dense = [run.metrics.get(dense_key) for run in sweep.runs]
        if all(_is_number(value) for value in dense):
            axes.axhline(statistics.median(dense), color="gray", linestyle="--", label="dense (median)")
    budgets = {next(iter(run.metrics["target"].keys() & {"macs", "params"}), "cost")
               for run in sweep.runs if isinstance(run.metrics.get("target"), dict)}
    xlabel = f"fraction of dense {'/'.join(sorted(budgets))} removed (1 - target)" if budgets else "sparsity level"
    accuracy_axes.set(xlabel=xlabel, ylabel=accuracy.replace("_acc", " accuracy"), title="Accuracy")
    latency_axes.set(xlabel=xlabel, ylabel="CPU latency (ms)", title="Latency")
    for axes in (accuracy_axes, latency_axes):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _line_label(sweep: Sweep, run: Run) -> str:
    """The pruner, plus any other override the sweep varies, so distinct settings get distinct lines."""
    others = [f"{key}={run.overrides.get(key, '')}" for key in sweep.varied_keys]
    return ", ".join([run.pruner, *others])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_prune.report", description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun dir (each run wrote a metrics.json)")
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep_dir)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for path, reason in sweep.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(markdown_table(sweep))
    write_csv(sweep, args.sweep_dir / CSV_FILE)
    plot(sweep, args.sweep_dir / PLOT_FILE)
    print(f"\nwrote {args.sweep_dir / CSV_FILE} and {args.sweep_dir / PLOT_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
