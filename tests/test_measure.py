"""Params, MACs, latency and layer widths on tiny models whose numbers are worked out by hand."""

import pytest
import torch
from torch import nn

from lightning_prune.fusion.rules import layer_widths
from lightning_prune.measure import count_macs, count_params, latency_ms


def tiny_cnn():
    # conv: 4*3*3*3 + 4 = 112, BatchNorm: 2*4 = 8, linear: 36*5 + 5 = 185 -> 305 parameters.
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    )


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Linear(4, 3)
        self.right = nn.Linear(2, 3)

    def forward(self, a, b):
        return self.left(a) + self.right(b)


def test_count_params_of_a_small_cnn():
    assert count_params(tiny_cnn()) == 305


def test_count_params_counts_a_shared_layer_once():
    layer = nn.Linear(4, 4)
    assert count_params(nn.Sequential(layer, nn.ReLU(), layer)) == 20


@pytest.mark.parametrize(
    ("model", "shape", "macs"),
    [
        (nn.Linear(4, 3), (2, 4), 2 * 4 * 3),
        (nn.Conv2d(1, 2, 3), (1, 1, 5, 5), 2 * 3 * 3 * 9),
        (nn.Conv2d(4, 4, 3, groups=4), (1, 4, 5, 5), 4 * 3 * 3 * 9),
        (nn.Conv1d(2, 3, 3, padding=1), (1, 2, 7), 3 * 7 * 2 * 3),
        # conv: 2 images * 4 channels * 36 positions * 27; linear: 2 * 36 * 5. Norms and pools cost none.
        (tiny_cnn(), (2, 3, 6, 6), 2 * 4 * 36 * 27 + 2 * 36 * 5),
        # Per time step and sequence: 4 gates * hidden 8 * (input 4 + hidden 8); 3 sequences of 5 steps.
        (nn.LSTM(4, 8, batch_first=True), (3, 5, 4), 3 * 5 * 4 * 8 * (4 + 8)),
        (nn.LSTM(4, 8, num_layers=2), (5, 3, 4), 3 * 5 * 4 * 8 * ((4 + 8) + (8 + 8))),
    ],
    ids=["linear", "conv2d", "depthwise", "conv1d", "cnn", "lstm", "lstm-2-layers"],
)
def test_count_macs_matches_hand_count(model, shape, macs):
    assert count_macs(model, torch.randn(shape)) == macs


def test_count_macs_passes_a_tuple_as_several_arguments():
    assert count_macs(TwoInputs(), (torch.randn(2, 4), torch.randn(2, 2))) == 2 * 4 * 3 + 2 * 2 * 3


def test_count_macs_runs_in_eval_mode_and_restores_each_module_mode():
    model = tiny_cnn()
    model[5].eval()
    running_mean = model[1].running_mean.clone()
    count_macs(model, torch.randn(2, 3, 6, 6))
    assert torch.equal(model[1].running_mean, running_mean)
    assert [m.training for m in model] == [True, True, True, True, True, False]


def test_count_macs_restores_the_backend_flags():
    backends = torch.backends
    flags = (backends.mkldnn.enabled, backends.mkldnn.deterministic, backends.cudnn.enabled)
    count_macs(nn.LSTM(4, 8), torch.randn(5, 1, 4))
    assert (backends.mkldnn.enabled, backends.mkldnn.deterministic, backends.cudnn.enabled) == flags


def test_count_macs_leaves_no_gradients():
    model = nn.Linear(4, 3)
    count_macs(model, torch.randn(2, 4))
    assert model.weight.grad is None


def test_latency_ms_is_a_positive_time_and_restores_modes_and_threads():
    model = tiny_cnn()
    threads = torch.get_num_threads()
    latency = latency_ms(model, torch.randn(2, 3, 6, 6), threads=1, min_run_time=0.01)
    assert isinstance(latency, float)
    assert latency > 0
    assert model.training
    assert torch.get_num_threads() == threads


def test_latency_ms_accepts_several_inputs():
    assert latency_ms(TwoInputs(), (torch.randn(2, 4), torch.randn(2, 2)), min_run_time=0.01) > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threads": 0}, "threads must be an integer >= 1, got 0"),
        ({"threads": 1.5}, "threads must be an integer >= 1, got 1.5"),
        ({"min_run_time": 0}, "min_run_time must be a positive number of seconds, got 0"),
    ],
)
def test_latency_ms_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        latency_ms(nn.Linear(2, 2), torch.randn(1, 2), **kwargs)


def test_layer_widths_lists_prunable_layers_and_norms():
    model = nn.ModuleDict(
        {
            "features": tiny_cnn(),
            "signal": nn.Conv1d(2, 6, 3),
            "rnn": nn.LSTM(6, 16, num_layers=2),
            "norm": nn.LayerNorm(16),
            "act": nn.GELU(),
        }
    )
    assert layer_widths(model) == {
        "features.0": (3, 4),
        "features.1": (4, 4),
        "features.5": (36, 5),
        "signal": (2, 6),
        "rnn": (6, 16),
        "norm": (16, 16),
    }
