"""The model's life between prepare and prune: tensors it replaces (``.double()``, a precision plugin), fits that
never train, a callback given a second module, a finished run resumed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_prune as lp
from tests.checks import masked, randomize_norms, step_and_prune_exactly
from tests.runs import CLASSES, HIDDEN, TinyClassifier, loader, probe, pruning, trainer_for


def conv_bn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))


@pytest.mark.parametrize("move", [lambda m: m.double(), lambda m: m.to(torch.float64), lambda m: m.float()],
                         ids=["double", "to-float64", "float"])
def test_buffers_replaced_after_prepare_are_still_narrowed(move) -> None:
    """``Module._apply`` swaps buffers for new objects (a precision plugin, a strategy moving the model to its
    device): the BatchNorm statistics must still lose the pruned channels."""
    model = conv_bn()
    randomize_norms(model)
    model.eval()
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, [{"tensor_fqn": "0.weight"}], example_inputs=(torch.randn(1, 3, 8, 8),))
    move(model)
    dtype = next(model.parameters()).dtype
    step_and_prune_exactly(pruner, model, torch.randn(2, 3, 8, 8, dtype=dtype))
    assert model[1].running_mean.shape == (4,) and model[1].num_features == 4
    assert model[1].running_var.dtype == dtype


class NormedClassifier(TinyClassifier):
    """TinyClassifier with a BatchNorm after the first layer: its running statistics are buffers."""

    def __init__(self):
        super().__init__()
        self.net.insert(1, nn.BatchNorm1d(HIDDEN))


def test_a_double_precision_run_narrows_the_running_statistics(tmp_path) -> None:
    """``precision="64-true"`` converts the module after the callback's setup."""
    model = NormedClassifier()
    trainer = trainer_for(tmp_path, [pruning()], precision="64-true")
    trainer.fit(model, loader())
    norm = model.net[1]
    assert norm.num_features == HIDDEN // 2 and norm.running_mean.shape == (HIDDEN // 2,)
    assert norm.running_var.dtype == torch.float64
    x = probe().double()
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (x.shape[0], CLASSES)


def test_one_callback_given_a_second_model_refuses_at_setup(tmp_path) -> None:
    callback = pruning()
    first, second = TinyClassifier(), TinyClassifier()
    trainer_for(tmp_path, [callback]).fit(first, loader())
    assert first.net[0].out_features == HIDDEN // 2
    with pytest.raises(lp.PruningConfigError, match="set up for another TinyClassifier.*new StructuredPruning"):
        trainer_for(tmp_path, [callback]).fit(second, loader())
    assert second.net[0].out_features == HIDDEN and not masked(second)


@pytest.mark.parametrize("limit", [{"max_steps": 0}, {"limit_train_batches": 0}])
def test_a_fit_that_never_trains_leaves_no_masks(tmp_path, limit) -> None:
    model = TinyClassifier()
    with pytest.warns(UserWarning, match=r"training did not run in this fit .*sparsity 0.000"):
        trainer_for(tmp_path, [pruning()], **limit).fit(model, loader())
    assert not masked(model) and model.net[0].out_features == HIDDEN


def test_resuming_a_finished_masked_run_fuses_the_restored_masks(tmp_path) -> None:
    """A checkpoint at max_steps: the fit restores the masks and stops at once; they are fused, not left on."""
    model = TinyClassifier()
    trainer = trainer_for(tmp_path, [pruning(prune_on_fit_end=False)], max_steps=4)
    trainer.fit(model, loader())
    assert masked(model)
    path = tmp_path / "masked.ckpt"
    trainer.save_checkpoint(path)
    resumed = TinyClassifier()
    with pytest.warns(UserWarning, match=r"training did not run .*sparsity 0.500"):
        trainer_for(tmp_path, [pruning()], max_steps=4).fit(resumed, loader(), ckpt_path=path)
    assert not masked(resumed) and resumed.net[0].out_features == HIDDEN // 2
