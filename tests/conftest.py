"""Shared test configuration: hypothesis profiles and the real-data location."""

import gzip
import os
from pathlib import Path

import numpy as np
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


@pytest.fixture(scope="module")
def torch_one_thread():
    """PyTorch with one intra-op thread for the requesting test module, the caller's count restored
    after it: the tensors are tiny, and PyTorch's spinning workers only slow a shared machine.
    Skips where PyTorch (the ``torch`` extra) is not installed."""
    torch = pytest.importorskip("torch", reason="PyTorch (the torch extra) is not installed")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(before)


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


def write_idx_gz(path, array, code=0x08):
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture
def fake_mnist(tmp_path):
    """``tmp_path/data/mnist/``: the four IDX files of a random 60 + 20 image MNIST."""
    d = tmp_path / "data" / "mnist"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("t10k", 20)):
        write_idx_gz(d / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx_gz(d / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    return d
