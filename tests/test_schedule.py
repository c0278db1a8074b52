"""The sparsity schedules: their curves, their ticks, fractions of the run, the scheduler that drives a pruner, and
the errors for bad arguments."""

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lightning_prune.errors import PrunerStateError, PruningConfigError
from lightning_prune.schedule import (
    SCHEDULES,
    SparsityScheduler,
    cubic,
    linear,
    oneshot,
    relative_level,
    resolve_step,
    sparsity_at,
    validate_schedule,
)
from lightning_prune.sparsifier import SaliencyPruner


def test_schedules_are_registered_by_name():
    assert {"oneshot": oneshot, "linear": linear, "cubic": cubic} == SCHEDULES


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.0), (9, 0.0), (10, 0.6), (11, 0.6), (1000, 0.6)],
)
def test_oneshot_jumps_to_target_at_start_step(step, expected):
    assert oneshot(step, 0.6, start_step=10) == expected


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.0), (10, 0.0), (15, 0.25), (20, 0.5), (25, 0.75), (30, 1.0), (31, 1.0)],
)
def test_linear_ramps_in_equal_increments(step, expected):
    assert linear(step, 0.8, start_step=10, end_step=30) == pytest.approx(0.8 * expected)


@pytest.mark.parametrize(
    ("step", "expected"),
    # s_t = s_f (1 - (1 - p)^3) with s_f = 0.8 and p = (t - 10) / 20.
    [(0, 0.0), (10, 0.0), (15, 0.8 * (1 - 0.75**3)), (20, 0.8 * 0.875), (25, 0.8 * (1 - 0.25**3)), (30, 0.8)],
)
def test_cubic_follows_zhu_and_gupta(step, expected):
    assert cubic(step, 0.8, start_step=10, end_step=30) == pytest.approx(expected)


def test_cubic_prunes_faster_than_linear_early_on():
    assert cubic(5, 0.5, end_step=20) > linear(5, 0.5, end_step=20)


@pytest.mark.parametrize("name", ["linear", "cubic"])
def test_ramps_reach_the_target_exactly_at_end_step_and_stay(name):
    target = 0.37
    assert sparsity_at(name, 99, target, start_step=3, end_step=100, every_n_steps=7) < target
    for step in (100, 101, 10_000):
        assert sparsity_at(name, step, target, start_step=3, end_step=100, every_n_steps=7) == target


@pytest.mark.parametrize("name", ["linear", "cubic"])
def test_ramps_change_only_on_ticks(name):
    values = [sparsity_at(name, step, 0.5, start_step=4, end_step=24, every_n_steps=5) for step in range(30)]
    changes = [step for step in range(1, 30) if values[step] != values[step - 1]]
    assert changes == [9, 14, 19, 24]


def test_end_step_off_the_tick_grid_still_reaches_the_target():
    assert linear(9, 0.5, start_step=0, end_step=10, every_n_steps=3) == pytest.approx(0.5 * 9 / 10)
    assert linear(10, 0.5, start_step=0, end_step=10, every_n_steps=3) == 0.5


@given(
    name=st.sampled_from(sorted(SCHEDULES)),
    target=st.floats(0.0, 0.99),
    start=st.integers(0, 50),
    length=st.integers(1, 200),
    every=st.integers(1, 20),
)
def test_every_schedule_is_monotone_and_bounded(name, target, start, length, every):
    end = start + length
    values = [sparsity_at(name, step, target, start, end, every) for step in range(end + 3)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))
    assert values[0] == 0.0 or start == 0
    assert all(0.0 <= v <= target for v in values)
    assert values[end] == target


def test_sparsity_at_passes_its_arguments_through():
    assert sparsity_at("cubic", 7, 0.4, 2, 12, 1) == cubic(7, 0.4, 2, 12, 1)


def test_zero_target_never_prunes():
    assert [linear(step, 0.0, end_step=5) for step in range(8)] == [0.0] * 8


@pytest.mark.parametrize(
    ("kwargs", "names_in_message"),
    [
        ({"name": "exponential"}, ["'exponential'", "cubic", "linear", "oneshot"]),
        ({"target": 1.0}, ["target", "1.0", "[0, 1)"]),
        ({"target": -0.1}, ["target", "-0.1"]),
        ({"target": float("nan")}, ["target", "nan"]),
        ({"target": "0.5"}, ["target", "'0.5'"]),
        ({"start_step": -1}, ["start_step", "-1"]),
        ({"start_step": 1.5}, ["start_step", "1.5"]),
        ({"every_n_steps": 0}, ["every_n_steps", "0"]),
        ({"end_step": 10, "start_step": 10}, ["end_step=10", "start_step=10"]),
        ({"end_step": 3, "start_step": 10}, ["end_step=3", "start_step=10"]),
        ({"end_step": True}, ["end_step", "True"]),
    ],
)
def test_validate_schedule_names_the_bad_value(kwargs, names_in_message):
    arguments = {"name": "linear", "target": 0.5, "start_step": 0, "end_step": 100, "every_n_steps": 1}
    arguments.update(kwargs)
    with pytest.raises(PruningConfigError) as error:
        validate_schedule(**arguments)
    for name in names_in_message:
        assert name in str(error.value)


def test_validate_schedule_accepts_a_missing_end_step():
    validate_schedule("cubic", 0.5, start_step=3, end_step=None, every_n_steps=2)


def test_oneshot_ignores_end_step():
    validate_schedule("oneshot", 0.5, start_step=10, end_step=2)
    assert oneshot(10, 0.5, start_step=10, end_step=2) == 0.5


@pytest.mark.parametrize("name", ["linear", "cubic"])
def test_ramps_need_an_end_step_to_compute(name):
    with pytest.raises(PruningConfigError, match=f"{name}.*end_step"):
        sparsity_at(name, 5, 0.5)


def test_schedule_functions_check_their_own_arguments():
    with pytest.raises(PruningConfigError, match="every_n_steps"):
        cubic(5, 0.5, end_step=10, every_n_steps=0)


def test_sparsity_at_rejects_an_unknown_name_listing_the_choices():
    with pytest.raises(PruningConfigError, match=r"'step'.*\['cubic', 'linear', 'oneshot'\]"):
        sparsity_at("step", 5, 0.5, end_step=10)


# --- fractions of the run -------------------------------------------------------------------------------------


def test_fractions_are_steps_of_the_run_and_ints_stay_steps():
    assert resolve_step("end_step", 0.75, 200) == 150
    assert resolve_step("end_step", 1.0, 201) == 201
    assert resolve_step("end_step", 1, 200) == 1  # an int is a step, even 1
    assert resolve_step("start_step", 40, float("inf")) == 40


@pytest.mark.parametrize("total", [None, float("inf")])
def test_a_fraction_of_a_run_without_a_length_names_the_argument(total):
    with pytest.raises(PruningConfigError, match=r"start_step=0\.5 is a fraction.*no planned length"):
        resolve_step("start_step", 0.5, total)


def test_validate_schedule_takes_fractions_and_orders_bounds_of_one_kind():
    validate_schedule("linear", 0.5, start_step=0.1, end_step=0.75)
    validate_schedule("linear", 0.5, start_step=0.1, end_step=500)  # mixed kinds are ordered once resolved
    with pytest.raises(PruningConfigError, match="end_step=0.2 and start_step=0.4"):
        validate_schedule("linear", 0.5, start_step=0.4, end_step=0.2)
    with pytest.raises(PruningConfigError, match="resolve fractions first"):
        linear(5, 0.5, start_step=0.1, end_step=10)


# --- the scheduler ----------------------------------------------------------------------------------------------


def prepared(width: int = 16) -> SaliencyPruner:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3))
    pruner = SaliencyPruner(sparsity_level=0.5)
    pruner.prepare(model, [{"tensor_fqn": "0.weight"}])
    return pruner


def masked_rows(pruner: SaliencyPruner) -> int:
    return int((~pruner.state["0.weight"]["mask"]).sum())


def test_the_scheduler_drives_a_pruner_without_lightning():
    pruner = prepared()
    scheduler = SparsityScheduler(pruner, "linear", start_step=0, end_step=0.5, every_n_steps=1, total_steps=8)
    scheduler.track()
    assert (scheduler.start, scheduler.end) == (0, 4)
    changed = [scheduler.step(step) for step in range(1, 9)]
    assert changed == [True, True, True, True, False, False, False, False]
    assert masked_rows(pruner) == 8 and scheduler.done and scheduler.completed_at == 4
    assert scheduler.step(8) is False  # the same step twice does nothing
    assert scheduler.sparsity() == 0.5 and scheduler.last_change == 4


def test_finish_applies_the_target_when_training_stops_early():
    pruner = prepared()
    scheduler = SparsityScheduler(pruner, "cubic", end_step=100)
    scheduler.track()
    scheduler.step(10)
    assert 0 < scheduler.sparsity() < 0.5
    assert scheduler.finish() is True and scheduler.sparsity() == 0.5
    assert scheduler.completed_at is None and scheduler.finish() is False


def test_fractional_bounds_must_be_resolved_before_stepping():
    scheduler = SparsityScheduler(prepared(), "linear", end_step=0.5)
    scheduler.track()
    with pytest.raises(PrunerStateError, match=r"resolve\(total_steps\)"):
        scheduler.step(1)


def test_the_scheduler_state_round_trips_through_a_weights_only_checkpoint():
    pruner = prepared()
    scheduler = SparsityScheduler(pruner, "linear", end_step=0.5, total_steps=8)
    scheduler.track()
    for step in (1, 2):
        scheduler.step(step)
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    other_pruner = prepared()
    other = SparsityScheduler(other_pruner, "linear", end_step=0.5)
    other.track()
    other.load_state_dict(state)
    assert (other.start, other.end, other.last_step) == (0, 4, 2)
    assert [g["sparsity_level"] for g in other_pruner.groups] == [g["sparsity_level"] for g in pruner.groups]
    other.load_state_dict({})  # keys missing from older checkpoints keep their values
    assert other.end == 4


def test_levels_stay_relative_to_the_original_width_after_a_shrink():
    # 16 channels, 4 already removed: 50% of the original is 8, so 4 more of the 12 left
    level = relative_level(0.5, original=16, current=12)
    assert int(12 * level) == round(12 * level) == 4
    assert relative_level(0.5, 16, 16) == 0.5 and relative_level(0.1, 16, 12) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "total", "message"),
    [
        ({"schedule": "oneshot", "start_step": 100}, 50, "at step 100 cannot finish in this run of 50"),
        ({"schedule": "linear", "end_step": 1.0}, 40, "reaches its target on the run's last step (40)"),
        ({"schedule": "cubic", "end_step": 0.75}, 40, None),
        ({"schedule": "linear", "end_step": 60}, float("inf"), None),
    ],
)
def test_fit_problem_says_when_a_schedule_leaves_nothing_to_fine_tune(kwargs, total, message):
    scheduler = SparsityScheduler(prepared(), **kwargs)
    scheduler.resolve(total)
    problem = scheduler.fit_problem(total)
    assert (problem is None) if message is None else message in problem
