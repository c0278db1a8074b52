"""What a pruned model costs, as a function of which classes of channels it keeps.

Every tensor fusion narrows shrinks along each bound dim in proportion to the positions kept there, so a layer's
parameters, and the MACs of a Linear or conv (proportional to its weight's size), are the dense count times the
product over its bound dims of the fraction kept. :class:`CostModel` holds those terms once per plan, so a budget can
evaluate a kept set, and the saving of removing each class, in a few tensor operations. Dense MACs per layer come from
``torch.utils.flop_counter`` on fake tensors of the example inputs (no real compute); MACs outside leaf layers
(functional matmuls, attention) are counted as fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode

from lightning_prune.fusion.records import Walk, held
from lightning_prune.fusion.rules import registry
from lightning_prune.measure import countable_kernels, eval_mode

METRICS = ("macs", "params")


def layer_macs(model: nn.Module, example_inputs: tuple[tuple, dict]) -> tuple[int, dict[str, int], int]:
    """Dense MACs of ``model`` on ``example_inputs`` (args, kwargs): the total, each leaf module's (by FQN) and the
    batch size."""
    args, kwargs = example_inputs
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_args, fake_kwargs = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t,
                                      (tuple(args), dict(kwargs)))
    counter = FlopCounterMode(display=False)
    with mode, eval_mode(model), torch.no_grad(), countable_kernels(), counter:
        model(*fake_args, **fake_kwargs)
    counts = {key.partition(".")[2]: sum(ops.values()) for key, ops in counter.get_flop_counts().items()}
    modules = dict(model.named_modules())
    leaves = {name: flops // 2 for name, flops in counts.items() if name in modules and _is_leaf(modules[name])}
    batch = next((t.shape[0] for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)
                  and t.dim()), 1)
    return counter.get_total_flops() // 2, leaves, int(batch)


def _is_leaf(module: nn.Module) -> bool:
    """A layer the analysis reads as one call (``nn.MultiheadAttention``, whose ``out_proj`` is a child it never
    calls), or a module with no submodules but its parametrizations (a masked layer is still a leaf)."""
    rule = registry.active().call_rule(module)
    if rule is not None and not rule.transparent:
        return True
    return all(name == "parametrizations" for name, _ in module.named_children())


def own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """A module's own parameters, the originals under masks included."""
    found = [p for p in module._parameters.values() if p is not None]
    plists = getattr(module, "parametrizations", None)
    if plists is not None:
        found += [p for plist in plists.values() for p in plist._parameters.values() if p is not None]
    return found


def mac_shares(module: nn.Module) -> list[tuple[torch.Tensor, float]]:
    """The tensors a layer's MACs follow, each with its share of them: its ``weight`` (masked or not); else its
    matrices, its children's included (``nn.MultiheadAttention``'s ``in_proj_weight`` and the ``out_proj`` it calls
    without calling the module), in proportion to their sizes (an LSTM's ``weight_ih``/``weight_hh``: per step it
    multiplies by each once); else its first parameter."""
    weight = held(module, "weight")
    if weight is not None:
        return [(weight, 1.0)]
    own = own_tensors(module)
    matrices = [t for m in module.modules() for t in own_tensors(m) if t.dim() >= 2]
    if matrices:
        total = float(sum(t.numel() for t in matrices))
        return [(t, t.numel() / total) for t in matrices]
    return [(own[0], 1.0)] if own else []


@dataclass
class CostModel:
    """``cost(kept) = fixed + sum_t dense_t * prod_d (fraction of positions kept along bound dim d of term t)``.

    ``kept`` is a bool per channel id, read at class roots (as :meth:`PruningPlan.kept_classes` returns it);
    positions no producer controls (FIXED) always stay. A plan builds each metric's model once
    (:meth:`PruningPlan.cost`); its table and a budget both read it.
    """

    metric: str
    dense: float
    fixed: float
    terms: list[tuple[float, list[torch.Tensor]]]  # (dense cost, the class root at each position of each bound dim)
    batch: int = 1  # the batch size of the example inputs MACs were counted on

    @classmethod
    def of(cls, walk: Walk, metric: str, example_inputs: tuple[tuple, dict] | None = None) -> CostModel:
        """The cost model of ``metric`` ("macs": needs ``example_inputs``, (args, kwargs); "params") for the model
        the walk read (a current walk: :meth:`PruningPlan.current_walk`).

        Raises:
            ValueError: an unknown metric, or "macs" without example inputs.
        """
        if metric not in METRICS:
            raise ValueError(f"unknown cost metric {metric!r}; choose one of {list(METRICS)}")
        root = walk.groups.solve()
        dims: dict[int, list[torch.Tensor]] = {}
        for (tensor_id, _dim), binding in sorted(walk.bindings.items(), key=lambda kv: kv[0][1]):
            labels = binding.labels
            dims.setdefault(tensor_id, []).append(torch.where(labels >= 0, root[labels.clamp_min(0)], -1))
        if metric == "params":
            tensors = {id(t): t for m in walk.model.modules() for t in own_tensors(m)}
            dense = float(sum(t.numel() for t in tensors.values()))
            terms = [(float(t.numel()), dims[i]) for i, t in tensors.items() if i in dims]
            batch = 1
        else:
            if example_inputs is None:
                raise ValueError("counting MACs needs example inputs")
            total, leaves, batch = layer_macs(walk.model, example_inputs)
            modules = dict(walk.model.named_modules())
            dense, terms = float(total), []
            for name, macs in leaves.items():
                for tensor, share in mac_shares(modules[name]):
                    if id(tensor) in dims and macs:
                        terms.append((macs * share, dims[id(tensor)]))
        return cls(metric, dense, dense - sum(w for w, _ in terms), terms, batch)

    def total(self, kept: torch.Tensor) -> float:
        """The cost with the classes in ``kept``."""
        cost = self.fixed
        for weight, dims in self.terms:
            fraction = 1.0
            for labels in dims:
                fraction *= float(_kept_at(kept, labels).float().mean()) if labels.numel() else 1.0
            cost += weight * fraction
        return cost

    def savings(self, kept: torch.Tensor) -> torch.Tensor:
        """For every channel id, how much the cost falls if that class alone is removed from ``kept`` (0 for ids
        that are not kept class roots)."""
        saved = torch.zeros(kept.numel(), dtype=torch.float64)
        for weight, dims in self.terms:
            before, after = 1.0, torch.ones(kept.numel(), dtype=torch.float64)
            for labels in dims:
                if not labels.numel():
                    continue
                stays = _kept_at(kept, labels)
                counts = torch.bincount(labels[stays & (labels >= 0)], minlength=kept.numel()).double()
                fraction = float(stays.double().mean())
                before *= fraction
                after *= fraction - counts / labels.numel()
            saved += weight * (before - after)
        return saved


def _kept_at(kept: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whether each position stays: FIXED positions always, the others when their class is kept."""
    return (labels < 0) | kept[labels.clamp_min(0)]
