"""Every checkpoint of a pruning run is usable as a pruned model: resume, load_pruned, load_from_checkpoint,
trainer.test(ckpt_path=...), and what is refused (loading never widens a pruned model)."""

from __future__ import annotations

import copy
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

import lightning_prune as lp
from lightning_prune.checkpoint import dense_view, is_masked
from lightning_prune.measure import count_params
from tests.checks import masked
from tests.runs import TinyClassifier, assert_shrunk, loader, logged, outputs, probe, pruning, trainer_for


class ReloadableClassifier(TinyClassifier):
    """The README's recipe: narrow to the checkpoint before Lightning's strict load."""

    def on_load_checkpoint(self, checkpoint):
        lp.narrow_to_state_dict(self, checkpoint["state_dict"])


def fitted(tmp_path, module_cls=TinyClassifier):
    model = module_cls()
    trainer = trainer_for(tmp_path, [pruning()])
    trainer.fit(model, loader())
    path = tmp_path / "pruned.ckpt"
    trainer.save_checkpoint(path)
    return model.eval(), path


# --- resume -------------------------------------------------------------------------------------------------


def resumable_run(tmp_path, max_epochs: int, ckpt_path=None, checkpoint: ModelCheckpoint | None = None,
                  module_cls=TinyClassifier):
    pl.seed_everything(0, verbose=False)
    model = module_cls()
    callback = pruning(schedule="cubic", start_step=1, end_step=12, every_n_steps=2)
    callbacks = [callback] + ([checkpoint] if checkpoint else [])
    trainer = trainer_for(tmp_path, callbacks, max_epochs=max_epochs, deterministic=True,
                          enable_checkpointing=checkpoint is not None)
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return model, callback


@pytest.mark.parametrize("module_cls", [TinyClassifier, ReloadableClassifier], ids=["plain", "readme-hook"])
def test_resume_mid_schedule_equals_an_uninterrupted_run(tmp_path, module_cls):
    """The README's on_load_checkpoint hook, there for load_from_checkpoint, must not get in the way of resuming."""
    uninterrupted, _ = resumable_run(tmp_path / "a", max_epochs=4)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    resumable_run(tmp_path / "b", max_epochs=2, checkpoint=checkpoint)
    mid = tmp_path / "ckpt" / "epoch=1-step=8.ckpt"
    saved = torch.load(mid, weights_only=False)
    assert any(".parametrizations." in key for key in saved["state_dict"])  # masked, not yet fused
    masks = [v for k, v in saved["state_dict"].items() if k.endswith(".mask")]
    pruned_fraction = sum(int((~m).sum()) for m in masks) / sum(m.numel() for m in masks)
    assert 0 < pruned_fraction < 0.5  # really mid-schedule

    resumed, callback = resumable_run(tmp_path / "c", max_epochs=4, ckpt_path=mid, module_cls=module_cls)
    assert callback.fused
    assert_shrunk(resumed)
    expected, actual = uninterrupted.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-5, rtol=0, msg=key)


def test_a_checkpoint_taken_after_fusion_resumes(tmp_path):
    model = TinyClassifier()
    trainer = trainer_for(tmp_path, [pruning()], max_epochs=1)
    trainer.fit(model, loader())
    fused_path = tmp_path / "fused.ckpt"
    trainer.save_checkpoint(fused_path)
    fused_weights = copy.deepcopy(model.state_dict())

    fresh, callback = TinyClassifier(), pruning()
    trainer_for(tmp_path, [callback], max_epochs=3).fit(fresh, loader(), ckpt_path=fused_path)

    assert callback.fused
    assert_shrunk(fresh)
    assert fresh.state_dict().keys() == fused_weights.keys()
    # training continued on the narrow parameters (the optimizer holds them, not the dense ones)
    assert not torch.equal(fresh.net[0].weight, fused_weights["net.0.weight"])


# --- load_pruned and load_from_checkpoint ----------------------------------------------------------------------------


def test_load_pruned_reloads_save_checkpoint_and_last_ckpt(tmp_path):
    model = TinyClassifier()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = trainer_for(tmp_path, [pruning(), checkpoint], max_epochs=2, enable_checkpointing=True)
    trainer.fit(model, loader())
    saved = tmp_path / "after_fit.ckpt"
    trainer.save_checkpoint(saved)
    expected = outputs(model, probe())

    for path in (saved, tmp_path / "ckpt" / "last.ckpt"):
        reloaded = lp.load_pruned(TinyClassifier(), path)
        assert_shrunk(reloaded)
        torch.testing.assert_close(outputs(reloaded, probe()), expected, atol=0, rtol=0)


def test_load_from_checkpoint_with_the_narrowing_hook(tmp_path):
    model, path = fitted(tmp_path, ReloadableClassifier)
    reloaded = ReloadableClassifier.load_from_checkpoint(path).eval()
    assert reloaded.net[0].out_features == model.net[0].out_features < 16
    torch.testing.assert_close(reloaded(probe()), model(probe()), rtol=0, atol=0)


def test_load_pruned_takes_a_plain_state_dict_and_creates_folded_biases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 3, bias=False))
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, [{"tensor_fqn": "0.weight"}])
    pruner.step()
    pruner.prune()  # sigmoid(0) = 0.5 from the removed channels is folded into a new bias of the last layer
    assert model[2].bias is not None
    fresh = lp.load_pruned(nn.Sequential(nn.Linear(4, 8), nn.Sigmoid(), nn.Linear(8, 3, bias=False)),
                           model.state_dict())
    assert (fresh[0].out_features, fresh[2].in_features) == (4, 4)
    x = torch.randn(5, 4)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def _pruned_pair() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, [{"tensor_fqn": "0.weight"}])
    pruner.step()
    pruner.prune()
    return model, model.state_dict()


@pytest.mark.parametrize(("edit", "match"), [
    (lambda sd: sd.update({"extra.weight": torch.ones(2)}), r"unexpected \['extra.weight'\]"),
    (lambda sd: sd.pop("2.bias"), r"missing \['2.bias'\]"),
    (lambda sd: sd.update({"0.weight": "x"}), r"\['0.weight'\] hold \['str'\]"),
])
def test_load_pruned_refuses_keys_that_do_not_fit_before_changing_the_model(edit, match):
    _pruned, state_dict = _pruned_pair()
    edit(state_dict)
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(lp.PruningConfigError, match=match):
        lp.load_pruned(fresh, state_dict)
    assert fresh[0].out_channels == 8 and all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


@pytest.mark.parametrize("bias", [torch.zeros(99), torch.zeros(4, 4)])
def test_a_bias_for_a_layer_without_one_must_have_one_value_per_output(bias):
    """Fusion creates biases where it folds constants; one of another shape is not from fusion."""
    def build():
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False))
    state_dict = {**build().state_dict(), "2.bias": bias}
    fresh = build()
    with pytest.raises(lp.PruningConfigError, match=r"'2.bias' has shape .*one value per output channel.*\(4,\)"):
        lp.load_pruned(fresh, state_dict)
    assert fresh[2].bias is None


def test_a_masked_checkpoint_whose_mask_has_another_length_is_a_config_error():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    lp.SaliencyPruner().prepare(model, [{"tensor_fqn": "0.weight"}])
    state_dict = model.state_dict()
    state_dict["0.parametrizations.weight.0.mask"] = torch.ones(7, dtype=torch.bool)
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(lp.PruningConfigError, match="does not fit Sequential: .*size mismatch"):
        lp.load_pruned(fresh, state_dict)
    assert fresh[0].out_features == 16 and not hasattr(fresh[0], "parametrizations")


def test_load_pruned_puts_the_structure_back_when_loading_fails_midway(monkeypatch):
    _pruned, state_dict = _pruned_pair()
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    weights = dict(fresh.named_parameters())

    def broken(*args, **kwargs):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(fresh, "load_state_dict", broken)
    with pytest.raises(RuntimeError, match="disk went away"):
        lp.load_pruned(fresh, state_dict)
    assert (fresh[0].out_channels, fresh[2].in_channels) == (8, 8)
    assert all(p is weights[k] for k, p in fresh.named_parameters()) and weights.keys() == dict(
        fresh.named_parameters()).keys()


def test_dense_view_names_masked_tensors_as_the_plain_model_does():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    plain_keys = set(model.state_dict())
    lp.SaliencyPruner().prepare(model, [{"tensor_fqn": "0.weight"}])
    assert set(dense_view(model.state_dict())) == plain_keys


def test_pruning_starts_from_a_dense_checkpoint(tmp_path):
    dense = TinyClassifier()
    trainer = trainer_for(tmp_path, [])
    trainer.fit(dense, loader())
    path = tmp_path / "dense.ckpt"
    trainer.save_checkpoint(path)

    model = TinyClassifier()
    trainer_for(tmp_path, [pruning()], max_epochs=2).fit(model, loader(), ckpt_path=path)
    assert model.net[0].out_features == 8  # pruned and fused, after resuming the dense weights and optimizer


def test_loading_dense_weights_into_a_prepared_model_keeps_its_masks(tmp_path):
    callback = pruning()
    model = TinyClassifier()
    model.example_input_array = probe()  # setup outside fit has no training batch to take one from
    trainer = trainer_for(tmp_path, [callback])
    callback.setup(trainer, model, "fit")
    dense = TinyClassifier().state_dict()
    model.load_state_dict(dense)
    torch.testing.assert_close(model.net[0].weight, dense["net.0.weight"])
    assert callback.pruner.state["net.0.weight"]["mask"].all()


# --- masked checkpoints as pruned models --------------------------------------------------------------------------


def conv_bn() -> nn.Module:
    """Biasless convs before BatchNorm: whether the BN affine was masked tells how the masks were attached."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


@pytest.mark.parametrize(
    ("build", "config", "x"),
    [
        (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)),
         [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight", "prune_bias": False}], torch.randn(5, 6)),
        (conv_bn, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "3.weight"}], torch.randn(2, 3, 6, 6)),
        (conv_bn, [{"tensor_fqn": "0.weight", "prune_bias": False}, {"tensor_fqn": "3.weight", "prune_bias": False}],
         torch.randn(2, 3, 6, 6)),
    ],
    ids=["linear-mixed-prune-bias", "conv-bn", "conv-bn-keep-bias"],
)
def test_load_pruned_turns_a_masked_state_dict_into_the_model_it_stands_for(build, config, x):
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 2), module.bias.uniform_(-1, 1)
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, config)
    pruner.step()
    saved = copy.deepcopy(model.state_dict())
    assert is_masked(saved)
    pruner.prune()

    fresh = lp.load_pruned(build(), saved).eval()
    assert not masked(fresh)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    torch.testing.assert_close(fresh(x), model(x), rtol=1e-6, atol=1e-6)


class Monitored(TinyClassifier):
    """Logs ``progress`` (the global step) at validation, so ModelCheckpoint's best file is the last one (mode max)
    or the first one (mode min)."""

    def validation_step(self, batch, batch_idx):
        self.log("progress", float(self.global_step))


class OutputsAtSave(Callback):
    """The (masked) model's outputs on the probe at each checkpoint, by step."""

    def __init__(self):
        self.by_step: dict[int, torch.Tensor] = {}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        training = pl_module.training
        self.by_step[trainer.global_step] = outputs(pl_module, probe())
        pl_module.train(training)


def fit_with_best(tmp_path, mode: str):
    """4 epochs of 4 steps, a linear ramp to 50% ending at step 12, the best of the per-epoch files kept."""
    model, saved = Monitored(), OutputsAtSave()
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="progress", mode=mode, save_top_k=1, save_last=True)
    trainer = trainer_for(tmp_path, [pruning(schedule="linear", end_step=12), best, saved], max_epochs=4,
                          enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader(), loader(1))
    step = torch.load(best.best_model_path, weights_only=True)["global_step"]
    return model, trainer, best.best_model_path, saved.by_step[step], [str(w.message) for w in caught]


def test_testing_from_the_best_checkpoint_keeps_the_model_pruned(tmp_path):
    model, trainer, best, at_save, _ = fit_with_best(tmp_path, "max")
    assert is_masked(torch.load(best, weights_only=True)["state_dict"])  # written before fusion
    params, expected = count_params(model), outputs(model, probe())

    trainer.test(model, loader(1), ckpt_path="best", verbose=False)
    assert count_params(model) == params and not masked(model)
    assert_shrunk(model)
    torch.testing.assert_close(outputs(model, probe()), at_save, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs(model, probe()), expected, rtol=1e-5, atol=1e-6)  # the last epoch was best


def test_a_best_checkpoint_below_the_target_is_warned_about_and_never_widens_the_model(tmp_path):
    model, trainer, best, at_save, messages = fit_with_best(tmp_path, "min")
    assert any("best checkpoint" in m and "below the target 0.500" in m and str(best) in m for m in messages)
    params, expected = count_params(model), outputs(model, probe())

    with pytest.raises(lp.PruningConfigError, match=r"wider than the model's.*load_pruned\(Monitored"):
        trainer.test(model, loader(1), ckpt_path="best", verbose=False)
    assert count_params(model) == params and not masked(model)
    torch.testing.assert_close(outputs(model, probe()), expected, rtol=0, atol=0)

    # on its own it is the (wider) pruned model that the masks at that step stood for
    for reloaded in (lp.load_pruned(Monitored(), best), ReloadableClassifier.load_from_checkpoint(best)):
        assert not masked(reloaded)
        assert params < count_params(reloaded) < count_params(Monitored())
        torch.testing.assert_close(outputs(reloaded, probe()), at_save, rtol=1e-5, atol=1e-6)


def test_checkpoints_load_with_weights_only_and_none_is_written_without_saying_what(tmp_path):
    with logged("lightning.pytorch.trainer.connectors.checkpoint_connector") as records:
        every = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_last=True, every_n_epochs=1)
        trainer = trainer_for(tmp_path, [pruning(schedule="linear", end_step=6), every], max_epochs=2,
                              enable_checkpointing=True)
        trainer.fit(TinyClassifier(), loader())
    assert not [r for r in records if "weights_only" in r.getMessage()]
    for path in sorted((tmp_path / "ckpt").glob("*.ckpt")):
        checkpoint = torch.load(path, weights_only=True)
        assert any("StructuredPruning" in key for key in checkpoint["callbacks"])
    assert not is_masked(torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["state_dict"])


def test_load_pruned_of_a_masked_checkpoint_does_not_warn_about_its_own_prepare():
    """Without example inputs the analysis assumes a conv's batched input and prune() warns when no forward ran
    since prepare() to confirm it; load_pruned's own prepare -> prune runs no forward and must not warn so."""
    torch.manual_seed(0)
    model = conv_bn().eval()
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, [{"tensor_fqn": "0.weight"}, {"tensor_fqn": "3.weight"}])
    pruner.step()
    saved = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="no forward ran since prepare"):  # the user's own prune() is warned
        pruner.prune()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh = lp.load_pruned(conv_bn(), saved).eval()
    assert not [w for w in caught if "no forward ran since prepare" in str(w.message)]
    assert fresh[0].out_channels == model[0].out_channels < 8
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(fresh(x), model(x), rtol=1e-6, atol=1e-6)
