"""Fused per-element float32 kernels for the packed inference engine (NHWC, channel last).

Non-linearity codes (each equals the training layer's float32 formula exactly; the sign of a
zero ReLU output is not specified): 0 none; 1 ReLU ``max(v, 0)``; 2 PReLU ``v if v > 0 else
a[c] * v`` (``a`` passed as ``neg``); 3 FPReLU ``pos[c] * v if v >= 0 else neg[c] * v``.
:func:`act` is their one definition; :func:`act_select` computes the same values without
branching on the code (for vectorized loops: the conv epilogue's ``FUSED`` mode), from
:func:`select_params`.
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


def select_params(code, pos, neg, channels):
    """``(slopes, lo)`` of :func:`act_select` for non-linearity ``code`` with the per-channel
    slopes ``pos``/``neg`` (float32 ``(channels,)``, or ``None`` where the code has none):
    ``slopes`` float32 ``(2 * channels,)``, ``[2c]`` the slope below zero and ``[2c + 1]`` above:
    none ``(1, 1)``, ReLU ``(1, 1)`` with ``lo = 0``, PReLU ``(a, 1)`` (``a`` passed as ``neg``),
    FPReLU ``(neg, pos)``; ``lo = -inf`` but for ReLU."""
    slopes = np.ones(2 * channels, np.float32)
    if code in (PRELU, FPRELU):
        slopes[0::2] = neg
    if code == FPRELU:
        slopes[1::2] = pos
    return slopes, np.float32(0) if code == RELU else np.float32(-np.inf)


@njit(cache=True, inline="always")
def act_select(v, slopes, c, lo):
    """``t = slopes[2c + (v > 0)] * v``, then ``lo if t < lo else t``: equal to :func:`act` with
    the :func:`select_params` of its code for every float32 ``v`` (finite slopes), except that
    the sign of a zero result may differ (at ``v = +-0`` FPReLU scales by ``neg`` here, by ``pos``
    there). No branch on ``v``: an indexed load instead (with a branch, or a select the compiler
    turns into one, random signs cost ~6 ns per value; measured 4.9 ms -> 0.36 ms for 56x56x64
    with two non-linearities)."""
    t = slopes[2 * c + (v > 0)] * v
    return lo if t < lo else t


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
