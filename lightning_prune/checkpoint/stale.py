"""Checkpoint files written before the sparsity schedule finished: a ModelCheckpoint's best file that stands for a
wider model than the fused one."""

from __future__ import annotations

import os
from typing import Any

from lightning_prune.checkpoint.files import read_checkpoint
from lightning_prune.checkpoint.keys import masked_sparsity


def masked_sparsity_of_file(path: str | os.PathLike) -> float | None:
    """:func:`masked_sparsity` of a checkpoint file's state dict; None when it holds no masks or cannot be read."""
    try:
        checkpoint = read_checkpoint(path, mmap=True)
    except Exception:
        return None
    return masked_sparsity(checkpoint.get("state_dict", checkpoint))


def stale_best_checkpoints(checkpoint_callbacks: list[Any], target: float) -> list[str]:
    """A warning for each ModelCheckpoint whose best checkpoint was written below the sparsity ``target`` (before the
    schedule finished): it stands for a wider model than the fused one."""
    warnings = []
    for callback in checkpoint_callbacks:
        path = getattr(callback, "best_model_path", "")
        if not path or not getattr(callback, "monitor", None) or path == callback.last_model_path:
            continue
        level = masked_sparsity_of_file(path)
        if level is not None and level < target - 1e-6:
            warnings.append(
                f"ModelCheckpoint's best checkpoint {path} was written at sparsity {level:.3f}, below the target "
                f"{target:.3f} (before the schedule finished): it stands for a wider model than the fused one. "
                "trainer.test(ckpt_path='best') refuses to widen this model; load that checkpoint on its own with "
                "lightning_prune.load_pruned(MyModule(...), path)."
            )
    return warnings
