"""The public bug reports of issue 13 (``shared/cases/bugreports/`` 03, 04, 05, 10, 11), each scenario with its right
outcome, given example inputs: the structure prunes exactly and the configured layers get narrower, or, where the
source writes a size as a literal, ``prepare()`` refuses and leaves the model untouched. Without example inputs the
permutes still prune (a permute names the rank), and the SE gates that need shapes are refused naming the op.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import lightning_prune as lp
from tests.pruners import prune
from tests.structures import Conv1dToLinear


# -- 03: PReLU after a pruned conv (distiller #409) --------------------------------------------------------------
class PReLUBlock(nn.Module):
    def __init__(self, slopes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.PReLU(slopes)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.bn(self.conv1(x))))


@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "keep_bias"])
@pytest.mark.parametrize("slopes", [16, 1])
def test_03_prelu_per_channel_or_shared_prunes_exactly(slopes: int, prune_bias: bool) -> None:
    model = PReLUBlock(slopes)
    prune(model, ["conv1.weight"], torch.randn(2, 3, 8, 8), prune_bias)
    if prune_bias:  # with the BatchNorm shift kept, its constant meets conv2's padding and the channels stay
        assert model.conv1.out_channels == model.bn.num_features == model.conv2.in_channels == 8
        assert model.act.num_parameters == (8 if slopes == 16 else 1)


# -- 04: InstanceNorm between convs (Torch-Pruning #200, nncf #1057) ---------------------------------------------
class InstanceNormBlock(nn.Module):
    def __init__(self, dims: int, track: bool):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        norm = nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d
        self.conv1 = conv(3, 16, 3, padding=1)
        self.norm = norm(16, affine=True, track_running_stats=track)
        self.conv2 = conv(16, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.leaky_relu(self.norm(self.conv1(x)), 0.1))


@pytest.mark.parametrize(("dims", "track"), [(2, False), (3, True)], ids=["2d", "3d_running_stats"])
def test_04_instancenorm_slices_affine_and_running_stats(dims: int, track: bool) -> None:
    model = InstanceNormBlock(dims, track)
    prune(model, ["conv1.weight"], torch.randn(2, 3, *([6] * dims)))
    assert model.conv1.out_channels == model.norm.num_features == model.norm.weight.numel() == 8
    if track:
        assert model.norm.running_mean.numel() == model.norm.running_var.numel() == 8


# -- 05: squeeze-and-excitation gates (nni #4720, nncf #938) ------------------------------------------------------
class MBConvSE(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(8, 32, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.se_reduce = nn.Conv2d(32, 4, 1)
        self.se_expand = nn.Conv2d(4, 32, 1)
        self.project = nn.Conv2d(32, 8, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.bn1(self.dw(F.silu(self.bn0(self.expand(x))))))
        g = torch.sigmoid(self.se_expand(F.silu(self.se_reduce(F.adaptive_avg_pool2d(h, 1)))))
        return self.bn2(self.project(h * g)) + x


class SELinear(nn.Module):
    """The classic SENet gate with Linear layers, its vector and its broadcast written as ``view`` or as indexing."""

    def __init__(self, indexing: bool):
        super().__init__()
        self.conv = nn.Conv2d(8, 32, 3, padding=1)
        self.fc1 = nn.Linear(32, 4)
        self.fc2 = nn.Linear(4, 32)
        self.out = nn.Conv2d(32, 8, 1)
        self.indexing = indexing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        if self.indexing:
            y = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3))))))
            return self.out(h * y[:, :, None, None])
        b, c, _, _ = h.size()
        y = F.adaptive_avg_pool2d(h, 1).view(b, c)
        return self.out(h * torch.sigmoid(self.fc2(F.relu(self.fc1(y)))).view(b, c, 1, 1))


@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "keep_bias"])
def test_05_mbconv_se_prunes_with_expand_and_gate_configured(prune_bias: bool) -> None:
    """The depthwise conv's rows are the expand conv's channels: leaving it out of the config blocks nothing."""
    model = MBConvSE()
    prune(model, ["expand.weight", "se_expand.weight"], torch.randn(2, 8, 8, 8), prune_bias)
    if prune_bias:  # with biases kept, the BatchNorm shift meets the depthwise conv's padding and the channels stay
        assert model.expand.out_channels == model.dw.out_channels == model.dw.groups == 16
        assert model.se_expand.out_channels == model.se_reduce.in_channels == model.project.in_channels == 16


def test_05_mbconv_se_with_only_expand_configured_names_the_gate() -> None:
    model = MBConvSE()
    with pytest.raises(lp.UnsupportedPatternError, match=r"'expand.weight'.*tied to those of 'se_expand.weight'"):
        lp.SaliencyPruner().prepare(model, [{"tensor_fqn": "expand.weight"}],
                                    example_inputs=(torch.randn(2, 8, 8, 8),))
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


@pytest.mark.parametrize("indexing", [False, True], ids=["view_b_c", "mean_none_none"])
def test_05_linear_se_gate_prunes_with_the_gated_conv(indexing: bool) -> None:
    model = SELinear(indexing)
    prune(model, ["conv.weight", "fc2.weight"], torch.randn(2, 8, 8, 8))
    assert model.conv.out_channels == model.fc1.in_features == model.fc2.out_features == model.out.in_channels == 16


@pytest.mark.parametrize(("indexing", "blocker"), [(False, r"method 'view'.*view\(b, c\)"),
                                                   (True, r"function 'getitem'.*None, None\]")],
                         ids=["view_b_c", "mean_none_none"])
def test_05_linear_se_gate_without_example_inputs_is_refused_naming_the_op_that_needs_shapes(
        indexing: bool, blocker: str) -> None:
    with pytest.raises(lp.UnsupportedPatternError, match=rf"cannot prune 'conv.weight'.*{blocker}") as raised:
        lp.SaliencyPruner().prepare(SELinear(indexing), [{"tensor_fqn": "conv.weight"}, {"tensor_fqn": "fc2.weight"}])
    assert "residual connection" not in str(raised.value)


# -- 10: from a pooled feature map to a classifier (Torch-Pruning #511, #2) ---------------------------------------
class Classifier(nn.Module):
    def __init__(self, to_vector: Callable, global_pool: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.global_pool = global_pool
        self.fc = nn.Linear(8 if global_pool else 8 * 4 * 4, 5)
        self.to_vector = to_vector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x))
        h = F.adaptive_avg_pool2d(h, 1) if self.global_pool else F.max_pool2d(h, 2)
        return self.fc(self.to_vector(h))


IDIOMS = {  # name: (op, global pool?)
    "flatten(1)": (lambda h: h.flatten(1), False),
    "view(x.size(0), -1)": (lambda h: h.view(h.size(0), -1), False),
    "squeeze()": (lambda h: h.squeeze(), True),
    "squeeze(-1).squeeze(-1)": (lambda h: h.squeeze(-1).squeeze(-1), True),
    "sum((2, 3))": (lambda h: h.sum((2, 3)), True),
    "view(x.size()[0], -1)": (lambda h: h.view(h.size()[0], -1), False),
    "view(b, c)": (lambda h: h.view(h.size(0), h.size(1)), True),
    "x[:, :, 0, 0]": (lambda h: h[:, :, 0, 0], True),
}


@pytest.mark.parametrize("idiom", IDIOMS)
def test_10_every_idiom_that_keeps_channels_together_prunes_exactly(idiom: str) -> None:
    op, global_pool = IDIOMS[idiom]
    model = Classifier(op, global_pool)
    prune(model, ["conv.weight"], torch.randn(2, 3, 8, 8))
    assert model.conv.out_channels == 4
    assert model.fc.in_features == (4 if global_pool else 4 * 4 * 4)


def test_10_hard_coded_view_is_refused_and_the_model_left_alone() -> None:
    model = Classifier(lambda h: h.view(-1, 8 * 4 * 4), global_pool=False)
    with pytest.raises(lp.UnsupportedPatternError, match=r"literal \(128\).*x\.shape"):
        lp.SaliencyPruner().prepare(model, [{"tensor_fqn": "conv.weight"}], example_inputs=(torch.randn(2, 3, 8, 8),))
    assert not any(parametrize.is_parametrized(m) for m in model.modules())


# -- 11: transpose / permute between conv and Linear (Torch-Pruning #188) -----------------------------------------
class ConvNeXtish(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.pw1 = nn.Linear(8, 32)
        self.pw2 = nn.Linear(32, 16)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(x).permute(0, 2, 3, 1)
        return self.out(self.pw2(F.gelu(self.pw1(h))).permute(0, 3, 1, 2))


class Conformerish(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.conv = nn.Conv1d(16, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, C)
        return self.conv(F.silu(self.fc(x)).permute(0, 2, 1))


SHAPES = pytest.mark.parametrize("shapes", [True, False], ids=["shapes", "no_shapes"])  # permute names the rank


@SHAPES
@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "keep_bias"])
def test_11_channels_last_linear_permuted_back_to_a_conv(prune_bias: bool, shapes: bool) -> None:
    model = ConvNeXtish()
    prune(model, ["pw1.weight", "pw2.weight"], torch.randn(2, 8, 6, 6), prune_bias, shapes)
    assert model.pw2.out_features == model.out.in_channels == 8
    assert model.pw1.out_features == model.pw2.in_features == 16


@SHAPES
def test_11_linear_permuted_into_a_conv1d(shapes: bool) -> None:
    model = Conformerish()
    prune(model, ["fc.weight"], torch.randn(2, 10, 8), shapes=shapes)
    assert model.fc.out_features == model.conv.in_channels == 8


@SHAPES
def test_11_conv1d_transposed_into_a_linear(shapes: bool) -> None:
    model = Conv1dToLinear()
    prune(model, ["conv.weight"], torch.randn(2, 8, 10), shapes=shapes)
    assert model.conv.out_channels == model.fc.in_features == 8
