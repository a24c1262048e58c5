"""Bi-Real Net's per-output-channel weight scale ``alpha``, defined exactly.

``alpha[o]`` is the float nearest (ties to even) to the exact real number
``(1 / n) * sum_i |W[o, i]|`` over the ``n = W[o].size`` latent weights of output channel ``o``:
one rounding of the exact mean, in float32 (or float64 for ``dtype=np.float64``). Every part of
refbnn that needs ``alpha`` calls :func:`mean_abs_scale`: the training layers, the PyTorch twin, the
packed engine (through the layers), the golden vectors and the ``scale`` stored in weight files.

Why not a float mean: ``np.mean`` of float32 values sums in float32 (pairwise), which is up to a few
ulp off on ordinary weights; a float64 sum is exact only while all the values fit in 53 bits of one
binade range, and even ``math.fsum`` (the float64 nearest the exact sum) followed by the division and
a rounding to float32 rounds twice, which misses the correct result when the exact mean lies just off
a float32 midpoint (``tests/test_scale.py`` has such weights). Here the sum is computed exactly in
integers: each ``|w| = M * 2**E`` (``M`` < 2**53 from ``np.frexp``), ``M`` split into two halves of
at most 27 bits whose per-exponent sums stay below 2**53 (exact in ``np.bincount``'s float64
accumulator for fewer than 2**26 weights per channel), then combined as Python integers; the
quotient by ``n`` is rounded once, by integer division.
"""

from __future__ import annotations

import numpy as np

_HALF = 26                     # the low half of a 53-bit mantissa
_MAX_PER_CHANNEL = 1 << 26     # bucket sums of 27-bit halves stay below 2**53 (exact in float64)


def _round_ratio_f32(num: int, den: int) -> float:
    """``num / den`` (integers, ``num >= 0``, ``den > 0``) rounded once to float32, to nearest, ties
    to even, with float32's subnormal grid below 2**-126. Returned as a Python float (exact)."""
    if num == 0:
        return 0.0
    e = num.bit_length() - den.bit_length()        # 2**e <= num/den < 2**(e+2)
    if (num << max(-e, 0)) < (den << max(e, 0)):
        e -= 1                                      # now 2**e <= num/den < 2**(e+1)
    g = max(e - 23, -149)                           # spacing of float32 values in that binade
    n2, d2 = (num, den << g) if g >= 0 else (num << -g, den)
    q, r = divmod(n2, d2)
    if 2 * r > d2 or (2 * r == d2 and q & 1):
        q += 1
    if q * 2.0 ** g > float(np.finfo(np.float32).max):
        return float("inf")
    return q * 2.0 ** g                             # q <= 2**24: exact in float64


def mean_abs_scale(weight, dtype=np.float32) -> np.ndarray:
    """``alpha`` (O,) of the weight ``(O, ...)``: the exact mean of ``|W[o]|`` rounded once to
    ``dtype`` (float32 or float64). Raises ``ValueError`` for NaN or infinite weights."""
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"alpha is float32 or float64, not {dtype}")
    w = np.abs(np.asarray(weight, dtype=np.float64))  # float32 -> float64 is exact
    if w.ndim < 1 or w.shape[0] == 0:
        raise ValueError(f"weight must be (O, ...) with O >= 1, got shape {w.shape}")
    o = w.shape[0]
    w = w.reshape(o, -1)
    n = w.shape[1]
    if n == 0:
        raise ValueError(f"weight must have at least one value per output channel, got {w.shape}")
    if n >= _MAX_PER_CHANNEL:
        raise ValueError(f"{n} weights per output channel: the exact sum supports < 2**26")
    if not np.isfinite(w).all():
        raise ValueError("weight contains NaN or infinity; its mean |W| is undefined")
    m, e = np.frexp(w)                             # w = m * 2**e, m in [0.5, 1) or 0
    mant = (m * 2.0 ** 53).astype(np.int64)        # exact integers < 2**53
    exp = e.astype(np.int64) - 53                  # w = mant * 2**exp
    hi, lo = mant >> _HALF, mant & ((1 << _HALF) - 1)
    nonzero = mant != 0
    if not nonzero.any():
        return np.zeros(o, dtype)
    base = int(exp[nonzero].min())
    span = int(exp[nonzero].max()) - base + _HALF + 1
    offset = exp - base
    offset[~nonzero] = 0                           # zeros add nothing; keep their keys in range
    offset += (np.arange(o) * span)[:, None]
    sums = np.zeros((o, span), np.float64)
    for part, shift in ((lo, 0), (hi, _HALF)):
        sums += np.bincount((offset + shift).reshape(-1), weights=part.reshape(-1).astype(np.float64),
                            minlength=o * span).reshape(o, span)
    powers = np.array([1 << j for j in range(span)], dtype=object)
    totals = (sums.astype(np.int64).astype(object) * powers).sum(axis=1)  # exact sum / 2**base
    num_shift, den_shift = max(base, 0), max(-base, 0)
    out = np.empty(o, dtype)
    for c, total in enumerate(totals):
        num, den = int(total) << num_shift, n << den_shift
        out[c] = num / den if dtype == np.float64 else _round_ratio_f32(num, den)
    return out
