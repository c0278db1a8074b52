"""One run of the Hydra app: train dense, prune on the schedule, fuse, test, and record what pruning bought.

Kept apart from the entry point (``cli.py``) so tests can run it on a composed config without a subprocess.
"""

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from omegaconf import DictConfig, OmegaConf

from lightning_prune.app.data import DigitsDataModule
from lightning_prune.app.lm_data import StdlibDataModule
from lightning_prune.measure import count_macs, count_params, latency_ms
from lightning_prune.report import METRICS_FILE

RESOLVED_CONFIG_FILE = "resolved_config.yaml"
CHECKPOINT_FILE = "pruned.ckpt"
LOG_FILE = "train.log"
log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the experiment ``cfg`` describes; write metrics.json, the resolved config and pruned checkpoint.

    Needs Hydra's config to be set (inside ``@hydra.main``, or ``HydraConfig.instance().set_config`` after
    ``compose(..., return_hydra_config=True)``): the overrides and group choices go into metrics.json.
    Everything that can be checked without training is checked before the dense baseline trains: the pruner and
    schedule (when the callbacks are built), and the tensors against the model (``StructuredPruning.check``).
    The model is judged by ``cfg.score``: the module logs ``val_<score>`` and ``test_<score>`` (``acc`` for the
    classifiers, ``ppl`` for the language model), and metrics.json holds them under those names.
    """
    score = cfg.get("score", "acc")
    started = time.perf_counter()
    if cfg.torch_threads is not None:
        torch.set_num_threads(cfg.torch_threads)
    output_dir = Path(cfg.output_dir)
    log.info(f"Writing outputs to {output_dir}")
    datamodule: DigitsDataModule | StdlibDataModule = instantiate(cfg.data)
    example_input = datamodule.example_input(cfg.measure.batch_size)
    callbacks = instantiate(cfg.callbacks)
    pruning = callbacks["pruning"]
    if cfg.get("explain", False):  # +explain=true: print the plan and stop, nothing trained
        plan = pruning.explain(instantiate(cfg.module), example_input[:1])
        print(plan)
        return {f"val_{score}": None, "plan": plan.to_dict()}
    pruning.check(instantiate(cfg.module), example_input[:2])

    dense_val = dense_test = None
    if cfg.dense_baseline:
        dense_val, dense_test = _train_dense_baseline(cfg, datamodule, score)

    seed_everything(cfg.seed, workers=True)
    module: LightningModule = instantiate(cfg.module)
    module.example_input_array = example_input  # lets pruning read models fx cannot trace (transformers)
    dense_net = copy.deepcopy(module.net)
    trainer: Trainer = instantiate(cfg.trainer, callbacks=list(callbacks.values()))
    trainer.fit(module, datamodule=datamodule)
    val, test = _evaluate(trainer, module, datamodule, score)
    # Dense and pruned timed back to back, so a change in machine load between them cannot pose as a speed-up.
    before = _measure(dense_net, example_input, cfg.measure)
    after = _measure(module.net, example_input, cfg.measure)
    trainer.save_checkpoint(output_dir / CHECKPOINT_FILE, weights_only=False)

    hydra_cfg = HydraConfig.get()
    target = cfg.get("target")
    metrics = {
        # with a budget (+target.macs=...), the fraction of the dense cost removed: 1 - the budget
        "sparsity_level": pruning.pruner.defaults["sparsity_level"],
        "target": None if target is None else OmegaConf.to_container(target),
        "pruner": hydra_cfg.runtime.choices["pruner"],
        "model": hydra_cfg.runtime.choices["model"],
        "schedule": cfg.schedule.name,
        **pruning.summary(),
        "measure_batch_size": cfg.measure.batch_size,
        **{f"{name}_before": value for name, value in before.items()},
        **{f"{name}_after": value for name, value in after.items()},
        "score": score,
        f"val_{score}": val,
        f"test_{score}": test,
        f"dense_val_{score}": dense_val,
        f"dense_test_{score}": dense_test,
        "overrides": list(hydra_cfg.overrides.task),
        "seed": cfg.seed,
        "wall_time_s": time.perf_counter() - started,
    }
    if trainer.is_global_zero:
        OmegaConf.save(cfg, output_dir / RESOLVED_CONFIG_FILE, resolve=True)
        (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        log.info(summary_table(metrics))
        log.info(f"Outputs in {output_dir}: {METRICS_FILE}, {RESOLVED_CONFIG_FILE}, {CHECKPOINT_FILE}, {LOG_FILE}, "
                 "checkpoints/, logs/")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # exit without gloo/nccl threads still running
    return metrics


def _train_dense_baseline(cfg: DictConfig, datamodule: LightningDataModule, score: str) -> tuple[float, float]:
    """The same network, seed and epochs without pruning: the score that pruning is judged against."""
    seed_everything(cfg.seed, workers=True)
    module: LightningModule = instantiate(cfg.module)
    trainer: Trainer = instantiate(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)
    return _evaluate(trainer, module, datamodule, score)


def _evaluate(trainer: Trainer, module: LightningModule, datamodule: LightningDataModule,
              score: str) -> tuple[float, float]:
    """Validation and test score of the model as it is now (after fit: the pruned, fused one)."""
    val = trainer.validate(module, datamodule=datamodule, verbose=False)[0][f"val_{score}"]
    test = trainer.test(module, datamodule=datamodule, verbose=False)[0][f"test_{score}"]
    return val, test


def _measure(net: torch.nn.Module, example_input: torch.Tensor, settings: DictConfig) -> dict[str, float]:
    """Size, MACs per sample (the basis of the callback's summary too) and CPU latency of the whole batch.

    Lightning has already moved the model back to the CPU when fit and test end.
    """
    net.cpu()
    return {
        "params": count_params(net),
        "macs": count_macs(net, example_input) // len(example_input),
        "latency_ms": latency_ms(net, example_input, threads=settings.threads, min_run_time=settings.min_run_time),
    }


def summary_table(metrics: dict[str, Any]) -> str:
    """Dense vs pruned as a markdown table: params, MACs per sample, CPU latency and test accuracy."""
    rows = [
        ("params", metrics["params_before"], metrics["params_after"], "{:,}"),
        ("MACs per sample", metrics["macs_before"], metrics["macs_after"], "{:,}"),
        (f"latency (ms, batch {metrics.get('measure_batch_size', '?')})", metrics["latency_ms_before"],
         metrics["latency_ms_after"], "{:.3f}"),
    ]
    lines = [_headline(metrics), "| | dense | pruned | pruned / dense |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {fmt.format(a)} | {fmt.format(b)} | {b / a:.2f} |" for name, a, b, fmt in rows]
    score = metrics.get("score", "acc")
    dense, pruned = metrics[f"dense_test_{score}"], metrics[f"test_{score}"]
    dense_text = "n/a" if dense is None else f"{dense:.4f}"
    change = "" if dense is None else f"{100 * (pruned - dense):+.2f} points" if score == "acc" else \
        f"{pruned / dense:.2f}"
    lines.append(f"| test {score} | {dense_text} | {pruned:.4f} | {change} |")
    return "\n".join(lines)


def _headline(metrics: dict[str, Any]) -> str:
    """What was pruned, or that nothing was, and whether the schedule ran to its end with time to fine-tune."""
    if not metrics.get("pruned_tensors") or metrics["params_after"] >= metrics["params_before"]:
        reason = "no tensor was selected" if not metrics.get("pruned_tensors") else \
            f"the masks removed no channel (sparsity_level {metrics['sparsity_level']})"
        return f"Nothing was pruned with {metrics['pruner']}: {reason}; the model is the dense one."
    target = metrics.get("target")
    level = f"to the budget {target}" if target else f"at sparsity {metrics['sparsity_level']}"
    headline = f"Pruned with {metrics['pruner']} {level}"
    if metrics.get("schedule_completed") is False:
        return headline + " (the schedule was cut short: the rest of the target was applied at the end, unrecovered):"
    after = metrics.get("steps_after_last_pruning")
    return headline + (f", then {after} steps of fine-tuning:" if after is not None else ":")
