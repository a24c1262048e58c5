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
            xr = x[ni, ci]
            o = y[ni, ci]
            for li in range(length):
                v = xr[li]
                o[li] = (p if v >= 0 else q) * v
    return y


@nb.njit(cache=True, fastmath={"reassoc"})
def _slope_grad_sums(dy, x, ci):
    """float64 sums of ``x * dy`` (products in the data dtype) over channel ``ci``, split by
    ``x >= 0`` / ``x < 0``; reassociated so that they vectorize (deterministic per build)."""
    sp = 0.0
    sn = 0.0
    zero = x.dtype.type(0)
    for ni in range(x.shape[0]):
        xr = x[ni, ci]
        gr = dy[ni, ci]
        for li in range(x.shape[2]):
            v = xr[li]
            xg = v * gr[li]
            pos = v >= zero
            sp += xg if pos else zero
            sn += zero if pos else xg
    return sp, sn


@nb.njit(cache=True, parallel=True)
def fprelu_backward_kernel(dy, x, pos, neg, dx, dpos, dneg):
    """``dx = slope * dy`` (slope as in the forward pass); ``dpos[c]`` = sum of ``x * dy`` over
    ``x >= 0``, ``dneg[c]`` over ``x < 0`` (float64 accumulators, products in the data dtype)."""
    n, c, length = x.shape
    for ci in nb.prange(c):
        p, q = pos[ci], neg[ci]
        dpos[ci], dneg[ci] = _slope_grad_sums(dy, x, ci)
        for ni in range(n):
            xr = x[ni, ci]
            gr = dy[ni, ci]
            o = dx[ni, ci]
            for li in range(length):
                o[li] = (p if xr[li] >= 0 else q) * gr[li]
    return dx


@nb.njit(cache=True, parallel=True)
def relu_backward_kernel(x, dy, dx):
    """``dx = dy`` where ``x > 0``, else ``0`` (flat arrays, as ``np.where(x > 0, dy, 0)``)."""
    zero = dx.dtype.type(0)
    size = x.size
    step = 1 << 14
    for blk in nb.prange((size + step - 1) // step):
        lo, hi = blk * step, min(size, (blk + 1) * step)
        xb, gb, ob = x[lo:hi], dy[lo:hi], dx[lo:hi]
        for i in range(hi - lo):
            ob[i] = gb[i] if xb[i] > 0 else zero
    return dx
