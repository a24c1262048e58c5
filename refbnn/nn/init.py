"""Parameter initialisation: one seedable generator for every layer's default weights.

Defaults follow PyTorch's ``reset_parameters``: conv and linear weights and biases are
``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (``kaiming_uniform_(a=sqrt(5))``), fan_in = in/groups*KH*KW.
"""

from __future__ import annotations

import math

import numpy as np

_RNG = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Reseed the generator used by every layer constructed afterwards."""
    global _RNG
    _RNG = np.random.default_rng(seed)


def generator() -> np.random.Generator:
    return _RNG


def uniform_fan_in(shape, fan_in: int) -> np.ndarray:
    """float32 ``U(-b, b)`` with ``b = 1 / sqrt(fan_in)``."""
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return _RNG.uniform(-bound, bound, size=shape).astype(np.float32)
