"""Regenerate the figures of README.md and docs/sweep.md from real runs, so they cannot go stale.

    python docs/figures.py            # run the demo, the standard sweep and examples/minimal.py (about 5 min on
                                      # 2 CPUs), keep their results in docs/results/, rewrite the marked blocks
    python docs/figures.py --render   # rewrite the blocks from docs/results/ without running anything
    python docs/figures.py --check    # exit 1 when a block differs from what docs/results/ renders to (CI runs it)

A block is the text between ``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lightning_prune.app.experiment import summary_table  # noqa: E402
from lightning_prune.report import PLOT_FILE, Run, Sweep, load_sweep, markdown_table  # noqa: E402

RESULTS = ROOT / "docs" / "results"
#: the environment that makes torch, oneDNN and MKL use their AVX2 kernels, as on an x86 CPU without AVX-512
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
ACCURACIES = ("val_acc", "test_acc", "dense_val_acc", "dense_test_acc")
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "sweep.md")
_BLOCK = re.compile(r"(<!-- figures:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /figures:(?P=name) -->)", re.S)


# -- running ------------------------------------------------------------------------------------------------------
def run_all() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        _app(["+trainer.enable_progress_bar=false", f"hydra.run.dir={tmp}/demo"], env)
        demo = json.loads((Path(tmp) / "demo" / "metrics.json").read_text())
        demo["command_wall_s"] = time.perf_counter() - started
        # the same run on the vector kernels of another CPU: how much the accuracies vary across machines
        _app(["+trainer.enable_progress_bar=false", f"hydra.run.dir={tmp}/demo_avx2"], {**env, **AVX2})
        other = json.loads((Path(tmp) / "demo_avx2" / "metrics.json").read_text())

        started = time.perf_counter()
        _app(["experiment=sweep", "+trainer.enable_progress_bar=false", f"hydra.sweep.dir={tmp}/sweep"], env)
        wall = time.perf_counter() - started
        sweep = load_sweep(Path(tmp) / "sweep")
        subprocess.run([sys.executable, "-m", "lightning_prune.report", f"{tmp}/sweep"], check=True, env=env,
                       capture_output=True)
        shutil.copy(Path(tmp) / "sweep" / PLOT_FILE, ROOT / "docs" / "sweep.png")

    minimal = subprocess.run([sys.executable, str(ROOT / "examples" / "minimal.py")], check=True, env=env,
                             capture_output=True, text=True).stdout
    machine = f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"
    (RESULTS / "demo.json").write_text(json.dumps({**demo, "machine": machine}, indent=2) + "\n")
    kernels = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                             check=True, env=env, capture_output=True, text=True).stdout.strip()
    (RESULTS / "demo_avx2.json").write_text(json.dumps(
        {"environment": AVX2, "default_kernels": kernels, **{k: other[k] for k in ACCURACIES}}, indent=2) + "\n")
    (RESULTS / "sweep.json").write_text(json.dumps(
        {"machine": machine, "wall_s": wall, "runs": [run.metrics for run in sweep.runs]}, indent=2) + "\n")
    (RESULTS / "minimal.txt").write_text("\n".join(line for line in minimal.splitlines()
                                                   if line.lstrip().startswith(("dense:", "pruned:"))) + "\n")


def _app(overrides: list[str], env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "lightning_prune.app", *overrides], check=True, env=env,
                   capture_output=True, cwd=ROOT)


# -- rendering ----------------------------------------------------------------------------------------------------
def blocks() -> dict[str, str]:
    """Every block's text, rendered from docs/results/."""
    demo = json.loads((RESULTS / "demo.json").read_text())
    sweep = json.loads((RESULTS / "sweep.json").read_text())
    runs = Sweep([Run(Path(f"{i}/metrics.json"), metrics) for i, metrics in enumerate(sweep["runs"])], [])
    minimal = dict(_minimal_line(line) for line in (RESULTS / "minimal.txt").read_text().splitlines())
    headline, table = summary_table(demo).split("\n", 1)
    demo_table = f"{headline}\n\n{table}"
    other = json.loads((RESULTS / "demo_avx2.json").read_text())
    variation = (
        f"Runs on one machine repeat exactly (seeded, deterministic algorithms, one thread), but the accuracies "
        f"depend on the CPU's vector kernels, which sum floats in another order: this machine used "
        f"{other['default_kernels']}; with the AVX2 kernels of a CPU without AVX-512 "
        f"(`{' '.join(f'{k}={v}' for k, v in other['environment'].items())}`) the same run gives test accuracy "
        f"{other['dense_test_acc']:.4f} dense -> {other['test_acc']:.4f} pruned "
        f"({100 * (other['test_acc'] - other['dense_test_acc']):+.2f} points), so expect a few tenths of a point "
        "either way (one test image is 0.37 points). Params and MACs are the same everywhere.")
    return {
        "demo": f"{demo_table}\n\n(`python -m lightning_prune.app`, {demo['command_wall_s']:.0f} s wall on "
                f"{demo['machine']}, dense baseline included.) {variation}\n",
        "sweep": _compact_sweep(sweep) + f"\n\nThe sweep took {_minutes(sweep['wall_s'])} on {sweep['machine']}.\n",
        "sweep-table": markdown_table(runs) + f"\n\n{len(runs.runs)} runs, {_minutes(sweep['wall_s'])} on "
                                              f"{sweep['machine']}.\n",
        "minimal": f"`examples/minimal.py` is a runnable version on digits (test accuracy {minimal['dense'][0]} "
                   f"dense -> {minimal['pruned'][0]} pruned, {minimal['dense'][1]} -> {minimal['pruned'][1]} "
                   "params).\n",
    }


def _compact_sweep(sweep: dict) -> str:
    runs = sorted(sweep["runs"], key=lambda m: (m["sparsity_level"], m["pruner"]))
    dense = runs[0].get("dense_test_acc")
    lines = [f"| sparsity | pruner | params | MACs per sample | test acc (dense {dense:.4f}) |",
             "| ---: | --- | ---: | ---: | ---: |"]
    for m in runs:
        lines.append(f"| {m['sparsity_level']:g} | {m['pruner']} | {m['params_after']:,} "
                     f"({m['params_after'] / m['params_before']:.0%}) | {m['macs_after']:,} "
                     f"({m['macs_after'] / m['macs_before']:.0%}) | {m['test_acc']:.4f} |")
    return "\n".join(lines)


def _minimal_line(line: str) -> tuple[str, tuple[str, str]]:
    label, rest = line.split(":", 1)
    accuracy = re.search(r"test accuracy ([\d.]+)", rest)[1]
    params = re.search(r"params\s+([\d,]+)", rest)[1]
    return label.strip(), (accuracy, params)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


def rewrite(check: bool) -> list[str]:
    """Put the rendered blocks into the documents (or, with ``check``, only compare); returns the stale ones."""
    rendered, stale = blocks(), []
    for document in DOCUMENTS:
        text = document.read_text()

        def fill(match: re.Match, document: Path = document) -> str:
            name = match["name"]
            if name not in rendered:
                raise SystemExit(f"{document.name}: unknown figures block {name!r}")
            if match["body"] != rendered[name]:
                stale.append(f"{document.relative_to(ROOT)}:{name}")
            return match[1] + rendered[name] + match[4]

        new = _BLOCK.sub(fill, text)
        if not check and new != text:
            document.write_text(new)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--render", action="store_true", help="rewrite the blocks from docs/results/ only")
    mode.add_argument("--check", action="store_true", help="exit 1 when a block is not what docs/results/ gives")
    args = parser.parse_args(argv)
    if not (args.render or args.check):
        run_all()
    stale = rewrite(check=args.check)
    if args.check and stale:
        print(f"stale figures (run python docs/figures.py --render): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
