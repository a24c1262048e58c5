"""Input validation shared by the layers: one-line ``ValueError`` messages naming the problem."""

from __future__ import annotations

import numpy as np


def check_input(x, ndims, name: str, channels: int | None = None) -> np.ndarray:
    """Return ``x`` as an array if it is float32/float64 with ``ndim`` in ``ndims`` and, when
    given, ``channels`` entries on axis 1; raise ``ValueError`` otherwise."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise ValueError(f"{name}: input must be float32 or float64, got {x.dtype}")
    if x.ndim not in ndims:
        raise ValueError(f"{name}: input must have {' or '.join(map(str, ndims))} dimensions, "
                         f"got shape {x.shape}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name}: expected {channels} channels on axis 1, got shape {x.shape}")
    return x


def check_grad(cache, name: str):
    """The cached forward state, or a ``RuntimeError`` if backward comes without a training
    forward."""
    if cache is None:
        raise RuntimeError(f"{name}.backward called without a forward pass in training mode")
    return cache


def positive_int(v, what: str) -> int:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{what} must be a positive int, got {v!r}")
    return int(v)


def param(p, dtype):
    """A parameter's data in the compute dtype (no copy for float32)."""
    return p.data if p.data.dtype == dtype else p.data.astype(dtype)
