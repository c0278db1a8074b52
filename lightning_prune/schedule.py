"""Sparsity schedules: pure functions from an optimizer step to the sparsity level to apply at that step.

They hold no state, so a resumed run recomputes exactly the sparsity an uninterrupted run had. The level
only changes on ticks (``start_step + k * every_n_steps``) and reaches ``target`` exactly at ``end_step``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

from lightning_prune.errors import PruningConfigError

_RAMPS = ("linear", "cubic")


def validate_schedule(
    name: str,
    target: float,
    start_step: int = 0,
    end_step: int | None = None,
    every_n_steps: int = 1,
) -> None:
    """Raise PruningConfigError naming the first bad argument.

    ``end_step=None`` is accepted so that a caller can check everything else before the end of training
    is known; the ramps need it by the time a sparsity is computed.
    """
    _check_name(name)
    if not isinstance(target, numbers.Real) or not 0.0 <= target < 1.0:
        raise PruningConfigError(f"target sparsity must be a number in [0, 1), got {target!r}")
    _check_int("start_step", start_step, minimum=0)
    _check_int("every_n_steps", every_n_steps, minimum=1)
    if end_step is not None and name in _RAMPS:
        _check_int("end_step", end_step, minimum=0)
        if end_step <= start_step:
            raise PruningConfigError(
                f"schedule {name!r} needs end_step > start_step, got end_step={end_step} "
                f"and start_step={start_step}"
            )


def oneshot(
    step: int, target: float, start_step: int = 0, end_step: int | None = None, every_n_steps: int = 1
) -> float:
    """0 before ``start_step``, then ``target`` for good; ``end_step`` and ``every_n_steps`` play no part."""
    validate_schedule("oneshot", target, start_step, end_step, every_n_steps)
    return float(target) if step >= start_step else 0.0


def linear(
    step: int, target: float, start_step: int = 0, end_step: int | None = None, every_n_steps: int = 1
) -> float:
    """Sparsity grows in equal increments from 0 at ``start_step`` to ``target`` at ``end_step``."""
    return float(target) * _progress("linear", step, target, start_step, end_step, every_n_steps)


def cubic(
    step: int, target: float, start_step: int = 0, end_step: int | None = None, every_n_steps: int = 1
) -> float:
    """Zhu & Gupta (2017): s_t = s_f (1 - (1 - p)^3) with p the elapsed fraction of the ramp.

    It prunes fast while many redundant channels remain and slowly near the target, leaving the network
    time to recover.
    """
    remaining = 1.0 - _progress("cubic", step, target, start_step, end_step, every_n_steps)
    return float(target) * (1.0 - remaining**3)


SCHEDULES: dict[str, Callable[..., float]] = {"oneshot": oneshot, "linear": linear, "cubic": cubic}


def sparsity_at(
    name: str,
    step: int,
    target: float,
    start_step: int = 0,
    end_step: int | None = None,
    every_n_steps: int = 1,
) -> float:
    """The sparsity that schedule ``name`` prescribes at optimizer step ``step``."""
    _check_name(name)
    return SCHEDULES[name](step, target, start_step, end_step, every_n_steps)


def _progress(
    name: str, step: int, target: float, start_step: int, end_step: int | None, every_n_steps: int
) -> float:
    """Fraction of the ramp elapsed at the last tick at or before ``step``, clamped to [0, 1]."""
    validate_schedule(name, target, start_step, end_step, every_n_steps)
    if end_step is None:
        raise PruningConfigError(f"schedule {name!r} needs an end_step, got None")
    if step >= end_step:
        return 1.0
    if step <= start_step:
        return 0.0
    last_tick = start_step + (step - start_step) // every_n_steps * every_n_steps
    return (last_tick - start_step) / (end_step - start_step)


def _check_int(label: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise PruningConfigError(f"{label} must be an integer >= {minimum}, got {value!r}")


def _check_name(name: str) -> None:
    if name not in SCHEDULES:
        raise PruningConfigError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
