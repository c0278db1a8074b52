"""The pruners the tests share and the runs that prune with them: a pruner that ignores the weights (random rows),
and prepare -> step -> prune runs that check the pruned output equals the masked one."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import lightning_prune as lp
from lightning_prune.sparsifier import BaseStructuredSparsifier, SaliencyPruner
from tests.checks import assert_outputs_match, randomize_norms, step_and_prune_exactly


class RandomRowPruner(BaseStructuredSparsifier):
    """Drops a random ``sparsity_level`` share of each tensor's rows, whatever the weights say, so coupled members
    disagree and fusion must reconcile them. With ``coin_per_row=True`` each row is dropped on its own with
    probability ``sparsity_level`` instead (a tensor may then lose all its rows)."""

    def update_mask(self, module, tensor_name, sparsity_level, coin_per_row=False, **kwargs):
        mask = getattr(module.parametrizations, tensor_name)[0].mask
        if coin_per_row:
            mask.copy_(torch.rand(mask.shape) > sparsity_level)
            return
        mask.fill_(True)
        mask[torch.randperm(mask.numel())[: int(mask.numel() * sparsity_level)].to(mask.device)] = False


def make_pruner(kind: str, prune_bias: bool) -> BaseStructuredSparsifier:
    """A SaliencyPruner (``kind="saliency"``) or a RandomRowPruner at 50%."""
    defaults = {"sparsity_level": 0.5, "prune_bias": prune_bias}
    return SaliencyPruner(defaults) if kind == "saliency" else RandomRowPruner(defaults)


def rows(model: nn.Module, tensor_fqn: str) -> int:
    """The rows (output channels) of a weight."""
    return model.get_parameter(tensor_fqn).shape[0]


def prune_and_compare(
    model: nn.Module,
    pruner: BaseStructuredSparsifier,
    tensors: tuple[str, ...],
    x: torch.Tensor,
    narrows: tuple[str, ...],
    coupled: tuple[str, ...] = (),
    output: Callable = lambda y: y,
    shapes: bool = False,
) -> None:
    """Mask rows of ``tensors``, prune, and check that the output is unchanged and ``narrows`` got narrower.

    A narrowed tensor keeps exactly its mask's rows, except in a coupled set pruned by a per-tensor pruner
    whose members disagree: there a row stays if any member keeps it. ``shapes``: prepare with ``x`` as the
    example input.
    """
    randomize_norms(model)
    model.eval()
    before = {fqn: rows(model, fqn) for fqn in tensors}
    pruner.prepare(model, [{"tensor_fqn": fqn} for fqn in tensors], example_inputs=(x,) if shapes else None)
    pruner.enable_mask_update = True
    pruner.step()
    kept = {fqn: int(pruner.state[fqn]["mask"].sum()) for fqn in tensors}
    with torch.no_grad():
        y_masked = output(model(x))

    pruned = pruner.prune()
    assert pruned is model
    with torch.no_grad():
        y_pruned = output(model(x))

    assert_outputs_match(y_masked, y_pruned)
    after = {fqn: rows(model, fqn) for fqn in tensors}
    for fqn in tensors:
        assert kept[fqn] <= after[fqn] <= before[fqn], f"{fqn}: {after[fqn]} rows, mask keeps {kept[fqn]}"
    for fqn in narrows:
        assert after[fqn] < before[fqn], f"{fqn} was not narrowed: {after[fqn]} rows of {before[fqn]}"
        if fqn not in coupled or isinstance(pruner, SaliencyPruner):
            assert after[fqn] == kept[fqn], f"{fqn}: {after[fqn]} rows, mask keeps {kept[fqn]}"


def prune(model: nn.Module, config: list[str], x: torch.Tensor, prune_bias: bool = True,
          shapes: bool = True) -> lp.SaliencyPruner:
    """Prepare (with ``x`` as example input when ``shapes``), step at 50%, prune; the pruned output must equal the
    masked one."""
    randomize_norms(model)
    model.eval()
    pruner = lp.SaliencyPruner(sparsity_level=0.5, prune_bias=prune_bias)
    pruner.prepare(model, [{"tensor_fqn": fqn} for fqn in config], example_inputs=(x,) if shapes else None)
    step_and_prune_exactly(pruner, model, x)
    return pruner
