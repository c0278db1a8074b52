"""timm's fused norm-activation layers prune (issue 23, item 5): ``F.batch_norm`` / ``F.group_norm`` /
``F.instance_norm`` on a module's own tensors (timm's BatchNormAct2d, GroupNormAct), the frozen BatchNorms and
EvoNorm B0 by their class names; EvoNorm S0's group statistics are refused with the reason. Replicas in
tests/timm_blocks.py; every case pruned == masked (eval, 1e-5), both ``prune_bias`` settings, fx with and without
shapes and torch.export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import lightning_prune as lp
from lightning_prune.errors import UnsupportedPatternError
from lightning_prune.measure import count_macs
from tests import timm_blocks as tb
from tests.checks import step_and_prune_exactly


class InstanceNormAct(nn.InstanceNorm2d):
    """An instance norm written as the call, with its running statistics (used in eval) and affine."""

    def forward(self, x):
        return torch.relu(F.instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                          self.training, self.momentum, self.eps))


NORMS = {
    "BatchNormAct2d": lambda c: tb.BatchNormAct2d(c),
    "BatchNormAct2d-silu-no-affine": lambda c: tb.BatchNormAct2d(c, act_layer=nn.SiLU, affine=False),
    "BatchNormAct2d-batch-stats": lambda c: tb.BatchNormAct2d(c, track_running_stats=False),
    "GroupNormAct": lambda c: tb.GroupNormAct(c, num_groups=4),
    "instance_norm": lambda c: InstanceNormAct(c, affine=True, track_running_stats=True),
    "FrozenBatchNorm2d": lambda c: tb.FrozenBatchNorm2d(c),
    "FrozenBatchNormAct2d": lambda c: tb.FrozenBatchNormAct2d(c, act_layer=nn.Hardswish),
    "EvoNorm2dB0": lambda c: tb.EvoNorm2dB0(c),
    "EvoNorm2dB0-no-act": lambda c: tb.EvoNorm2dB0(c, apply_act=False),
    "EvoNorm2dS0-no-act": lambda c: tb.EvoNorm2dS0(c, groups=4, apply_act=False),
}


class Block(nn.Module):
    """conv -> norm -> 1x1 conv (no padding, so a removed channel's constant folds into its bias) -> conv."""

    def __init__(self, norm, branch: bool = False):
        super().__init__()
        self.branch = branch
        self.c1, self.norm = nn.Conv2d(3, 16, 3, padding=1), norm(16)
        self.c2, self.c3 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        if self.branch and x.shape[0] > 1:  # fx cannot trace this: read with torch.export
            x = x * 2.0
        return self.c3(torch.relu(self.c2(self.norm(self.c1(x)))))


def _randomize(model: nn.Module) -> None:
    """Norm tensors far from their defaults (variances positive), so a wrong slice or constant shows."""
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.Conv2d):
                for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                    if tensor.dim() == 1:
                        tensor.uniform_(0.5, 2.0) if name in ("running_var", "weight", "v") else tensor.uniform_(-1, 1)


@pytest.mark.parametrize("front", ["fx", "fx-shapes", "fx-traced-training", "export"])
@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "fold_bias"])
@pytest.mark.parametrize("norm", list(NORMS))
def test_a_fused_norm_prunes_exactly(norm: str, prune_bias: bool, front: str) -> None:
    """``fx-traced-training``: prepared in training mode, as the callback does (the graph then holds the training
    flags), trained one forward, then compared in eval mode."""
    model, x = Block(NORMS[norm], branch=front == "export").eval(), torch.randn(2, 3, 6, 6)
    _randomize(model)
    if front == "export":
        assert lp.explain(model, example_inputs=x).walk.traced.front_end == "export"
    pruner = lp.SaliencyPruner(sparsity_level=0.5, prune_bias=prune_bias)
    model.train(front == "fx-traced-training")
    pruner.prepare(model, [{"tensor_fqn": "c1.weight"}, {"tensor_fqn": "c2.weight"}],
                   **({"example_inputs": (x,)} if front != "fx" else {}))
    model(x)
    model.eval()
    affine = [n for n in ("weight", "bias") if getattr(model.norm, n, None) is not None]
    assert all(parametrize.is_parametrized(model.norm, n) == prune_bias for n in affine)  # masked while masked
    step_and_prune_exactly(pruner, model, x)
    assert (model.c1.out_channels, model.c2.in_channels) == (8, 8)
    kept = [t for t in (*model.norm.parameters(recurse=False), *model.norm.buffers(recurse=False)) if t.dim() == 1]
    assert kept and all(t.shape == (8,) for t in kept)
    if isinstance(model.norm, nn.GroupNorm):
        assert (model.norm.num_groups, model.norm.num_channels) == (2, 8)  # whole groups of 4 removed
    if isinstance(model.norm, nn.BatchNorm2d):
        assert model.norm.num_features == 8


def test_a_pruned_channel_is_silent_after_the_norm_while_masked_in_training() -> None:
    """prune_bias: with batch statistics (training) a removed channel normalises to its bias, which is masked."""
    model, x = Block(NORMS["BatchNormAct2d"]).train(), torch.randn(4, 3, 6, 6)
    _randomize(model)
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, [{"tensor_fqn": "c1.weight"}])
    pruner.step()
    pruned = ~pruner.state["c1.weight"]["mask"]
    assert pruned.sum() == 8
    assert (model.norm(model.c1(x))[:, pruned] == 0).all()


def test_group_norm_loses_whole_groups_and_one_group_is_refused() -> None:
    model = Block(lambda c: tb.GroupNormAct(c, num_groups=1)).eval()
    with pytest.raises(UnsupportedPatternError, match=r"group_norm.*timm_blocks\.py.*one group"):
        lp.SaliencyPruner(sparsity_level=0.5).prepare(model, [{"tensor_fqn": "c1.weight"}])
    model = Block(NORMS["GroupNormAct"]).eval()
    plan = lp.explain(model, example_inputs=torch.randn(2, 3, 6, 6))
    group = next(g for g in plan.to_dict()["groups"] if g["producers"] == ["c1.weight"])
    assert group["granularity"] == "group-of-4"


def test_evonorm_s0_group_statistics_are_refused_with_the_reason() -> None:
    model = Block(lambda c: tb.EvoNorm2dS0(c, groups=4)).eval()
    reason = lp.explain(model).to_dict()["left_out"]["c1.weight"]
    assert "EvoNorm2dS0 'norm'" in reason and "std of each group of 4 channels" in reason
    with pytest.raises(UnsupportedPatternError, match="EvoNorm2dS0 'norm'.*group"):
        lp.SaliencyPruner(sparsity_level=0.5).prepare(model, [{"tensor_fqn": "c1.weight"}])


def test_a_norm_given_a_tensor_computed_in_forward_keeps_its_channels() -> None:
    class Scaled(nn.BatchNorm2d):
        def forward(self, x):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight * 2, self.bias, False, 0.1, 1e-5)

    reason = lp.explain(Block(Scaled).eval()).to_dict()["left_out"]["c1.weight"]
    assert "batch_norm" in reason and "takes its weight from a tensor computed in forward" in reason


@pytest.mark.parametrize("act", [nn.SiLU, nn.Hardswish], ids=["efficientnet", "mobilenetv3"])
def test_an_efficientnet_like_net_of_batchnormact_loses_its_macs(act) -> None:
    """Every norm a BatchNormAct2d, with SE gates and residuals: at 50% the MACs fall to 0.30 of the dense ones
    (0.999 when F.batch_norm was unknown), the pruned net computes what the masked one did, and load_pruned rebuilds
    it from a fresh dense one."""
    model, x = tb.TinyEfficientNet(act).eval(), torch.randn(2, 3, 32, 32)
    _randomize(model)
    dense = count_macs(model, x)
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, None, exclude_output=True, example_inputs=(x,))
    step_and_prune_exactly(pruner, model, x)
    assert count_macs(model, x) / dense < 0.31
    rebuilt = lp.load_pruned(tb.TinyEfficientNet(act), model.state_dict()).eval()  # widths from the shapes alone
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))
