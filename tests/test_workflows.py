"""StructuredPruning in the everyday Lightning workflows: schedules that fit the run, forwards with several inputs,
outputs of any shape, strategies refused up front, and nothing left on the module after fit."""

from __future__ import annotations

import io
import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune.callback import StructuredPruning
from lightning_prune.errors import PruningConfigError
from lightning_prune.measure import count_params
from tests.custom_layers import Scale
from tests.runs import (
    BATCHES_PER_EPOCH,
    CLASSES,
    HIDDEN,
    IN,
    BatchCounter,
    CorruptingPruner,
    SparsityRecorder,
    TinyClassifier,
    assert_shrunk,
    loader,
    logged,
    outputs,
    probe,
    pruning,
    trainer_for,
)


def ours(caught: list[warnings.WarningMessage]) -> list[str]:
    """The warnings lightning_prune gave."""
    return [str(w.message) for w in caught if "lightning_prune" in w.filename]


class StopAt(Callback):
    """Stops training after a given optimizer step, as EarlyStopping or max_time would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


# --- schedules that fit the run ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "epochs", "changes"),
    [(0.25, 0.75, 2, [3, 4, 5, 6]), (0.25, 0.75, 4, list(range(5, 13))), (0.0, None, 2, [1, 2, 3, 4, 5, 6])],
    ids=["quarter-to-three-quarters-of-8", "same-fractions-of-16", "default-end"],
)
def test_fractional_bounds_follow_the_length_of_the_run(tmp_path, start, end, epochs, changes):
    callback = pruning(schedule="linear", start_step=start, end_step=end)
    recorder = SparsityRecorder(callback)
    trainer_for(tmp_path, [callback, recorder], max_epochs=epochs).fit(TinyClassifier(), loader())
    fractions = [0.0, *recorder.fractions]  # fractions[s] is the level after optimizer step s
    assert [s for s in range(1, len(fractions)) if fractions[s] != fractions[s - 1]] == changes
    assert fractions[changes[-1]] == pytest.approx(0.5)
    summary = callback.summary()
    assert summary["schedule_completed"] and summary["last_pruning_step"] == changes[-1]
    assert summary["steps_after_last_pruning"] == epochs * BATCHES_PER_EPOCH - changes[-1] > 0


def test_the_readme_snippet_leaves_steps_to_fine_tune(tmp_path):
    """cubic, end_step=None, every_n_steps=10 in a 200-step run: the last pruning comes a quarter before the end."""
    callback = pruning(schedule="cubic", start_step=0, end_step=None, every_n_steps=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_for(tmp_path, [callback], max_epochs=50).fit(TinyClassifier(), loader())
    assert callback.summary()["last_pruning_step"] == 150
    assert callback.summary()["steps_after_last_pruning"] == 50
    assert ours(caught) == []


@pytest.mark.parametrize(
    ("kwargs", "stop", "at_start"),
    [
        ({"schedule": "oneshot", "start_step": 1000}, None, "cannot finish in this run of 8 optimizer steps"),
        ({"schedule": "linear", "end_step": 8}, None, "reaches its target on the run's last step"),
        ({"schedule": "linear", "end_step": 6, "every_n_steps": 2}, 3, None),  # EarlyStopping-like stop at step 3
    ],
    ids=["oneshot-beyond-the-run", "ramp-ends-on-the-last-step", "stopped-early"],
)
def test_a_schedule_that_does_not_fit_is_warned_about(tmp_path, kwargs, stop, at_start):
    callback = pruning(**kwargs)
    extra = [StopAt(stop)] if stop else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_for(tmp_path, [callback, *extra], max_epochs=2).fit(TinyClassifier(), loader())
    messages = ours(caught)
    schedule = kwargs["schedule"]
    if at_start:
        assert any(at_start in m and schedule in m for m in messages), messages
    if kwargs.get("end_step") != 8:  # cut short: the rest of the target lands at fusion, and says so
        end = [m for m in messages if m.startswith("StructuredPruning: training stopped")]
        level = r"0\.1\d\d" if stop else r"0\.000"  # 2 of 16 channels masked at step 3
        assert len(end) == 1 and re.search(f"from sparsity {level} to 0.500", end[0]), end
        assert "0 steps of fine-tuning" in end[0]
        assert not callback.summary()["schedule_completed"]
        assert callback.summary()["steps_after_last_pruning"] == 0
    assert callback.fused


def test_a_ramp_without_end_in_an_endless_run_names_end_step(tmp_path):
    counter = BatchCounter()
    trainer = trainer_for(tmp_path, [counter, pruning(schedule="linear"), StopAt(4)], max_epochs=-1)
    with pytest.raises(PruningConfigError, match=r"end_step=None .*no planned length.*end_step in optimizer steps"):
        trainer.fit(TinyClassifier(), loader())
    assert counter.batches == 0


# --- the example input ---------------------------------------------------------------------------------------


class TwoInputs(pl.LightningModule):
    """forward(x, extra); batches are (x, extra, y)."""

    def __init__(self, example: str | None = None):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(IN, HIDDEN), nn.Linear(5, HIDDEN), nn.Linear(HIDDEN, CLASSES)
        x, extra = torch.randn(4, IN), torch.randn(4, 5)
        self.example_input_array = {"tuple": (x, extra), "dict": {"x": x, "extra": extra}, None: None}[example]

    def forward(self, x, extra):
        return self.head(torch.relu(self.a(x) + self.b(extra)))

    def training_step(self, batch, batch_idx):
        x, extra, y = batch
        return F.cross_entropy(self(x, extra), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def two_input_batches() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(32, IN, generator=generator), torch.randn(32, 5, generator=generator),
                                    torch.randint(0, CLASSES, (32,), generator=generator)), batch_size=8)


@pytest.mark.parametrize("verify", [True, False])
def test_a_forward_that_cannot_run_on_the_first_batch_fails_at_setup_naming_example_input_array(tmp_path, verify):
    counter = BatchCounter()
    model = TwoInputs()
    with pytest.raises(PruningConfigError, match=r"TwoInputs.forward cannot run on .*missing.*example_input_array"):
        trainer_for(tmp_path, [counter, pruning(verify=verify)]).fit(model, two_input_batches())
    assert counter.batches == 0
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_example_input_array_serves_a_forward_with_two_inputs(tmp_path, form):
    model = TwoInputs(form)
    callback = pruning(config=[{"tensor_fqn": "a.weight"}, {"tensor_fqn": "b.weight"}])
    trainer = trainer_for(tmp_path, [callback], max_epochs=2, log_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, two_input_batches())
    assert ours(caught) == []  # verified, and MACs counted
    assert callback.fused and model.a.out_features == model.b.out_features == HIDDEN // 2
    assert model.head.in_features == HIDDEN // 2


def test_taking_the_example_from_the_first_batch_leaves_the_run_unchanged(tmp_path):
    """The example is drawn without touching the RNGs or the sampler: a pruning run sees the batches a plain run
    sees, in the same order."""

    class Batches(Callback):
        def __init__(self):
            self.first = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.first.append(batch[0][0].clone())

    def shuffled():
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(32, IN, generator=generator), torch.randint(0, CLASSES, (32,)))
        return DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(1))

    seen = []
    for callbacks in ([], [pruning(verify=False)]):
        pl.seed_everything(0, verbose=False)
        batches = Batches()
        trainer_for(tmp_path, [batches, *callbacks], max_epochs=2).fit(TinyClassifier(), shuffled())
        seen.append(torch.stack(batches.first))
    torch.testing.assert_close(seen[0], seen[1], rtol=0, atol=0)


# --- verify and measuring after training -----------------------------------------------------------------------


class DictOutput(TinyClassifier):
    def forward(self, x):
        hidden = torch.relu(self.net[2](torch.relu(self.net[0](x))))
        logits = self.net[4](hidden)
        return {"logits": logits, "aux": (logits.softmax(1), [logits.sum(1)])}

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0])["logits"], batch[1])


def test_verify_compares_every_tensor_of_a_dict_output(tmp_path):
    callback = StructuredPruning(CorruptingPruner(sparsity_level=0.5))
    with pytest.raises(RuntimeError, match=r"differs from the masked output .* at output\['(logits|aux)'\]"):
        trainer_for(tmp_path, [callback]).fit(DictOutput(), loader())


def test_a_dict_output_is_verified_and_fused(tmp_path):
    model = DictOutput()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_for(tmp_path, [pruning()]).fit(model, loader())
    assert ours(caught) == []
    assert_shrunk(model)


class BreaksAfterTraining(TinyClassifier):
    """Its forward works during training and fails afterwards, e.g. on a device the example is not on."""

    broken = False

    def forward(self, x):
        if self.broken:
            raise RuntimeError("expected all tensors to be on the same device")
        return super().forward(x)


class Break(Callback):
    def on_train_end(self, trainer, pl_module):
        pl_module.broken = True


@pytest.mark.parametrize("verify", [True, False])
def test_verify_and_macs_warn_with_the_reason_instead_of_crashing_after_training(tmp_path, verify):
    model = BreaksAfterTraining()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_for(tmp_path, [Break(), pruning(verify=verify)]).fit(model, loader())
    assert any("fails on the example input" in m and "same device" in m for m in ours(caught)), ours(caught)
    model.broken = False
    assert_shrunk(model)


# --- bad configuration fails before training -------------------------------------------------------------------


def test_an_explicit_config_naming_the_output_layer_is_refused_at_setup(tmp_path):
    counter = BatchCounter()
    model = TinyClassifier()
    with pytest.raises(PruningConfigError, match=r"net\.4\.weight.*narrow_output=True"):
        trainer_for(tmp_path, [counter, pruning(config=[{"tensor_fqn": "net.4.weight"}])]).fit(model, loader())
    assert counter.batches == 0 and model.net[4].out_features == CLASSES


def test_narrow_output_opts_in_to_changing_the_output_width(tmp_path):
    model = TinyClassifier()
    callback = pruning(config=[{"tensor_fqn": "net.4.weight"}], narrow_output=True)
    trainer_for(tmp_path, [callback]).fit(model, loader())
    assert callback.fused and model.net[4].out_features == 2


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"config": ["net.0.weight"]}, r"each config entry is a dict with a 'tensor_fqn'.*\{'tensor_fqn': 'net\.0"),
        ({"config": {"tensor_fqn": "net.0.weight"}}, r"config must be None or a list of dicts"),
        ({"include": "net"}, r"include must be a list of regexes.*got 'net'"),
        ({"start_step": 1.5}, r"start_step must be an int .* or a float in \[0, 1\].*1\.5"),
        ({"schedule": "linear", "start_step": 0.8}, r"end_step=None ends the ramp at 0\.75"),
    ],
    ids=["strings-for-dicts", "one-dict", "include-string", "fraction-above-1", "start-after-default-end"],
)
def test_bad_arguments_fail_in_init_saying_what_is_accepted(kwargs, named):
    with pytest.raises(PruningConfigError, match=named):
        pruning(**kwargs)


def test_include_patterns_that_match_no_weight_fail_at_setup(tmp_path):
    counter = BatchCounter()
    with pytest.raises(PruningConfigError, match=r"include=\['net\\\\\.9'\] matches no weight.*net\.0\.weight"):
        trainer_for(tmp_path, [counter, pruning(include=[r"net\.9"])]).fit(TinyClassifier(), loader())
    assert counter.batches == 0


def test_a_zero_target_says_nothing_will_be_pruned(tmp_path):
    model = TinyClassifier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_for(tmp_path, [pruning(sparsity=0.0)]).fit(model, loader())
    assert any("every target sparsity is 0" in m for m in ours(caught))
    assert model.net[0].out_features == HIDDEN


# --- strategies ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_notebook"])
def test_process_spawning_strategies_are_refused_at_setup_with_the_reason(tmp_path, strategy):
    """Lightning copies the workers' weights back into the main process's module with a load that cannot narrow it,
    so these strategies cannot hand back a pruned model; they are refused in setup, which runs in every worker."""
    trainer = trainer_for(tmp_path, [], strategy=strategy, devices=2)
    model = TinyClassifier()
    with pytest.raises(PruningConfigError, match=r"ddp_spawn.*ddp_notebook.*cannot come back.*Supported:.*'ddp'"):
        pruning().setup(trainer, model, "fit")
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


# --- after fit -------------------------------------------------------------------------------------------------


def test_the_module_pickles_after_fit_and_keeps_no_hook(tmp_path):
    model = TinyClassifier()
    hooks_before = len(model._load_state_dict_pre_hooks)
    trainer = trainer_for(tmp_path, [pruning()])
    trainer.fit(model, loader())
    trainer.test(model, loader(2), verbose=False)
    assert len(model._load_state_dict_pre_hooks) == hooks_before
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(outputs(restored, probe()), outputs(model, probe()), rtol=0, atol=0)
    assert count_params(restored) == count_params(model)


class WithCustomScale(pl.LightningModule):
    """A conv, then a per-channel Scale layer that fusion knows from a registered rule (not from layer_widths)."""

    def __init__(self):
        super().__init__()
        self.conv, self.scale, self.head = nn.Conv2d(3, 8, 3, padding=1), Scale(8), nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(torch.relu(self.scale(self.conv(x))), 1).flatten(1))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_fused_summary_lists_every_layer_whose_width_changed(tmp_path, custom_layer_rules):
    images = TensorDataset(torch.randn(16, 3, 6, 6), torch.randint(0, CLASSES, (16,)))
    with logged("lightning.pytorch.utilities.rank_zero") as records:
        trainer_for(tmp_path, [pruning()]).fit(WithCustomScale(), DataLoader(images, batch_size=8))
    summary = next(r.getMessage() for r in records if r.getMessage().startswith("StructuredPruning: fused"))
    changed = {line.split()[0] for line in summary.splitlines()[2:] if "->" in line and not line.startswith(
        ("params", "MACs"))}
    assert changed == {"conv", "scale", "head"}, summary
    assert "MACs per sample" in summary and "example batch of 8" in summary
