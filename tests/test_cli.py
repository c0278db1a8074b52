"""Lightning's config system (LightningCLI, jsonargparse) reads constructor signatures: every built-in pruner names
its hyper-parameters, and the callback is built from a YAML file or the command line and prunes."""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_prune as lp

COMMON = {"sparsity_level", "prune_bias", "target", "allocation", "rules", "defaults"}
OWN = {lp.SaliencyPruner: set(), lp.FPGMPruner: {"dist"}, lp.LSTMSaliencyPruner: {"tie_gates"},
       lp.TaylorPruner: {"beta", "sample"}, lp.ActivationPruner: {"beta"}}


@pytest.mark.parametrize("pruner", list(OWN), ids=lambda c: c.__name__)
def test_every_built_in_pruner_names_its_hyperparameters_in_its_signature(pruner):
    parameters = inspect.signature(pruner).parameters
    named = {name for name, p in parameters.items() if p.kind is not p.VAR_KEYWORD}
    assert COMMON | OWN[pruner] <= named
    for name in COMMON | OWN[pruner]:
        assert parameters[name].annotation is not inspect.Parameter.empty, name  # jsonargparse types the option
    built = pruner(sparsity_level=0.25, prune_bias=False, **({"tie_gates": True} if "tie_gates" in OWN[pruner] else {}))
    assert built.defaults == {"sparsity_level": 0.25, "prune_bias": False}


def test_every_exported_pruner_is_covered():
    exported = {getattr(lp, name) for name in lp.__all__ if name.endswith("Pruner")}
    concrete = {c for c in exported if not inspect.isabstract(c) and c is not lp.StatisticsPruner}
    assert concrete == set(OWN)


def test_the_seeds_defaults_dict_still_works_and_keywords_win_over_it():
    assert lp.SaliencyPruner({"sparsity_level": 0.3}).defaults == {"sparsity_level": 0.3, "prune_bias": True}
    assert lp.SaliencyPruner({"sparsity_level": 0.3}, sparsity_level=0.2).defaults["sparsity_level"] == 0.2
    assert lp.TaylorPruner({"prune_bias": False}, beta=0.5).defaults == {"sparsity_level": 0.5, "prune_bias": False}
    assert lp.FPGMPruner(0.3).defaults["sparsity_level"] == 0.3
    with pytest.raises(lp.PruningConfigError, match="either sparsity_level"):
        lp.TaylorPruner({"sparsity_level": 0.3}, target={"macs": 0.5})
    with pytest.raises(lp.PruningConfigError, match=r"sparsity_level must be a number in \[0, 1\), got 1.5"):
        lp.ActivationPruner(sparsity_level=1.5)
    with pytest.raises(lp.PruningConfigError, match="prune_bias must be True or False, got 'no'"):
        lp.FPGMPruner(prune_bias="no")


class Tiny(pl.LightningModule):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))
        self.example_input_array = torch.zeros(2, 4)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(16, 4, generator=generator), torch.randint(0, 2, (16,), generator=generator))
        return DataLoader(data, batch_size=4)


TRAINER = ["--trainer.max_steps=3", "--trainer.accelerator=cpu", "--trainer.logger=false",
           "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
           "--trainer.enable_model_summary=false"]

YAML = """\
trainer:
  callbacks:
    - class_path: lightning_prune.StructuredPruning
      init_args:
        pruner: {class_path: lightning_prune.SaliencyPruner, init_args: {sparsity_level: 0.5}}
        schedule: linear
"""


@pytest.fixture(autouse=True)
def _no_pytest_arguments(monkeypatch):
    """LightningCLI warns when ``args`` is given while ``sys.argv`` holds pytest's own arguments."""
    monkeypatch.setattr("sys.argv", ["cli"])


def _pruning(trainer: pl.Trainer) -> lp.StructuredPruning:
    found = [c for c in trainer.callbacks if isinstance(c, lp.StructuredPruning)]
    assert len(found) == 1
    return found[0]


def test_a_lightning_cli_yaml_builds_the_callback_and_fit_prunes(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(YAML)  # the README's YAML
    cli = LightningCLI(Tiny, args=["fit", "--config", str(config), *TRAINER], save_config_callback=None)
    pruning = _pruning(cli.trainer)
    assert isinstance(pruning.pruner, lp.SaliencyPruner) and pruning.scheduler.schedule == "linear"
    assert pruning.fused and pruning.sparsity() == 0.5
    assert cli.model.net[0].out_features == 4 and cli.model.net[2].in_features == 4


def test_the_command_line_appends_the_callback_with_a_pruners_own_knobs_and_a_budget():
    args = ["--trainer.callbacks+=lightning_prune.StructuredPruning",
            "--trainer.callbacks.pruner=lightning_prune.TaylorPruner", "--trainer.callbacks.pruner.beta=0.5",
            "--trainer.callbacks.pruner.sample=step", "--trainer.callbacks.pruner.prune_bias=false",
            "--trainer.callbacks.pruner.target={params: 0.6}", "--trainer.callbacks.schedule=oneshot"]
    cli = LightningCLI(Tiny, run=False, args=[*args, *TRAINER], save_config_callback=None)
    pruner = _pruning(cli.trainer).pruner
    assert isinstance(pruner, lp.TaylorPruner)
    assert (pruner.beta, pruner.sample, pruner.defaults["prune_bias"]) == (0.5, "step", False)
    assert pruner.budget == lp.Budget(params=0.6)
    cli.trainer.fit(cli.model)
    assert 0.5 < pruner.budget_reached <= 0.6 and cli.model.net[0].out_features < 8


def test_a_misspelt_option_is_refused_by_the_cli_naming_it(capsys):
    args = ["--trainer.callbacks+=lightning_prune.StructuredPruning",
            "--trainer.callbacks.pruner=lightning_prune.FPGMPruner", "--trainer.callbacks.pruner.sparsity_levl=0.5"]
    with pytest.raises(SystemExit):
        LightningCLI(Tiny, run=False, args=[*args, *TRAINER], save_config_callback=None)
    assert "sparsity_levl" in capsys.readouterr().err
