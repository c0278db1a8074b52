"""The classes of channels a decision sees: a coupled set of members, its classes, their masks and what may go.

Scoring pruners (:mod:`.scoring`) score and write a :class:`ClassSet`; the budget's allocators (:mod:`.budget`) take
them as inputs. Both import this module, not each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_prune.fusion.plan import Member, PruningPlan
from lightning_prune.masks import row_mask


@dataclass
class ClassSet:
    """The classes of channels of some coupled members, as one decision sees them.

    ``classes`` are the distinct class roots (sorted) of the members' rows; ``index[k]`` maps member ``k``'s rows to
    positions in ``classes``; ``kept`` says which classes any row keeps under the current masks; ``free`` which
    classes nothing blocks (the only ones a pruner may remove).
    """

    members: list[Member]
    classes: torch.Tensor
    index: list[torch.Tensor]
    masks: list[torch.Tensor | None]  # None before masks are attached (every row kept)
    kept: torch.Tensor
    free: torch.Tensor

    def write(self, keep: torch.Tensor) -> None:
        """Set every member's row mask from ``keep`` (a bool per class)."""
        for idx, mask in zip(self.index, self.masks, strict=True):
            mask.copy_(keep[idx].to(mask.device))


def class_structure(plan: PruningPlan, members: list[Member]) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """The members' classes (sorted), each member's row -> class index, and which classes may go."""
    row_classes = [plan.classes(m.labels) for m in members]
    classes = torch.cat([c[c >= 0] for c in row_classes]).unique()
    index = [torch.searchsorted(classes, c.clamp_min(0)) for c in row_classes]
    return classes, index, ~plan.groups.blocked_mask()[classes]


def class_set(plan: PruningPlan, members: list[Member], structure: tuple | None = None) -> ClassSet:
    """The classes of ``members``' rows, which of them the masks keep, and which nothing blocks (``structure``:
    :func:`class_structure`'s result, when cached)."""
    classes, index, free = structure if structure is not None else class_structure(plan, members)
    fakes = [row_mask(m.module, m.tensor_name) for m in members]
    masks = [None if fake is None else fake.mask for fake in fakes]
    kept = torch.zeros(classes.numel(), dtype=torch.long)
    for idx, mask in zip(index, masks, strict=True):
        kept.scatter_reduce_(0, idx, torch.ones_like(idx) if mask is None else mask.cpu().long(), "amax")
    return ClassSet(members, classes, index, masks, kept.bool(), free)
