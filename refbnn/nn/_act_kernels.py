"""Numba loops for FTBNN's FPReLU over a (N, C, L) view, one channel per task.

``refbnn.nn.activation.fprelu_forward_reference`` / ``fprelu_backward_reference`` are the NumPy
oracles these are tested against: the element-wise results are the same single multiplication
(exact); the slope gradients are sums, accumulated here in float64 (NumPy sums pairwise in the data
dtype), so they agree within float rounding of the sum.
"""

from __future__ import annotations

import numba as nb


@nb.njit(cache=True, parallel=True)
def fprelu_forward_kernel(x, pos, neg, y):
    """``y = pos[c] * x`` where ``x >= 0`` (also -0.0), else ``neg[c] * x``."""
    n, c, length = x.shape
    for ci in nb.prange(c):
        p, q = pos[ci], neg[ci]
        for ni in range(n):
            for li in range(length):
                v = x[ni, ci, li]
                y[ni, ci, li] = (p if v >= 0 else q) * v
    return y


@nb.njit(cache=True, parallel=True)
def fprelu_backward_kernel(dy, x, pos, neg, dx, dpos, dneg):
    """``dx = slope * dy`` (slope as in the forward pass); ``dpos[c]`` = sum of ``x * dy`` over
    ``x >= 0``, ``dneg[c]`` over ``x < 0`` (float64 accumulators, products in the data dtype)."""
    n, c, length = x.shape
    for ci in nb.prange(c):
        p, q = pos[ci], neg[ci]
        sp = 0.0
        sn = 0.0
        for ni in range(n):
            for li in range(length):
                v = x[ni, ci, li]
                g = dy[ni, ci, li]
                xg = v * g
                if v >= 0:
                    dx[ni, ci, li] = p * g
                    sp += xg
                else:
                    dx[ni, ci, li] = q * g
                    sn += xg
        dpos[ci] = sp
        dneg[ci] = sn
    return dx
