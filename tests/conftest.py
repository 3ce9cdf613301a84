"""Shared test settings: a hypothesis profile for a noisy 2-core machine and one torch thread
per test process (pytest-xdist runs one process per core)."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "gcache",
    deadline=None,
    max_examples=int(os.environ.get("GCACHE_HYPOTHESIS_EXAMPLES", "60")),
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.load_profile("gcache")

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture
def generator() -> torch.Generator:
    """A fresh seeded generator: every random draw in a test is reproducible."""
    return torch.Generator().manual_seed(0)
