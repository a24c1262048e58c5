"""Numba loop behind :class:`refbnn.training.optim.Adam` / ``AdamW`` for float32 parameters.

One pass over the flat arrays doing, per element and in the same order, the float32 operations
the NumPy expressions in ``Adam._update`` do (each rounded to float32, no fused multiply-add), so
the results are bit-identical to them (tested); parallel over blocks of elements.
"""

from __future__ import annotations

import numba as nb
import numpy as np

BLOCK = 1 << 14  # elements per task of the parallel kernel


@nb.njit(cache=True, inline="always")
def _adam_block(p, grad, m, v, lo, hi, one_minus_b1, b2, one_minus_b2, bias2_sqrt, eps, step_size,
                l2, decay_scale, decoupled, clip, clip_lo, clip_hi):
    """:func:`adam_kernel`'s update of elements ``lo .. hi - 1``."""
    # views: indices from range() are non-negative to LLVM, so the loop vectorizes
    pb, gb, mb, vb = p[lo:hi], grad[lo:hi], m[lo:hi], v[lo:hi]
    for i in range(hi - lo):
        pi = pb[i]
        g = gb[i]
        if decoupled:
            pi = pi * decay_scale
        elif l2 != 0:
            g = g + l2 * pi
        mi = mb[i] + one_minus_b1 * (g - mb[i])
        vi = vb[i] * b2
        vi = vi + one_minus_b2 * (g * g)
        denom = np.sqrt(vi) / bias2_sqrt + eps
        mb[i] = mi
        vb[i] = vi
        pi = pi - step_size * (mi / denom)
        if clip:
            if pi < clip_lo:  # np.clip: maximum(., lo), then minimum(., hi)
                pi = clip_lo
            if pi > clip_hi:
                pi = clip_hi
        pb[i] = pi


@nb.njit(cache=True, parallel=True)
def adam_kernel(p, grad, m, v, one_minus_b1, b2, one_minus_b2, bias2_sqrt, eps, step_size,
                l2, decay_scale, decoupled, clip, clip_lo, clip_hi):
    """All arrays flat float32, all scalars float32. Per element, in this order:
    ``p *= decay_scale`` (``decoupled``) or ``g = grad + l2 * p`` (``l2 != 0``) else ``g = grad``;
    ``m += one_minus_b1 * (g - m)``; ``v *= b2``; ``v += one_minus_b2 * (g * g)``;
    ``p -= step_size * (m / (sqrt(v) / bias2_sqrt + eps))``; then with ``clip`` the new ``p``
    is clipped to [clip_lo, clip_hi] as ``np.clip`` does (NaN stays NaN, -0.0 stays -0.0).
    Blocks of :data:`BLOCK` elements over numba's threads."""
    size = p.size
    for blk in nb.prange((size + BLOCK - 1) // BLOCK):
        _adam_block(p, grad, m, v, blk * BLOCK, min(size, (blk + 1) * BLOCK), one_minus_b1, b2,
                    one_minus_b2, bias2_sqrt, eps, step_size, l2, decay_scale, decoupled, clip,
                    clip_lo, clip_hi)
    return p


@nb.njit(cache=True)
def adam_kernel_serial(p, grad, m, v, one_minus_b1, b2, one_minus_b2, bias2_sqrt, eps, step_size,
                       l2, decay_scale, decoupled, clip, clip_lo, clip_hi):
    """:func:`adam_kernel` on the calling thread (the same operations, so the same bits): for
    parameters of one block, where waking the worker threads costs more than it saves."""
    _adam_block(p, grad, m, v, 0, p.size, one_minus_b1, b2, one_minus_b2, bias2_sqrt, eps,
                step_size, l2, decay_scale, decoupled, clip, clip_lo, clip_hi)
    return p
