"""Health checks of a built model on real data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from refbnn import nn
from refbnn.models.trace import trace


@dataclass
class BinaryInputStats:
    name: str
    positive_fraction: float   # fraction of the binarized input that is +1
    dead: bool                 # the binarized input is one constant value over the whole batch


def binarized(x, sign_at_zero):
    if sign_at_zero == 1:
        return np.where(x >= 0, 1, -1)
    if sign_at_zero == -1:
        return np.where(x > 0, 1, -1)
    return np.sign(x)


def binary_input_stats(model, x, mode="eval") -> list[BinaryInputStats]:
    """For every binary layer that binarizes its input, the share of +1 in ``sign(input)`` over the
    batch ``x``; ``dead`` when that binarized input is constant (every value equal), so the layer's
    output carries no information beyond its border pattern (the ReLU trap, docs/models.md)."""
    stats = []
    for name, layer, inp, _ in trace(model, x, lambda n, m: isinstance(m, (nn.BinaryConv2d, nn.BinaryLinear))
                                     and m.binarize_input, mode=mode):
        b = binarized(np.asarray(inp), layer.sign_at_zero)
        stats.append(BinaryInputStats(name, float((b == 1).mean()), bool(np.all(b == b.flat[0]))))
    return stats
