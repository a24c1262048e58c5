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
DEPS_DIGEST = "7329088c5f5d996f"


@njit(cache=True, inline="always")
def pack_word(xf, start, count, nonpos):
    """(packed word, NaN found) for ``count`` <= 64 values from ``xf[start]`` (module docstring)."""
    if count == 64:
        nan = nan_bits64(xf, start) != 0
        if nonpos:
            return nonpos_bits64(xf, start), nan
        return neg_bits64(xf, start), nan
    # a partial word: branch-free over a view (LLVM vectorizes the shifted ORs; measured 3.5-4x
    # faster than a branch per bit for 24, 32 and 48 values)
    w = np.uint64(0)
    nan = False
    xs = xf[start:start + count]
    for b in range(count):
        v = xs[b]
        nan |= v != v
        bit = (not (v > 0)) if nonpos else (v < 0)
        w |= np.uint64(bit) << np.uint64(b)
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
                w, nan = pack_word(xf, base + g * cg + k * 64, min(64, cg - k * 64), nonpos)
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


#: :func:`pack_nchw_into` packs a block of image rows of about this many pixels at a time (long,
#: vectorized inner loops; measured 2-4x faster than row by row for 28x28 and smaller maps).
NCHW_BLOCK_PIXELS = 1024


@njit(cache=True, inline="always")
def _nchw_blocks(h, w):
    """``(rows, blocks)`` per image of :func:`pack_nchw_into`: blocks of ``rows`` image rows
    (about :data:`NCHW_BLOCK_PIXELS` pixels, at least one row), the last one possibly short."""
    rows = max(1, min(h, NCHW_BLOCK_PIXELS // w))
    return rows, (h + rows - 1) // rows


@njit(cache=True, inline="always")
def _pack_nchw_block(xf, t, nblocks, rows, c, h, w, groups, out, p1, p2, off1, off2, nonpos,
                     tmp):
    """Pack block ``t`` (image ``t // nblocks``, ``rows`` image rows from ``(t % nblocks) * rows``)
    of NCHW ``xf``: each word gathers its <= 64 channels into ``tmp`` (one word per pixel of the
    block; per channel a contiguous read of the block's plane and a vectorized OR), then stores
    them to the pixels. Returns the number of NaN values met."""
    cg = c // groups
    wg = (cg + 63) // 64
    cw = groups * wg
    i0 = t // nblocks
    r0 = (t - i0 * nblocks) * rows
    r1 = min(h, r0 + rows)
    npx = (r1 - r0) * w
    nans = 0
    for g in range(groups):
        for k in range(wg):
            for j in range(npx):
                tmp[j] = 0
            for b in range(min(64, cg - k * 64)):
                base = ((i0 * c + g * cg + k * 64 + b) * h + r0) * w
                sh = np.uint64(b)
                xs = xf[base:base + npx]
                if nonpos:  # two loops, each branch-free, so that both vectorize
                    for j in range(npx):
                        v = xs[j]
                        nans += v != v
                        tmp[j] |= np.uint64(not (v > 0)) << sh
                else:
                    for j in range(npx):
                        v = xs[j]
                        nans += v != v
                        tmp[j] |= np.uint64(v < 0) << sh
            col = g * wg + k
            for r in range(r1 - r0):
                ob = ((i0 * p1 + r0 + r + off1) * p2 + off2) * cw + col
                for j in range(w):
                    out[ob + j * cw] = tmp[r * w + j]
    return nans


@njit(cache=True, parallel=True)
def pack_nchw_into(xf, n, c, h, w, groups, out, p1, p2, off1, off2, nonpos):
    """Pack the signs of NCHW ``xf`` (flat, C-contiguous ``(n, c, h, w)``) along channels into
    ``out``, a flat ``uint64`` array laid out ``(n, p1, p2, groups * Wg)``, pixel ``(i0, i1, i2)``
    at ``(i0, i1 + off1, i2 + off2)``: the same words :func:`pack_rows_into` writes for the NHWC
    transpose of ``xf``, without building it. Returns the number of NaN values (the caller
    raises). Blocks of about :data:`NCHW_BLOCK_PIXELS` pixels are split over numba's threads."""
    rows, nblocks = _nchw_blocks(h, w)
    nans = 0
    for t in prange(n * nblocks):
        tmp = np.empty(rows * w, np.uint64)
        nans += _pack_nchw_block(xf, t, nblocks, rows, c, h, w, groups, out, p1, p2, off1, off2,
                                 nonpos, tmp)
    return nans


@njit(cache=True)
def pack_nchw_into_serial(xf, n, c, h, w, groups, out, p1, p2, off1, off2, nonpos):
    """:func:`pack_nchw_into` on the calling thread only (same bits), for small inputs."""
    rows, nblocks = _nchw_blocks(h, w)
    nans = 0
    tmp = np.empty(rows * w, np.uint64)
    for t in range(n * nblocks):
        nans += _pack_nchw_block(xf, t, nblocks, rows, c, h, w, groups, out, p1, p2, off1, off2,
                                 nonpos, tmp)
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
def _hwio_block(k3, tj, out3, below):
    """Block ``tj = t * Wg + j`` of :func:`pack_hwio` (``k3`` ``(taps, cg, o)``, ``out3``
    ``(taps, Wg, o)``); returns whether it met a NaN.

    Rows are ORed into the block's ``o`` words eight at a time, along contiguous row views, with a
    boolean NaN flag and a branch-free bit test: the loop over ``o`` vectorizes and each word is
    read and written once per eight rows (3x3x512x512 on one Zen 4 core: 3.1 ms with an integer
    NaN count, 0.3 ms one row at a time, 0.22 ms eight at a time)."""
    cg = k3.shape[1]
    wg = out3.shape[1]
    t = tj // wg
    j = tj - t * wg
    words = out3[t, j]
    words[:] = 0
    bad = False
    nb = min(64, cg - 64 * j)
    r = 64 * j
    for b in range(0, nb - nb % 8, 8):
        r0, r1, r2, r3 = k3[t, r + b], k3[t, r + b + 1], k3[t, r + b + 2], k3[t, r + b + 3]
        r4, r5, r6, r7 = k3[t, r + b + 4], k3[t, r + b + 5], k3[t, r + b + 6], k3[t, r + b + 7]
        shift = np.uint64(b)
        for q in range(words.shape[0]):
            v0, v1, v2, v3, v4, v5, v6, v7 = r0[q], r1[q], r2[q], r3[q], r4[q], r5[q], r6[q], r7[q]
            bad |= (v0 != v0) | (v1 != v1) | (v2 != v2) | (v3 != v3) | (v4 != v4) | (v5 != v5) \
                | (v6 != v6) | (v7 != v7)
            x = np.uint64(v0 < below) | (np.uint64(v1 < below) << np.uint64(1)) \
                | (np.uint64(v2 < below) << np.uint64(2)) | (np.uint64(v3 < below) << np.uint64(3)) \
                | (np.uint64(v4 < below) << np.uint64(4)) | (np.uint64(v5 < below) << np.uint64(5)) \
                | (np.uint64(v6 < below) << np.uint64(6)) | (np.uint64(v7 < below) << np.uint64(7))
            words[q] |= x << shift
    for b in range(nb - nb % 8, nb):
        row = k3[t, r + b]
        shift = np.uint64(b)
        for q in range(words.shape[0]):
            v = row[q]
            bad |= v != v
            words[q] |= np.uint64(v < below) << shift
    return bad


@njit(cache=True, parallel=True)
def pack_hwio(k, taps, cg, o, below, out):
    """Pack real weights along their input-channel axis without transposing the floats.

    ``k``: flat, C-contiguous ``(taps, cg, o)`` (an HWIO kernel, ``taps = KH * KW``); ``out``:
    flat ``uint64`` ``(taps, Wg, o)``, ``Wg = ceil(cg / 64)``: bit ``b`` of word ``(t, j, q)`` is
    ``k[t, 64*j + b, q] < below`` (unused high bits 0), ``below`` a scalar of ``k``'s dtype:
    0 gives ``sign_at_zero=+1``; the smallest positive value of the dtype gives ``not v > 0``
    (``sign_at_zero=-1``) for every non-NaN ``v``, ``-0.0`` included. Each input row
    ``k[t, i, :]`` is read once, contiguously, into the ``o`` words of its block. Returns the
    number of blocks that met a NaN (their bits are meaningless; the caller raises). Blocks
    ``(t, j)`` are split over numba's threads.
    """
    k3 = k.reshape(taps, cg, o)
    out3 = out.reshape(taps, (cg + 63) // 64, o)
    nans = 0
    for tj in prange(taps * out3.shape[1]):
        nans += _hwio_block(k3, tj, out3, below)
    return nans


@njit(cache=True)
def pack_hwio_serial(k, taps, cg, o, below, out):
    """:func:`pack_hwio` on the calling thread only (same bits), for small kernels."""
    k3 = k.reshape(taps, cg, o)
    out3 = out.reshape(taps, (cg + 63) // 64, o)
    nans = 0
    for tj in range(taps * out3.shape[1]):
        nans += _hwio_block(k3, tj, out3, below)
    return nans


@njit(cache=True)
def tap_sign_sums(tap_words, n, out):
    """``out[o, t] = n - 2 * popcount(tap_words[t, :, o])`` (int64 ``(O, taps)``): the sum of the
    ``n`` signs packed in output channel ``o``'s words of tap ``t``; ``tap_words`` ``uint64``
    ``(taps, Wg, O)``, any layout."""
    taps, wg, o = tap_words.shape
    for t in range(taps):
        for q in range(o):
            out[q, t] = n
        for c in range(wg):
            row = tap_words[t, c]
            for q in range(o):  # contiguous for C-contiguous words: vectorizes
                out[q, t] -= 2 * popcount64(row[q])
