"""The sparsity schedules: their curves, their ticks, and the errors for bad arguments."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_prune.errors import PruningConfigError
from lightning_prune.schedule import SCHEDULES, cubic, linear, oneshot, sparsity_at, validate_schedule


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
