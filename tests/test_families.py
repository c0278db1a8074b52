"""The couplings real CNN families need (issue 13, sections 3 and 4), on small replicas of their blocks
(benchmarks/families.py): grouped convs that keep their groups, equal chunks and splits, channel shuffle, GhostNet's
slice, upsampling and ASPP's concatenation, and a concatenated input that no configured layer produces.

Each family is pruned at 50% with ``config=None`` (the classifier kept), with example inputs, norms randomised, in
eval mode: the pruned model computes what the masked model computed, and its MACs really fall. Full-size figures
against Torch-Pruning live in benchmarks/sizes.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_prune as lp
from benchmarks import families
from lightning_prune.measure import count_macs
from tests.checks import assert_outputs_match, randomize_norms, step_and_prune_exactly
from tests.pruners import RandomRowPruner, prune

#: family -> (a small replica, the most MACs it may keep at 50%; Torch-Pruning's result is 0.25 to 0.3)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], float]] = {
    "resnext": (lambda: families.ResNeXt(width=32, depth=1, cardinality=4, image_size=16), 0.3),
    "regnet_x": (lambda: families.RegNet(width=16, depth=1, group_width=4, image_size=16), 0.3),
    "regnet_y": (lambda: families.RegNet(width=16, depth=1, group_width=4, se=True, image_size=16), 0.3),
    "efficientnet": (lambda: families.EfficientNet(width=8, image_size=16), 0.35),
    "shufflenet_v2": (lambda: families.ShuffleNetV2(width=8, image_size=16), 0.35),
    "csp": (lambda: families.CSPNet(width=8, image_size=16), 0.3),
    "ghostnet": (lambda: families.GhostNet(width=8, image_size=16), 0.4),
    "hrnet": (lambda: families.HRNet(width=8, modules=1, image_size=16), 0.3),
    "deeplab_aspp": (lambda: families.DeepLab(width=8, image_size=16), 0.3),
}


def prune_family(model: nn.Module, pruner: lp.BaseStructuredSparsifier) -> float:
    """Prune ``model`` in place with ``config=None`` (classifier kept); returns the MACs kept."""
    randomize_norms(model)
    model.eval()
    x = model.example_input(batch=2)
    dense = count_macs(model, x[:1])
    pruner.prepare(model, None, exclude_output=True, example_inputs=(x,))
    step_and_prune_exactly(pruner, model, x)
    return count_macs(model, x[:1]) / dense


@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "keep_bias"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_prunes_exactly_to_torch_pruning_size(family: str, prune_bias: bool) -> None:
    build, most = FAMILIES[family]
    kept = prune_family(build(), lp.SaliencyPruner(sparsity_level=0.5, prune_bias=prune_bias))
    assert kept <= (most if prune_bias else 0.9), f"{family} keeps {kept:.2f} of its MACs"


@pytest.mark.parametrize("family", ["resnext", "shufflenet_v2", "csp"])
def test_per_row_pruner_masks_are_reconciled_across_groups_chunks_and_shuffles(family: str) -> None:
    assert prune_family(FAMILIES[family][0](), RandomRowPruner(sparsity_level=0.5)) < 1


def test_resnext_grouped_conv_keeps_groups_and_prunes_the_same_positions_in_each() -> None:
    model = families.ResNeXt(width=32, depth=1, cardinality=4, image_size=16)
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    assert [block.conv2[0].in_channels for block in model.body[1:]] == [16, 32, 64]
    prune_family(model, pruner)
    for block, dense in zip(model.body[1:], [16, 32, 64], strict=True):
        grouped = block.conv2[0]
        assert grouped.groups == 4 and grouped.in_channels == grouped.out_channels == block.conv1[0].out_channels
        assert grouped.in_channels == dense // 2, f"half of each group's {dense // 4} channels go"
        for fqn in (f"{name}.weight" for name, m in model.named_modules() if m is grouped or m is block.conv1[0]):
            parts = pruner.state[fqn]["mask"].reshape(4, -1)
            assert (parts == parts[:1]).all(), f"{fqn}: every group loses the same positions"


def test_shufflenet_unit_couples_the_halves_its_chunk_and_shuffle_interleave() -> None:
    unit = families.ShuffleUnit(16, 16, stride=1)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), unit, nn.Conv2d(16, 4, 1))
    pruner = prune(model, ["0.weight", "1.branch2.2.0.weight"], torch.randn(2, 3, 8, 8))
    stem, branch = pruner.state["0.weight"]["mask"], pruner.state["1.branch2.2.0.weight"]["mask"]
    assert torch.equal(stem[:8], stem[8:]), "chunk(2): both halves lose the same positions"
    assert torch.equal(stem[:8], branch), "the shuffle interleaves the kept half with the branch, position by position"
    assert model[0].out_channels == 8 and model[2].in_channels == 8


class GLU(nn.Module):
    """A gated Linear unit, its halves taken with ``chunk`` or with ``F.glu``."""

    def __init__(self, functional: bool):
        super().__init__()
        self.up = nn.Linear(8, 32)
        self.down = nn.Linear(16, 8)
        self.functional = functional

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.functional:
            return self.down(F.glu(h, dim=-1))
        a, b = h.chunk(2, dim=-1)
        return self.down(a * torch.sigmoid(b))


@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "keep_bias"])
@pytest.mark.parametrize(("functional", "shapes"), [(False, True), (True, True), (True, False)],
                         ids=["chunk", "F.glu", "F.glu_without_shapes"])
def test_glu_halves_prune_position_by_position(functional: bool, shapes: bool, prune_bias: bool) -> None:
    model = GLU(functional).eval()
    x = torch.randn(4, 8)
    pruner = lp.SaliencyPruner(sparsity_level=0.5, prune_bias=prune_bias)
    pruner.prepare(model, [{"tensor_fqn": "up.weight"}], example_inputs=(x,) if shapes else None)
    pruner.step()
    mask = pruner.state["up.weight"]["mask"]
    assert torch.equal(mask[:16], mask[16:])
    with torch.no_grad():
        masked = model(x)
        pruner.prune()
        assert_outputs_match(masked, model(x))
    assert (model.up.out_features, model.down.in_features) == (16, 8)


class DenseLayer(nn.Module):
    """A DenseNet layer on the image: its input (no layer produces it) is concatenated to its conv's output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.next = nn.Conv2d(11, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.next(torch.cat([x, torch.relu(self.conv(x))], dim=1))


class UNetSkip(nn.Module):
    """A decoder conv reading an upsampled bottleneck beside a skip from a stem that is not configured."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up = nn.Conv2d(24, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = torch.relu(self.stem(x))
        deep = F.interpolate(torch.relu(self.down(skip)), scale_factor=2.0)
        return self.up(torch.cat([deep, skip], dim=1))


@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "keep_bias"])
@pytest.mark.parametrize(("build", "fqn", "reader"), [(DenseLayer, "conv.weight", "next"),
                                                      (UNetSkip, "down.weight", "up")], ids=["densenet", "unet_skip"])
def test_concatenated_input_no_configured_layer_produces_is_a_fixed_part(build, fqn: str, reader: str,
                                                                         prune_bias: bool) -> None:
    model = build()
    fixed = getattr(model, reader).in_channels - model.get_parameter(fqn).shape[0]
    prune(model, [fqn], torch.randn(2, 3, 8, 8), prune_bias)
    pruned = model.get_parameter(fqn).shape[0]
    if prune_bias or build is DenseLayer:  # a kept bias meeting 'up's padding keeps the U-Net's channels
        assert pruned == model.get_parameter(fqn).numel() // model.get_parameter(fqn)[0].numel() < 16
    assert getattr(model, reader).in_channels == fixed + pruned


class SplitNet(nn.Module):
    def __init__(self, split: Callable):
        super().__init__()
        self.conv, self.head, self.split = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1), split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat(self.split(self.conv(x))[::-1], 1))


@pytest.mark.parametrize("split", [lambda h: h.split([3, 5], 1), lambda h: h.split(4, 1)],
                         ids=["unequal", "literal_size"])
def test_split_of_the_channels_into_sizes_written_in_the_code_is_refused(split: Callable) -> None:
    with pytest.raises(lp.UnsupportedPatternError, match=r"'conv.weight'.*split.*(unequal|literal sizes \(4\))"):
        lp.SaliencyPruner().prepare(SplitNet(split), [{"tensor_fqn": "conv.weight"}],
                                    example_inputs=(torch.randn(1, 3, 4, 4),))
