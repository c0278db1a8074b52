"""The StructuredPruning callback inside real (tiny, CPU) Lightning runs: shrink, schedule, resume, reload, log."""

from __future__ import annotations

import copy
import csv
import itertools
import os
from unittest import mock

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import FSDPStrategy
from torch.nn.utils import parametrize

from lightning_prune.callback import StructuredPruning
from lightning_prune.errors import PruningConfigError, UnsupportedPatternError
from lightning_prune.measure import count_params
from lightning_prune.sparsifier import SaliencyPruner
from tests.runs import (
    BATCHES_PER_EPOCH,
    CLASSES,
    HIDDEN,
    BatchCounter,
    CorruptingPruner,
    SparsityRecorder,
    TinyClassifier,
    assert_shrunk,
    loader,
    outputs,
    probe,
    pruning,
    trainer_for,
)


class MaskedSnapshot(Callback):
    """Placed before StructuredPruning, its on_train_end sees the masked model just before fusion.

    It keeps outputs, not a deepcopy: a copy shares the parametrized class, which fusion then strips.
    """

    def on_train_end(self, trainer, pl_module):
        self.was_masked = any(parametrize.is_parametrized(m) for m in pl_module.modules())
        self.outputs = outputs(pl_module, probe())
        pl_module.train()
        self.params = count_params(pl_module)


# --- shrinking ----------------------------------------------------------------------------------------------


def test_fit_shrinks_the_module_in_place(tmp_path):
    model = TinyClassifier()
    snapshot, callback = MaskedSnapshot(), pruning()
    trainer = trainer_for(tmp_path, [snapshot, callback], max_epochs=2)
    trainer.fit(model, loader())

    assert type(model) is TinyClassifier and trainer.lightning_module is model
    assert_shrunk(model)
    assert callback.fused
    assert count_params(model) < snapshot.params
    assert snapshot.was_masked
    torch.testing.assert_close(outputs(model, probe()), snapshot.outputs, atol=1e-5, rtol=1e-5)
    predictions = trainer.predict(model, loader(1))
    assert predictions[0].shape == (8, CLASSES)


def test_verify_raises_when_fusion_changes_the_output(tmp_path):
    callback = StructuredPruning(CorruptingPruner(sparsity_level=0.5))
    with pytest.raises(RuntimeError, match="differs from the masked output"):
        trainer_for(tmp_path, [callback]).fit(TinyClassifier(), loader())


def test_trainer_test_after_fit_runs_on_the_pruned_model(tmp_path):
    model = TinyClassifier()
    trainer = trainer_for(tmp_path, [pruning()])
    trainer.fit(model, loader())
    results = trainer.test(model, loader(2), verbose=False)

    assert model.test_widths == [HIDDEN // 2, HIDDEN // 2]
    assert torch.isfinite(torch.tensor(results[0]["test_loss"]))
    assert_shrunk(model)


# --- configuration errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("softmax_inside", "config", "error", "named"),
    [
        (False, [{"tensor_fqn": "net.7.weight"}], PruningConfigError, "net.7.weight"),
        (False, [{"tensor_fqn": "net.0.bias"}], PruningConfigError, "net.0.bias"),
        (True, [{"tensor_fqn": "net.0.weight"}], UnsupportedPatternError, "net.0.weight"),
    ],
    ids=["unknown-fqn", "1d-tensor", "softmax-blocked"],
)
def test_bad_config_fails_at_setup_before_any_step(tmp_path, softmax_inside, config, error, named):
    model = TinyClassifier(softmax_inside=softmax_inside)
    dense = copy.deepcopy(model.state_dict())
    counter = BatchCounter()
    trainer = trainer_for(tmp_path, [counter, pruning(config=config)])
    with pytest.raises(error, match=named.replace(".", r"\.")):
        trainer.fit(model, loader())
    assert counter.batches == 0
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert model.state_dict().keys() == dense.keys()


def test_unknown_schedule_lists_the_choices():
    with pytest.raises(PruningConfigError, match="'quadratic'") as raised:
        pruning(schedule="quadratic")
    assert all(name in str(raised.value) for name in ("oneshot", "linear", "cubic"))


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"schedule": "linear", "start_step": 5, "end_step": 5}, "end_step"),
        ({"schedule": "cubic", "start_step": 6, "end_step": 2}, "end_step"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"start_step": -1}, "start_step"),
    ],
    ids=["end-equals-start", "end-before-start", "every-0", "negative-start"],
)
def test_bad_step_bounds_fail_in_init(kwargs, named):
    with pytest.raises(PruningConfigError, match=named):
        pruning(**kwargs)


def test_sparsity_out_of_range_is_refused():
    with pytest.raises(PruningConfigError, match="1.5"):
        SaliencyPruner(sparsity_level=1.5)
    pruner = SaliencyPruner(sparsity_level=0.5)
    pruner.defaults["sparsity_level"] = 1.5  # set after construction: the callback checks it again
    with pytest.raises(PruningConfigError, match="1.5"):
        StructuredPruning(pruner)


@pytest.mark.parametrize("not_a_pruner", [object(), torch.nn.utils.prune, "saliency"], ids=["object", "module", "str"])
def test_a_non_pruner_is_refused(not_a_pruner):
    with pytest.raises(PruningConfigError, match="BaseStructuredSparsifier"):
        StructuredPruning(not_a_pruner)


def test_config_and_include_together_are_refused():
    with pytest.raises(PruningConfigError, match="include"):
        pruning(config=[{"tensor_fqn": "net.0.weight"}], include=["net"])


# --- the schedule -------------------------------------------------------------------------------------------


def test_linear_schedule_ramps_masks_to_the_target(tmp_path):
    callback = pruning(schedule="linear", start_step=0, end_step=4, every_n_steps=1)
    recorder = SparsityRecorder(callback)
    model = TinyClassifier()
    trainer_for(tmp_path, [callback, recorder], max_epochs=2).fit(model, loader())

    fractions = recorder.fractions
    assert len(fractions) == 2 * BATCHES_PER_EPOCH
    assert all(a <= b for a, b in itertools.pairwise(fractions)), fractions
    assert 0 < fractions[0] < 0.5  # a ramp, not a jump
    assert len(set(fractions[:4])) == 4
    assert fractions[3] == pytest.approx(0.5) and fractions[-1] == pytest.approx(0.5)
    assert_shrunk(model)


def test_no_pruning_during_the_sanity_check(tmp_path):
    callback = pruning(schedule="oneshot", start_step=0)
    recorder = SparsityRecorder(callback)
    trainer = trainer_for(tmp_path, [callback, recorder], num_sanity_val_steps=2)
    trainer.fit(TinyClassifier(), loader(), loader(2))

    assert recorder.at_sanity_end == 0.0
    assert recorder.fractions[0] == pytest.approx(0.5)


def test_target_is_reached_when_training_stops_before_end_step(tmp_path):
    model = TinyClassifier()
    callback = pruning(schedule="cubic", start_step=0, end_step=100)
    trainer_for(tmp_path, [callback], max_epochs=1).fit(model, loader())
    assert_shrunk(model)


# --- logging ------------------------------------------------------------------------------------------------


def test_sparsity_is_logged_to_csv(tmp_path):
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = trainer_for(tmp_path, [pruning(schedule="linear", end_step=4)], max_epochs=2, logger=logger,
                          log_every_n_steps=1)
    trainer.fit(TinyClassifier(), loader())

    with open(os.path.join(logger.log_dir, "metrics.csv")) as handle:
        rows = list(csv.DictReader(handle))
    sparsities = [float(r["pruning/sparsity"]) for r in rows if r.get("pruning/sparsity")]
    assert sparsities and max(sparsities) == pytest.approx(0.5)
    params = [(float(r["pruning/params_before"]), float(r["pruning/params"])) for r in rows
              if r.get("pruning/params")]
    assert len(params) == 1 and params[0][1] < params[0][0]


# --- trainer options ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{"precision": "bf16-mixed"}, {"accumulate_grad_batches": 2}, {"fast_dev_run": True}],
    ids=["bf16-mixed", "accumulate-2", "fast-dev-run"],
)
def test_trainer_options_still_shrink(tmp_path, options):
    model = TinyClassifier()
    callback = pruning(schedule="linear", start_step=0, end_step=2)
    recorder = SparsityRecorder(callback)
    trainer_for(tmp_path, [callback, recorder], max_epochs=2, **options).fit(model, loader())
    assert callback.fused
    assert_shrunk(model)
    assert model.net[0].weight.dtype == torch.float32
    assert recorder.fractions  # training really ran


def test_accumulation_ticks_on_optimizer_steps(tmp_path):
    callback = pruning(schedule="linear", start_step=0, end_step=4)
    recorder = SparsityRecorder(callback)
    trainer_for(tmp_path, [callback, recorder], max_epochs=2, accumulate_grad_batches=2).fit(
        TinyClassifier(), loader())
    # 8 batches are 4 optimizer steps, taken at batches 1, 3, 5, 7: the level changes only there
    fractions = recorder.fractions
    changed = [i for i in range(1, len(fractions)) if fractions[i] != fractions[i - 1]]
    assert changed == [1, 3, 5, 7], fractions


def test_fit_called_twice(tmp_path):
    model = TinyClassifier()
    callback = pruning()
    trainer_for(tmp_path, [callback], max_epochs=1).fit(model, loader())
    first = copy.deepcopy(model.state_dict())
    trainer_for(tmp_path, [callback], max_epochs=1).fit(model, loader())

    assert_shrunk(model)
    assert model.state_dict().keys() == first.keys()
    assert not torch.equal(model.net[0].weight, first["net.0.weight"])  # the second fit trained the narrow model


# --- strategies ---------------------------------------------------------------------------------------------


def test_a_subclass_of_fsdp_is_refused(tmp_path):
    """Strategies are recognised by class, so a user's FSDPStrategy subclass is refused like FSDPStrategy."""

    class MyFSDP(FSDPStrategy):
        pass

    counter = BatchCounter()
    trainer = trainer_for(tmp_path, [counter, pruning()], strategy=MyFSDP())
    with mock.patch.dict(os.environ):  # the strategy starts a process group
        try:
            with pytest.raises(PruningConfigError, match="MyFSDP.*shards parameters"):
                trainer.fit(TinyClassifier(), loader())
        finally:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
    assert counter.batches == 0


def test_sync_batchnorm_is_refused_at_setup(tmp_path):
    trainer = trainer_for(tmp_path, [pruning()])
    trainer.strategy._layer_sync = object()  # what Trainer(sync_batchnorm=True) sets; it needs a GPU to construct
    with pytest.raises(PruningConfigError, match="sync_batchnorm"):
        trainer.fit(TinyClassifier(), loader())


def test_setup_logs_the_plan_as_a_table(tmp_path, caplog):
    with caplog.at_level("INFO", logger="lightning.pytorch"):
        trainer_for(tmp_path, [pruning()], max_steps=1).fit(TinyClassifier(), loader())
    logged = caplog.text
    assert "Pruning plan (fx, shapes from example inputs" in logged
    assert "net.0.weight*" in logged and "left out net.4.weight: its channels reach the model's output" in logged


def test_explain_shows_the_callbacks_plan_without_touching_the_module():
    module = TinyClassifier()
    plan = pruning(0.25).explain(module, probe())
    assert [g["configured"] for g in plan.to_dict()["groups"]][:2] == [["net.0.weight"], ["net.2.weight"]]
    assert plan.to_dict()["sparsity_level"] == 0.25
    assert not any(parametrize.is_parametrized(m) for m in module.modules())
