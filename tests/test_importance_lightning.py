"""Pruners that learn from the run, inside Lightning: where they sample, DDP, resume, budgets through the callback."""

from __future__ import annotations

import functools
import textwrap

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision

from lightning_prune import (
    ActivationPruner,
    BaseStructuredSparsifier,
    PruningConfigError,
    SaliencyPruner,
    StructuredPruning,
    TaylorPruner,
)
from lightning_prune.app.data import DigitsDataModule
from lightning_prune.app.models import DigitsCNN
from lightning_prune.app.module import LitClassifier
from tests.checks import cheapest_digits_cnn_class
from tests.runs import two_ranks_and_one_process

SCRIPT = textwrap.dedent(
    '''
    import sys
    from pathlib import Path

    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_prune import ActivationPruner, StructuredPruning, TaylorPruner


    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
            self.example_input_array = torch.zeros(2, 8)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2)

        def train_dataloader(self):
            """Global batches of 16 in order; rank r of n takes samples r, r + n, ... of each."""
            generator = torch.Generator().manual_seed(0)
            data = TensorDataset(torch.randn(64, 8, generator=generator),
                                 torch.randint(0, 3, (64,), generator=generator))
            ranks, rank = self.trainer.world_size, self.trainer.global_rank
            return DataLoader(data, batch_size=16 // ranks, sampler=range(rank, 64, ranks))


    def fit(devices):
        """Two runs over the same global batches, on ``devices`` CPU processes."""
        results = {}
        pruners = {"activation": (ActivationPruner(sparsity_level=0.5), None),
                   "taylor": (TaylorPruner(beta=0.5), {"params": 0.6})}
        for name, (pruner, target) in pruners.items():
            pl.seed_everything(0, verbose=False)
            callback = StructuredPruning(pruner, schedule="linear", start_step=1, end_step=4, prune_on_fit_end=False,
                                         target=target)
            run = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                             max_steps=4, use_distributed_sampler=False, callbacks=[callback], logger=False,
                             enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
            run.fit(Net())
            results[name] = {"masks": {k: s["mask"].clone() for k, s in pruner.state.items()},
                             "statistics": pruner.statistics().cpu(), "rank": run.global_rank}
        return results


    if __name__ == "__main__":
        results = fit(2)
        torch.save(results, Path(sys.argv[1]) / f"rank{results['taylor']['rank']}.pt")
        torch.distributed.destroy_process_group()
    '''
)


def test_two_ddp_ranks_decide_what_one_process_decides_over_the_same_global_batches(tmp_path):
    ranks, single = two_ranks_and_one_process(tmp_path, SCRIPT, "importance_ddp_script")
    for name in ("activation", "taylor"):
        expected = single[name]
        assert any(not bool(mask.all()) for mask in expected["masks"].values())
        for rank in ranks:
            # the statistics were averaged over the ranks before the last decision: the one-process values
            torch.testing.assert_close(rank[name]["statistics"], expected["statistics"], rtol=1e-4, atol=1e-8)
            for fqn, mask in expected["masks"].items():
                assert torch.equal(rank[name]["masks"][fqn], mask), (name, fqn)


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
        self.example_input_array = torch.zeros(2, 8)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int = 48, batch_size: int = 8):
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 8, generator=generator),
                                          torch.randint(0, 3, (n,), generator=generator))
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    defaults = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
                "enable_checkpointing": False, "default_root_dir": tmp_path}
    return pl.Trainer(callbacks=callbacks, **{**defaults, **kwargs})


class GradientProbe(Callback):
    """Records (sum over each row of the first layer, and its bias, of w * grad) ** 2 where the pruner samples."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        layer = pl_module.net[0].parametrizations
        weight, bias = layer.weight.original, layer.bias.original
        self.last = ((weight * weight.grad).sum(1) + bias * bias.grad).detach() ** 2
        self.norm = float(torch.cat([p.grad.flatten() for p in pl_module.parameters()]).norm())
        self.steps = getattr(self, "steps", 0) + 1


def test_taylor_samples_unscaled_accumulated_unclipped_gradients_once_per_optimizer_step(tmp_path):
    pruner = TaylorPruner(beta=0.0, sparsity_level=0.25)
    probe = GradientProbe()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer = _trainer(tmp_path, [StructuredPruning(pruner, start_step=100, prune_on_fit_end=False), probe],
                       plugins=[MixedPrecision("16-mixed", "cpu", scaler)], accumulate_grad_batches=2,
                       gradient_clip_val=1e-3, max_steps=3)
    trainer.fit(Net(), _loader())
    assert pruner.sample == "step" and probe.steps == 3
    assert probe.norm > 100 * 1e-3  # seen before Lightning clips to gradient_clip_val=1e-3
    assert pruner.samples == 3  # one per optimizer step, not one per micro-batch (6 backward passes)
    ids = pruner.plan.members[0].labels
    torch.testing.assert_close(pruner.values()[ids], probe.last)  # not 1024 ** 2 times it


def test_a_run_resumed_mid_schedule_decides_as_an_uninterrupted_one(tmp_path):
    def run(epochs, callbacks=(), ckpt_path=None):  # 3 optimizer steps per epoch
        pl.seed_everything(0, verbose=False)
        pruner = TaylorPruner(beta=0.5)
        pruning = StructuredPruning(pruner, schedule="linear", start_step=1, end_step=5, prune_on_fit_end=False,
                                    target={"params": 0.5})
        trainer = _trainer(tmp_path, [pruning, *callbacks], max_epochs=epochs, enable_checkpointing=bool(callbacks))
        trainer.fit(Net(), _loader(24), ckpt_path=ckpt_path)
        return pruner

    uninterrupted = run(2)
    run(1, [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)])
    resumed = run(2, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    torch.testing.assert_close(resumed.statistics(), uninterrupted.statistics())
    for fqn, state in uninterrupted.state.items():
        assert torch.equal(resumed.state[fqn]["mask"], state["mask"]), fqn
    # 195 params, a channel of the first layer holds 12 of them: the budget lands within one channel
    assert 0.5 - 12 / 195 <= uninterrupted.budget_reached <= 0.5


def test_the_callback_refuses_a_target_it_cannot_honour():
    with pytest.raises(PruningConfigError, match="either sparsity_level"):
        SaliencyPruner(sparsity_level=0.4, target={"macs": 0.5})
    with pytest.raises(PruningConfigError, match=r"unknown budget key\(s\) \['mac'\]"):
        StructuredPruning(SaliencyPruner(), target={"mac": 0.5})
    with pytest.raises(PruningConfigError, match="target and shrink_every_n_steps"):
        StructuredPruning(SaliencyPruner(), target={"macs": 0.5}, shrink_every_n_steps=2)

    class Custom(BaseStructuredSparsifier):
        def update_mask(self, module, tensor_name, **kwargs):
            pass

    with pytest.raises(PruningConfigError, match="Custom cannot prune to a budget .* scores channels"):
        StructuredPruning(Custom(), target={"macs": 0.5})


class FrozenNormNet(Net):
    """Net with a BatchNorm after its first layer, fine-tuned in eval mode (frozen statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                       torch.nn.Linear(16, 3))

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))


@pytest.mark.parametrize("make", [lambda: ActivationPruner(beta=0.5), lambda: TaylorPruner(beta=0.5)],
                         ids=["activation", "taylor"])
def test_a_fit_of_a_module_in_eval_mode_samples_at_every_training_step(tmp_path, make):
    """Lightning keeps the mode the module is in at fit(): model.eval() then fit() is the frozen-BatchNorm recipe.
    The pruner samples in the training steps (4), not in validation (2 batches per check) or the analysis."""
    pl.seed_everything(0, verbose=False)
    model, pruner = FrozenNormNet().eval(), make()
    statistics = model.net[1].running_mean.clone()
    trainer = _trainer(tmp_path, [StructuredPruning(pruner, schedule="linear", start_step=1, end_step=3)],
                       max_steps=4, val_check_interval=2, limit_val_batches=2, num_sanity_val_steps=2)
    trainer.fit(model, _loader(), _loader(16))
    assert pruner.samples == 4
    assert model.net[0].out_features == 8 and model.net[1].num_features == 8
    assert not model.training and torch.isin(model.net[1].running_mean, statistics).all()  # the kept ones, frozen


@pytest.mark.parametrize("make", [ActivationPruner, TaylorPruner], ids=["activation", "taylor"])
def test_a_macs_budget_through_the_callback_lands_within_the_cheapest_class_and_says_where(tmp_path, caplog, make):
    """The digits CNN (3 conv-BN-ReLU) on digits, a linear ramp over 0.2-0.6 of 3 epochs (10 batches each) to half
    the dense MACs: ActivationPruner landed 1.5 cheapest channels below the budget (0.4921), its last step left with
    costly ones only."""
    pl.seed_everything(0, verbose=False)
    module = LitClassifier(DigitsCNN(), functools.partial(torch.optim.AdamW, lr=2e-3))
    pruning = StructuredPruning(make(target={"macs": 0.5}), schedule="linear", start_step=0.2, end_step=0.6)
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        _trainer(tmp_path, [pruning], max_epochs=3, limit_train_batches=10, limit_val_batches=0,
                 num_sanity_val_steps=0).fit(module, DigitsDataModule())
    landing = pruning.summary()["budget"]
    cheapest = cheapest_digits_cnn_class(module.net) / 599_680  # the dense MACs per sample
    assert landing["resolution"] == pytest.approx(cheapest)
    assert 0.5 - cheapest < landing["reached"] <= 0.5
    assert f"budget macs=0.5: landed at {landing['reached']:.4f} of the dense macs" in caplog.text
