"""Channel layouts: which dims of a tensor carry channels, and which channel sits at each position.

A :class:`Layout` labels the channel-carrying dims of one tensor in the analysed graph. ``labels`` has one axis per
such dim; ``labels[i, j]`` is the global id of the channel at that position (see :mod:`.groups`), or :data:`FIXED`
for a position no producer controls (a model input, a buffer, an unconfigured branch). Ops that move dims (permute,
view, flatten, indexing, concat) move the label tensor with them, so a Linear after ``view(b, c)`` or the heads of an
attention block are followed exactly; ops that mix positions are refused by their rule.

When no example inputs were given the tensors' ranks are unknown: ``ndim`` is None, ``axes`` may count from the end,
and a flatten whose block size is not known yet leaves ``pending`` set until a consumer's width resolves it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FIXED = -1


@dataclass(frozen=True, eq=False)
class Layout:
    """The channel labels of one tensor.

    Attributes:
        axes: the tensor dims that carry labels, ascending; counted from the end (negative) when ``ndim`` is None.
        labels: int64, one axis per entry of ``axes``, sized like those dims.
        ndim: the tensor's rank, if known.
        pending: (rank unknown) ``labels`` are channels each standing for a block of flattened features of
            unknown size.
        stable: axes whose positions never disappear when channels are removed (an LSTM state's layer axis), so
            indexing along them is exact.
    """

    axes: tuple[int, ...]
    labels: torch.Tensor
    ndim: int | None
    pending: bool = False
    stable: tuple[int, ...] = ()

    @staticmethod
    def vector(labels: torch.Tensor, dim: int, ndim: int | None) -> Layout:
        """Channels along one dim; ``dim`` may be negative when ``ndim`` is unknown."""
        if ndim is not None:
            dim %= ndim
        return Layout((dim,), labels, ndim)

    @property
    def width(self) -> int:
        return self.labels.numel()

    def same(self, other: object) -> bool:
        return (isinstance(other, Layout) and self.axes == other.axes and self.ndim == other.ndim
                and self.pending == other.pending and torch.equal(self.labels, other.labels))

    def ids(self) -> torch.Tensor:
        """The distinct channel ids (FIXED excluded)."""
        flat = self.labels.reshape(-1)
        return flat[flat >= 0].unique()

    def single_axis(self) -> int | None:
        """The one dim carrying channels, or None when there are several."""
        return self.axes[0] if len(self.axes) == 1 else None

    def at(self, dim: int) -> bool:
        """Whether ``dim`` (from the front or the end) is the layout's single channel dim, as far as can be known."""
        axis = self.single_axis()
        if axis is None:
            return False
        if self.ndim is not None:
            return axis == dim % self.ndim
        return axis == dim

    def front_axes(self) -> tuple[int, ...] | None:
        """``axes`` counted from the front, or None when the rank is unknown and an axis counts from the end."""
        if self.ndim is not None:
            return self.axes
        return self.axes if all(a >= 0 for a in self.axes) else None


def from_full(full: torch.Tensor, pending: bool = False) -> Layout | None:
    """A layout from the label of every element (``full`` has the tensor's shape): the dims along which the labels
    vary become the channel axes. None when no dim varies (no channel, or a single one, which is never pruned)."""
    if not full.numel() or not (full >= 0).any():
        return None
    labels = full
    axes = []
    for d in reversed(range(full.dim())):
        if labels.shape[d] > 1 and _varies(labels, d):
            axes.append(d)
        else:
            labels = labels.select(d, 0)
    axes.reverse()
    if not axes:  # one channel everywhere: a width-1 layer, which is never pruned
        return None
    return Layout(tuple(axes), labels.contiguous(), full.dim(), pending)


def _varies(labels: torch.Tensor, axis: int) -> bool:
    first = labels.narrow(axis, 0, 1)
    return not bool((labels == first).all())


def expand_to(layout: Layout, shape: tuple[int, ...]) -> torch.Tensor:
    """The label of every element of a tensor of ``shape``: labels broadcast over the non-channel dims."""
    view = [1] * len(shape)
    for axis, size in zip(layout.axes, layout.labels.shape, strict=True):
        view[axis] = size
    return layout.labels.reshape(view).expand(*shape)


def reshape_groups(old: tuple[int, ...], new: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of ``old`` dims with runs of ``new`` dims of equal element count, as ``view`` regroups memory.

    Returns None when the shapes hold different element counts or a size-0 dim is involved.
    """
    if math.prod(old) != math.prod(new) or 0 in old or 0 in new:
        return None
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(old) and j < len(new):
        if old[i] == 1 and new[j] != 1:
            groups.append(([i], []))
            i += 1
            continue
        if new[j] == 1 and old[i] != 1:
            groups.append(([], [j]))
            j += 1
            continue
        gi, gj, a, b = [i], [j], old[i], new[j]
        i, j = i + 1, j + 1
        while a != b:
            if a < b:
                a *= old[i]
                gi.append(i)
                i += 1
            else:
                b *= new[j]
                gj.append(j)
                j += 1
        groups.append((gi, gj))
    groups += [([k], []) for k in range(i, len(old))] + [([], [k]) for k in range(j, len(new))]
    return groups


def reshape(layout: Layout, old: tuple[int, ...], new: tuple[int, ...]) -> tuple[Layout | None, list[list[int]]]:
    """The layout after viewing a tensor of shape ``old`` as ``new``.

    Also returns, for each run of new dims that holds channels, those dims (the caller checks that the ones whose
    size depends on the channel count are not written as literals).

    Raises:
        ValueError: ``old`` and ``new`` hold different numbers of elements.
    """
    groups = reshape_groups(old, new)
    if groups is None:
        raise ValueError(f"cannot view {old} as {new}")
    old_small, new_small = list(old), list(new)
    touched = []
    for gi, gj in groups:  # runs without channels shrink to size 1, so the label tensor stays small
        if any(a in gi for a in layout.axes):
            if gj:
                touched.append(gj)
        else:
            for d in gi:
                old_small[d] = 1
            for d in gj:
                new_small[d] = 1
    full = expand_to(layout, tuple(old_small)).reshape(new_small)
    return from_full(full, layout.pending), touched


def permute(layout: Layout, perm: tuple[int, ...]) -> Layout:
    """The layout after ``tensor.permute(perm)`` (``perm`` normalised to non-negative dims)."""
    inverse = {old: new for new, old in enumerate(perm)}
    axes = [inverse[a] for a in layout.axes]
    order = sorted(range(len(axes)), key=lambda k: axes[k])
    return Layout(tuple(axes[k] for k in order), layout.labels.permute(order).contiguous(), layout.ndim,
                  layout.pending, tuple(inverse[a] for a in layout.stable))
