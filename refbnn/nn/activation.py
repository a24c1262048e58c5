"""Element-wise activations: ``ReLU``, ``PReLU`` (PyTorch) and FTBNN's ``FPReLU``.

Channel-wise parameters act on axis 1 of an input of 2 or more dimensions (NC, NCL, NCHW).
"""

from __future__ import annotations

import numpy as np

from refbnn.nn._checks import check_grad, check_input, param, positive_int
from refbnn.nn.module import Module, Parameter


def _channel_view(v, ndim):
    """A per-channel vector shaped to broadcast along axis 1 of an ``ndim``-D array."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _sum_but_channel(a):
    return a.sum(axis=(0,) + tuple(range(2, a.ndim)))


class ReLU(Module):
    """``y = max(x, 0)``; gradient 1 where ``x > 0``, else 0 (also at 0, as PyTorch)."""

    def __init__(self):
        super().__init__()
        self._cache = None

    def forward(self, x):
        x = check_input(x, (2, 3, 4), "ReLU")
        self._cache = x if self.training else None
        return np.maximum(x, 0)

    def backward(self, grad_out):
        x = check_grad(self._cache, "ReLU")
        return np.where(x > 0, grad_out, 0).astype(grad_out.dtype, copy=False)


class PReLU(Module):
    """``y = x`` where ``x > 0``, else ``weight[c] * x`` (``torch.nn.PReLU``).

    ``weight`` has ``num_parameters`` entries (1: shared by all channels; otherwise one per
    channel on axis 1), initialised to ``init``; no weight decay by default.
    """

    def __init__(self, num_parameters=1, init=0.25):
        super().__init__()
        self.num_parameters = positive_int(num_parameters, "num_parameters")
        self.weight = Parameter(np.full(num_parameters, init, dtype=np.float32), decay=False)
        self._cache = None

    def _slope(self, x):
        w = param(self.weight, x.dtype)
        if self.num_parameters == 1:
            return w.reshape((1,) * x.ndim)
        if x.shape[1] != self.num_parameters:
            raise ValueError(f"PReLU: {self.num_parameters} parameters but input has "
                             f"{x.shape[1]} channels")
        return _channel_view(w, x.ndim)

    def forward(self, x):
        x = check_input(x, (2, 3, 4), "PReLU")
        a = self._slope(x)
        self._cache = (x, a) if self.training else None
        return np.where(x > 0, x, a * x)

    def backward(self, grad_out):
        x, a = check_grad(self._cache, "PReLU")
        neg = x <= 0
        gw = np.where(neg, x * grad_out, 0)
        self.weight.accumulate(gw.sum() if self.num_parameters == 1 else _sum_but_channel(gw))
        return np.where(neg, a * grad_out, grad_out)

    def extra_repr(self):
        return f"num_parameters={self.num_parameters}"


class FPReLU(Module):
    """FTBNN's fully parametric ReLU: ``y = pos_slope[c] * x`` for ``x >= 0``, ``neg_slope[c] * x``
    for ``x < 0``; both slopes start at 1 (identity) and take no weight decay by default.

    Gradient w.r.t. ``x`` is ``pos_slope[c]`` on ``x >= 0`` (including 0), ``neg_slope[c]`` below.
    """

    def __init__(self, num_channels):
        super().__init__()
        self.num_channels = positive_int(num_channels, "num_channels")
        self.pos_slope = Parameter(np.ones(num_channels, dtype=np.float32), decay=False)
        self.neg_slope = Parameter(np.ones(num_channels, dtype=np.float32), decay=False)
        self._cache = None

    def forward(self, x):
        x = check_input(x, (2, 3, 4), "FPReLU", self.num_channels)
        pos = x >= 0
        slope = np.where(pos, _channel_view(param(self.pos_slope, x.dtype), x.ndim),
                         _channel_view(param(self.neg_slope, x.dtype), x.ndim))
        self._cache = (x, pos, slope) if self.training else None
        return slope * x

    def backward(self, grad_out):
        x, pos, slope = check_grad(self._cache, "FPReLU")
        xg = x * grad_out
        self.pos_slope.accumulate(_sum_but_channel(np.where(pos, xg, 0)))
        self.neg_slope.accumulate(_sum_but_channel(np.where(pos, 0, xg)))
        return slope * grad_out

    def extra_repr(self):
        return f"{self.num_channels}"
