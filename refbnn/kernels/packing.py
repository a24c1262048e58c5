"""Numba kernels that pack signs into ``uint64`` words and unpack them (no input validation).

Semantics (``refbnn.bits``): bit 1 means -1; value ``c`` of a group goes to word ``c // 64`` of that
group, bit ``c % 64``; unused high bits are 0. ``nonpos`` selects ``sign_at_zero=-1``
(bit = ``not x > 0``) instead of ``sign_at_zero=+1`` (bit = ``x < 0``; ``-0.0`` gives bit 0).
NaN is counted and reported to the caller, which must raise.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .simd import (
    all_finite,
    nan_bits64,
    neg_bits64,
    nonpos_bits64,
    popcount64,
    sum_into64,
    v8_zero,
)

# Numba's cache does not notice edits to imported kernels; this digest of the modules this one
# imports, transitively (written by ``python refbnn/kernels/_codegen.py``), forces a recompile.
DEPS_DIGEST = "045e0d23f6321ba6"


@njit(cache=True, inline="always")
def _word(xf, start, count, nonpos):
    """(packed word, NaN found) for ``count`` <= 64 values from ``xf[start]``."""
    if count == 64:
        nan = nan_bits64(xf, start) != 0
        if nonpos:
            return nonpos_bits64(xf, start), nan
        return neg_bits64(xf, start), nan
    w = np.uint64(0)
    nan = False
    for b in range(count):
        v = xf[start + b]
        nan |= v != v
        bit = not (v > 0) if nonpos else v < 0
        if bit:
            w |= np.uint64(1) << np.uint64(b)
    return w, nan


@njit(cache=True, inline="always")
def _pack_line(xf, q, d1, d2, channels, groups, out, p1, p2, off1, off2, nonpos):
    """Pack the ``d2`` rows of line ``q = i0 * d1 + i1``; returns the number of NaN words."""
    cg = channels // groups
    wg = (cg + 63) // 64
    cw = groups * wg
    nans = 0
    i0 = q // d1
    i1 = q - i0 * d1
    obase = ((i0 * p1 + i1 + off1) * p2 + off2) * cw
    if cg % 64 == 0:
        # every word is full: the line is d2 * cw consecutive words of 64 consecutive values;
        # NaN shows as a non-finite running sum (then counted exactly, word by word)
        base = q * d2 * channels
        s = v8_zero()
        for j in range(d2 * cw):
            s = sum_into64(s, xf, base + 64 * j)
            if nonpos:
                out[obase + j] = nonpos_bits64(xf, base + 64 * j)
            else:
                out[obase + j] = neg_bits64(xf, base + 64 * j)
        if all_finite(s, xf):
            return 0
        for j in range(d2 * cw):
            nans += nan_bits64(xf, base + 64 * j) != 0
        return nans
    for i2 in range(d2):
        base = (q * d2 + i2) * channels
        for g in range(groups):
            for k in range(wg):
                w, nan = _word(xf, base + g * cg + k * 64, min(64, cg - k * 64), nonpos)
                out[obase + i2 * cw + g * wg + k] = w
                nans += nan
    return nans


@njit(cache=True, parallel=True)
def pack_rows_into(xf, d0, d1, d2, channels, groups, out, p1, p2, off1, off2, nonpos):
    """Pack ``d0 * d1 * d2`` rows of ``channels`` values (flat, C-contiguous ``xf``) into ``out``.

    ``out`` is a flat ``uint64`` array laid out ``(d0, p1, p2, groups * Wg)``; row ``(i0, i1, i2)``
    goes to pixel ``(i0, i1 + off1, i2 + off2)`` (the interior of a padded buffer when
    ``p1 > d1``), ``Wg = ceil(channels / groups / 64)``: group ``g``'s ``Cg = channels / groups``
    values start at bit 0 of word ``g * Wg``. Returns the number of words that met a NaN (their
    bits are meaningless; the caller raises). Lines ``(i0, i1)`` are split over numba's threads.
    """
    nans = 0
    for q in prange(d0 * d1):  # one (i0, i1) line of d2 rows per iteration: no per-row division
        nans += _pack_line(xf, q, d1, d2, channels, groups, out, p1, p2, off1, off2, nonpos)
    return nans


@njit(cache=True)
def pack_rows_into_serial(xf, d0, d1, d2, channels, groups, out, p1, p2, off1, off2, nonpos):
    """:func:`pack_rows_into` on the calling thread only (same bits): for inputs so small that
    waking the worker threads costs more than the packing."""
    nans = 0
    for q in range(d0 * d1):
        nans += _pack_line(xf, q, d1, d2, channels, groups, out, p1, p2, off1, off2, nonpos)
    return nans


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


@njit(cache=True, inline="always")
def _hwio_block(k, tj, cg, o, nonpos, out):
    """Block ``tj = t * Wg + j`` of :func:`pack_hwio`; returns its number of NaN values."""
    wg = (cg + 63) // 64
    t = tj // wg
    j = tj - t * wg
    ob = tj * o
    bad = 0
    for q in range(o):
        out[ob + q] = 0
    for b in range(min(64, cg - 64 * j)):
        kb = (t * cg + 64 * j + b) * o
        shift = np.uint64(b)
        if nonpos:
            for q in range(o):
                v = k[kb + q]
                bad += v != v
                out[ob + q] |= np.uint64(not v > 0) << shift
        else:
            for q in range(o):
                v = k[kb + q]
                bad += v != v
                out[ob + q] |= np.uint64(v < 0) << shift
    return bad


@njit(cache=True, parallel=True)
def pack_hwio(k, taps, cg, o, nonpos, out):
    """Pack real weights along their input-channel axis without transposing the floats.

    ``k``: flat, C-contiguous ``(taps, cg, o)`` (an HWIO kernel, ``taps = KH * KW``); ``out``:
    flat ``uint64`` ``(taps, Wg, o)``, ``Wg = ceil(cg / 64)``: bit ``b`` of word ``(t, j, q)`` is
    the sign bit of ``k[t, 64*j + b, q]`` (module docstring; unused high bits 0). Each input row
    ``k[t, i, :]`` is read once, contiguously, into the ``o`` words of its block. Returns the
    number of NaN values (their bits are meaningless; the caller raises). Blocks ``(t, j)`` are
    split over numba's threads.
    """
    nans = 0
    for tj in prange(taps * ((cg + 63) // 64)):
        nans += _hwio_block(k, tj, cg, o, nonpos, out)
    return nans


@njit(cache=True)
def pack_hwio_serial(k, taps, cg, o, nonpos, out):
    """:func:`pack_hwio` on the calling thread only (same bits), for small kernels."""
    nans = 0
    for tj in range(taps * ((cg + 63) // 64)):
        nans += _hwio_block(k, tj, cg, o, nonpos, out)
    return nans


@njit(cache=True)
def sign_sums(words, rows, wg, n, out):
    """``out[r] = n - 2 * popcount(words[r * wg : (r + 1) * wg])`` (int64): the sum of the ``n``
    signs packed in row ``r`` of the flat ``uint64`` ``words``."""
    for r in range(rows):
        pc = 0
        for c in range(wg):
            pc += popcount64(words[r * wg + c])
        out[r] = n - 2 * pc
