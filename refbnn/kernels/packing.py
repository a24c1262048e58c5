"""Numba kernels that pack signs into ``uint64`` words and unpack them (no input validation).

Semantics (``refbnn.bits``): bit 1 means -1; value ``c`` of a group goes to word ``c // 64`` of that
group, bit ``c % 64``; unused high bits are 0. ``nonpos`` selects ``sign_at_zero=-1``
(bit = ``not x > 0``) instead of ``sign_at_zero=+1`` (bit = ``x < 0``; ``-0.0`` gives bit 0).
NaN must be rejected by the caller (an ordered ``<`` would silently give bit 0).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .simd import neg_bits64, nonpos_bits64


@njit(cache=True, inline="always")
def _word(xf, start, count, nonpos):
    if count == 64:
        if nonpos:
            return nonpos_bits64(xf, start)
        return neg_bits64(xf, start)
    w = np.uint64(0)
    for b in range(count):
        v = xf[start + b]
        bit = not (v > 0) if nonpos else v < 0
        if bit:
            w |= np.uint64(1) << np.uint64(b)
    return w


@njit(cache=True, parallel=True)
def pack_rows_into(xf, rows, channels, groups, out, nonpos):
    """Pack ``rows`` rows of ``channels`` values (flat, C-contiguous ``xf``) into ``out``.

    ``out`` is a 4-D ``uint64`` array (possibly a strided view, e.g. the interior of a padded
    buffer) whose first three axes flatten to ``rows`` and whose last axis has
    ``groups * ceil(channels / groups / 64)`` words: group ``g``'s ``Cg = channels / groups`` values
    start at bit 0 of word ``g * Wg``.
    """
    d1, d2 = out.shape[1], out.shape[2]
    cg = channels // groups
    wg = (cg + 63) // 64
    for r in prange(rows):
        i0 = r // (d1 * d2)
        rem = r - i0 * d1 * d2
        i1 = rem // d2
        i2 = rem - i1 * d2
        base = r * channels
        for g in range(groups):
            for k in range(wg):
                c0 = g * cg + k * 64
                out[i0, i1, i2, g * wg + k] = _word(xf, base + c0, min(64, cg - k * 64), nonpos)


@njit(cache=True, parallel=True)
def unpack_rows(words, rows, nwords, n, out):
    """``out[r, c] = -1 if bit c % 64 of words[r * nwords + c // 64] else +1``, for ``c < n``.

    ``words`` flat ``uint64``; ``out`` a C-contiguous 2-D array (int8 or float) of ``(rows, n)``.
    """
    one = out.dtype.type(1)
    for r in prange(rows):
        for c in range(n):
            bit = (words[r * nwords + c // 64] >> np.uint64(c % 64)) & np.uint64(1)
            out[r, c] = one - out.dtype.type(2) * out.dtype.type(bit)
