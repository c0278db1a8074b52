"""The Hydra app: digits data, demo models, the LightningModule, one run end to end, and a CLI sweep."""

import csv
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from omegaconf import OmegaConf

from lightning_prune.app import DigitsCNN, DigitsDataModule, DigitsLSTM, DigitsResNet, LitClassifier, experiment
from lightning_prune.app.experiment import (
    CHECKPOINT_FILE,
    LOG_FILE,
    METRICS_FILE,
    RESOLVED_CONFIG_FILE,
    summary_table,
)
from lightning_prune.errors import PruningConfigError
from lightning_prune.measure import count_macs
from lightning_prune.report import main as report_main

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "lightning_prune" / "app" / "conf"
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
    state_dict = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["state_dict"]
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    saved_params = sum(t.numel() for name, t in state_dict.items() if not name.endswith(buffers))
    assert saved_params == written["params_after"]
    # the schedule's outcome: one shot at step 2 of 6, then 4 steps of fine-tuning
    assert written["schedule_completed"] is True and written["pruned_tensors"] >= 2
    assert (written["last_pruning_step"], written["steps_after_last_pruning"]) == (2, 4)


def test_a_mac_budget_run_lands_on_its_budget_and_says_so(composed_run, tmp_path):
    written = composed_run([*TINY, "dense_baseline=false", "model=digits_resnet", "pruner=taylor",
                            "+target.macs=0.25"])
    assert written["target"] == {"macs": 0.25} and written["sparsity_level"] == 0.75
    assert 0.23 <= written["macs_after"] / written["macs_before"] <= 0.25
    assert summary_table(written).startswith("Pruned with taylor to the budget {'macs': 0.25}, then 4 steps")


def test_both_summaries_count_macs_per_sample(composed_run, tmp_path):
    written = composed_run([*TINY, "dense_baseline=false"])
    one_image = DigitsDataModule().example_input(1)
    assert written["macs_before"] == count_macs(DigitsCNN(), one_image)
    logged = {}
    with open(next(tmp_path.glob("logs/*/metrics.csv"))) as handle:
        for row in csv.DictReader(handle):
            logged.update({key: float(value) for key, value in row.items() if key.startswith("pruning/macs") and value})
    assert logged == {"pruning/macs_before": written["macs_before"], "pruning/macs": written["macs_after"]}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tensors.config=[{tensor_fqn: net.features.0.weigth}]", "unknown tensor_fqn 'net.features.0.weigth'"),
        ("tensors.config=[{tensor_fqn: net.classifier.weight}]", "narrow_output=True"),
        ("tensors.config=[net.features.0.weight]", "each config entry is a dict with a 'tensor_fqn'"),
        ("tensors.include=[net\\.nope]", "matches no weight of LitClassifier"),
        ("+pruner.sparsity_levl=0.3", "did you mean 'sparsity_level'"),
    ],
    ids=["misspelt-fqn", "output-layer", "strings-for-dicts", "include-matches-nothing", "misspelt-pruner-key"],
)
def test_bad_configuration_fails_before_the_dense_baseline_trains(composed_run, monkeypatch, override, message):
    trained = []
    monkeypatch.setattr(experiment, "_train_dense_baseline", lambda *args: trained.append(args) or (0.0, 0.0))
    with pytest.raises(Exception) as raised:  # noqa: B017 - Hydra wraps some of them in InstantiationException
        composed_run([*TINY, override])
    chain = [raised.value, raised.value.__cause__]
    assert any(isinstance(e, PruningConfigError) and message in str(e) for e in chain), chain
    assert trained == []


def test_a_run_that_pruned_nothing_says_so():
    metrics = {"pruner": "saliency", "sparsity_level": 0.5, "params_before": 100, "params_after": 100,
               "macs_before": 10, "macs_after": 10, "latency_ms_before": 1.0, "latency_ms_after": 1.0,
               "test_acc": 0.9, "dense_test_acc": None, "measure_batch_size": 256}
    for pruned_tensors, reason in ((0, "no tensor was selected"), (3, "the masks removed no channel")):
        headline = summary_table({**metrics, "pruned_tensors": pruned_tensors}).splitlines()[0]
        assert headline.startswith("Nothing was pruned with saliency") and reason in headline
    cut = summary_table({**metrics, "params_after": 50, "pruned_tensors": 3, "schedule_completed": False})
    assert "the schedule was cut short" in cut.splitlines()[0]
    done = summary_table({**metrics, "params_after": 50, "pruned_tensors": 3, "schedule_completed": True,
                          "steps_after_last_pruning": 100})
    assert done.splitlines()[0] == "Pruned with saliency at sparsity 0.5, then 100 steps of fine-tuning:"


def _cli(*args, cwd, entry=("examples/train.py",)):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(REPO / entry[0])] if entry[0].endswith(".py") else [sys.executable, *entry]
    return subprocess.run(
        [*command, *args],
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
    for job in sorted(sweep_dir.glob("*/metrics.json")):  # every run says where it wrote, and train.log has the log
        assert f"Outputs in {job.parent}" in result.stdout
        log = (job.parent / LOG_FILE).read_text()
        assert "StructuredPruning: masking" in log and "StructuredPruning: fused" in log and "Pruned with" in log
    printed = (result.stdout + result.stderr).splitlines()
    masking = [line for line in printed if "StructuredPruning: masking" in line]
    assert len(masking) == 2 and all(line.startswith("StructuredPruning") for line in masking)  # once per run
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


def test_cli_reports_a_tensor_the_model_lacks_as_a_message_not_a_traceback(tmp_path):
    result = _cli("tensors.config=[{tensor_fqn: net.featurs.0.weight}]", f"hydra.run.dir={tmp_path / 'run'}",
                  cwd=tmp_path)
    assert result.returncode == 1
    assert "PruningConfigError: unknown tensor_fqn 'net.featurs.0.weight'" in result.stderr
    assert "net.features.0.weight" in result.stderr and "Traceback" not in result.stderr
    assert "Epoch" not in result.stderr + result.stdout


def test_ddp_runs_on_a_cpu_only_machine_as_documented(tmp_path):
    run_dir = tmp_path / "run"
    result = _cli(*TINY, "trainer=ddp", "trainer.devices=2", "dense_baseline=false", f"hydra.run.dir={run_dir}",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    written = json.loads((run_dir / METRICS_FILE).read_text())
    assert written["params_after"] < written["params_before"] and written["schedule_completed"]


def test_the_installed_package_runs_the_app_from_any_directory(tmp_path):
    """The configs ship inside the package: the wheel holds them and ``python -m lightning_prune.app`` composes
    them with no conf/ directory around."""
    source = tmp_path / "src"
    shutil.copytree(REPO / "lightning_prune", source / "lightning_prune", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, capture_output=True, timeout=300)
    with zipfile.ZipFile(next((tmp_path / "wheel").glob("*.whl"))) as wheel:
        shipped = {name for name in wheel.namelist() if name.endswith(".yaml")}
    packaged = {f"lightning_prune/app/conf/{p.relative_to(CONF_DIR)}" for p in CONF_DIR.rglob("*.yaml")}
    assert shipped == packaged and "lightning_prune/app/conf/pruner/fpgm.yaml" in shipped

    result = _cli("--cfg", "job", "pruner=fpgm", cwd=tmp_path, entry=("-m", "lightning_prune.app"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lightning_prune.sparsifier.FPGMPruner" in result.stdout


def test_explain_prints_the_plan_and_trains_nothing(composed_run, monkeypatch, capsys, tmp_path):
    trained = []
    monkeypatch.setattr(experiment, "_train_dense_baseline", lambda *args: trained.append(args) or (0.0, 0.0))
    result = composed_run([*TINY, "+explain=true"])
    printed = capsys.readouterr().out
    assert "Pruning plan (fx, shapes from example inputs" in printed and "net.features.0.weight*" in printed
    assert result["plan"]["left_out"] == {"net.classifier.weight": "its channels reach the model's output"}
    assert trained == [] and not (tmp_path / "metrics.json").exists()
