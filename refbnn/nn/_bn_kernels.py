"""Numba loops for training-mode batch normalisation over a (N, C, L) view, one channel per task.

Statistics accumulate in float64; element-wise results are computed in the data's dtype.
``refbnn.nn.batchnorm.batch_norm_train_reference`` / ``batch_norm_backward_reference`` are the
NumPy oracles these are tested against.
"""

from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True, parallel=True)
def bn_forward_kernel(x, w, b, eps, y, mean_out, var_out, inv_out):
    """Per channel c: ``mean``, biased ``var``, ``inv = 1 / sqrt(var + eps)`` and
    ``y = (x - mean) * inv * w + b`` (as ``xhat * w + b`` with ``xhat = (x - mean) * inv``)."""
    n, c, length = x.shape
    m = n * length
    for ci in nb.prange(c):
        s = 0.0
        for ni in range(n):
            for li in range(length):
                s += x[ni, ci, li]
        mean = s / m
        q = 0.0
        for ni in range(n):
            for li in range(length):
                d = x[ni, ci, li] - mean
                q += d * d
        var = q / m
        mean_out[ci] = mean
        var_out[ci] = var
        mu = x.dtype.type(mean)
        inv = x.dtype.type(1.0 / np.sqrt(var + eps))
        inv_out[ci] = inv
        wc, bc = w[ci], b[ci]
        for ni in range(n):
            for li in range(length):
                y[ni, ci, li] = (x[ni, ci, li] - mu) * inv * wc + bc
    return y


@nb.njit(cache=True, parallel=True)
def bn_backward_kernel(dy, x, mean, inv, w, dx, dw, db):
    """Per channel: ``db = sum dy``, ``dw = sum dy * xhat`` and
    ``dx = w * inv * (dy - db / M - xhat * dw / M)`` with ``xhat = (x - mean) * inv``."""
    n, c, length = x.shape
    m = n * length
    for ci in nb.prange(c):
        mu = x.dtype.type(mean[ci])
        iv = inv[ci]
        sdy = 0.0
        sdyx = 0.0
        for ni in range(n):
            for li in range(length):
                g = dy[ni, ci, li]
                sdy += g
                sdyx += g * ((x[ni, ci, li] - mu) * iv)
        db[ci] = sdy
        dw[ci] = sdyx
        k1 = x.dtype.type(sdy / m)
        k2 = x.dtype.type(sdyx / m)
        scale = w[ci] * iv
        for ni in range(n):
            for li in range(length):
                xh = (x[ni, ci, li] - mu) * iv
                dx[ni, ci, li] = (dy[ni, ci, li] - k1 - xh * k2) * scale
    return dx
