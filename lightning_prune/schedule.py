"""Sparsity schedules: pure functions from an optimizer step to a sparsity level, and the scheduler that drives a
pruner along one.

The functions hold no state, so a resumed run recomputes exactly the sparsity an uninterrupted run had. The level
only changes on ticks (``start_step + k * every_n_steps``) and reaches ``target`` exactly at ``end_step``.

Step bounds are ints (optimizer steps) or floats in [0, 1], fractions of the run's optimizer steps (Lightning's
convention for ``val_check_interval``): ``end_step=0.75`` ends the ramp three quarters of the way through. Fractions are
turned into steps once the run's length is known (:meth:`SparsityScheduler.resolve`); the pure functions take steps.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

from lightning_prune.errors import PrunerStateError, PruningConfigError

_RAMPS = ("linear", "cubic")
#: Where a ramp ends when ``end_step`` is not given: three quarters into the run, so the last quarter fine-tunes the
#: network at its final width.
DEFAULT_END = 0.75
Step = int | float


def validate_schedule(
    name: str,
    target: float,
    start_step: Step = 0,
    end_step: Step | None = None,
    every_n_steps: int = 1,
    *,
    fractions: bool = True,
) -> None:
    """Raise PruningConfigError naming the first bad argument.

    ``start_step``/``end_step`` are ints >= 0 (optimizer steps) or, with ``fractions``, floats in [0, 1] (fractions of
    the run). ``end_step=None`` is accepted so that a caller can check everything else before the run's length is
    known; the ramps need it by the time a sparsity is computed.
    """
    _check_name(name)
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not 0.0 <= target < 1.0:
        raise PruningConfigError(f"target sparsity must be a number in [0, 1), got {target!r}")
    _check_step("start_step", start_step, fractions)
    _check_int("every_n_steps", every_n_steps, minimum=1)
    if end_step is not None and name in _RAMPS:
        _check_step("end_step", end_step, fractions)
        if _is_fraction(start_step) == _is_fraction(end_step) and end_step <= start_step:
            raise PruningConfigError(
                f"schedule {name!r} needs end_step > start_step, got end_step={end_step} and start_step={start_step}"
            )


def oneshot(
    step: int, target: float, start_step: int = 0, end_step: int | None = None, every_n_steps: int = 1
) -> float:
    """0 before ``start_step``, then ``target`` for good; ``end_step`` and ``every_n_steps`` play no part."""
    validate_schedule("oneshot", target, start_step, end_step, every_n_steps, fractions=False)
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
    name: str, step: int, target: float, start_step: int = 0, end_step: int | None = None, every_n_steps: int = 1
) -> float:
    """The sparsity that schedule ``name`` prescribes at optimizer step ``step``."""
    _check_name(name)
    return SCHEDULES[name](step, target, start_step, end_step, every_n_steps)


def resolve_step(label: str, value: Step, total_steps: float | None) -> int:
    """``value`` in optimizer steps: an int as it is, a fraction of ``total_steps`` rounded down.

    Raises:
        PruningConfigError: ``value`` is a fraction and the run has no known length (``total_steps`` None or inf).
    """
    if not _is_fraction(value):
        return int(value)
    if total_steps is None or not math.isfinite(total_steps):
        name = label.split("=")[0].split(" ")[0]
        shown = label if "=" in label else f"{label}={value!r}"
        raise PruningConfigError(
            f"{shown} is a fraction of the run, but this run has no planned length (max_epochs=-1 and no "
            f"max_steps): give {name} in optimizer steps, as an int"
        )
    return int(value * total_steps)


class SparsityScheduler:
    """Drives a prepared structured sparsifier along a schedule, one optimizer step at a time.

    In the spirit of torch.ao's ``BaseScheduler``: the sparsifier decides *which* channels go, the scheduler *how many*
    and *when*. It keeps each configured tensor's target (the group's ``sparsity_level`` when :meth:`track` is
    called) and its original width, so that after a layer has been narrowed mid-training (``prune()`` then
    ``prepare()`` again) its level stays relative to the original width. Torch-only: no Lightning needed::

        pruner.prepare(model, config)
        scheduler = SparsityScheduler(pruner, "cubic", end_step=0.75, every_n_steps=10, total_steps=1000)
        for step in range(1, 1001):
            train_one_step()
            scheduler.step(step)        # sets the groups' levels and calls pruner.step() when they change
        scheduler.finish()              # the targets, whatever stopped training
        pruner.prune()

    Args:
        sparsifier: a :class:`~lightning_prune.BaseStructuredSparsifier`; prepared before :meth:`track`/:meth:`step`.
        schedule: ``"oneshot"`` (the target at ``start_step``), ``"linear"`` or ``"cubic"`` (Zhu & Gupta 2017).
        start_step, end_step: ints (optimizer steps) or floats in [0, 1] (fractions of ``total_steps``).
            ``end_step=None`` ends a ramp at :data:`DEFAULT_END` of the run, leaving the rest to fine-tune.
        every_n_steps: the level changes only every this many steps after ``start_step``.
        total_steps: the run's optimizer steps, to resolve fractions; or call :meth:`resolve` later.

    Raises:
        PruningConfigError: an unknown schedule (the error lists the choices), a bad step bound, or a target
            sparsity outside [0, 1).
    """

    def __init__(
        self,
        sparsifier: Any,
        schedule: str = "oneshot",
        start_step: Step = 0,
        end_step: Step | None = None,
        every_n_steps: int = 1,
        total_steps: float | None = None,
    ):
        end = end_step if end_step is not None or schedule not in _RAMPS else DEFAULT_END
        if end_step is None and schedule in _RAMPS and _is_fraction(start_step) and DEFAULT_END <= start_step <= 1:
            raise PruningConfigError(
                f"end_step=None ends the ramp at {DEFAULT_END} of the run, not after start_step={start_step}: "
                "give end_step explicitly"
            )
        if not isinstance(getattr(sparsifier, "defaults", None), dict) or not hasattr(sparsifier, "groups"):
            raise PruningConfigError(f"SparsityScheduler drives a pruner (e.g. SaliencyPruner(sparsity_level=0.5)), "
                                     f"got {sparsifier!r}")
        validate_schedule(schedule, sparsifier.defaults["sparsity_level"], start_step, end, every_n_steps)
        self.sparsifier = sparsifier
        self.schedule, self.every_n_steps = schedule, every_n_steps
        self.start_step, self.end_step = start_step, end
        self._end_label = f"end_step=None (a ramp's default end, {DEFAULT_END} of the run)" if end_step is None \
            else "end_step"
        self.start: int | None = None  # the bounds in optimizer steps, once resolved
        self.end: int | None = None
        self.total_steps: float | None = None
        self.targets: dict[str, float] = {}
        self.widths: dict[str, int] = {}
        self.last_step = -1  # the last step given to step()
        self.last_change: int | None = None  # the last step at which the masks changed
        self.completed_at: int | None = None  # the step at which the schedule itself reached the targets
        if total_steps is not None:
            self.resolve(total_steps)

    # -- setting up ---------------------------------------------------------------------------------------------
    def track(self) -> None:
        """Take each group's ``sparsity_level`` as its target and its width as the original; start from 0."""
        self.targets = {g["tensor_fqn"]: float(g["sparsity_level"]) for g in self.sparsifier.groups}
        self.widths = {g["tensor_fqn"]: self.sparsifier.channels_of(g) for g in self.sparsifier.groups}
        self.rebase()

    def rebase(self) -> None:
        """After the sparsifier was prepared again on narrowed layers: nothing more is masked until the next step."""
        for group in self.sparsifier.groups:
            group["sparsity_level"] = 0.0

    def resolve(self, total_steps: float | None) -> None:
        """Turn fractional bounds into optimizer steps of a run of ``total_steps`` (None or inf: unknown length).

        Raises:
            PruningConfigError: ``total_steps`` neither None nor a whole number >= 0; a fraction (or a ramp's
                default end) in a run of unknown length.
        """
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Real)
                                        or not total_steps >= 0
                                        or math.isfinite(total_steps) and total_steps != int(total_steps)):
            raise PruningConfigError(f"total_steps must be None or a whole number of optimizer steps >= 0 (inf: "
                                     f"unknown length), got {total_steps!r}")
        self.total_steps = total_steps
        self.start = resolve_step("start_step", self.start_step, total_steps)
        if self.schedule in _RAMPS:
            end = resolve_step(self._end_label, self.end_step, total_steps)
            if end < self.start:  # one bound in steps, the other a fraction of the run
                raise PruningConfigError(
                    f"{self._end_label.split(' ')[0]} resolves to step {end}, before start_step={self.start_step!r} "
                    f"(step {self.start}) in this run of {total_steps:g} optimizer steps: give both bounds as "
                    "fractions of the run, or both in steps")
            self.end = max(end, self.start + 1)  # a fraction of a very short run may round onto start
        else:
            self.end = None

    # -- stepping -----------------------------------------------------------------------------------------------
    def levels(self, step: int | None) -> dict[str, float]:
        """Each group's level at optimizer step ``step`` (None: its target), relative to its width now."""
        self._require_resolved()
        if any(g["tensor_fqn"] not in self.targets for g in self.sparsifier.groups):
            self.track()  # prepared after this scheduler was made, and never tracked: the levels now are the start
        levels = {}
        for group in self.sparsifier.groups:
            fqn = group["tensor_fqn"]
            target = self.targets[fqn]
            level = target if step is None else sparsity_at(
                self.schedule, step, target, self.start, self.end, self.every_n_steps)
            levels[fqn] = relative_level(level, self.widths[fqn], self.sparsifier.channels_of(group))
        return levels

    def step(self, step: int) -> bool:
        """Set every group's level for optimizer step ``step``; call the sparsifier's ``step()`` if any changed.

        Returns whether the masks were updated. Calling it twice for the same step does nothing the second time.

        Raises:
            PrunerStateError: the bounds hold fractions and :meth:`resolve` was not called.
        """
        if step == self.last_step:
            return False
        self.last_step = step
        changed = self._apply(self.levels(step), step)
        if self.completed_at is None and self.done:
            self.completed_at = step
        return changed

    def finish(self) -> bool:
        """Apply the targets now (training ended); returns whether that changed anything (the schedule was cut)."""
        return self._apply(self.levels(None), self.last_step)

    def sparsity(self) -> float:
        """Fraction of the tracked tensors' original channels that are masked now or were removed by a shrink."""
        total = sum(self.widths.values())
        gone = 0.0
        for group in self.sparsifier.groups:
            mask = group["module"].parametrizations[group["tensor_name"]][0].mask
            now = self.sparsifier.channels_of(group)
            gone += self.widths[group["tensor_fqn"]] - now + int((~mask).sum()) * now / mask.numel()
        return gone / total if total else 0.0

    @property
    def done(self) -> bool:
        """Every group is at its target."""
        levels = self.levels(None)
        return all(g["sparsity_level"] == levels[g["tensor_fqn"]] for g in self.sparsifier.groups)

    def _apply(self, levels: dict[str, float], step: int) -> bool:
        groups = self.sparsifier.groups
        if all(g["sparsity_level"] == levels[g["tensor_fqn"]] for g in groups):
            return False
        for group in groups:
            group["sparsity_level"] = levels[group["tensor_fqn"]]
        self.sparsifier.step()
        self.last_change = step
        return True

    def _require_resolved(self) -> None:
        if self.start is None:
            if _is_fraction(self.start_step) or (self.schedule in _RAMPS and _is_fraction(self.end_step)):
                raise PrunerStateError("the schedule has fractional bounds: call resolve(total_steps) first")
            self.resolve(None)

    # -- reporting ----------------------------------------------------------------------------------------------
    def describe(self) -> str:
        """The schedule in optimizer steps, e.g. ``"cubic ramp from step 0 to step 150 (ticking every 10 steps)"``."""
        self._require_resolved()
        if self.schedule == "oneshot":
            return f"oneshot schedule at step {self.start}"
        every = "every step" if self.every_n_steps == 1 else f"every {self.every_n_steps} steps"
        return f"{self.schedule} ramp from step {self.start} to step {self.end} (ticking {every})"

    def fit_problem(self, total_steps: float) -> str | None:
        """What goes wrong with this schedule in a run of ``total_steps`` optimizer steps, or None if it fits and
        leaves steps to fine-tune after its last pruning step."""
        self._require_resolved()
        last = self.start if self.schedule == "oneshot" else self.end
        if not math.isfinite(total_steps) or last < total_steps:
            return None
        if last == total_steps:
            return (f"the {self.describe()} reaches its target on the run's last step ({int(total_steps)}), leaving no "
                    "step to fine-tune at the final width")
        return (f"the {self.describe()} cannot finish in this run of {int(total_steps)} optimizer steps: fusion will "
                "apply the rest of the target at once, with no fine-tuning after it")

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything but the sparsifier, in plain types (it loads with ``torch.load(weights_only=True)``)."""
        return {
            "targets": dict(self.targets),
            "widths": dict(self.widths),
            "levels": {g["tensor_fqn"]: float(g["sparsity_level"]) for g in self.sparsifier.groups},
            "start": self.start,
            "end": self.end,
            "total_steps": self.total_steps,
            "last_step": self.last_step,
            "last_change": self.last_change,
            "completed_at": self.completed_at,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a position in the schedule; keys missing from older checkpoints keep their current values."""
        self.targets = dict(state_dict.get("targets") or self.targets)
        self.widths = dict(state_dict.get("widths") or self.widths)
        self.start = state_dict.get("start", self.start)
        self.end = state_dict.get("end", self.end)
        self.total_steps = state_dict.get("total_steps", self.total_steps)
        self.last_step = state_dict.get("last_step", self.last_step)
        self.last_change = state_dict.get("last_change", self.last_change)
        self.completed_at = state_dict.get("completed_at", self.completed_at)
        levels = state_dict.get("levels", {})
        for group in self.sparsifier.groups:
            group["sparsity_level"] = levels.get(group["tensor_fqn"], group["sparsity_level"])


def relative_level(level: float, original: int, current: int) -> float:
    """The level that prunes a layer now ``current`` wide to ``level`` of its ``original`` width.

    Pruners count ``int(n * level)`` (or round) channels; aiming a quarter channel above the whole count makes either
    rounding land on it.
    """
    if current == original or level == 0:
        return level
    remaining = int(original * level) - (original - current)
    return (remaining + 0.25) / current if remaining > 0 else 0.0


def _is_fraction(value: object) -> bool:
    return isinstance(value, float)


def _check_step(label: str, value: object, fractions: bool) -> None:
    if fractions and isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise PruningConfigError(
                f"{label} must be an int (optimizer steps) or a float in [0, 1] (a fraction of the run's optimizer "
                f"steps), got {value!r}"
            )
        return
    what = "an int >= 0 (optimizer steps) or a float in [0, 1] (a fraction of the run)" if fractions else \
        "an integer >= 0 (optimizer steps; resolve fractions first)"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise PruningConfigError(f"{label} must be {what}, got {value!r}")


def _check_int(label: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise PruningConfigError(f"{label} must be an integer >= {minimum}, got {value!r}")


def _check_name(name: str) -> None:
    if name not in SCHEDULES:
        raise PruningConfigError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")


def _progress(name: str, step: int, target: float, start_step: int, end_step: int | None, every_n_steps: int) -> float:
    """Fraction of the ramp elapsed at the last tick at or before ``step``, clamped to [0, 1]."""
    validate_schedule(name, target, start_step, end_step, every_n_steps, fractions=False)
    if end_step is None:
        raise PruningConfigError(f"schedule {name!r} needs an end_step, got None")
    if step >= end_step:
        return 1.0
    if step <= start_step:
        return 0.0
    last_tick = start_step + (step - start_step) // every_n_steps * every_n_steps
    return (last_tick - start_step) / (end_step - start_step)
