"""Checking and reporting a fusion: masked vs pruned outputs, tensor by tensor whatever container holds them, and a
summary of what changed. Torch-only."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from lightning_prune import inputs, measure
from lightning_prune.fusion.rules import layer_widths
from lightning_prune.measure import count_macs, count_params

#: masked and pruned outputs may differ by this much, relative to the largest magnitude of the tensor (at least 1)
TOLERANCE = 1e-5
_REPORT = "please report this model structure as a lightning_prune bug"


def output_tensors(output: Any, path: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in ``output`` with its path, e.g. ``output['logits']``, ``output[1][0]``.

    Tuples, lists, dicts (Hugging Face ``ModelOutput`` included) and dataclasses are searched; other values
    (None, numbers, strings) are not outputs to compare.
    """
    if isinstance(output, torch.Tensor):
        return [(path, output)]
    if isinstance(output, Mapping):
        return [pair for key, value in output.items() for pair in output_tensors(value, f"{path}[{key!r}]")]
    if isinstance(output, (tuple, list)):
        return [pair for i, value in enumerate(output) for pair in output_tensors(value, f"{path}[{i}]")]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [pair for field in dataclasses.fields(output)
                for pair in output_tensors(getattr(output, field.name), f"{path}.{field.name}")]
    return []


@dataclasses.dataclass
class Comparison:
    """How two outputs differ: tensors compared, the largest relative difference and where, and structural changes."""

    compared: int = 0
    worst: float = 0.0
    worst_path: str = ""
    reshaped: list[str] = dataclasses.field(default_factory=list)  # same entry, another shape
    restructured: bool = False  # other entries altogether


def compare_outputs(expected: Any, actual: Any) -> Comparison:
    """Compare every tensor of ``expected`` with the one at the same path in ``actual``."""
    before, after = output_tensors(expected), output_tensors(actual)
    result = Comparison()
    if [path for path, _ in before] != [path for path, _ in after]:
        result.restructured = True
        return result
    for (path, x), (_, y) in zip(before, after, strict=True):
        if x.shape != y.shape:
            result.reshaped.append(f"{path} {tuple(x.shape)} -> {tuple(y.shape)}")
            continue
        result.compared += 1
        if not (x.is_floating_point() or x.is_complex()):
            diff = float(not torch.equal(x, y))
        else:
            x, y = x.detach().double(), y.detach().double()
            diff = ((x - y).abs().max() / max(1.0, x.abs().max().item())).item() if x.numel() else 0.0
        if diff > result.worst or not result.worst_path:
            result.worst, result.worst_path = diff, path
    return result


def try_forward(model: torch.nn.Module, example: Any, eval_mode: bool = False) -> tuple[Any, str | None]:
    """``(output, None)``, or ``(None, "TypeError: ...")`` when forward fails on the example; no gradients. With
    ``eval_mode`` every module runs in eval mode and gets its own mode back afterwards."""
    if example is None:
        return None, "no example input"
    try:
        with measure.eval_mode(model) if eval_mode else contextlib.nullcontext(), torch.no_grad():
            return inputs.run_forward(model, example), None
    except Exception as error:
        return None, f"{type(error).__name__}: {error}"


def verdict(expected: Any, actual: Any, errors: tuple[str | None, str | None], *, verify: bool,
            output_may_change: bool, approximate: bool) -> tuple[str, str] | None:
    """Judge a fusion from the masked and pruned outputs (or the errors running them): None when all is well, else
    ``("error", message)`` for a broken fusion under ``verify`` and ``("warning", message)`` for what only limits the
    check (or was announced: ``approximate`` fusion notes, outputs narrowed on purpose with ``output_may_change``)."""
    expected_error, actual_error = errors
    if expected_error:
        return "warning", f"the masked model fails on the example input ({expected_error}): fusion not verified"
    if actual_error:
        message = f"the pruned model fails on the example input, where the masked one ran ({actual_error})"
        return ("error", f"{message}; {_REPORT}") if verify else ("warning", message)
    if not verify:
        return None
    result = compare_outputs(expected, actual)
    if result.restructured:
        return "error", f"the pruned model's output holds other entries than the masked one's; {_REPORT}"
    if result.reshaped and not output_may_change:
        return "error", f"output tensors changed shape: {', '.join(result.reshaped)}; {_REPORT}"
    if result.worst > TOLERANCE:
        message = (f"pruned output differs from the masked output by {result.worst:.3g} (relative, bound "
                   f"{TOLERANCE:g}) at {result.worst_path}")
        return ("warning", f"{message} (expected: fusion was approximate)") if approximate else \
            ("error", f"{message}; {_REPORT}")
    if not result.compared:
        return "warning", "the output holds no tensor of unchanged shape to compare" + \
            (" (narrow_output=True changed them all)" if result.reshaped else "")
    return None


# -- what fusion changed ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Snapshot:
    """A model's size: parameters, MACs per sample (None when they cannot be counted), each module's tensor shapes
    and the channel widths of the layer types :func:`layer_widths` knows."""

    params: int
    macs: int | None
    shapes: dict[str, list[tuple[str, tuple[int, ...]]]]
    widths: dict[str, tuple[int, int]]
    batch: int | None = None
    macs_error: str | None = None


def snapshot(model: torch.nn.Module, example: Any) -> Snapshot:
    batch = inputs.batch_size(example) if example is not None else None
    macs, error = None, None
    if example is not None:
        try:
            macs = count_macs(model, example) // max(1, batch or 1)
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
    return Snapshot(count_params(model), macs, module_shapes(model), layer_widths(model), batch, error)


def module_shapes(model: torch.nn.Module) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """``{module fqn: [(tensor name, shape), ...]}`` from the state dict, masked tensors under their own names."""
    shapes: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for key, value in model.state_dict().items():
        head, marker, tail = key.partition(".parametrizations.")
        if marker and not tail.endswith(".original"):
            continue  # a mask buffer
        key = f"{head}.{tail.removesuffix('.original')}" if marker else key
        module, _, name = key.rpartition(".")
        shapes.setdefault(module, []).append((name, tuple(value.shape)))
    return {module: sorted(tensors) for module, tensors in shapes.items()}


def fusion_summary(before: Snapshot, after: Snapshot, landing: dict[str, Any] | None = None) -> str:
    """Every module whose tensors changed shape (channels in -> out where its type is known), params and MACs, and
    under a cost budget where it landed (``landing``: :meth:`ScoringPruner.budget_landing`)."""
    lines = ["StructuredPruning: fused", f"{'layer':<40} {'channels (in, out)':>28}"]
    for name, shapes in before.shapes.items():
        if after.shapes.get(name) == shapes:
            continue
        old, new = (before.widths[name], after.widths.get(name)) if name in before.widths else \
            (dict(shapes), dict(after.shapes.get(name, [])))
        lines.append(f"{name:<40} {str(old):>13} -> {str(new):<12}")
    lines.append(f"params {before.params:,} -> {after.params:,}")
    if before.macs is not None and after.macs is not None:
        basis = f" (counted on an example batch of {before.batch})" if before.batch else ""
        lines.append(f"MACs per sample {before.macs:,} -> {after.macs:,}{basis}")
    else:
        lines.append(f"MACs not counted: {before.macs_error or after.macs_error or 'no example input'}")
    if landing is not None:
        resolution = landing["resolution"]
        cheapest = "no class can go further" if resolution is None else \
            f"the cheapest class left would save {resolution:.4f}"
        lines.append(f"budget {landing['metric']}={landing['budget']}: landed at {landing['reached']:.4f} of the dense "
                     f"{landing['metric']} ({landing['budget'] - landing['reached']:.4f} below; {cheapest})")
    return "\n".join(lines)
