"""Fusion never breaks a model (issue 11): prune() is atomic; modules called twice and tied weights are coupled or
refused; the channel dim comes from the tensor's shape; weights used outside their module's call are never picked."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import lightning_prune as lp
from lightning_prune.fusion.surgery import InjectedFault, inject_fault
from tests.checks import assert_outputs_match, config_for, randomize_norms, step_and_prune_exactly, unique_params


def prune_exactly(model, config, x, exclude_output=False, **pruner_kwargs):
    """prepare -> step -> prune with example inputs; asserts pruned == masked and no more parameters than dense."""
    model.eval()
    dense = unique_params(model)
    pruner = lp.SaliencyPruner(sparsity_level=0.5, **pruner_kwargs)
    args = x if isinstance(x, tuple) else (x,)
    pruner.prepare(model, config, exclude_output=exclude_output, example_inputs=args)
    step_and_prune_exactly(pruner, model, *args)
    assert unique_params(model) <= dense
    return pruner


def state(model: nn.Module) -> dict:
    """Everything a failed prune() must leave as it was."""
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "objects": [id(p) for p in model.parameters()],
        "classes": [type(m) for m in model.modules()],
        "sizes": [(getattr(m, "in_channels", None), getattr(m, "out_channels", None), getattr(m, "num_features", None),
                   getattr(m, "in_features", None), getattr(m, "out_features", None)) for m in model.modules()],
        "masked": [parametrize.is_parametrized(m) for m in model.modules()],
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert after["objects"] == before["objects"], "parameters were replaced"
    assert after["classes"] == before["classes"] and after["sizes"] == before["sizes"]
    assert after["masked"] == before["masked"], "masks were not put back"
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, tensor in before["tensors"].items():
        assert torch.equal(after["tensors"][key], tensor), f"{key} changed"


# -- atomic prune() -------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1), nn.BatchNorm2d(c_out, affine=False)
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out)) \
            if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1, self.layer2 = Block(8, 8), Block(8, 16, stride=2)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.layer2(self.layer1(self.stem(x))), 1), 1))


def prepared_resnet(prune_bias: bool) -> tuple[nn.Module, lp.SaliencyPruner, torch.Tensor]:
    torch.manual_seed(0)
    model = SmallResNet()
    randomize_norms(model)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    pruner = lp.SaliencyPruner(sparsity_level=0.5, prune_bias=prune_bias)
    pruner.prepare(model, None, exclude_output=True)
    pruner.step()
    return model, pruner, x


@pytest.mark.parametrize("prune_bias", [True, False], ids=["prune_bias", "keep_bias"])
def test_a_fault_at_any_edit_leaves_the_model_exactly_as_it_was(prune_bias: bool, request) -> None:
    """A fault at edit 1, then 2, ... of prune(), on one prepared model: each rolls back to the prepared state (so
    the next fault starts from it, as a fresh prepare would), and the run past the last edit finishes the job."""
    model, pruner, x = prepared_resnet(prune_bias)
    with torch.no_grad():
        masked = model(x)
    before = state(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~240 forwards of a 2x3x8x8 input: on a busy machine OpenMP threads only wait
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    for at in range(1, 1000):
        with inject_fault(at):
            try:
                pruner.prune()
            except InjectedFault:
                pass
            else:
                break  # no edit ``at``: the pruner could still finish the job
        assert_same_state(before, state(model))
        with torch.no_grad():
            assert torch.equal(model(x), masked), f"the model computes something else after a fault at edit {at}"
        assert not pruner.pruned
    assert pruner.pruned and pruner.edits == at - 1 > 20
    with torch.no_grad():
        assert_outputs_match(masked, model(x))


def test_norms_without_parameters_are_pruned_like_the_others() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU(),
                          nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8, affine=False, track_running_stats=False), nn.ReLU(),
                          nn.Conv2d(8, 8, 3), nn.InstanceNorm2d(8), nn.Conv2d(8, 4, 3))
    randomize_norms(model)
    prune_exactly(model, config_for("0.weight", "3.weight", "6.weight"), torch.randn(2, 3, 12, 12))
    assert [model[i].num_features for i in (1, 4, 7)] == [4, 4, 4]
    assert model[1].running_mean.shape == (4,) and model[0].out_channels == 4


# -- modules called twice, tied weights --------------------------------------------------------------------------
class TwiceInARow(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.out = nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.out(F.relu(self.block(F.relu(self.block(F.relu(self.stem(x)))))))


class RawAndBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch, self.shared = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.out(self.shared(x) + self.shared(F.relu(self.branch(x))))


class SharedHead(nn.Module):
    """A RetinaNet-style head shared by two pyramid levels."""

    def __init__(self):
        super().__init__()
        self.p3, self.p4 = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head, self.cls = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        outs = [self.cls(F.relu(self.head(F.relu(level)))).flatten(2) for level in (self.p3(x), self.p4(x))]
        return torch.cat(outs, 2)


@pytest.mark.parametrize(("build", "fqns", "uses"), [
    (TwiceInARow, ["block.weight"], "stem.weight"),
    (RawAndBranch, ["branch.weight"], "shared"),
], ids=["block(block(h))", "shared(x) + shared(branch(x))"])
def test_a_module_called_on_inputs_that_cannot_all_be_narrowed_is_refused(build, fqns, uses) -> None:
    model = build()
    before = state(model)
    with pytest.raises(lp.UnsupportedPatternError, match=rf"cannot prune '{fqns[0]}'.*{uses}"):
        lp.SaliencyPruner().prepare(model, config_for(*fqns), example_inputs=(torch.randn(2, 8, 8, 8),))
    assert_same_state(before, state(model))


def test_a_head_shared_by_two_levels_prunes_the_same_channels_on_both() -> None:
    model = SharedHead()
    pruner = prune_exactly(model, config_for("p3.weight", "p4.weight", "head.weight"), torch.randn(2, 8, 8, 8))
    assert model.p3.out_channels == model.p4.out_channels == model.head.in_channels == 8
    assert {"p3.weight", "p4.weight"} <= next(
        {m.tensor_fqn for _, m in s} for s in pruner.coupled_sets() if any(m.tensor_fqn == "p3.weight" for _, m in s))


def test_block_used_twice_prunes_when_everything_feeding_it_is_configured() -> None:
    model = TwiceInARow()
    prune_exactly(model, config_for("stem.weight", "block.weight"), torch.randn(2, 8, 6, 6))
    assert model.stem.out_channels == model.block.in_channels == model.block.out_channels == 8


class SharedLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.l1, self.l2, self.out = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        self.l2.weight = self.l1.weight  # ALBERT-style sharing

    def forward(self, x):
        return self.out(F.relu(self.l2(F.relu(self.l1(F.relu(self.inp(x)))))))


class TiedLM(nn.Module):
    def __init__(self, vocab: int = 50, d: int = 16, hidden: int = 32):
        super().__init__()
        self.emb, self.fc1, self.fc2 = nn.Embedding(vocab, d), nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.emb.weight

    def forward(self, tokens):
        e = self.emb(tokens)
        return self.lm_head(e + self.fc2(F.gelu(self.fc1(e))))


@pytest.mark.parametrize("fqns", [["inp.weight"], ["l1.weight"], ["l2.weight"]])
def test_one_side_of_a_tied_weight_alone_is_refused(fqns) -> None:
    model = SharedLayers()
    before = state(model)
    with pytest.raises(lp.UnsupportedPatternError, match=rf"cannot prune '{fqns[0]}'"):
        lp.SaliencyPruner().prepare(model, config_for(*fqns), example_inputs=(torch.randn(4, 8),))
    assert_same_state(before, state(model))


def test_a_tied_weight_prunes_as_one_parameter_when_its_channels_are_configured() -> None:
    model = SharedLayers()
    prune_exactly(model, config_for("inp.weight", "l1.weight"), torch.randn(4, 8))
    assert model.l1.weight is model.l2.weight, "the tie came apart"
    assert tuple(model.l1.weight.shape) == (8, 8) and model.inp.out_features == 8


def test_embedding_tied_to_the_lm_head_keeps_the_tie_and_the_vocabulary() -> None:
    model = TiedLM()
    pruner = prune_exactly(model, None, torch.randint(0, 50, (2, 7)), exclude_output=True)
    assert model.lm_head.weight is model.emb.weight
    assert model.lm_head.out_features == 50 and model.emb.num_embeddings == 50
    assert model.emb.embedding_dim == model.lm_head.in_features == model.fc2.out_features == 8
    assert "lm_head.weight" not in {g["tensor_fqn"] for g in pruner.groups}


# -- the channel dim comes from the tensor ----------------------------------------------------------------------
class SingleSignal(nn.Module):
    """Conv1d on one unbatched (C, L) signal, then a Linear over time and a mean over the channels."""

    def __init__(self, length: int = 16):
        super().__init__()
        self.conv, self.over_time = nn.Conv1d(4, 8, 3, padding=1), nn.Linear(length, 3)

    def forward(self, x):
        return self.over_time(F.relu(self.conv(x)).flatten(1)).mean(0)


def test_unbatched_conv_channels_are_read_from_the_shape_and_refused_where_mixed() -> None:
    model = SingleSignal()
    before = state(model)
    refusal = r"cannot prune 'conv.weight'.*Linear 'over_time'.*channel dimension"
    with pytest.raises(lp.UnsupportedPatternError, match=refusal):
        lp.SaliencyPruner().prepare(model, config_for("conv.weight"), example_inputs=(torch.randn(4, 16),))
    assert_same_state(before, state(model))


def test_an_unbatched_conv_read_as_batched_without_shapes_is_warned_at_the_first_forward_and_refused_at_prune():
    """Without shapes a conv's input is read as batched; (C, L) is just as consistent with the layer types (the
    Linear over time would be a Linear over channel blocks), so forward's real rank decides: prune() refuses a plan
    forward has contradicted, and the first such forward warns, before the training that would be lost."""
    model, x = SingleSignal().eval(), torch.randn(4, 16)
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, config_for("conv.weight"))
    with warnings.catch_warnings():  # a deep copy carries the hook, which watches the original only
        warnings.simplefilter("error")
        copy.deepcopy(model)(x)
    with pytest.warns(UserWarning, match=r"Conv1d 'conv' .*test_integrity.py.* rank 3, but forward gave it rank 2"):
        model(x)
    pruner.step()
    with torch.no_grad():
        masked = model(x)
    with pytest.raises(lp.UnsupportedPatternError, match=r"rank 2\. .*example_inputs=\(x,\).*model is unchanged"):
        pruner.prune()
    assert model.conv.out_channels == 8 and parametrize.is_parametrized(model.conv)
    with torch.no_grad():
        assert torch.equal(model(x), masked)


def test_pruning_with_a_rank_assumed_and_never_seen_says_so() -> None:
    """prepare -> step -> prune with no forward in between (or load_pruned of a masked checkpoint): nothing confirmed
    the batched reading, so prune() warns, naming the layer and the fix."""
    model = SingleSignal().eval()
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, config_for("conv.weight"))
    pruner.step()
    with pytest.warns(UserWarning, match=r"1 convolution\(s\) were read as taking batched input, and no forward ran"
                                         r".*Conv1d 'conv'.*example_inputs=\(x,\)"):
        pruner.prune()


def test_a_batched_conv_read_without_shapes_prunes_and_leaves_no_hook() -> None:
    model, x = SingleSignal().eval(), torch.randn(5, 4, 2)  # the Linear reads 8 channels x 2 steps
    pruner = lp.SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, config_for("conv.weight"))
    step_and_prune_exactly(pruner, model, x)
    assert model.conv.out_channels == 4 and not model.conv._forward_pre_hooks


class UnbatchedChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv1d(4, 8, 3, padding=1), nn.Conv1d(8, 6, 3, padding=1)
        self.norm = nn.BatchNorm1d(8)

    def forward(self, x):  # (C, L)
        return self.conv2(F.relu(self.conv1(x).unsqueeze(0)).squeeze(0))


def test_unbatched_conv_chain_prunes_exactly() -> None:
    model = UnbatchedChain()
    prune_exactly(model, config_for("conv1.weight"), torch.randn(4, 16))
    assert model.conv1.out_channels == model.conv2.in_channels == 4


# -- weights the graph never calls as a module ------------------------------------------------------------------
class LeafEncoder(nn.Module):
    """nn.TransformerEncoderLayer is a leaf to fx with no rule: its inner Linears are never called as modules."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(8, 16), nn.Linear(16, 3)
        self.encoder = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)

    def forward(self, x):
        return self.head(self.encoder(self.fc(x)))


def test_weights_inside_a_leaf_module_are_never_picked_and_refused_when_named() -> None:
    pruner = lp.SaliencyPruner()
    model = LeafEncoder().eval()
    with pytest.raises(lp.UnsupportedPatternError, match=r"'encoder.linear1.weight' is never used as a layer's output"):
        pruner.prepare(model, config_for("encoder.linear1.weight"))
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    pruner.prepare(model, None, exclude_output=True)
    assert not any(g["tensor_fqn"].startswith("encoder.") for g in pruner.groups)
    pruner.step()
    pruner.prune()
    assert model(torch.randn(2, 5, 8)).shape == (2, 5, 3)


class FunctionalProjection(nn.Module):
    """A Linear's weight read directly (swin-style functional attention)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.proj(F.relu(F.linear(x, self.qkv.weight, self.qkv.bias)))


def test_a_weight_used_functionally_is_followed_and_its_module_synced() -> None:
    model = FunctionalProjection()
    prune_exactly(model, config_for("qkv.weight"), torch.randn(3, 8))
    assert model.qkv.out_features == model.qkv.weight.shape[0] == model.proj.in_features == 8
