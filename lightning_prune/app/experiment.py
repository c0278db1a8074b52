"""One run of the Hydra app: train dense, prune on the schedule, fuse, test, and record what pruning bought.

Kept apart from ``examples/train.py`` so tests can run it on a composed config without a subprocess.
"""

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch import LightningModule, Trainer, seed_everything
from omegaconf import DictConfig, OmegaConf

from lightning_prune.app.data import DigitsDataModule
from lightning_prune.measure import count_macs, count_params, latency_ms
from lightning_prune.report import METRICS_FILE

RESOLVED_CONFIG_FILE = "resolved_config.yaml"
CHECKPOINT_FILE = "pruned.ckpt"


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the experiment ``cfg`` describes; write metrics.json, the resolved config and pruned checkpoint.

    Needs Hydra's config to be set (inside ``@hydra.main``, or ``HydraConfig.instance().set_config`` after
    ``compose(..., return_hydra_config=True)``): the overrides and group choices go into metrics.json.
    """
    started = time.perf_counter()
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    output_dir = Path(cfg.output_dir)
    datamodule: DigitsDataModule = instantiate(cfg.data)
    example_input = datamodule.example_input(cfg.measure.batch_size)
    # Built first so that a bad pruner or sparsity fails before any training.
    callbacks = instantiate(cfg.callbacks)

    dense_val_acc = dense_test_acc = None
    if cfg.dense_baseline:
        dense_val_acc, dense_test_acc = _train_dense_baseline(cfg, datamodule)

    seed_everything(cfg.seed, workers=True)
    module: LightningModule = instantiate(cfg.module)
    module.example_input_array = example_input  # lets pruning read models fx cannot trace (transformers)
    dense_net = copy.deepcopy(module.net)
    trainer: Trainer = instantiate(cfg.trainer, callbacks=list(callbacks.values()))
    trainer.fit(module, datamodule=datamodule)
    val_acc, test_acc = _evaluate(trainer, module, datamodule)
    # Dense and pruned timed back to back, so a change in machine load between them cannot pose as a speed-up.
    before = _measure(dense_net, example_input, cfg.measure)
    after = _measure(module.net, example_input, cfg.measure)
    trainer.save_checkpoint(output_dir / CHECKPOINT_FILE)

    hydra_cfg = HydraConfig.get()
    metrics = {
        "sparsity_level": cfg.pruner.sparsity_level,
        "pruner": hydra_cfg.runtime.choices["pruner"],
        "model": hydra_cfg.runtime.choices["model"],
        "schedule": cfg.schedule.name,
        **{f"{name}_before": value for name, value in before.items()},
        **{f"{name}_after": value for name, value in after.items()},
        "val_acc": val_acc,
        "test_acc": test_acc,
        "dense_val_acc": dense_val_acc,
        "dense_test_acc": dense_test_acc,
        "overrides": list(hydra_cfg.overrides.task),
        "seed": cfg.seed,
        "wall_time_s": time.perf_counter() - started,
    }
    if trainer.is_global_zero:
        OmegaConf.save(cfg, output_dir / RESOLVED_CONFIG_FILE, resolve=True)
        (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        print(summary_table(metrics))
    return metrics


def _train_dense_baseline(cfg: DictConfig, datamodule: DigitsDataModule) -> tuple[float, float]:
    """The same network, seed and epochs without pruning: the accuracy that pruning is judged against."""
    seed_everything(cfg.seed, workers=True)
    module: LightningModule = instantiate(cfg.module)
    trainer: Trainer = instantiate(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)
    return _evaluate(trainer, module, datamodule)


def _evaluate(trainer: Trainer, module: LightningModule, datamodule: DigitsDataModule) -> tuple[float, float]:
    """Validation and test accuracy of the model as it is now (after fit: the pruned, fused one)."""
    val_acc = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val_acc"]
    test_acc = trainer.test(module, datamodule=datamodule, verbose=False)[0]["test_acc"]
    return val_acc, test_acc


def _measure(net: torch.nn.Module, example_input: torch.Tensor, settings: DictConfig) -> dict[str, float]:
    """Size and CPU speed; Lightning has already moved the model back to the CPU when fit and test end."""
    net.cpu()
    return {
        "params": count_params(net),
        "macs": count_macs(net, example_input),
        "latency_ms": latency_ms(net, example_input, threads=settings.threads, min_run_time=settings.min_run_time),
    }


def summary_table(metrics: dict[str, Any]) -> str:
    """Dense vs pruned as a markdown table: params, MACs, CPU latency and test accuracy."""
    rows = [
        ("params", metrics["params_before"], metrics["params_after"], "{:,}"),
        ("MACs", metrics["macs_before"], metrics["macs_after"], "{:,}"),
        ("latency (ms)", metrics["latency_ms_before"], metrics["latency_ms_after"], "{:.3f}"),
    ]
    lines = [
        f"Pruned with {metrics['pruner']} at sparsity {metrics['sparsity_level']}:",
        "| | dense | pruned | pruned / dense |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.2f} |" for name, a, b, fmt in rows]
    dense_acc = metrics["dense_test_acc"]
    dense_text = "n/a" if dense_acc is None else f"{dense_acc:.4f}"
    change = "" if dense_acc is None else f"{100 * (metrics['test_acc'] - dense_acc):+.2f} points"
    lines.append(f"| test acc | {dense_text} | {metrics['test_acc']:.4f} | {change} |")
    return "\n".join(lines)
