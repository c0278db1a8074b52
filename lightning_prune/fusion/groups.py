"""Channel groups: which channels must be kept or removed together, and which can never be removed.

Every output channel of every layer the analysis meets gets a global id. Ops that join channels position by position
(a residual add, a multiply, one module called on two inputs, a weight shared by two layers, the heads of an
attention block) record a *coupling*; ops that channels cannot pass exactly record a *block* with its reason. After
the walk, :meth:`ChannelGroups.solve` finds the connected components: each component is one *class* of channels
that a pruner keeps or removes as a whole, and a class touched by a block is never removed.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch


@dataclass
class Block:
    """Channels that cannot be removed, and why. ``retain`` blocks keep the channels (zeroed) without refusing."""

    ids: torch.Tensor
    reason: str
    retain: bool = False


@dataclass
class Coupling:
    """Two runs of channels joined position by position, and the op that joined them."""

    a: torch.Tensor
    b: torch.Tensor
    where: str


@dataclass
class ChannelGroups:
    """Global channel ids, their couplings and blocks; :meth:`solve` turns them into classes."""

    size: int = 0
    couplings: list[Coupling] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    root: torch.Tensor | None = None
    #: blocked_classes() by its filter, until the next id, coupling or block (a 1B model has ~10^5 blocked classes)
    _blocked: dict = field(default_factory=dict, repr=False)

    def fresh(self, n: int) -> torch.Tensor:
        """``n`` new channel ids."""
        ids = torch.arange(self.size, self.size + n, dtype=torch.long)
        self.size += n
        self.root = None
        self._blocked.clear()
        return ids

    def couple(self, a: torch.Tensor, b: torch.Tensor, where: str) -> None:
        """Join ``a`` and ``b`` position by position (same shape). A FIXED position blocks its partner."""
        a, b = a.reshape(-1), b.reshape(-1)
        fixed = (a < 0) | (b < 0)
        if fixed.any():
            partner = torch.where(a[fixed] < 0, b[fixed], a[fixed])
            self.block(partner, f"{where} joins them with channels that no configured layer produces")
        live = ~fixed & (a != b)
        if live.any():
            self.couplings.append(Coupling(a[live], b[live], where))
            self.root = None
            self._blocked.clear()

    def block(self, ids: torch.Tensor, reason: str, retain: bool = False) -> None:
        ids = ids.reshape(-1)
        ids = ids[ids >= 0]
        if ids.numel():
            self.blocks.append(Block(ids.unique(), reason, retain))
            self._blocked.clear()

    def mark_output(self, ids: torch.Tensor) -> None:
        ids = ids.reshape(-1)
        ids = ids[ids >= 0]
        if ids.numel():
            self.outputs.append(ids.unique())

    # -- solving ------------------------------------------------------------------------------------------------
    def solve(self) -> torch.Tensor:
        """The class (smallest member id) of every channel id, by vectorised min-label propagation."""
        if self.root is not None:
            return self.root
        parent = torch.arange(self.size, dtype=torch.long)
        if self.couplings:
            a = torch.cat([c.a for c in self.couplings])
            b = torch.cat([c.b for c in self.couplings])
            while True:
                low = torch.minimum(parent[a], parent[b])
                new = parent.clone()
                new.scatter_reduce_(0, parent[a], low, "amin")
                new.scatter_reduce_(0, parent[b], low, "amin")
                new = torch.minimum(new, new[parent])
                while True:  # pointer jumping
                    jumped = new[new]
                    if torch.equal(jumped, new):
                        break
                    new = jumped
                if torch.equal(new, parent):
                    break
                parent = new
        self.root = parent
        return parent

    def classes(self, labels: torch.Tensor) -> torch.Tensor:
        """The class of each label (FIXED stays FIXED)."""
        root = self.solve()
        out = labels.clone()
        live = labels >= 0
        out[live] = root[labels[live]]
        return out

    def blocked_classes(self, retained: bool | None = None) -> dict[int, list[str]]:
        """Class -> the reasons it can never be removed (``retained`` filters by block kind)."""
        if retained in self._blocked:
            return self._blocked[retained]
        root = self.solve()
        reasons: dict[int, list[str]] = defaultdict(list)
        for block in self.blocks:
            if retained is not None and block.retain != retained:
                continue
            for cls in root[block.ids].unique().tolist():
                if block.reason not in reasons[cls]:
                    reasons[cls].append(block.reason)
        self._blocked[retained] = dict(reasons)
        return self._blocked[retained]

    def blocked_mask(self) -> torch.Tensor:
        """A bool per channel id, read at class roots: whether the class is blocked (cached like blocked_classes)."""
        if "mask" not in self._blocked:
            mask = torch.zeros(self.size, dtype=torch.bool)
            blocked = list(self.blocked_classes())
            mask[torch.tensor(blocked, dtype=torch.long)] = True
            self._blocked["mask"] = mask
        return self._blocked["mask"]

    def output_classes(self) -> set[int]:
        root = self.solve()
        return {c for ids in self.outputs for c in root[ids].unique().tolist()}
