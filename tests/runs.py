"""The tiny Lightning runs the callback tests share: an 8 -> 16 -> 16 -> 3 classifier, its data and probe input, a
quiet CPU Trainer, callbacks that count or record, a pruner whose fusion is wrong on purpose, a logger's records,
and a 2-rank DDP script started in its own process."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune.callback import StructuredPruning
from lightning_prune.sparsifier import SaliencyPruner

REPO_ROOT = Path(__file__).resolve().parents[1]
IN, HIDDEN, CLASSES = 8, 16, 3
BATCHES_PER_EPOCH = 4


class TinyClassifier(pl.LightningModule):
    """8 -> 16 -> 16 -> 3; with ``config=None`` the two hidden layers are pruned, the classifier is kept."""

    def __init__(self, softmax_inside: bool = False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                                 nn.Linear(HIDDEN, CLASSES))
        self.softmax_inside = softmax_inside
        self.test_widths: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.softmax_inside:  # the hidden channels meet a softmax: they cannot be removed exactly
            x = torch.softmax(self.net[0](x), dim=-1)
            return self.net[4](self.net[3](self.net[2](x)))
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_widths.append(self.net[0].out_features)
        self.log("test_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader(batches: int = BATCHES_PER_EPOCH, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * 8, IN, generator=generator)
    y = torch.randint(0, CLASSES, (batches * 8,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def probe() -> torch.Tensor:
    return torch.randn(5, IN, generator=torch.Generator().manual_seed(1))


def trainer_for(tmp_path, callbacks, **overrides) -> pl.Trainer:
    options = {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False, "enable_progress_bar": False,
               "enable_model_summary": False, "enable_checkpointing": False, "default_root_dir": tmp_path,
               "num_sanity_val_steps": 0, **overrides}
    return pl.Trainer(callbacks=callbacks, **options)


def pruning(sparsity: float = 0.5, **kwargs) -> StructuredPruning:
    return StructuredPruning(SaliencyPruner(sparsity_level=sparsity), **kwargs)


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def assert_shrunk(model: TinyClassifier) -> None:
    """Both hidden layers lost half their channels; the classifier kept its classes; no masks remain."""
    first, second, head = model.net[0], model.net[2], model.net[4]
    assert (first.in_features, first.out_features) == (IN, HIDDEN // 2)
    assert (second.in_features, second.out_features) == (HIDDEN // 2, HIDDEN // 2)
    assert (head.in_features, head.out_features) == (HIDDEN // 2, CLASSES)
    assert first.weight.shape == (HIDDEN // 2, IN) and head.weight.shape == (CLASSES, HIDDEN // 2)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert not any(".parametrizations." in key for key in model.state_dict())


class BatchCounter(Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1


class CorruptingPruner(SaliencyPruner):
    """Fusion that changes one hidden unit's bias: what verify is there to catch."""

    def prune(self):
        model = super().prune()
        with torch.no_grad():
            model.net[2].bias.add_(1.0)
        return model


class SparsityRecorder(Callback):
    """Placed after StructuredPruning: the fraction of masked rows after each training batch."""

    def __init__(self, pruning_callback: StructuredPruning):
        self.pruning = pruning_callback
        self.fractions: list[float] = []
        self.at_sanity_end: float | None = None

    def _fraction(self) -> float:
        masks = [state["mask"] for state in self.pruning.pruner.state.values()]
        return sum(int((~m).sum()) for m in masks) / sum(m.numel() for m in masks)

    def on_sanity_check_end(self, trainer, pl_module):
        self.at_sanity_end = self._fraction()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.fractions.append(self._fraction())


@contextlib.contextmanager
def logged(logger_name: str) -> Iterator[list[logging.LogRecord]]:
    """The records a logger emits inside the block (Lightning's loggers do not propagate to pytest's caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def run_ddp_script(tmp_path, source: str) -> subprocess.CompletedProcess:
    """Run a 2-rank DDP script in a fresh process (Lightning re-launches it per rank) with a clean DDP env.

    The scripts end with ``torch.distributed.destroy_process_group()``: a process that exits while the gloo
    process group's threads still run can die in std::terminate ("terminate called without an active exception",
    return code -6), now and then, after all its work is done.
    """
    script = tmp_path / "ddp_script.py"
    script.write_text(source)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)


def two_ranks_and_one_process(tmp_path, source: str, name: str) -> tuple[list[dict], dict]:
    """Run ``source`` on 2 ranks (:func:`run_ddp_script`; each rank saves ``fit(2)``'s results to ``rank{r}.pt``),
    then its ``fit(1)`` in this process: the two ranks' results and the single process's, to compare."""
    run = run_ddp_script(tmp_path, source)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    namespace: dict = {}
    exec(compile(source, name, "exec"), namespace)
    return ranks, namespace["fit"](1)
