"""A dry run of an export-mode plan: does the model still run once channels are gone?

``torch.export`` bakes every size into the graph as an int, so the analysis cannot tell a size the code derives from
a tensor (it follows the narrower layer) from a literal or an attribute (it may not). The dry run answers it by
running the code: it builds a copy of the model on the meta device (no real memory, nothing shared with the real
model) with one removable class per channel group removed, every tensor narrowed and every rule's ``narrow`` and
``sync`` applied (head counts, widths), then exports that copy from meta example inputs. A group whose removal makes
the forward fail, or changes the shape of an output in a way its channels do not explain, is blocked with the error
and the line of the model's code that raised it. Failing groups are found by bisection, so a dry run that passes
costs one export.
"""

from __future__ import annotations

import copy
import traceback

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from lightning_prune.fusion.apply import FuseContext, decide
from lightning_prune.fusion.layout import Layout
from lightning_prune.fusion.plan import PruningPlan
from lightning_prune.fusion.rules import registry
from lightning_prune.fusion.surgery import Surgery
from lightning_prune.fusion.trace import export, user_frame


def dry_run(plan: PruningPlan, example_inputs: tuple[tuple, dict]) -> bool:
    """Check ``plan`` by running the narrowed model on meta tensors; returns whether it blocked any group."""
    groups = []
    for group in plan.channel_groups():
        free = [int(c) for c in group.classes if int(c) not in group.blocked]
        if len(free) > 1 and group.members:  # a lone class is never removed (every layer keeps one)
            groups.append((group, free[-1]))
    failures: list[tuple[object, str]] = []
    _bisect(plan, example_inputs, groups, failures)
    for group, reason in failures:
        for producer in group.producers:
            plan.groups.block(producer.labels, reason)
    return bool(failures)


def _bisect(plan: PruningPlan, example_inputs: tuple[tuple, dict], groups: list, failures: list) -> None:
    if not groups:
        return
    error = _attempt(plan, example_inputs, [cls for _group, cls in groups])
    if error is None:
        return
    if len(groups) == 1:
        failures.append((groups[0][0], error))
        return
    half = len(groups) // 2
    _bisect(plan, example_inputs, groups[:half], failures)
    _bisect(plan, example_inputs, groups[half:], failures)


def _attempt(plan: PruningPlan, example_inputs: tuple[tuple, dict], removed: list[int]) -> str | None:
    """Remove ``removed`` (class roots) from a meta copy and export it; the reason it fails, or None."""
    root = plan.groups.solve()
    kept = torch.ones(plan.groups.size, dtype=torch.bool)
    kept[torch.tensor(removed, dtype=torch.long)] = False
    ctx, _notes, keeps = decide(plan, root, kept, Surgery())
    model, changed = _narrowed_copy(plan, ctx, keeps)
    args, kwargs = tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, example_inputs)
    try:
        with torch.device("meta"):  # tensors made in forward: meta too
            program = export(model, args, kwargs)
    except Exception as error:  # noqa: BLE001 - any failure of the narrowed model is the answer
        frame = user_frame(traceback.extract_tb(error.__traceback__))
        where = f" at {frame}" if frame else ""
        return (f"removing a channel of it breaks the model's forward{where} ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}); a size there is written as a literal or an "
                "attribute that does not follow the narrower layer")
    return _output_mismatch(plan, ctx, program)


def _narrowed_copy(plan: PruningPlan, ctx: FuseContext, keeps: dict) -> tuple[nn.Module, list[nn.Module]]:
    """A copy of the model on the meta device with every bound tensor narrowed and the rules' narrowing applied."""
    memo: dict[int, torch.Tensor] = {}
    touched: set[int] = set()
    for module in plan.model.modules():
        for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is None or id(tensor) in memo:
                continue
            shape = list(tensor.shape)
            for dim, index in keeps.get(id(tensor), {}).items():
                shape[dim] = index.numel()
            fake = torch.empty(shape, dtype=tensor.dtype, device="meta")
            memo[id(tensor)] = nn.Parameter(fake, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else fake
            if id(tensor) in keeps:
                holders = plan.walk.holders.get(id(tensor), [(module, "", name)])
                touched |= {id(holder) for holder, _fqn, _name in holders}
    model = copy.deepcopy(plan.model, memo)
    twin = {id(a): b for a, b in zip(plan.model.modules(), model.modules(), strict=True)}
    for module, rule, data in plan.walk.actions:
        rule.narrow(twin[id(module)], data, ctx)
        touched.add(id(module))
    changed = [twin[i] for i in touched if i in twin]
    rules = registry.active()
    for module in changed:
        rule = rules.module_rule(module)
        if rule is not None:
            rule.sync(module)
    registry.sync_containers(model, changed)
    return model, changed


def _output_mismatch(plan: PruningPlan, ctx: FuseContext, program) -> str | None:
    """Whether an output's shape changed beyond what its channels explain (the removed channels it carries)."""
    graph = plan.walk.traced.graph
    expected_nodes = tree_flatten(next(n for n in graph.nodes if n.op == "output").args[0])[0]
    got_nodes = tree_flatten(next(n for n in program.graph.nodes if n.op == "output").args[0])[0]
    if len(expected_nodes) != len(got_nodes):
        return "removing a channel of it changes what the model's forward returns"
    for k, (old, new) in enumerate(zip(expected_nodes, got_nodes, strict=True)):
        old_val = getattr(old, "meta", {}).get("val")
        new_val = getattr(new, "meta", {}).get("val")
        if not (isinstance(old_val, torch.Tensor) and isinstance(new_val, torch.Tensor)):
            continue
        shape = list(old_val.shape)
        layout = plan.walk.values.get(old.name)
        if isinstance(layout, Layout) and layout.ndim == len(shape):
            kept = ctx.kept[ctx.root[layout.labels.clamp_min(0)]] | (layout.labels < 0)
            for k_axis, axis in enumerate(layout.axes):
                others = [d for d in range(kept.dim()) if d != k_axis]
                shape[axis] = int(kept.any(dim=others).sum()) if others else int(kept.sum())
        if list(new_val.shape) != shape:
            return (f"removing a channel of it changes the shape of the model's output {k} from "
                    f"{tuple(old_val.shape)} to {tuple(new_val.shape)} (expected {tuple(shape)})")
    return None
