"""Random networks from a grammar (issue 11): every net is pruned exactly or refused with the model unchanged.

The grammar mixes what breaks naive fusion: modules called twice, weights tied between layers, concatenated and
added branches, norms without parameters or over the channels (LayerNorm, RMSNorm), a leaf module hiding its own
weights, and unbatched inputs. Configs and masks are random; ``prune_bias`` too. No other outcome passes, and no
exception other than the library's own configuration errors may escape ``prepare()``, ``step()`` or ``prune()``.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

import lightning_prune as lp
from tests.checks import assert_outputs_match, randomize_norms, snapshot, step_and_prune_exactly, unique_params
from tests.pruners import RandomRowPruner

OPS = ("conv", "norm", "act", "residual", "reuse", "tie", "branch_cat", "gate", "pool", "leaf")


class RandomNet(nn.Module):
    """A chain of ops over (N, C, H, W), or (C, L) with ``unbatched``; ``plan`` lists (op, width) steps."""

    def __init__(self, plan: list[tuple[str, int, int]], unbatched: bool, seed: int):
        super().__init__()
        rng = random.Random(seed)
        self.unbatched, self.plan = unbatched, plan
        conv = nn.Conv1d if unbatched else nn.Conv2d
        self.layers = nn.ModuleList()
        width = 3
        for op, size, choice in plan:
            if op in ("conv", "residual", "reuse", "branch_cat", "gate"):
                out = width if op in ("residual", "reuse") else size
                first = conv(width, out, 3, padding=1, bias=bool(choice % 2))
                second = conv(width, size, 1) if op == "branch_cat" else conv(out, out, 1) if op == "gate" else None
                self.layers.append(nn.ModuleList([first] + ([second] if second is not None else [])))
                width = out + (size if op == "branch_cat" else 0)
            elif op == "tie":
                pair = nn.ModuleList([conv(width, width, 1), conv(width, width, 1)])
                pair[1].weight = pair[0].weight
                self.layers.append(pair)
            elif op == "norm":
                batch_norm = nn.BatchNorm1d if unbatched else nn.BatchNorm2d
                instance_norm = nn.InstanceNorm1d if unbatched else nn.InstanceNorm2d
                kinds = [batch_norm, lambda c, bn=batch_norm: bn(c, affine=False),
                         lambda c, inorm=instance_norm: inorm(c, affine=True),
                         lambda c: nn.GroupNorm(1 if c % 2 else 2, c), nn.LayerNorm, nn.RMSNorm]  # channels last
                self.layers.append(nn.ModuleList([kinds[choice % len(kinds)](width)]))
            elif op == "leaf":  # a GRU over the positions: a leaf to fx with weights fusion never sees into
                self.layers.append(nn.ModuleList([nn.GRU(width, width)]))
            else:
                self.layers.append(nn.ModuleList())
        self.width, self.rng_choices = width, [rng.random() for _ in plan]
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        for (op, _size, choice), mods in zip(self.plan, self.layers, strict=True):
            if op == "conv":
                x = mods[0](x)
            elif op == "norm" and isinstance(mods[0], (nn.LayerNorm, nn.RMSNorm)):  # over the channels, moved last
                dim = 0 if self.unbatched else 1
                x = mods[0](x.movedim(dim, -1)).movedim(-1, dim)
            elif op == "norm":  # BatchNorm1d and GroupNorm need a batch dim; InstanceNorm1d takes (C, L) as it is
                batch = self.unbatched and not isinstance(mods[0], nn.InstanceNorm1d)
                x = mods[0](x.unsqueeze(0)).squeeze(0) if batch else mods[0](x)
            elif op == "act":
                x = (F.relu, torch.sigmoid, F.gelu)[choice % 3](x)
            elif op == "residual":
                x = x + mods[0](x)
            elif op == "reuse":
                x = mods[0](F.relu(mods[0](x)))
            elif op == "tie":
                x = mods[1](F.relu(mods[0](x)))
            elif op == "branch_cat":
                x = torch.cat([mods[0](x), mods[1](x)], dim=0 if self.unbatched else 1)
            elif op == "gate":
                h = mods[0](x)
                pooled = h.mean(-1, keepdim=True) if self.unbatched else h.mean((2, 3), keepdim=True)
                x = h * torch.sigmoid(mods[1](pooled))
            elif op == "pool":
                x = F.max_pool1d(x, 2, ceil_mode=True) if self.unbatched else F.avg_pool2d(x, 2, ceil_mode=True)
            elif op == "leaf":
                seq = x.t() if self.unbatched else x.flatten(2).permute(2, 0, 1)
                out = mods[0](seq)[0]
                x = out.t() if self.unbatched else out.permute(1, 2, 0).reshape(x.shape)
        pooled = x.mean(-1) if self.unbatched else x.mean((2, 3))
        return self.head(pooled)


plans = st.lists(st.tuples(st.sampled_from(OPS), st.sampled_from([4, 6, 8]), st.integers(0, 11)), min_size=1,
                 max_size=6)


@given(plan=plans, unbatched=st.booleans(), shapes=st.booleans(), explicit=st.booleans(), scoring=st.booleans(),
       prune_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_random_net_is_pruned_exactly_or_refused_unchanged(plan, unbatched, shapes, explicit, scoring, prune_bias,
                                                           seed) -> None:
    torch.manual_seed(seed)
    model = RandomNet(plan, unbatched, seed).eval()
    randomize_norms(model)
    x = torch.randn(3, 8) if unbatched else torch.randn(2, 3, 8, 8)
    rng = random.Random(seed)
    weights = [n for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("head")]
    config = [{"tensor_fqn": n} for n in weights if rng.random() < 0.6] if explicit else None
    if config == []:
        config = None
    pruner = (lp.SaliencyPruner(sparsity_level=0.5, prune_bias=prune_bias) if scoring
              else RandomRowPruner({"prune_bias": prune_bias, "coin_per_row": True}))
    example = (x,) if shapes else None
    dense, before = unique_params(model), snapshot(model)
    with torch.no_grad():
        expected_dense = model(x)
    try:
        pruner.prepare(model, config, exclude_output=True, example_inputs=example)
    except lp.PruningConfigError:
        assert not any(parametrize.is_parametrized(m) for m in model.modules())
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
        with torch.no_grad():
            assert torch.equal(model(x), expected_dense)
        return
    if unbatched and example is None:  # read as batched: prune() refuses once forward has shown the real rank
        pruner.step()
        with torch.no_grad():
            masked = model(x)
        try:
            pruner.prune()
        except lp.UnsupportedPatternError as error:
            assert "but forward gave it rank 2" in str(error)
            with torch.no_grad():
                assert torch.equal(model(x), masked)
            return
        with torch.no_grad():
            assert_outputs_match(masked, model(x))
    else:
        step_and_prune_exactly(pruner, model, x)
    assert unique_params(model) <= dense
    for module in model.modules():
        assert not parametrize.is_parametrized(module)
