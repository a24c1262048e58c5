"""Element-wise activations: ``ReLU``, ``PReLU`` (PyTorch) and FTBNN's ``FPReLU``.

Channel-wise parameters act on axis 1 of an input of 2 or more dimensions (NC, NCL, NCHW).
"""

from __future__ import annotations

import numpy as np

from refbnn.nn import _act_kernels as _act
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
        g = np.ascontiguousarray(grad_out)
        dx = np.empty_like(g)
        _act.relu_backward_kernel(np.ascontiguousarray(x).reshape(-1), g.reshape(-1),
                                  dx.reshape(-1))
        return dx


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


def _ncl(a):
    """(N, C), (N, C, L) or (N, C, H, W) as a contiguous (N, C, L) view or copy."""
    a = np.ascontiguousarray(a)
    return a.reshape(a.shape[0], a.shape[1], -1)


def fprelu_forward_reference(x, pos_slope, neg_slope):
    """NumPy oracle of FPReLU: ``y = pos_slope[c] * x`` on ``x >= 0``, ``neg_slope[c] * x`` below;
    ``c`` is axis 1; computed in the dtype of ``x``."""
    pos = _channel_view(pos_slope.astype(x.dtype), x.ndim)
    neg = _channel_view(neg_slope.astype(x.dtype), x.ndim)
    return np.where(x >= 0, pos, neg) * x


def fprelu_backward_reference(dy, x, pos_slope, neg_slope):
    """NumPy oracle of FPReLU's gradients ``(dx, dpos, dneg)``: ``dx = slope * dy``; ``dpos[c]``
    and ``dneg[c]`` sum ``x * dy`` over ``x >= 0`` / ``x < 0`` (all axes but 1), in float64."""
    pos = x >= 0
    dx = np.where(pos, _channel_view(pos_slope.astype(x.dtype), x.ndim),
                  _channel_view(neg_slope.astype(x.dtype), x.ndim)) * dy
    xg = (x * dy).astype(np.float64)
    return dx, _sum_but_channel(np.where(pos, xg, 0)), _sum_but_channel(np.where(pos, 0, xg))


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
        x3 = _ncl(x)
        y = np.empty_like(x3)
        _act.fprelu_forward_kernel(x3, param(self.pos_slope, x.dtype),
                                   param(self.neg_slope, x.dtype), y)
        self._cache = x3 if self.training else None
        return y.reshape(x.shape)

    def backward(self, grad_out):
        x3 = check_grad(self._cache, "FPReLU")
        d3 = _ncl(grad_out.astype(x3.dtype, copy=False))
        dx = np.empty_like(x3)
        c = x3.shape[1]
        dpos, dneg = np.empty(c), np.empty(c)
        _act.fprelu_backward_kernel(d3, x3, param(self.pos_slope, x3.dtype),
                                    param(self.neg_slope, x3.dtype), dx, dpos, dneg)
        self.pos_slope.accumulate(dpos)
        self.neg_slope.accumulate(dneg)
        return dx.reshape(grad_out.shape)

    def extra_repr(self):
        return f"{self.num_channels}"
