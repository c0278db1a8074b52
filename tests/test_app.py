"""The Hydra app: digits data, demo models, the LightningModule, one run end to end, and a CLI sweep."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch import Trainer
from omegaconf import OmegaConf, open_dict

from lightning_prune.app import DigitsCNN, DigitsDataModule, DigitsLSTM, DigitsResNet, LitClassifier
from lightning_prune.app.experiment import CHECKPOINT_FILE, METRICS_FILE, RESOLVED_CONFIG_FILE, run
from lightning_prune.report import main as report_main

REPO = Path(__file__).resolve().parents[1]
N_DIGITS = 1797
# The smallest run that still trains, prunes (one shot at step 2), fuses, validates and tests.
TINY = [
    "trainer.max_epochs=2",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "+trainer.enable_progress_bar=false",
    "schedule=oneshot",
    "schedule.start_step=2",
    "measure.batch_size=8",
    "measure.min_run_time=0.05",
]
METRIC_KEYS = {
    "sparsity_level",
    "params_before",
    "params_after",
    "macs_before",
    "macs_after",
    "latency_ms_before",
    "latency_ms_after",
    "val_acc",
    "test_acc",
    "dense_test_acc",
    "pruner",
    "overrides",
}


@pytest.fixture(scope="module")
def digits():
    datamodule = DigitsDataModule(batch_size=32)
    datamodule.setup()
    return datamodule


def test_split_is_disjoint_complete_and_fixed_by_the_seed(digits):
    splits = (digits.train_set, digits.val_set, digits.test_set)
    indices = [set(split.indices) for split in splits]
    assert sum(map(len, indices)) == len(set().union(*indices)) == N_DIGITS
    assert [len(split) for split in splits] == [1257, 270, 270]
    again = DigitsDataModule(batch_size=32)
    again.setup()
    assert again.test_set.indices == digits.test_set.indices
    other_seed = DigitsDataModule(seed=1)
    other_seed.setup()
    assert other_seed.test_set.indices != digits.test_set.indices


def test_batches_are_8x8_images_in_unit_range(digits):
    images, labels = next(iter(digits.train_dataloader()))
    assert images.shape == (32, 1, 8, 8) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1 and images.max() == 1
    assert labels.dtype == torch.long and set(labels.tolist()) <= set(range(10))
    assert torch.equal(digits.example_input(5), digits.example_input(5))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"val_fraction": 1.2}, "val_fraction must be in \\(0, 1\\), got 1.2"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must leave training data"),
    ],
)
def test_bad_data_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


MODELS = {
    DigitsCNN: ["features.0.weight", "features.3.weight", "features.7.weight", "classifier.weight"],
    DigitsLSTM: ["lstm.weight_ih_l0", "lstm.weight_hh_l0", "classifier.weight"],
    DigitsResNet: [
        "stem.0.weight",
        "layer1.conv1.weight",
        "layer1.conv2.weight",
        "layer2.conv1.weight",
        "layer2.conv2.weight",
        "layer2.shortcut.0.weight",
        "classifier.weight",
    ],
}


@pytest.mark.parametrize("model_class", MODELS, ids=lambda cls: cls.__name__)
def test_models_classify_digits_trace_with_fx_and_keep_stable_names(model_class, digits):
    model = model_class().eval()
    images = digits.example_input(4)
    logits = model(images)
    assert logits.shape == (4, 10)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(images), logits)
    names = dict(model.named_parameters())
    assert all(name in names for name in MODELS[model_class])


def test_lit_classifier_names_tensors_under_net_and_logs_accuracy(digits):
    module = LitClassifier(DigitsCNN(), optimizer=lambda params: torch.optim.SGD(params, lr=0.1))
    assert "net.features.0.weight" in dict(module.named_parameters())
    trainer = Trainer(fast_dev_run=2, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=digits)
    assert {"train_loss", "val_acc", "val_loss"} <= set(trainer.callback_metrics)
    (result,) = trainer.test(module, datamodule=digits, verbose=False)
    assert 0 <= result["test_acc"] <= 1
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)


@pytest.fixture
def composed_run(tmp_path):
    """Runs the app in-process on a composed config, as ``@hydra.main`` would, writing into tmp_path."""

    def _run(overrides):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, f"output_dir={tmp_path}"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg.hydra
        return run(cfg)

    yield _run
    HydraConfig.instance().cfg = None


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model=digits_resnet", "pruner=fpgm", "dense_baseline=false"],
        ["experiment=lstm", "dense_baseline=false"],
    ],
    ids=["cnn", "resnet", "lstm"],
)
def test_one_run_prunes_and_writes_complete_metrics(composed_run, tmp_path, overrides):
    metrics = composed_run([*TINY, *overrides])
    written = json.loads((tmp_path / METRICS_FILE).read_text())
    assert set(written) >= METRIC_KEYS
    assert written["sparsity_level"] == 0.5
    assert written["params_after"] < written["params_before"]
    assert written["macs_after"] < written["macs_before"]
    assert written["latency_ms_after"] > 0 and 0 <= written["val_acc"] <= 1
    assert (written["dense_test_acc"] is None) == ("dense_baseline=false" in overrides)
    assert written["overrides"] == [*TINY, *overrides, f"output_dir={tmp_path}"]
    assert metrics["params_after"] == written["params_after"]
    assert OmegaConf.load(tmp_path / RESOLVED_CONFIG_FILE).output_dir == str(tmp_path)
    state_dict = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)["state_dict"]
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    saved_params = sum(t.numel() for name, t in state_dict.items() if not name.endswith(buffers))
    assert saved_params == written["params_after"]


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / "train.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_sweep_then_report_gives_table_csv_and_png(tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    sweep = ["-m", *TINY, "dense_baseline=false", "pruner.sparsity_level=0.25,0.5", f"hydra.sweep.dir={sweep_dir}"]
    result = _cli(*sweep, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(sweep_dir.glob("*/metrics.json"))) == 2
    assert report_main([str(sweep_dir)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0.")]
    assert [row.split("|")[1].strip() for row in rows] == ["0.25", "0.5"]
    assert (sweep_dir / "report.csv").read_text().count("\n") == 3
    assert (sweep_dir / "report.png").read_bytes().startswith(b"\x89PNG")


def test_cli_rejects_out_of_range_sparsity_before_training(tmp_path):
    result = _cli("pruner.sparsity_level=1.5", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode != 0
    assert "PruningConfigError" in result.stderr and "1.5" in result.stderr
    assert "Epoch" not in result.stderr + result.stdout
    assert not (tmp_path / "run" / METRICS_FILE).exists()
