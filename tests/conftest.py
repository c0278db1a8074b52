"""Shared fixtures: the devices the seed's tests run on, and a seeded RNG so failures reproduce."""

import random

import pytest
import torch
from hypothesis import settings

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
