"""Numba loops for training-mode batch normalisation over a (N, C, L) view, one channel per task.

Statistics accumulate in float64 (the per-channel sums may be reassociated so that they vectorize:
deterministic for a given build, but not in index order); element-wise results are computed in
the data's dtype, in the order the docstrings write them.
``refbnn.nn.batchnorm.batch_norm_train_reference`` / ``batch_norm_backward_reference`` are the
NumPy oracles these are tested against.
"""

from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True, fastmath={"reassoc"})
def _channel_sum(x, ci):
    """float64 sum of ``x[:, ci, :]``."""
    s = 0.0
    for ni in range(x.shape[0]):
        r = x[ni, ci]
        for li in range(x.shape[2]):
            s += r[li]
    return s


@nb.njit(cache=True, fastmath={"reassoc"})
def _channel_sq_dev(x, ci, mean):
    """float64 sum of ``(x[:, ci, :] - mean)**2``."""
    q = 0.0
    for ni in range(x.shape[0]):
        r = x[ni, ci]
        for li in range(x.shape[2]):
            d = r[li] - mean
            q += d * d
    return q


@nb.njit(cache=True, fastmath={"reassoc"})
def _channel_grad_sums(dy, x, ci, mu, iv):
    """float64 ``(sum dy, sum dy * xhat)`` over channel ``ci``, ``xhat = (x - mu) * iv`` in the
    data dtype."""
    sdy = 0.0
    sdyx = 0.0
    for ni in range(x.shape[0]):
        gr = dy[ni, ci]
        xr = x[ni, ci]
        for li in range(x.shape[2]):
            g = gr[li]
            sdy += g
            sdyx += g * ((xr[li] - mu) * iv)
    return sdy, sdyx


@nb.njit(cache=True, parallel=True)
def bn_forward_kernel(x, w, b, eps, y, mean_out, var_out, inv_out):
    """Per channel c: ``mean``, biased ``var``, ``inv = 1 / sqrt(var + eps)`` and
    ``y = (x - mean) * inv * w + b`` (as ``xhat * w + b`` with ``xhat = (x - mean) * inv``)."""
    n, c, length = x.shape
    m = n * length
    for ci in nb.prange(c):
        mean = _channel_sum(x, ci) / m
        var = _channel_sq_dev(x, ci, mean) / m
        mean_out[ci] = mean
        var_out[ci] = var
        mu = x.dtype.type(mean)
        inv = x.dtype.type(1.0 / np.sqrt(var + eps))
        inv_out[ci] = inv
        wc, bc = w[ci], b[ci]
        for ni in range(n):
            r = x[ni, ci]
            o = y[ni, ci]
            for li in range(length):
                o[li] = (r[li] - mu) * inv * wc + bc
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
        sdy, sdyx = _channel_grad_sums(dy, x, ci, mu, iv)
        db[ci] = sdy
        dw[ci] = sdyx
        k1 = x.dtype.type(sdy / m)
        k2 = x.dtype.type(sdyx / m)
        scale = w[ci] * iv
        for ni in range(n):
            gr = dy[ni, ci]
            xr = x[ni, ci]
            o = dx[ni, ci]
            for li in range(length):
                xh = (xr[li] - mu) * iv
                o[li] = (gr[li] - k1 - xh * k2) * scale
    return dx


@nb.njit(cache=True, parallel=True)
def bn_affine_kernel(x, scale, shift, y):
    """Evaluation mode: ``y[n, c, l] = x[n, c, l] * scale[c] + shift[c]``, a product then a sum,
    each rounded to the dtype of ``x`` (no fused multiply-add), as NumPy's ``x * scale + shift``.
    One (n, c) row per task."""
    n, c, length = x.shape
    for row in nb.prange(n * c):
        ni = row // c
        ci = row % c
        r = x[ni, ci]
        o = y[ni, ci]
        sc, sh = scale[ci], shift[ci]
        for li in range(length):
            o[li] = r[li] * sc + sh
    return y
