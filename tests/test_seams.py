"""Seams between the plan and the model it was made for (found by trying to break it): the model changing its
tensors between prepare and prune, tensors read outside the rules that narrow them, subclasses that change a
layer's forward, and sizes written as literals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_prune as lp
from tests.models import randomize_norms, step_and_prune_exactly
from tests.test_callback import CLASSES, HIDDEN, TinyClassifier, loader, probe, pruning, trainer_for


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
