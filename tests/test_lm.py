"""The language-model corpus (the standard library's sources as bytes), the causal-LM module, and experiment=lm
through the Hydra app: a tiny Llama pruned and distilled in a few steps."""

from __future__ import annotations

import csv
import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_prune.app import LitCausalLM, StdlibDataModule
from lightning_prune.app.experiment import CHECKPOINT_FILE, METRICS_FILE
from lightning_prune.app.lm_data import SEPARATOR


def corpus(root: Path, names: list[str]) -> Path:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"# {name}\n".encode() * 20)
    return root


def test_the_split_is_by_file_fixed_by_each_path_and_leaves_installed_packages_out(tmp_path):
    names = [f"pkg{i % 3}/mod{i}.py" for i in range(60)]
    root = corpus(tmp_path / "lib", [*names, "site-packages/foo/bar.py"])
    splits = StdlibDataModule(root=str(root), val_fraction=0.2, test_fraction=0.2).files()
    relative = {split: [p.relative_to(root).as_posix() for p in paths] for split, paths in splits.items()}
    assert sorted(sum(relative.values(), [])) == sorted(names)  # every file once, none installed
    assert all(len(relative[split]) >= 5 for split in relative)  # the 20/20/60 shares, roughly
    assert all(paths == sorted(paths) for paths in relative.values())
    corpus(root, [f"extra/new{i}.py" for i in range(30)])  # more files: none of the old ones moves
    again = StdlibDataModule(root=str(root), val_fraction=0.2, test_fraction=0.2).files()
    for split, paths in relative.items():
        assert set(paths) <= {p.relative_to(root).as_posix() for p in again[split]}


def test_samples_are_next_byte_windows_of_the_joined_files_and_the_cap_holds(tmp_path):
    root = corpus(tmp_path / "lib", [f"m{i}.py" for i in range(40)])
    data = StdlibDataModule(root=str(root), block_size=16, batch_size=4, max_bytes=300, val_fraction=0.2,
                            test_fraction=0.2)
    data.setup()
    train = data.files()["train"]
    expected = b"".join(p.read_bytes() + SEPARATOR for p in train)[:300]
    assert len(data.train_set.stream) == 300 and bytes(data.train_set.stream.tolist()) == expected
    assert len(data.train_set) == (300 - 1) // 16
    x, y = data.train_set[2]
    assert x.shape == y.shape == (16,) and x.dtype == torch.long
    assert torch.equal(x[1:], y[:-1]) and bytes(x.tolist()) == expected[32:48]
    batch = next(iter(data.train_dataloader()))
    assert batch[0].shape == (4, 16) and int(batch[0].max()) < 256
    assert torch.equal(data.example_input(3), data.example_input(3)) and data.example_input(3).shape == (3, 16)


def test_the_default_root_is_the_standard_library(tmp_path):
    data = StdlibDataModule(max_bytes=5000)
    assert data.root == Path(sysconfig.get_paths()["stdlib"])
    data.setup()
    assert len(data.val_set.stream) == len(data.test_set.stream) == 5000
    assert b"import" in bytes(data.train_set.stream.tolist())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block_size": 0}, "block_size must be a positive integer, got 0"),
        ({"batch_size": 2.0}, "batch_size must be a positive integer, got 2.0"),
        ({"max_bytes": 64}, r"max_bytes must be None or an integer > block_size \(128\), got 64"),
        ({"val_fraction": 0.0}, r"val_fraction must be in \(0, 1\), got 0.0"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "must leave files to train on"),
    ],
)
def test_bad_corpus_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StdlibDataModule(**kwargs)


def test_a_split_too_small_for_one_sample_is_refused_at_setup(tmp_path):
    root = corpus(tmp_path / "lib", ["only.py"])
    with pytest.raises(ValueError, match="the val split of .* holds 0 bytes, fewer than block_size"):
        StdlibDataModule(root=str(root), block_size=16).setup()


def test_the_language_model_module_refuses_logits_of_another_vocabulary():
    module = LitCausalLM(nn.Sequential(nn.Embedding(256, 8), nn.Linear(8, 100)), torch.optim.SGD)
    with pytest.raises(ValueError, match="logits have 100 entries per position, the vocabulary"):
        module(torch.zeros(2, 5, dtype=torch.long))


TINY_LM = [
    "experiment=lm",
    "data.max_bytes=6000",
    "data.block_size=32",
    "data.batch_size=4",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
    "+trainer.enable_progress_bar=false",
    "schedule=oneshot",
    "schedule.start_step=2",
    "measure.batch_size=4",
    "measure.min_run_time=0.05",
]


@pytest.mark.parametrize("overrides", [[], ["pruner=activation", "dense_baseline=false"]],
                         ids=["saliency-with-baseline", "activation"])
def test_experiment_lm_prunes_a_tiny_llama_with_distillation(composed_run, tmp_path, overrides):
    metrics = composed_run([*TINY_LM, *overrides])
    written = json.loads((tmp_path / METRICS_FILE).read_text())
    assert written["score"] == "ppl" and metrics["test_ppl"] == written["test_ppl"]
    assert 1 < written["val_ppl"] < 256 and 1 < written["test_ppl"] < 256  # better than uniform over bytes
    assert (written["dense_test_ppl"] is None) == ("dense_baseline=false" in overrides)
    assert written["params_after"] < written["params_before"] and written["macs_after"] < written["macs_before"]
    assert written["schedule_completed"] and written["steps_after_last_pruning"] == 2
    rows = list(csv.DictReader((tmp_path / "logs" / "version_0" / "metrics.csv").open()))
    kls = [float(row["distill/kl"]) for row in rows if row.get("distill/kl")]
    assert len(kls) == 4 and all(math.isfinite(kl) for kl in kls)
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and max(kls[2:]) > 0  # the dense student, then the pruned one
    state_dict = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["state_dict"]
    assert not any("teacher" in key for key in state_dict)
    assert sum(t.numel() for t in state_dict.values() if t.is_floating_point()) == written["params_after"]


def test_the_lm_study_compresses_both_ways_to_the_budget_and_reports_the_unavailable_variants(tmp_path, capsys):
    from benchmarks import lm_study

    lm_study.main(["--seeds", "0", "--budgets", "0.5", "--methods", "ours Saliency", "TP recipe", "--hidden", "32",
                   "--layers", "2", "--heads", "2", "--ffn", "256", "--block-size", "16", "--batch-size", "4",
                   "--max-bytes", "20000", "--dense-tokens", "640", "--recovery-tokens", "256",
                   "--calibration-steps", "1", "--eval-batches", "2", "--threads", "1", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "lm_study.json").read_text())
    dense = lm_study.build(lm_study.parse(["--hidden", "32", "--layers", "2", "--heads", "2", "--ffn", "256"]))
    dense_params = sum(p.numel() for p in dense.parameters())
    runs = {(r["method"], r["recovery"]): r for r in written["results"]}
    assert set(runs) == {(m, r) for m in ("ours Saliency", "TP recipe") for r in ("fine-tune", "distill")}
    for run in runs.values():
        assert 0.3 * dense_params < run["params"] <= 0.5 * dense_params and 1 < run["val_ppl"] < 256, run
        assert run["macs"] > 0 and run["tokens_per_s"] > 0
    assert (tmp_path / "dense_seed0.pt").exists()
    printed = capsys.readouterr().out
    assert "(b) ours, + hidden size: unavailable" in printed and "(c) ours, + depth: unavailable" in printed
    assert "| ours Saliency | 0.5 | distill |" in printed
