"""Shared test configuration: hypothesis profiles and the real-data location."""

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# "ci": repeatable runs (derandomized, fixed budget) and no deadline, since the first call of a
# Numba kernel compiles (or loads from cache) inside the timed example.
settings.register_profile(
    "ci", deadline=None, max_examples=40, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", deadline=None, max_examples=25,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def _data_root():
    root = os.environ.get("REFBNN_DATA_DIR")
    return Path(root).resolve() if root else None  # absolute: subprocess tests run elsewhere


@pytest.fixture(scope="session")
def data_dir():
    """The folder named by ``REFBNN_DATA_DIR`` (holding ``mnist/``).

    Locally, tests that need real data are skipped when it is not set. Under CI (``CI`` set) a
    missing data folder is a failure, not a skip.
    """
    root = _data_root()
    if root is None or not (root / "mnist").is_dir():
        msg = f"REFBNN_DATA_DIR does not point at a folder with mnist/ (got {root})"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return root
