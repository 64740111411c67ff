"""Shared fixtures: a fresh random seed per test, printed when the test fails."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import settings

# Numba compiles on the first example of each dtype; a deadline would flag that, not bugs.
settings.register_profile("ringlib", deadline=None, print_blob=True)
settings.load_profile("ringlib")


@pytest.fixture
def seed(request) -> int:
    """A fresh seed (or RINGLIB_TEST_SEED to replay one), reported if the test fails."""
    value = int(os.environ.get("RINGLIB_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    request.node.ringlib_seed = value
    return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    value = getattr(item, "ringlib_seed", None)
    if report.failed and value is not None:
        report.sections.append(("seed", f"replay with RINGLIB_TEST_SEED={value}"))
    return report
