"""Fusion on real architectures (issue 5): ResNets, VGG, MobileNetV2, Inception, Conv1d, transformer MLPs,
grouped (groups kept) and transposed convs, and user-registered layers.

Every model is pruned at 50% with BatchNorm statistics randomised, in eval mode: the pruned model must compute
what the masked model computed, and the configured layers must really get narrower. Widths and inputs are tiny so
the file stays fast; full-size figures against Torch-Pruning live in benchmarks/sizes.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import lightning_prune as lp
from benchmarks import models as archs
from lightning_prune.fusion import rules as R
from lightning_prune.measure import count_params
from tests.checks import assert_outputs_match, config_for, randomize_norms
from tests.custom_layers import Scale, ScaledLinear
from tests.pruners import RandomRowPruner

#: name -> (small model factory, max pruned/dense param ratio with prune_bias True, and False). Keeping biases
#: keeps the channels whose constant bias meets zero padding (DESIGN, bias semantics), so those bounds are looser.
ARCHITECTURES: dict[str, tuple[Callable[[], nn.Module], float, float]] = {
    "resnet18": (lambda: archs.ResNet18(width=8, image_size=8), 0.3, 0.6),
    "resnet50": (lambda: archs.ResNet50(num_classes=10, width=8, image_size=16), 0.3, 0.4),
    "vgg11": (lambda: archs.VGG11(width=8, image_size=64), 0.3, 0.55),
    "mobilenetv2": (lambda: archs.MobileNetV2ish(channels=8, image_size=8), 0.4, 0.6),
    "inception": (lambda: archs.InceptionNet(width=8, image_size=8), 0.4, 0.4),
    "temporal_conv": (lambda: archs.TemporalConvNet(width=16, length=16), 0.35, 0.55),
    # the residual stream runs through LayerNorm and stays; only the hidden width goes
    "transformer_mlp": (lambda: archs.TransformerMLP(dim=16, hidden=64), 0.6, 0.6),
    # grouped: the same positions go in every group, inputs and outputs
    "grouped_conv": (lambda: archs.GroupedConvNet(width=16), 0.35, 0.6),
    "conv_transpose": (lambda: archs.ConvTransposeNet(width=8), 0.3, 0.55),
    "mlp": (lambda: archs.MLP(width=64, depth=3), 0.35, 0.35),
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: extra intra-op threads only contend with each other (40x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prune_exactly(model: nn.Module, config: list[dict] | None = None, prune_bias: bool = True,
                  **prepare_kwargs) -> lp.SaliencyPruner:
    """Prepare, step and prune ``model`` in place at 50%, asserting the pruned output equals the masked one."""
    randomize_norms(model)
    model.eval()
    x = model.example_input(batch=2)
    pruner = lp.SaliencyPruner(sparsity_level=0.5, prune_bias=prune_bias)
    pruner.prepare(model, config, **prepare_kwargs)
    pruner.step()
    with torch.no_grad():
        masked = model(x)
    assert pruner.prune() is model
    with torch.no_grad():
        assert_outputs_match(masked, model(x))
    return pruner


def out_channels(module: nn.Module) -> int:
    return R.rule_for(module).out_channels(module)


@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "keep_bias"])
@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_architecture_prunes_exactly_and_shrinks(name: str, prune_bias: bool) -> None:
    build, max_ratio_pruned_bias, max_ratio_kept_bias = ARCHITECTURES[name]
    model = build()
    dense = count_params(model)
    widths = {name: out_channels(m) for name, m in model.named_modules() if isinstance(R.rule_for(m), R.LayerRule)}
    pruner = prune_exactly(model, None, prune_bias, exclude_output=True)

    assert out_channels(model.head) == widths["head"], "the classifier keeps its classes"
    assert not any(g["module"] is model.head for g in pruner.groups)
    ratio = count_params(model) / dense
    assert ratio <= (max_ratio_pruned_bias if prune_bias else max_ratio_kept_bias), f"{name} shrank to {ratio:.2f}"
    if prune_bias:
        for group in pruner.groups:
            before = widths[group["module_fqn"]]
            assert out_channels(group["module"]) == before - before // 2, group["tensor_fqn"]


def test_resnet18_residual_stream_is_one_coupled_group_per_stage() -> None:
    model = archs.ResNet18(width=8, image_size=8)
    randomize_norms(model)
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, None, exclude_output=True)
    pruner.step()
    stages = [
        ["conv1.weight", "layers.0.conv2.weight", "layers.1.conv2.weight"],
        *[[f"layers.{b}.shortcut.0.weight", f"layers.{b}.conv2.weight", f"layers.{b + 1}.conv2.weight"]
          for b in (2, 4, 6)],
    ]
    coupled = [{member.tensor_fqn for _, member in members} for members in pruner.coupled_sets()]
    for stream in stages:
        assert set(stream) in coupled
        masks = [pruner.state[fqn]["mask"] for fqn in stream]
        assert all(torch.equal(masks[0], mask) for mask in masks[1:]), f"{stream} disagree"
        assert masks[0].sum().item() == masks[0].numel() // 2, "the coupled set reaches the target sparsity"

    x = model.example_input(batch=2)
    model.eval()  # the exactness contract is in eval mode (batch statistics of 2 samples amplify rounding)
    with torch.no_grad():
        masked = model(x)
    pruner.prune()
    with torch.no_grad():
        assert_outputs_match(masked, model(x))
    for stream, width in zip(stages, (4, 8, 16, 32), strict=True):
        modules = [model.get_submodule(fqn.removesuffix(".weight")) for fqn in stream]
        assert [m.out_channels for m in modules] == [width] * len(modules)


def test_resnet18_custom_pruner_masks_are_reconciled_across_the_residual_stream() -> None:
    model = archs.ResNet18(width=8, image_size=8)
    randomize_norms(model)
    model.eval()
    pruner = RandomRowPruner(sparsity_level=0.5)
    pruner.prepare(model, None, exclude_output=True)
    pruner.step()
    stream = ["conv1.weight", "layers.0.conv2.weight", "layers.1.conv2.weight"]
    kept = torch.stack([pruner.state[fqn]["mask"] for fqn in stream]).any(0)
    x = model.example_input(batch=2)
    with torch.no_grad():
        masked = model(x)
    pruner.prune()
    with torch.no_grad():
        assert_outputs_match(masked, model(x))
    assert model.conv1.out_channels == model.layers[1].conv2.out_channels == kept.sum().item() < 8


def test_mobilenetv2_depthwise_conv_ties_its_input_to_its_output() -> None:
    model = archs.MobileNetV2ish(channels=8, image_size=8)
    prune_exactly(model, None, exclude_output=True)
    for block in model.blocks:
        hidden = block.expand.out_channels
        assert hidden == 8 * 6 // 2
        assert block.depthwise.in_channels == block.depthwise.out_channels == block.depthwise.groups == hidden
        assert block.bn1.num_features == block.bn2.num_features == block.project.in_channels == hidden
        assert block.project.out_channels == model.stem.out_channels == 4, "the residual stream is coupled"


def test_inception_concat_maps_each_branch_to_its_offset() -> None:
    model = archs.InceptionNet(width=8, image_size=8)
    config = [{"tensor_fqn": "branch1.weight", "sparsity_level": 0.25},
              {"tensor_fqn": "branch3.weight", "sparsity_level": 0.75}]
    prune_exactly(model, config)
    assert (model.branch1.out_channels, model.branch3.out_channels) == (6, 3)
    assert model.mix.in_channels == 9


@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "keep_bias"])
def test_vgg11_non_adaptive_pool_before_flatten_maps_channels_to_feature_blocks(prune_bias: bool) -> None:
    model = archs.VGG11(width=8, image_size=64)
    convs = [f"features.{i}.weight" for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    prune_exactly(model, config_for(*convs), prune_bias)
    last_conv = model.get_submodule(convs[-1].removesuffix(".weight"))
    assert last_conv.out_channels < 64
    assert model.head.in_features == last_conv.out_channels * 2 * 2, "each channel is a 2x2 block of features"


def test_temporal_conv_net_explicit_config_narrows_conv1d_and_batchnorm1d() -> None:
    model = archs.TemporalConvNet(width=16, length=16)
    convs = [f"features.{i}.weight" for i, m in enumerate(model.features) if isinstance(m, nn.Conv1d)]
    prune_exactly(model, config_for(*convs))
    widths = [(m.num_features if isinstance(m, nn.BatchNorm1d) else m.out_channels)
              for m in model.features if isinstance(m, (nn.Conv1d, nn.BatchNorm1d))]
    assert widths == [8] * 6
    assert model.head.in_features == 8


def test_transformer_mlp_hidden_width_is_pruned_exactly() -> None:
    model = archs.TransformerMLP(dim=16, hidden=64)
    prune_exactly(model, config_for(*(f"blocks.{i}.fc1.weight" for i in range(3))))
    for block in model.blocks:
        assert block.fc1.out_features == block.fc2.in_features == 32
        assert block.fc2.out_features == block.norm.normalized_shape[0] == 16


@pytest.mark.parametrize("fqns", [("blocks.1.fc2.weight",), ("embed.weight",)], ids=["one_fc2", "embed"])
def test_transformer_mlp_residual_stream_needs_all_its_producers(fqns: tuple[str, ...]) -> None:
    """The residual adds tie every producer of the stream: configuring some of them is refused, naming the rest."""
    model = archs.TransformerMLP(dim=16, hidden=64)
    with pytest.raises(lp.UnsupportedPatternError, match=r"cannot prune '[\w.]+'.*tied to those of .*not configured"):
        lp.SaliencyPruner().prepare(model, config_for(*fqns))
    assert not any(parametrize.is_parametrized(m) for m in model.modules()), "a refused prepare() changes nothing"


@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "keep_bias"])
def test_transformer_mlp_residual_stream_through_layernorms_is_pruned_exactly(prune_bias: bool) -> None:
    """The stream's LayerNorms take masked statistics while masked, so removing the stream is exact (also with
    biases kept: a removed channel's constant is outside every norm's statistics and folds into the next layer)."""
    model = archs.TransformerMLP(dim=16, hidden=64)
    prune_exactly(model, config_for("embed.weight", *(f"blocks.{i}.fc2.weight" for i in range(3))), prune_bias)
    assert model.embed.out_features == model.head.in_features == model.norm.normalized_shape[0] == 8
    assert all(block.norm.weight.numel() == block.fc1.in_features == 8 for block in model.blocks)


@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "keep_bias"])
def test_grouped_conv_keeps_its_groups_and_loses_the_same_positions_in_each(prune_bias: bool) -> None:
    model = archs.GroupedConvNet(width=16, groups=4)
    pruner = prune_exactly(model, config_for("conv1.weight", "grouped.weight", "conv3.weight"), prune_bias)
    grouped = model.grouped
    assert grouped.groups == 4 and grouped.in_channels % 4 == 0 and grouped.out_channels % 4 == 0
    assert grouped.out_channels == 16 and model.conv3.in_channels == 16, "half of each group's outputs go"
    if prune_bias:  # with biases kept, conv1's constants meet the grouped conv's padding and its channels stay
        assert grouped.in_channels == model.conv1.out_channels == 8
    for fqn, groups in (("conv1.weight", 4), ("grouped.weight", 4)):
        parts = pruner.state[fqn]["mask"].reshape(groups, -1)
        assert (parts == parts[:1]).all(), f"{fqn}: every group keeps the same positions"


@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "keep_bias"])
def test_conv_transpose_as_producer_and_consumer(prune_bias: bool) -> None:
    model = archs.ConvTransposeNet(width=8)
    prune_exactly(model, config_for("enc1.weight", "enc2.weight", "up2.weight", "up1.weight"), prune_bias)
    assert model.enc2.out_channels == model.up2.in_channels < 16
    assert model.up1.in_channels == model.up2.out_channels + model.enc1.out_channels
    if prune_bias:
        assert model.up2.out_channels == model.up1.out_channels == model.head.in_channels == 4


def test_include_and_exclude_regexes_select_layers() -> None:
    model = archs.ResNet18(width=8, image_size=8)
    pruner = prune_exactly(model, None, include=[r"^layers\.\d+\.conv1\."], exclude=[r"^layers\.[67]\."])
    assert sorted(g["tensor_fqn"] for g in pruner.groups) == [f"layers.{b}.conv1.weight" for b in range(6)]
    assert [block.conv1.out_channels for block in model.layers] == [4, 4, 8, 8, 16, 16, 64, 64]
    assert model.conv1.out_channels == 8, "the residual stream was not selected"


# -- extensibility ----------------------------------------------------------------------------------------------
class CustomLayersNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = Scale(8)
        self.fc1 = ScaledLinear(8, 16)
        self.fc2 = ScaledLinear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(torch.relu(self.scale(self.conv(x))), 1).flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, 3, 6, 6)


@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "keep_bias"])
def test_registered_custom_layers_prune_exactly(prune_bias: bool, custom_layer_rules) -> None:
    model = CustomLayersNet()
    pruner = prune_exactly(model, config_for("conv.weight", "fc1.weight", "fc2.weight"), prune_bias)
    assert model.conv.out_channels == model.scale.gain.numel() == 4
    assert tuple(model.fc1.weight.shape) == (8, 4)
    assert model.fc2.weight.shape[1] == 8
    assert model.head.in_features == model.fc2.weight.shape[0]
    if prune_bias:
        assert model.fc2.weight.shape[0] == 8
    assert pruner.groups[1]["module"] is model.fc1, "the user's own module object is narrowed in place"


class ChannelMixer(nn.Module):
    """A user's layer fusion has no rule for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1)


@pytest.mark.parametrize(
    ("blocker", "says"),
    [(ChannelMixer, r"method 'flip'.*test_architectures.py:\d+: return x.flip\(1\).*register_function"),
     (nn.Softmax2d, r"Softmax2d '1'.*softmax over the channels"),
     (lambda: nn.LocalResponseNorm(2), r"LocalResponseNorm '1'.*across neighbouring channels")],
    ids=["unknown", "Softmax2d", "LRN"],
)
def test_module_on_the_path_that_mixes_channels_blocks_with_a_fitting_hint(blocker, says: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), blocker(), nn.Conv2d(8, 4, 3))
    with pytest.raises(lp.UnsupportedPatternError, match=rf"'0\.weight'.*{says}") as raised:
        lp.SaliencyPruner().prepare(model, config_for("0.weight"))
    assert not re.search(r"lightning_prune[/\\]", str(raised.value)), "the message cites the library's own code"
    pruner = lp.SaliencyPruner()
    pruner.prepare(model, None)
    assert [g["tensor_fqn"] for g in pruner.groups] == ["2.weight"]
