"""Numba loops behind ``MaxPool2d``: forward (max and first arg-max per window) and backward.

``refbnn.nn.pooling.max_pool2d_reference`` / ``max_pool2d_backward_reference`` are the NumPy
oracles these equal exactly (same comparisons, same additions in the same order). One (n, c) plane
per task.
"""

from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True, parallel=True)
def max_pool_forward_kernel(x, kh, kw, sh, sw, ph, pw, y, arg, want_arg):
    """``y`` (N, C, OH, OW): the maximum over each window of ``x`` padded with ``-inf``, taps
    visited in row-major (a, b) order ``t = a*KW + b``: ``best = tap 0``, then for each later tap
    ``v``: ``v > best`` makes ``t`` the arg-max and ``v`` the best; a tie (``v == best``, so only
    the sign of a zero can differ) or a NaN ``v`` makes ``v`` the best without moving the arg-max,
    as ``np.maximum(best, v)`` does; a NaN best stays. ``arg`` (N, C, OH, OW) int32 receives the arg-max
    tap when ``want_arg``."""
    n, c, h, w = x.shape
    oh, ow = y.shape[2], y.shape[3]
    ninf = x.dtype.type(-np.inf)
    mlen = ow + (kw - 1) // sw  # the phase columns the windows read (any padding)
    for plane in nb.prange(n * c):
        ni = plane // c
        ci = plane % c
        xi = x[ni, ci]
        # the -inf padded rows split by column phase, phs[yy, r, m] = xpad[yy, m*sw + r], so that
        # tap b of output column j is phs[yy, b % sw, j + b // sw]: unit-stride inner loops
        phs = np.empty((h, sw, mlen), dtype=x.dtype)
        for yy in range(h):
            xr = xi[yy]
            for r in range(sw):
                pr = phs[yy, r]
                for m in range(mlen):
                    u = m * sw + r - pw
                    pr[m] = xr[u] if (u >= 0 and u < w) else ninf
        for i in range(oh):
            best = y[ni, ci, i]
            bt = arg[ni, ci, i] if want_arg else arg[0, 0, 0]
            for j in range(ow):
                best[j] = ninf
            if want_arg:
                for j in range(ow):
                    bt[j] = 0
            for a in range(kh):
                yy = i * sh + a - ph
                if yy < 0 or yy >= h:
                    continue  # -inf taps: never > best, a tie leaves best as it is
                for b in range(kw):
                    t = a * kw + b
                    src = phs[yy, b % sw, b // sw:b // sw + ow]
                    if t == 0:
                        for j in range(ow):
                            best[j] = src[j]
                    elif want_arg:
                        # v replaces the best unless v < best or the best is NaN (np.maximum)
                        for j in range(ow):
                            v = src[j]
                            cur = best[j]
                            bt[j] = t if v > cur else bt[j]
                            best[j] = cur if (v < cur or cur != cur) else v
                    else:
                        for j in range(ow):
                            v = src[j]
                            cur = best[j]
                            best[j] = cur if (v < cur or cur != cur) else v
    return y


@nb.njit(cache=True, parallel=True)
def max_pool_backward_kernel(dy, arg, kh, kw, sh, sw, ph, pw, dx):
    """``dx`` (N, C, H, W) zeroed, then ``dy[n, c, i, j]`` added at the input position of window
    (i, j)'s arg-max tap, windows in DESCENDING row-major order (taps in the padding get nothing).

    An input element read by windows (i, j) and (i', j') through taps ``a*KW + b`` and
    ``a'*KW + b'`` has ``a = y + ph - i*sh``: the later window in row-major order has the smaller
    tap. So descending windows add into every element in ascending tap order: the same additions
    in the same order as ``max_pool2d_backward_reference`` (dy tap by tap into zeros)."""
    n, c, h, w = dx.shape
    oh, ow = dy.shape[2], dy.shape[3]
    zero = dx.dtype.type(0)
    row_of = np.empty(kh * kw, dtype=np.int64)  # tap -> (a, b)
    col_of = np.empty(kh * kw, dtype=np.int64)
    for t in range(kh * kw):
        row_of[t] = t // kw
        col_of[t] = t % kw
    for plane in nb.prange(n * c):
        ni = plane // c
        ci = plane % c
        d = dx[ni, ci]
        g = dy[ni, ci]
        am = arg[ni, ci]
        for yy in range(h):
            for xx in range(w):
                d[yy, xx] = zero
        for i in range(oh - 1, -1, -1):
            for j in range(ow - 1, -1, -1):
                t = am[i, j]
                yy = i * sh + row_of[t] - ph
                xx = j * sw + col_of[t] - pw
                if yy >= 0 and yy < h and xx >= 0 and xx < w:
                    d[yy, xx] += g[i, j]
    return dx


@nb.njit(cache=True, parallel=True)
def avg_pool_forward_kernel(x, kh, kw, sh, sw, ph, pw, div, y):
    """``y[n, c, i, j] = (tap 0 + tap 1 + ... ) / div[i, j]``, taps in row-major (a, b) order,
    left to right, in the dtype of ``x``; taps outside the input are 0 (zero padding)."""
    n, c, h, w = x.shape
    oh, ow = y.shape[2], y.shape[3]
    zero = x.dtype.type(0)
    for plane in nb.prange(n * c):
        ni = plane // c
        ci = plane % c
        xi = x[ni, ci]
        for i in range(oh):
            for j in range(ow):
                s = zero
                for a in range(kh):
                    yy = i * sh + a - ph
                    for b in range(kw):
                        xx = j * sw + b - pw
                        v = xi[yy, xx] if (yy >= 0 and yy < h and xx >= 0 and xx < w) else zero
                        s = v if (a == 0 and b == 0) else s + v
                y[ni, ci, i, j] = s / div[i, j]
    return y


@nb.njit(cache=True, parallel=True)
def avg_pool_backward_kernel(dy, kh, kw, sh, sw, ph, pw, div, tiles, dx):
    """``g = dy / div``; with ``tiles`` (windows tiling the input exactly) each input element is
    set to the ``g`` of its one window; otherwise ``dx`` is zeroed and, tap by tap in order and
    window by window in row-major order, ``g`` is added at every in-range tap position."""
    n, c, h, w = dx.shape
    oh, ow = dy.shape[2], dy.shape[3]
    for plane in nb.prange(n * c):
        ni = plane // c
        ci = plane % c
        d = dx[ni, ci]
        if not tiles:
            for yy in range(h):
                for xx in range(w):
                    d[yy, xx] = 0
        for t in range(kh * kw):
            a = t // kw
            b = t % kw
            for i in range(oh):
                yy = i * sh + a - ph
                if yy < 0 or yy >= h:
                    continue
                for j in range(ow):
                    xx = j * sw + b - pw
                    if xx >= 0 and xx < w:
                        g = dy[ni, ci, i, j] / div[i, j]
                        if tiles:
                            d[yy, xx] = g
                        else:
                            d[yy, xx] += g
    return dx
