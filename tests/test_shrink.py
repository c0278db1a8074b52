"""Shrinking during training (``shrink_every_n_steps``): the same result as fusing at the end, on a smaller model.

A shrunk run and a masked-to-the-end run follow the same trajectory (the masked channels get zero gradient in
both), so every test here compares the two, or a resumed / distributed shrinking run with an uninterrupted one.
"""

from __future__ import annotations

import textwrap

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_prune.errors import PruningConfigError
from lightning_prune.measure import count_params
from tests.runs import (
    HIDDEN,
    TinyClassifier,
    assert_shrunk,
    loader,
    outputs,
    probe,
    pruning,
    run_ddp_script,
    trainer_for,
)

EPOCHS = 4  # 16 optimizer steps of 4 batches per epoch; the ramp in ``run`` ticks every 2 steps until step 12


class AdamClassifier(TinyClassifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


class ScheduledClassifier(TinyClassifier):
    """SGD with momentum and a per-step LR scheduler, whose state must outlive every shrink."""

    def __init__(self, scheduler: str):
        super().__init__()
        self.scheduler = scheduler

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        if self.scheduler == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        else:  # one-cycle also cycles the momentum stored in the param group
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.5, total_steps=20)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class WidthRecorder(Callback):
    """Placed after StructuredPruning: the parameter count of the model and of its optimizer after each step."""

    def __init__(self):
        self.model_params: list[int] = []
        self.optimizer_params: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.model_params.append(count_params(pl_module))
        self.optimizer_params.append(sum(p.numel() for g in trainer.optimizers[0].param_groups for p in g["params"]))


def run(tmp_path, model: TinyClassifier, shrink: int | None, schedule: str = "linear", precision: str = "32-true",
        max_epochs: int = EPOCHS, callbacks: tuple = (), ckpt_path=None):
    """A deterministic fit of ``model`` (built after seeding) with a ramp to 50% over steps 0..12."""
    callback = pruning(schedule=schedule, start_step=0, end_step=12, every_n_steps=2, shrink_every_n_steps=shrink)
    recorder = WidthRecorder()
    trainer = trainer_for(tmp_path, [callback, recorder, *callbacks], max_epochs=max_epochs, precision=precision,
                          deterministic=True, enable_checkpointing=bool(callbacks))
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer, callback, recorder


def seeded(factory, *args):
    pl.seed_everything(0, verbose=False)
    return factory(*args)


def assert_same_weights(actual: torch.nn.Module, expected: torch.nn.Module) -> None:
    expected_sd, actual_sd = expected.state_dict(), actual.state_dict()
    assert actual_sd.keys() == expected_sd.keys()
    for key in expected_sd:
        torch.testing.assert_close(actual_sd[key], expected_sd[key], atol=1e-5, rtol=0, msg=key)


# --- equivalence --------------------------------------------------------------------------------------------


# Adam runs in float64: shrinking changes how many terms a conv or matmul accumulates, and Adam's normalisation
# (m / sqrt(v)) amplifies that float32 rounding (~3e-3 on a conv net); in float64 the runs agree to ~1e-11.
@pytest.mark.parametrize(
    ("factory", "precision"),
    [(TinyClassifier, "32-true"), (AdamClassifier, "64-true")],
    ids=["sgd-momentum-float32", "adam-float64"],
)
@pytest.mark.parametrize("schedule", ["linear", "cubic"])
def test_shrinking_every_tick_ends_like_fusing_at_the_end(tmp_path, factory, precision, schedule):
    masked_model = seeded(factory)
    _, masked_callback, masked_widths = run(tmp_path / "masked", masked_model, None, schedule, precision)
    shrunk_model = seeded(factory)
    _, shrunk_callback, shrunk_widths = run(tmp_path / "shrunk", shrunk_model, 1, schedule, precision)

    assert masked_callback.fused and shrunk_callback.fused
    assert_shrunk(shrunk_model)
    x = probe().to(next(shrunk_model.parameters()).dtype)
    torch.testing.assert_close(outputs(shrunk_model, x), outputs(masked_model, x), atol=1e-5, rtol=1e-5)
    assert_same_weights(shrunk_model, masked_model)

    assert len(set(masked_widths.model_params)) == 1  # the masked run trained the full width throughout
    # the shrunk run narrowed several times, reached its final size before the last step, and its optimizer
    # always held exactly the model's (narrowed) parameters
    steps = shrunk_widths.model_params
    assert all(a >= b for a, b in zip(steps, steps[1:], strict=False)), steps
    assert len(set(steps)) >= 4, steps
    assert steps.index(count_params(shrunk_model)) < len(steps) - 2, steps
    assert shrunk_widths.optimizer_params == steps


# --- resume -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "precision"),
    [(TinyClassifier, "32-true"), (AdamClassifier, "64-true")],  # float64 for Adam, as above
    ids=["sgd-momentum-float32", "adam-float64"],
)
def test_resume_from_a_checkpoint_taken_after_a_shrink(tmp_path, factory, precision):
    uninterrupted = seeded(factory)
    run(tmp_path / "a", uninterrupted, 1, "cubic", precision)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    run(tmp_path / "b", seeded(factory), 1, "cubic", precision, max_epochs=2, callbacks=(checkpoint,))
    mid = tmp_path / "ckpt" / "epoch=1-step=8.ckpt"
    saved = torch.load(mid, weights_only=False)["state_dict"]
    # mid-schedule after shrinks: narrowed layers with masks on them again
    first = saved["net.0.parametrizations.weight.original"]
    assert first.shape[0] < HIDDEN and saved["net.0.parametrizations.weight.0.mask"].shape == (first.shape[0],)
    assert saved["net.4.weight"].shape[1] < HIDDEN

    resumed = seeded(factory)
    _, callback, widths = run(tmp_path / "c", resumed, 1, "cubic", precision, ckpt_path=mid)
    assert callback.fused
    assert widths.model_params[0] < count_params(seeded(factory))  # training went on from the narrow model
    assert widths.optimizer_params == widths.model_params
    assert_shrunk(resumed)
    assert_same_weights(resumed, uninterrupted)


# --- LR schedulers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["step", "one-cycle"])
def test_an_lr_scheduler_survives_the_optimizer_rebuild(tmp_path, scheduler):
    masked_model = seeded(ScheduledClassifier, scheduler)
    masked_trainer, _, _ = run(tmp_path / "masked", masked_model, None)
    shrunk_model = seeded(ScheduledClassifier, scheduler)
    shrunk_trainer, _, widths = run(tmp_path / "shrunk", shrunk_model, 1)
    assert len(set(widths.model_params)) > 2  # it really shrank during training

    masked_scheduler = masked_trainer.lr_scheduler_configs[0].scheduler
    shrunk_scheduler = shrunk_trainer.lr_scheduler_configs[0].scheduler
    optimizer = shrunk_trainer.optimizers[0]
    assert shrunk_scheduler.optimizer is optimizer
    assert shrunk_scheduler.last_epoch == masked_scheduler.last_epoch == EPOCHS * 4
    assert shrunk_scheduler.state_dict() == masked_scheduler.state_dict()
    for key in ("lr", "momentum"):
        assert optimizer.param_groups[0][key] == masked_trainer.optimizers[0].param_groups[0][key], key
    assert {id(p) for p in optimizer.param_groups[0]["params"]} == {id(p) for p in shrunk_model.parameters()}
    assert_same_weights(shrunk_model, masked_model)


# --- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 1.5, True], ids=["zero", "negative", "float", "bool"])
def test_bad_shrink_every_n_steps_is_refused_at_construction(bad):
    with pytest.raises(PruningConfigError, match=rf"shrink_every_n_steps.*{bad!r}"):
        pruning(shrink_every_n_steps=bad)


# --- DDP ----------------------------------------------------------------------------------------------------

DDP_SCRIPT = textwrap.dedent(
    '''
    import sys
    from pathlib import Path

    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.callbacks import Callback
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_prune.callback import StructuredPruning
    from lightning_prune.sparsifier import SaliencyPruner


    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


    class Widths(Callback):
        """After each step: this rank's parameter count, and its first layer's weights (to see training go on)."""

        def __init__(self):
            self.params, self.first = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.params.append(sum(p.numel() for p in pl_module.parameters()))
            self.first.append(pl_module.net[0].weight.detach().clone())


    if __name__ == "__main__":
        out = Path(sys.argv[1])
        pl.seed_everything(0, verbose=False)
        generator = torch.Generator().manual_seed(0)  # 32 samples: each rank gets its own 2 batches per epoch
        data = TensorDataset(torch.randn(32, 8, generator=generator), torch.randint(0, 3, (32,), generator=generator))
        # shrinks at step 2 (masks go back on) and at step 4 (schedule done); steps 5..8 train the fused model
        callback = StructuredPruning(SaliencyPruner(sparsity_level=0.5), schedule="linear", start_step=0,
                                     end_step=4, shrink_every_n_steps=2)
        widths = Widths()
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=4, callbacks=[callback, widths],
                             logger=False, enable_progress_bar=False, enable_model_summary=False,
                             enable_checkpointing=False, default_root_dir=out)
        model = Net()
        trainer.fit(model, DataLoader(data, batch_size=8))
        torch.save({"state_dict": model.state_dict(), "fused": callback.fused, "steps": trainer.global_step,
                    "params": widths.params, "first": widths.first}, out / f"rank{trainer.global_rank}.pt")
        torch.distributed.destroy_process_group()  # exit with no gloo thread left running
    '''
)


def test_ddp_ranks_stay_identical_through_mid_fit_shrinks(tmp_path):
    done = run_ddp_script(tmp_path, DDP_SCRIPT)
    log = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, log
    assert "unused parameters" not in log

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["steps"] == rank1["steps"] == 8
    assert rank0["fused"] and rank1["fused"]
    # narrower after step 2, narrowest from step 4 on, on both ranks
    assert rank0["params"] == rank1["params"]
    assert rank0["params"][0] > rank0["params"][1] > rank0["params"][3] == rank0["params"][-1]
    # the fused model kept training after the last shrink, with gradients synced across ranks
    assert not torch.equal(rank0["first"][3], rank0["first"][-1])
    for first0, first1 in zip(rank0["first"], rank1["first"], strict=True):
        assert torch.equal(first0, first1)

    weights0, weights1 = rank0["state_dict"], rank1["state_dict"]
    assert weights0.keys() == weights1.keys()
    assert not any(".parametrizations." in key for key in weights0)
    assert weights0["net.0.weight"].shape == (8, 8) and weights0["net.4.weight"].shape == (3, 8)
    for key in weights0:
        assert torch.equal(weights0[key], weights1[key]), key
