"""Fused per-element float32 kernels for the packed inference engine (NHWC, channel last).

Non-linearity codes (each equals the training layer's float32 formula exactly; the sign of a
zero ReLU output is not specified): 0 none; 1 ReLU ``max(v, 0)``; 2 PReLU ``v if v > 0 else
a[c] * v`` (``a`` passed as ``neg``); 3 FPReLU ``pos[c] * v if v >= 0 else neg[c] * v``.
:func:`act` is their one definition (the conv epilogue's ``FUSED`` mode uses it too).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

NONE, RELU, PRELU, FPRELU = 0, 1, 2, 3
ACTIVATIONS = {None: NONE, "relu": RELU, "prelu": PRELU, "fprelu": FPRELU}


@njit(cache=True, inline="always")
def act(v, code, pos, neg):
    """Non-linearity ``code`` of the float32 ``v`` with the channel's slopes (module docstring)."""
    if code == 1:
        return max(v, np.float32(0.0))
    if code == 2:
        return v if v > 0 else neg * v
    if code == 3:
        return pos * v if v >= 0 else neg * v
    return v


@njit(cache=True, parallel=True)
def residual_merge(y, shortcut, pre, pre_pos, pre_neg, post, post_pos, post_neg):
    """In place on ``y`` (P, C) float32: ``y = post(pre(y) + shortcut)`` per element, where
    ``pre``/``post`` are non-linearity codes with per-channel slopes (see module docstring)."""
    p_total, c_total = y.shape
    for p in prange(p_total):
        for c in range(c_total):
            v = act(y[p, c], pre, pre_pos[c], pre_neg[c]) + shortcut[p, c]
            y[p, c] = act(v, post, post_pos[c], post_neg[c])


@njit(cache=True, parallel=True)
def affine_act(y, scale, shift, code, pos, neg):
    """In place on ``y`` (P, C) float32: ``y = act(y * scale[c] + shift[c])`` (two roundings)."""
    p_total, c_total = y.shape
    for p in prange(p_total):
        for c in range(c_total):
            v = y[p, c] * scale[c]
            y[p, c] = act(v + shift[c], code, pos[c], neg[c])
