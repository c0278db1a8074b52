"""Shape-aware analysis (issue 13): with example inputs, channels are followed through every op that keeps them
apart, and each such structure prunes exactly.

In each case a layer's channels pass through one structure before the next layer reads them: permute / transpose /
mT / movedim to channels-last Linears and back, squeeze / unsqueeze / None / ... indexing, views whose sizes come from
``x.shape``, reductions over the other dims, resizing, padding, stochastic depth, per-channel modules (PReLU,
InstanceNorm, GroupNorm), a layer scale, and constant channel slices. Each is pruned by a weight-driven pruner and by
one that ignores the weights, with ``prune_bias`` True and False, in eval mode with norms randomised, and the
configured layers must get narrower, except where DESIGN says a channel stays (a kept bias meeting zero padding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import lightning_prune as lp
from benchmarks.families import StochasticDepth, stochastic_depth
from tests.pruners import make_pruner, prune, prune_and_compare
from tests.structures import Conv1dToLinear


class Between(nn.Module):
    """conv (3 -> ``width``, padded, biased) -> ReLU -> ``op`` -> ``head``: a 1x1 conv reading ``reads`` channels,
    or a Linear over the last dim when ``features`` is given."""

    def __init__(self, op: Callable, features: int | None = None, width: int = 8, reads: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.op = op
        self.head = nn.Linear(features, 4) if features else nn.Conv2d(reads or width, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.op(torch.relu(self.conv(x))))


class LinearToConv1d(nn.Module):
    """A Linear over (B, T, C), its channels moved to dim 1 by ``move`` for a Conv1d (no padding, so biases fold)."""

    def __init__(self, move: Callable):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.move = move
        self.conv = nn.Conv1d(16, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.move(F.silu(self.fc(x))))


class ConvNeXtBlock(nn.Module):
    """stem conv, then a ConvNeXt block: depthwise 7x7 -> channels last -> LayerNorm -> Linear -> GELU -> Linear ->
    layer scale -> channels first, added to its input. LayerNorm keeps the stream; the hidden width prunes."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 3, padding=1)
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, 4 * dim)
        self.pw2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.rand(dim) + 0.5)
        self.head = nn.Conv2d(dim, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h = self.norm(self.dw(x).permute(0, 2, 3, 1))
        h = self.gamma * self.pw2(F.gelu(self.pw1(h)))
        return self.head(x + h.permute(0, 3, 1, 2))


class Beside(nn.Module):
    """``cat([x, f(x)])``: each channel at two positions, with two different constants when it is removed."""

    def __init__(self, f: nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.f(x)], dim=1)


class LayerScale(nn.Module):
    """``x * self.gamma``: a per-channel parameter used directly in arithmetic, channels first or last."""

    def __init__(self, channels: int, last: bool):
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(channels if last else (channels, 1, 1)) + 0.5)
        self.last = last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.last:
            return (x.permute(0, 2, 3, 1) * self.gamma).permute(0, 3, 1, 2)
        return x * self.gamma


fx.wrap("stochastic_depth")  # torchvision's contract: one call, whichever module calls it


class DropPath(nn.Module):
    """timm's DropPath, known to fusion by its qualified name."""

    __module__ = "timm.layers.drop"

    def __init__(self, p: float = 0.2):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stochastic_depth(x, self.p, "row", self.training)


@dataclass(frozen=True)
class Case:
    model: Callable[[], nn.Module]
    tensors: tuple[str, ...] = ("conv.weight",)
    input_shape: tuple[int, ...] = (2, 3, 8, 8)
    narrows_with_bias_kept: bool = True  # False: the kept biases meet zero padding, so the channels stay
    rows_coupled: bool = False  # rows go together (a GroupNorm group): a per-row pruner's masks are reconciled


def pooled(reduce: Callable) -> Case:
    """A reduction over H, W feeding a Linear."""
    return Case(lambda: Between(reduce, features=8))


CASES = {
    # channels moved between dims
    "conv1d_transpose_linear": Case(Conv1dToLinear, input_shape=(2, 8, 10)),
    "linear_permute_conv1d": Case(lambda: LinearToConv1d(lambda h: h.permute(0, 2, 1)), ("fc.weight",), (2, 10, 8)),
    "linear_mT_conv1d": Case(lambda: LinearToConv1d(lambda h: h.mT), ("fc.weight",), (2, 10, 8)),
    "linear_transpose_conv1d": Case(lambda: LinearToConv1d(lambda h: h.transpose(-1, -2)), ("fc.weight",), (2, 10, 8)),
    "movedim_linear": Case(lambda: Between(lambda h: h.movedim(1, -1), features=8)),
    "tokens_linear": Case(lambda: Between(lambda h: h.flatten(2).transpose(1, 2), features=8)),
    "convnext_block": Case(ConvNeXtBlock, ("pw1.weight",)),
    # dims added, removed, split and merged
    "squeeze": pooled(lambda h: F.adaptive_avg_pool2d(h, 1).squeeze()),
    "squeeze_last_two": pooled(lambda h: F.adaptive_avg_pool2d(h, 1).squeeze(-1).squeeze(-1)),
    "view_b_c_from_size": pooled(lambda h: F.adaptive_avg_pool2d(h, 1).view(h.size(0), h.size(1))),
    "index_0_0": pooled(lambda h: F.adaptive_avg_pool2d(h, 1)[:, :, 0, 0]),
    "unsqueeze_none_ellipsis": Case(lambda: Between(lambda h: h.mean((2, 3)).unsqueeze(-1)[..., None])),
    "ellipsis_crop": Case(lambda: Between(lambda h: h[..., 1:-1, 1:-1])),
    "flatten_blocks": Case(lambda: Between(lambda h: F.max_pool2d(h, 2).flatten(1), features=8 * 4 * 4)),
    "view_size0_minus1": Case(lambda: Between(lambda h: F.max_pool2d(h, 2).view(h.shape[0], -1), features=128)),
    "reshape_split_h": Case(lambda: Between(
        lambda h: h.reshape(h.shape[0], h.shape[1], 2, h.shape[2] // 2, h.shape[3]).amax(2))),
    "unflatten": Case(lambda: Between(lambda h: h.flatten(2).unflatten(2, (h.shape[2], h.shape[3])))),
    # positions picked, split and joined
    "swapped_chunks": Case(lambda: Between(lambda h: torch.cat(h.chunk(2, 1)[::-1], 1)), rows_coupled=True),
    # a removed channel's two constants cannot be folded per channel: it stays
    "cat_with_its_normalised_self": Case(lambda: Between(Beside(nn.BatchNorm2d(8)), reads=16),
                                         narrows_with_bias_kept=False),
    # reductions over the other dims
    **{name: pooled(fn) for name, fn in {
        "sum": lambda h: h.sum((2, 3)), "amax": lambda h: h.amax((2, 3)), "amin": lambda h: torch.amin(h, dim=(2, 3)),
        "std": lambda h: h.std((2, 3)), "var": lambda h: torch.var(h, (2, 3), True, False),
        "norm": lambda h: h.norm(2, (2, 3)), "vector_norm": lambda h: torch.linalg.vector_norm(h, dim=(2, 3)),
    }.items()},
    # resizing, padding, stochastic depth
    "interpolate": Case(lambda: Between(lambda h: F.interpolate(h, scale_factor=2, mode="bilinear"))),
    "upsample": Case(lambda: Between(nn.Upsample(size=(5, 5), mode="nearest"))),
    "pad_zeros": Case(lambda: Between(lambda h: F.pad(h, (1, 1, 2, 0))), narrows_with_bias_kept=False),
    "pad_reflect": Case(lambda: Between(lambda h: F.pad(h, (1, 1, 1, 1), mode="reflect"))),
    "stochastic_depth_module": Case(lambda: Between(StochasticDepth(0.2))),
    "stochastic_depth_function": Case(lambda: Between(lambda h: stochastic_depth(h, 0.2, "row", False))),
    "drop_path": Case(lambda: Between(DropPath())),
    # per-channel modules and parameters
    "prelu_shared": Case(lambda: Between(nn.PReLU())),
    "prelu_per_channel": Case(lambda: Between(nn.PReLU(8))),
    "instancenorm_affine": Case(lambda: Between(nn.InstanceNorm2d(8, affine=True))),
    "instancenorm_running_stats": Case(lambda: Between(nn.InstanceNorm2d(8, affine=True, track_running_stats=True))),
    "groupnorm_per_channel": Case(lambda: Between(nn.GroupNorm(8, 8))),
    "groupnorm_groups": Case(lambda: Between(nn.GroupNorm(4, 8)), rows_coupled=True),
    "layer_scale": Case(lambda: Between(LayerScale(8, last=False))),
    "layer_scale_channels_last": Case(lambda: Between(LayerScale(8, last=True))),
}


@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "keep_bias"])
@pytest.mark.parametrize("pruner_kind", ["saliency", "random"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_structure_prunes_exactly_with_shapes(case: Case, pruner_kind: str, prune_bias: bool) -> None:
    narrows = case.tensors if prune_bias or case.narrows_with_bias_kept else ()
    prune_and_compare(case.model(), make_pruner(pruner_kind, prune_bias), case.tensors,
                      torch.randn(case.input_shape), narrows, case.tensors if case.rows_coupled else (), shapes=True)


def test_groupnorm_loses_whole_groups_and_keeps_their_size() -> None:
    model = Between(nn.GroupNorm(4, 16), width=16)
    pruner = prune(model, ["conv.weight"], torch.randn(2, 3, 8, 8))
    mask = pruner.state["conv.weight"]["mask"].reshape(4, 4)
    assert ((mask == mask[:, :1]).all(1)).all(), "a group's channels go together"
    assert (model.op.num_groups, model.op.num_channels, model.conv.out_channels) == (2, 8, 8)


@pytest.mark.parametrize(("op", "before"), [(lambda h: h[:, :6], 6), (lambda h: h.narrow(1, 2, 4), 6)],
                         ids=["slice", "narrow"])
def test_constant_channel_slice_keeps_the_channels_up_to_its_end_in_place(op: Callable, before: int) -> None:
    model = Between(op, reads=op(torch.zeros(1, 8, 1, 1)).shape[1])
    pruner = prune(model, ["conv.weight"], torch.randn(2, 3, 8, 8))
    mask = pruner.state["conv.weight"]["mask"]
    assert mask[:before].all() and not mask[before:].all(), "only channels after the slice's end can go"
    assert model.conv.out_channels == 8 - int((~mask).sum()) < 8


@pytest.mark.parametrize("view", [lambda h: h.view(-1, 128), lambda h: h.view(h.shape[0], 2, 4, 4, 4)],
                         ids=["one_channel_dim", "every_channel_dim"])
def test_literal_size_of_every_channel_dim_is_refused_naming_the_line(view: Callable) -> None:
    model = Between(lambda h: view(F.max_pool2d(h, 2)).flatten(1), features=128)
    with pytest.raises(lp.UnsupportedPatternError, match=r"test_shapes.py:\d+: .*view.*literal \(\d+\)"):
        lp.SaliencyPruner().prepare(model, [{"tensor_fqn": "conv.weight"}], example_inputs=(torch.randn(2, 3, 8, 8),))


class SizeScaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.out(h * h.shape[-1] ** -0.5)


def test_arithmetic_with_a_size_read_in_forward_is_refused_as_such() -> None:
    """``h.shape[-1]`` is the pruned width here: the scale would change with it."""
    with pytest.raises(lp.UnsupportedPatternError, match=r"'fc.weight'.*mul.*number computed in forward"):
        lp.SaliencyPruner().prepare(SizeScaled(), [{"tensor_fqn": "fc.weight"}], example_inputs=(torch.randn(2, 8),))


def test_the_shape_pass_does_not_run_layers_that_keep_their_input_shape(monkeypatch) -> None:
    """BatchNorm's meta-device decomposition was the slowest step of ``prepare(example_inputs=...)``: its rule says
    it keeps the input's shape, so the shape pass takes that instead of running it; the plan is the same."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2))
    x = torch.randn(2, 3, 9, 9)
    original, calls = nn.BatchNorm2d.forward, []

    def counted(self, input):
        calls.append(input.device.type)
        return original(self, input)

    monkeypatch.setattr(nn.BatchNorm2d, "forward", counted)
    monkeypatch.setattr(nn.modules.batchnorm._BatchNorm, "forward", counted)
    plan = lp.explain(model, [{"tensor_fqn": "0.weight"}], example_inputs=(x,))
    assert "meta" not in calls
    shapes = {n.name: tuple(n.meta["val"].shape) for n in plan.walk.traced.graph.nodes if n.op == "call_module"}
    assert shapes == {"_0": (2, 8, 7, 7), "_1": (2, 8, 7, 7), "_2": (2, 8, 7, 7), "_3": (2, 4, 3, 3)}
    assert plan.to_dict()["groups"][0]["removable"] == 8
