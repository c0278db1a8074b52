"""Shared fixtures: the devices the seed's tests run on, a seeded RNG so failures reproduce, and rule registrations
scoped to the test that makes them, and the Hydra app run in-process on a composed config."""

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hypothesis import settings
from omegaconf import open_dict

import lightning_prune as lp
from lightning_prune.app.experiment import run
from lightning_prune.fusion.rules import registry
from tests import custom_layers

DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

# Model building and tracing take milliseconds to tens of them; a deadline would only make slow CI flaky.
# `pytest --hypothesis-profile=thorough` searches harder before a release.
settings.register_profile("lightning_prune", deadline=None, max_examples=25)
settings.register_profile("thorough", deadline=None, max_examples=400)
settings.load_profile("lightning_prune")


@pytest.fixture(params=DEVICES, ids=str)
def device(request) -> torch.device:
    return request.param


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same random state, so a failing draw is the same draw on rerun."""
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _rules_stay_put() -> Iterator[None]:
    """No test leaves a rule registered (or a rules scope open) behind: registrations go through ``rules``. A test
    that registers globally fails, and the registry is put back so the tests after it see the built-in rules."""
    outside = registry.active()
    assert outside.parent is None, "a rules scope was left open before this test"
    tables = (outside.modules, outside.functions, outside.names)
    before = [dict(table) for table in tables]
    yield
    changed = sorted({repr(key) for table, saved in zip(tables, before, strict=True)
                      for key in table.keys() | saved.keys() if table.get(key) is not saved.get(key)})
    for table, saved in zip(tables, before, strict=True):
        table.clear()
        table.update(saved)
    assert registry.active() is outside, "the test left a rules scope open"
    assert not changed, f"the test registered rules globally for {changed}: register them inside the `rules` fixture"


@pytest.fixture
def rules(_rules_stay_put) -> Iterator[registry.Registry]:
    """A rules scope for the test: whatever it registers (``lp.register_layer``, ``lp.register_function``) is undone
    when it ends."""
    with lp.rules_scope() as scope:
        yield scope


@pytest.fixture
def custom_layer_rules(rules) -> None:
    """The rules of tests/custom_layers.py's ScaledLinear and Scale, registered for this test only."""
    for layer, rule in custom_layers.RULES.items():
        lp.register_layer(layer, rule)


@pytest.fixture
def composed_run(tmp_path):
    """Runs the Hydra app in-process on a composed config, as ``@hydra.main`` would, writing into tmp_path."""
    def _run(overrides):
        conf = Path(__file__).resolve().parents[1] / "lightning_prune" / "app" / "conf"
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose("config", overrides=[*overrides, f"output_dir={tmp_path}"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg.hydra
        return run(cfg)

    yield _run
    HydraConfig.instance().cfg = None
