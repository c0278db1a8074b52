"""Pruned models leave for other runtimes: ``torch.export``, ONNX (``torch.onnx.export(dynamo=True)``) run in
onnxruntime, and ``torch.compile`` (eager backend), each with outputs equal to the pruned PyTorch model's (1e-4).
One tiny model per family: a CNN whose removed channels' biases were folded, an LSTM, ``nn.MultiheadAttention``, and
Hugging Face Llama (GQA), BERT and ViT."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import onnxruntime
import pytest
import torch
from torch import nn

import lightning_prune as lp
from tests import transformer_models as tm
from tests.checks import assert_outputs_match


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3), nn.Conv2d(8, 16, 3)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean((2, 3)))


class LSTMHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(8, 16, batch_first=True), nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


class Output(nn.Module):
    """The tensor a model returns (a Hugging Face output's last hidden state), for runtimes that take tensors."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return tm.output(self.model(*inputs))


def _cnn():
    with torch.no_grad():
        model = CNN().eval()
        model.conv1.bias.uniform_(0.5, 1.0)  # removed channels emit relu(bias) > 0, folded into conv2's bias
    return model, (torch.randn(2, 1, 8, 8),)


def _lstm():
    return LSTMHead().eval(), (torch.randn(2, 5, 8),)


#: family -> (build, pruner, config)
FAMILIES: dict[str, tuple[Callable, Callable, list | None]] = {
    "cnn-folded-bias": (_cnn, lambda: lp.SaliencyPruner(sparsity_level=0.5, prune_bias=False),
                        [{"tensor_fqn": "conv1.weight"}]),
    "lstm": (_lstm, lambda: lp.LSTMSaliencyPruner(sparsity_level=0.5, tie_gates=True), None),
    "mha": (tm.mha, lambda: lp.SaliencyPruner(sparsity_level=0.5), None),
    "llama-gqa": (tm.llama, lambda: lp.SaliencyPruner(sparsity_level=0.5), None),
    "bert": (tm.bert, lambda: lp.SaliencyPruner(sparsity_level=0.5), None),
    "vit": (tm.vit, lambda: lp.SaliencyPruner(sparsity_level=0.5), None),
}


def _pruned(name: str):
    """The pruned model (wrapped to return a tensor), its inputs and its output; checks that it was narrowed."""
    build, make, config = FAMILIES[name]
    torch.manual_seed(0)
    model, inputs = build()
    dense = sum(p.numel() for p in model.parameters())
    bias = model.conv2.bias.detach().clone() if name == "cnn-folded-bias" else None
    pruner = make()
    pruner.prepare(model, config, example_inputs=inputs, exclude_output=config is None)
    pruner.step()
    with torch.no_grad():
        masked = tm.output(model(*inputs))
    pruner.prune()
    assert sum(p.numel() for p in model.parameters()) < 0.8 * dense
    if bias is not None:
        assert not torch.allclose(model.conv2.bias, bias), "no removed channel's bias was folded"
    wrapped = Output(model).eval()
    with torch.no_grad():
        out = wrapped(*inputs)
    assert_outputs_match(masked, out)
    return wrapped, inputs, out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_pruned_models_export_and_run_in_onnxruntime(name, tmp_path):
    model, inputs, expected = _pruned(name)
    program = torch.export.export(model, inputs)
    assert_outputs_match(expected, program.module()(*inputs), rtol=1e-4)

    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():  # the exporter's notes on its own passes
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, path, dynamo=True)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {arg.name: value.numpy() for arg, value in zip(session.get_inputs(), inputs, strict=True)}
    assert_outputs_match(expected, torch.from_numpy(session.run(None, feeds)[0]), rtol=1e-4)


@pytest.mark.parametrize("name", ["cnn-folded-bias", "llama-gqa"])
def test_pruned_models_compile(name):
    model, inputs, expected = _pruned(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert_outputs_match(expected, compiled(*inputs), rtol=1e-4)
