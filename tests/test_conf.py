"""Every Hydra config composes and instantiates, sweeps compose, and bad overrides fail clearly."""

import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch import Trainer
from omegaconf import DictConfig, OmegaConf

from lightning_prune.callback import StructuredPruning
from lightning_prune.errors import PruningConfigError
from lightning_prune.sparsifier import BaseStructuredSparsifier, Budget, FPGMPruner, LSTMSaliencyPruner

CONF_DIR = Path(__file__).resolve().parents[1] / "lightning_prune" / "app" / "conf"
GROUP_OPTIONS = sorted((path.parent.name, path.stem) for path in CONF_DIR.glob("*/*.yaml"))


def compose_app(overrides: list[str], tmp_path: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*overrides, f"output_dir={tmp_path}"])


def targets(node, path=""):
    """(path, node) for every node with a _target_ that no enclosing _target_ node instantiates already."""
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
            return
        for key in node:
            yield from targets(node[key], f"{path}.{key}".lstrip("."))


def test_every_group_has_its_options():
    assert set(GROUP_OPTIONS) >= {
        ("data", "digits"),
        ("model", "digits_cnn"),
        ("model", "digits_lstm"),
        ("model", "digits_resnet"),
        ("pruner", "saliency"),
        ("pruner", "fpgm"),
        ("pruner", "lstm_saliency"),
        ("pruner", "taylor"),
        ("pruner", "activation"),
        ("schedule", "oneshot"),
        ("schedule", "linear"),
        ("schedule", "cubic"),
        ("tensors", "auto"),
        ("trainer", "cpu"),
        ("trainer", "gpu"),
        ("trainer", "ddp"),
        ("callbacks", "default"),
        ("experiment", "sweep"),
    }


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=lambda value: value)
def test_every_option_composes_and_every_target_instantiates(group, option, tmp_path):
    cfg = compose_app([f"{group}={option}"], tmp_path)
    nodes = dict(targets(cfg))
    assert {"data", "model", "pruner", "module", "trainer", "callbacks.pruning"} <= set(nodes)
    for path, node in nodes.items():
        if path == "trainer" and node.accelerator == "gpu" and not torch.cuda.is_available():
            # Everything but the accelerator is still checked by building the Trainer on CPU.
            obj = instantiate(node, accelerator="cpu")
        else:
            obj = instantiate(node)
        assert obj is not None, path
    assert isinstance(instantiate(cfg.callbacks.pruning), StructuredPruning)
    assert isinstance(instantiate(cfg.pruner), BaseStructuredSparsifier)


def test_default_config_is_the_documented_one(tmp_path):
    cfg = compose_app([], tmp_path)
    assert cfg.seed == 0
    assert cfg.schedule.name == "cubic"
    assert cfg.pruner._target_ == "lightning_prune.sparsifier.SaliencyPruner"
    assert cfg.model._target_ == "lightning_prune.app.DigitsCNN"
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.callbacks.pruning.pruner == cfg.pruner
    assert cfg.callbacks.pruning.schedule == "cubic"
    assert cfg.module.optimizer._partial_ is True


def test_ddp_trainer_takes_the_device_count_as_one_override(tmp_path):
    cfg = compose_app(["trainer=ddp", "trainer.devices=4"], tmp_path)
    assert (cfg.trainer.strategy, cfg.trainer.devices, cfg.trainer.accelerator) == ("ddp", 4, "auto")
    trainer = instantiate(cfg.trainer, devices=2)  # as documented, with no accelerator override on a CPU machine
    assert isinstance(trainer, Trainer) and trainer.num_devices == 2
    assert trainer.accelerator.is_available()


def test_every_pruner_config_stands_alone(tmp_path):
    """A pruner yaml holds the pruner and nothing else, so a new one needs no other block to compose and run."""
    for path in sorted((CONF_DIR / "pruner").glob("*.yaml")):
        assert "@package" not in path.read_text(), path.name
        assert "_target_" in OmegaConf.load(path), path.name
    own = tmp_path / "conf"
    shutil.copytree(CONF_DIR, own)
    (own / "pruner" / "mine.yaml").write_text("_target_: lightning_prune.sparsifier.FPGMPruner\nsparsity_level: 0.3\n")
    with initialize_config_dir(config_dir=str(own), version_base="1.3"):
        cfg = compose("config", overrides=["pruner=mine", f"output_dir={tmp_path}"])
    callback = instantiate(cfg.callbacks.pruning)
    assert isinstance(callback.pruner, FPGMPruner) and callback.pruner.defaults["sparsity_level"] == 0.3


@pytest.mark.parametrize("schedule", sorted(path.stem for path in (CONF_DIR / "schedule").glob("*.yaml")))
def test_schedules_are_fractions_of_the_run(schedule, tmp_path):
    """Absolute steps fit one run length only; fractions of the run's optimizer steps fit any."""
    cfg = compose_app([f"schedule={schedule}"], tmp_path)
    for bound in (cfg.schedule.start_step, cfg.schedule.end_step):
        assert bound is None or (isinstance(bound, float) and 0.0 <= bound <= 1.0), bound
    assert instantiate(cfg.callbacks.pruning).scheduler.start_step == cfg.schedule.start_step


def test_lstm_experiment_pairs_the_lstm_with_tied_gates(tmp_path):
    cfg = compose_app(["experiment=lstm"], tmp_path)
    assert cfg.model._target_ == "lightning_prune.app.DigitsLSTM"
    pruner = instantiate(cfg.pruner)
    assert isinstance(pruner, LSTMSaliencyPruner)
    assert cfg.pruner.tie_gates is True
    # tensors=auto: every layer but the classifier, which produces the output, so the LSTM's two weights
    selected = instantiate(cfg.callbacks.pruning).check(instantiate(cfg.module), torch.rand(2, 1, 8, 8))
    assert selected == ["net.lstm.weight_ih_l0", "net.lstm.weight_hh_l0"]


@pytest.mark.parametrize("pruner", ["taylor", "activation", "saliency"])
def test_a_budget_override_reaches_the_pruner_through_the_callback(pruner, tmp_path):
    cfg = compose_app([f"pruner={pruner}", "+target.macs=0.25", "+target.multiple_of=4"], tmp_path)
    callback = instantiate(cfg.callbacks.pruning)
    assert callback.pruner.budget == Budget(macs=0.25, multiple_of=4)
    assert callback.pruner.defaults["sparsity_level"] == 0.75  # the fraction of MACs removed, ramped by the schedule
    assert compose_app([f"pruner={pruner}"], tmp_path).callbacks.pruning.target is None


def test_budget_experiment_sweeps_pruners_and_mac_budgets(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=budgets"], return_hydra_config=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN
    assert cfg.hydra.sweeper.params["+target.macs"] == "0.5,0.25,0.1"


@pytest.mark.parametrize("pruner", ["saliency", "fpgm", "lstm_saliency", "taylor", "activation"])
def test_sparsity_level_is_a_real_key_of_every_pruner(pruner, tmp_path):
    cfg = compose_app([f"pruner={pruner}", "pruner.sparsity_level=0.25"], tmp_path)
    assert instantiate(cfg.pruner).defaults["sparsity_level"] == 0.25


def test_sweep_experiment_is_a_multirun_over_pruners_and_sparsity(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=sweep"], return_hydra_config=True)
    assert cfg.hydra.mode == RunMode.MULTIRUN
    params = cfg.hydra.sweeper.params
    assert params["pruner.sparsity_level"] == "0.25,0.5,0.75"
    assert set(params["pruner"].split(",")) == {"saliency", "fpgm"}


def test_unknown_pruner_names_the_available_ones(tmp_path):
    with pytest.raises(MissingConfigException, match="pruner/nope") as excinfo:
        compose_app(["pruner=nope"], tmp_path)
    assert all(name in str(excinfo.value) for name in ("saliency", "fpgm", "lstm_saliency"))


def test_misspelt_key_is_refused_at_composition(tmp_path):
    with pytest.raises(ConfigCompositionException, match="pruner.sparsity"):
        compose_app(["pruner.sparsity=0.5"], tmp_path)


@pytest.mark.parametrize("sparsity", ["1.5", "-0.1", "1.0"])
def test_out_of_range_sparsity_fails_when_the_callbacks_are_built(sparsity, tmp_path):
    cfg = compose_app([f"pruner.sparsity_level={sparsity}"], tmp_path)
    with pytest.raises(InstantiationException, match=sparsity) as excinfo:
        instantiate(cfg.callbacks)
    assert isinstance(excinfo.value.__cause__, PruningConfigError)
