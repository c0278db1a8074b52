"""Input ranks assumed without shapes, checked against what forward does before anything is removed.

Without example inputs the analysis reads a convolution's input as batched, ``(N, C, *spatial)``, because nothing
says otherwise; an unbatched ``(C, *spatial)`` input has its channels on dim 0 instead, and a plan built on the wrong
reading would narrow the wrong dim of what follows. Each such call gets a :class:`RankProbe` (a forward pre-hook that
notes the rank of the input it sees); :func:`check_ranks` refuses ``prune()`` before any change when a probe saw
another rank than the one assumed.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch

from lightning_prune.errors import UnsupportedPatternError
from lightning_prune.fusion.plan import PruningPlan


class RankProbe:
    """A forward pre-hook noting the rank of a module's first positional input (every rank seen, in order); the
    first rank other than the assumed one is warned about at once, so a training run learns it at its first step
    rather than at ``prune()``. It watches one module: in a deep copy of the model (which copies hooks) it is silent."""

    def __init__(self, module: torch.nn.Module, where: str, rank: int) -> None:
        self.module = weakref.ref(module)  # copy.deepcopy keeps a weakref as it is
        self.where, self.rank = where, rank
        self.seen: list[int] = []

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if module is not self.module():
            return
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() not in self.seen:
            self.seen.append(args[0].dim())
            if args[0].dim() != self.rank:
                warnings.warn(f"{_mismatch(self.where, self.rank, args[0].dim())}: prune() will refuse this plan. "
                              f"{_FIX}", UserWarning, stacklevel=2)


def attach_rank_probes(plan: PruningPlan) -> list[tuple[RankProbe, Any]]:
    """One probe per module whose input rank the walk assumed (none when the plan had shapes); returns each probe
    with its hook handle, for :func:`check_ranks` and :func:`remove_rank_probes`."""
    probes: list[tuple[RankProbe, Any]] = []
    probed: set[tuple[int, int]] = set()
    for module, where, rank in plan.walk.assumed_ranks:
        if (id(module), rank) in probed:  # a module called twice: one probe sees both calls
            continue
        probed.add((id(module), rank))
        probe = RankProbe(module, where, rank)
        probes.append((probe, module.register_forward_pre_hook(probe)))
    return probes


def check_ranks(probes: list[tuple[RankProbe, Any]]) -> None:
    """Refuse the plan if forward gave a probed module an input of another rank than the walk assumed; warn when
    no forward reached any probe.

    Raises:
        UnsupportedPatternError: naming the call, the rank assumed and the rank seen.
    """
    wrong = [_mismatch(probe.where, probe.rank, seen) for probe, _handle in probes
             for seen in probe.seen if seen != probe.rank]
    if wrong:
        raise UnsupportedPatternError(f"{'; '.join(wrong)}. {_FIX} The model is unchanged.")
    unseen = [probe.where for probe, _handle in probes if not probe.seen]
    if unseen and len(unseen) == len(probes):
        warnings.warn(f"{len(unseen)} convolution(s) were read as taking batched input, and no forward ran since "
                      f"prepare() to confirm it (e.g. {unseen[0]}); with an unbatched (C, *spatial) input the pruned "
                      f"model would not match. {_FIX}", UserWarning, stacklevel=4)


def remove_rank_probes(probes: list[tuple[RankProbe, Any]]) -> None:
    """Remove the probes' hooks (and empty the list)."""
    for _probe, handle in probes:
        handle.remove()
    probes.clear()


_FIX = ("Without example inputs the channel dim is inferred from the layer type, and an unbatched input puts it "
        "elsewhere: prepare(model, config, example_inputs=(x,)) reads it from the shapes.")


def _mismatch(where: str, rank: int, seen: int) -> str:
    return f"{where} was read as getting a batched input of rank {rank}, but forward gave it rank {seen}"
