import os
import sys

import pytest
from hypothesis import HealthCheck, settings

# CI runs a dozen fuzzed shapes per rule; HYPOTHESIS_PROFILE=thorough runs many more.
settings.register_profile("default", max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _fresh_wandb():
    """wandb keeps one process-wide setup (its directory, its mode) from the first run of the
    process; a later test's WANDB_DIR would be ignored. Tear it down after every test that used it."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and hasattr(wandb, "teardown"):
        wandb.teardown()
