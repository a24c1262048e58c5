"""Max-pool on packed bits: the AND of the words over each window's in-bounds pixels.

Bit 1 means -1, so the max of ``+-1`` values is -1 only if every value is -1: a bitwise AND.
Padded pixels take no part. ``x`` is packed NHWC ``(N, H, W, CW)`` ``uint64``; ``out`` is
``(N, OH, OW, CW)``; window ``(i, j)`` covers rows ``i*sh - pt .. + ph - 1`` (likewise columns).
Every window must hold at least one in-bounds pixel (the caller checks the padding).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def maxpool_packed(x, ph, pw, sh, sw, pt, pl, out):
    N, H, W, CW = x.shape
    _, OH, OW, _ = out.shape
    for q in prange(N * OH):
        n = q // OH
        i = q - n * OH
        h0 = max(i * sh - pt, 0)
        h1 = min(i * sh - pt + ph, H)
        for j in range(OW):
            w0 = max(j * sw - pl, 0)
            w1 = min(j * sw - pl + pw, W)
            for k in range(CW):
                out[n, i, j, k] = ~np.uint64(0)
            for a in range(h0, h1):
                for b in range(w0, w1):
                    for k in range(CW):
                        out[n, i, j, k] &= x[n, a, b, k]
