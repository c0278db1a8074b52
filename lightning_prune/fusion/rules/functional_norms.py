"""The functional norms: ``F.batch_norm``, ``F.instance_norm`` and ``F.group_norm`` (and their ATen ops in export
graphs) on tensors a module reads itself, as timm's ``BatchNormAct2d`` / ``GroupNormAct`` do in their ``forward``.

They are the modules' rules spelled as calls: statistics per channel (per group for GroupNorm, whose groups are
then removed whole), so the weight, bias and running statistics passed in are narrowed with the channels, the affine
pair is masked with them while masked (``prune_bias``), and a removed channel's constant goes through the same
arithmetic as in BatchNorm's module rule. A per-channel tensor computed in forward (not a parameter or buffer read
directly) cannot be narrowed, so its channels are kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from lightning_prune.fusion.rules.base import Rule, RuleKind, tie_axis
from lightning_prune.fusion.rules.registry import aten, register_functions


class FunctionalNormRule(Rule):
    """A norm called as a function. ``positions`` maps each per-channel tensor the call may take (``weight``,
    ``bias``, ``running_mean``, ``running_var``) to its argument index; ``groups_at``: the index of GroupNorm's group
    count (None: statistics per channel); ``flag``: the index and name of the flag that makes the call use the input's
    statistics instead of the running ones (``training``, ``use_input_stats``), and ``input_stats``: its default.

    A removed channel's constant is mapped as the call computes in eval mode. An export graph is read in eval mode,
    so its flag is that value. An fx graph is traced in the model's mode, where a flag that is given is taken to be
    derived from it as the modules' own forwards do (``self.training``): running statistics, when passed, are used.
    """

    kind = RuleKind.CHANNELWISE

    def __init__(self, positions: dict[str, int], eps_at: int, groups_at: int | None = None,
                 flag: tuple[int, str] | None = None, input_stats: bool = False):
        self.positions, self.eps_at, self.groups_at = positions, eps_at, groups_at
        self.flag, self.input_stats = flag, input_stats

    def tensors(self, v) -> dict[str, fx.Node]:
        """The per-channel tensor arguments given (not None), by role."""
        found = {}
        for role, index in self.positions.items():
            arg = v.arg(index, role)
            if arg is not None:
                found[role] = arg
        return found

    def visit(self, v) -> None:
        tensors = self.tensors(v)
        given = set(tensors.values())
        first = v.arg(0, "input")
        for arg in v.node.all_input_nodes:  # only the input may carry channels
            if arg is not first and arg not in given and v.layout(arg) is not None:
                v.block(v.value(arg), f"{v.where} takes pruned channels as a secondary argument")
        flow = v.layout(first)
        if flow is None:
            return
        if not flow.at(1):
            v.block(flow, f"{v.where} normalises per channel along dim 1, where the pruned channels are not")
            return
        labels = flow.labels.reshape(-1)
        refs = {}
        for role, arg in tensors.items():
            ref = v.value(arg) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None  # a TensorRef
            if ref is None:
                v.block(flow, f"{v.where} takes its {role} from a tensor computed in forward, which fusion cannot "
                              "narrow with the channels (pass the module's parameter or buffer itself)")
                return
            if tuple(ref.tensor.shape) != (labels.numel(),):
                v.block(flow, f"{v.where} takes a {role} '{ref.fqn}' of shape {tuple(ref.tensor.shape)}, not one value "
                              f"per channel ({labels.numel()})")
                return
            refs[role] = ref
        if self.groups_at is not None and not self._groups(v, flow):
            return
        for role, ref in refs.items():
            v.bind(ref.tensor, 0, labels)
            if role in ("weight", "bias"):
                holder = v.holder(ref.tensor)
                if holder is not None:
                    v.silence(holder[0], holder[2], labels)
        v.set(flow)

    def _groups(self, v, flow) -> bool:
        """GroupNorm: one class per group (its statistics span the group); the module holding the group count is
        narrowed with it. False when the channels must stay (refused)."""
        groups = v.arg(self.groups_at, "num_groups")
        if not isinstance(groups, int):
            v.block(flow, f"{v.where} takes a group count computed in forward")
            return False
        if groups == 1:
            v.block(flow, f"{v.where} normalises all channels together (one group), so removing any changes the "
                          "others; more groups are pruned a whole group at a time")
            return False
        weight = self.tensors(v).get("weight")
        holder = v.holder(v.value(weight).tensor) if weight is not None else None
        owner = holder[0] if holder else v.owner()
        if getattr(owner, "num_groups", None) != groups:
            v.block(flow, f"{v.where} takes {groups} groups written in forward, not read from a module's "
                          "num_groups, so fusion cannot lower it with the removed groups")
            return False
        tie_axis(v, flow.labels.reshape(groups, -1), 1)
        v.action((flow.labels.reshape(-1), groups), module=owner)
        return True

    def narrow(self, module, data, ctx) -> None:
        labels, groups = data
        per_group = labels.numel() // groups
        module.num_groups = int(ctx.kept_positions(labels).numel()) // per_group
        if hasattr(module, "num_channels"):
            module.num_channels = module.num_groups * per_group

    def uses_input_stats(self, v) -> bool:
        """Whether the call normalises a constant channel by its own statistics (to 0) in eval mode."""
        if self.flag is None:
            return False
        flag = v.arg(*self.flag)
        if flag is None:
            return self.input_stats
        return bool(flag) if v.front_end == "export" else False

    def const(self, v, values):
        tensors = {role: _current(v, v.value(arg).tensor).detach().to(torch.float64).cpu()
                   for role, arg in self.tensors(v).items()}
        eps = v.arg(self.eps_at, "eps", 1e-5)
        running = "running_mean" in tensors and "running_var" in tensors and not self.uses_input_stats(v)
        if self.groups_at is not None:
            groups = values.reshape(v.arg(self.groups_at, "num_groups"), -1)
            out = ((groups - groups.mean(1, keepdim=True)) /
                   torch.sqrt(groups.var(1, unbiased=False, keepdim=True) + eps)).reshape(-1)
        elif running:  # evaluation: the running statistics (batch statistics would turn a constant into 0)
            out = (values - tensors["running_mean"]) / torch.sqrt(tensors["running_var"] + eps)
        else:
            out = torch.zeros_like(values)
        if "weight" in tensors:
            out = out * tensors["weight"]
        if "bias" in tensors:
            out = out + tensors["bias"]
        return out, False


def _current(v, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as its module reads it now: through its masks (a masked affine gives a removed channel 0)."""
    holder = v.holder(tensor)
    return getattr(holder[0], holder[2]) if holder else tensor


_STATS = {"running_mean": 1, "running_var": 2, "weight": 3, "bias": 4}
_ATEN_STATS = {"weight": 1, "bias": 2, "running_mean": 3, "running_var": 4}
register_functions([F.batch_norm], FunctionalNormRule(_STATS, eps_at=7, flag=(5, "training")))
register_functions([aten("batch_norm")], FunctionalNormRule(_ATEN_STATS, eps_at=7, flag=(5, "training")))
register_functions([F.instance_norm], FunctionalNormRule(_STATS, eps_at=7, flag=(5, "use_input_stats"),
                                                           input_stats=True))
register_functions([aten("instance_norm")], FunctionalNormRule(_ATEN_STATS, eps_at=7,
                                                                flag=(5, "use_input_stats"), input_stats=True))
register_functions([F.group_norm, aten("group_norm")], FunctionalNormRule({"weight": 2, "bias": 3}, eps_at=4,
                                                                          groups_at=1))
