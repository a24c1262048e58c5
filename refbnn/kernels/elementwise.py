"""Fused per-element float32 kernels for the packed inference engine (NHWC, channel last).

Non-linearity codes (each equals the training layer's float32 formula exactly; the sign of a
zero ReLU output is not specified): 0 none; 1 ReLU ``max(v, 0)``; 2 PReLU ``v if v > 0 else
a[c] * v`` (``a`` passed as ``neg``); 3 FPReLU ``pos[c] * v if v >= 0 else neg[c] * v``.
:func:`act` is their one definition (:func:`act16` the same on 16 lanes).

:func:`merge_pack` is the epilogue that follows each binary conv (until the conv kernel does it in
its tile): one pass over the conv's float output that applies the residual add and the
non-linearities, keeps the result as the float32 residual stream, and sign-packs it into the next
binary conv's padded input buffer (:func:`pack_pixel`), so no layer reads floats back to pack them.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .fvec import f16_add, f16_fprelu, f16_load_n, f16_max, f16_prelu, f16_store_n, f16_zero
from .simd import neg_bits64, nonpos_bits64

# Numba's cache does not notice edits to imported kernels; this digest of the modules this one
# imports, transitively (written by ``python refbnn/kernels/_codegen.py``), forces a recompile.
DEPS_DIGEST = "23b2048de63c8218"

NONE, RELU, PRELU, FPRELU = 0, 1, 2, 3


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


@njit(cache=True, inline="always")
def pack_pixel(src, s0, groups, cg, wg, dst, d0, nonpos):
    """Pack one pixel's ``groups * cg`` float32 values ``src[s0 : ...]`` into ``dst[d0 : d0 +
    groups * wg]`` (uint64): group ``g``'s channel ``c`` is bit ``c % 64`` of word ``g * wg + c //
    64``, bit 1 = ``v < 0`` (``nonpos``: ``not v > 0``), unused high bits 0 (``refbnn.bits``)."""
    limit = src.shape[0] - 64
    for g in range(groups):
        for k in range(wg):
            start = s0 + g * cg + 64 * k
            count = min(64, cg - 64 * k)
            if count == 64 or start <= limit:
                # 64 values from start (past the group's end: masked off below)
                word = nonpos_bits64(src, start) if nonpos else neg_bits64(src, start)
                if count < 64:
                    word &= (np.uint64(1) << np.uint64(count)) - np.uint64(1)
            else:
                word = np.uint64(0)
                for i in range(count):
                    v = src[start + i]
                    if (not v > 0) if nonpos else (v < 0):
                        word |= np.uint64(1) << np.uint64(i)
            dst[d0 + g * wg + k] = word


@njit(cache=True, inline="always")
def act16(v, code, pos, neg, c0, m):
    """:func:`act` on 16 lanes (channels ``c0 ..``): the same float32 formula per lane."""
    if code == 1:
        return f16_max(v, f16_zero())
    if code == 2:
        return f16_prelu(v, f16_load_n(neg, c0, m))
    if code == 3:
        return f16_fprelu(v, f16_load_n(pos, c0, m), f16_load_n(neg, c0, m))
    return v


@njit(cache=True, inline="always")
def merge_pixel(y, base, short, sbase, c, sc, pre, pre_pos, pre_neg, post, post_pos, post_neg):
    """One pixel of :func:`merge_pack`, in place: ``y[base + ch] = post(pre(y[base + ch]) +
    short[sbase + ch % sc])`` for ``ch < c`` (``sc == 0``: no shortcut term), 16 lanes at a time;
    ``pre``/``post`` codes with per-channel slopes (module docstring)."""
    step = sc if sc else c
    for r in range(c // step):
        for k in range(0, step, 16):
            ch = r * step + k
            m = min(16, step - k)
            v = act16(f16_load_n(y, base + ch, m), pre, pre_pos, pre_neg, ch, m)
            if sc:
                v = f16_add(v, f16_load_n(short, sbase + k, m))
            f16_store_n(y, base + ch, act16(v, post, post_pos, post_neg, ch, m), m)


#: Layout of :func:`merge_pack`'s integer parameters.
MP_SC, MP_N, MP_OH, MP_OW, MP_C, MP_PRE, MP_POST, MP_HP, MP_WP, MP_PT, MP_PL, MP_GROUPS, MP_WG, \
    MP_NONPOS = range(14)


@njit(cache=True, inline="always")
def _merge_pack_rows(y, short, ip, slopes, dst, q0, q1):
    sc, oh, ow, c = ip[MP_SC], ip[MP_OH], ip[MP_OW], ip[MP_C]
    pre, post, hp, wp, pt, pl = ip[MP_PRE], ip[MP_POST], ip[MP_HP], ip[MP_WP], ip[MP_PT], ip[MP_PL]
    groups, wg, nonpos = ip[MP_GROUPS], ip[MP_WG], ip[MP_NONPOS] != 0
    pre_pos, pre_neg, post_pos, post_neg = slopes[0], slopes[1], slopes[2], slopes[3]
    pack = dst.shape[0] > 0
    cw = groups * wg
    cg = c // groups
    for q in range(q0, q1):
        img = q // oh
        i = q - img * oh
        for j in range(ow):
            p = q * ow + j
            base = p * c
            merge_pixel(y, base, short, p * sc, c, sc, pre, pre_pos, pre_neg, post, post_pos,
                        post_neg)
            if pack:
                pack_pixel(y, base, groups, cg, wg, dst, ((img * hp + pt + i) * wp + pl + j) * cw,
                           nonpos)


@njit(cache=True)
def merge_pack_rows(y, short, ip, slopes, dst, q0, q1):
    """:func:`merge_pack` of output rows ``q0 .. q1 - 1`` (row ``q`` = image ``q // oh``, row
    ``q % oh``), on the calling thread."""
    _merge_pack_rows(y, short, ip, slopes, dst, q0, q1)


@njit(cache=True, parallel=True)
def merge_pack(y, short, ip, slopes, dst):
    """The epilogue of a binary conv, in place on ``y`` (flat NHWC ``(n, oh, ow, c)`` float32):

    ``y[p, ch] = post(pre(y[p, ch]) + short[p, ch % sc])`` (``sc == 0``: no shortcut term; ``sc <
    c``: the shortcut's ``sc`` channels repeated, the cheap downsampling; ``sc`` divides ``c``),
    then each pixel packed (:func:`pack_pixel`) into ``dst``, a padded ``(n, hp, wp, groups * wg)``
    uint64 buffer (flat), at row ``pt + i``, column ``pl + j``; ``dst`` of size 0: no packing.

    ``ip``: int64 ``[sc, n, oh, ow, c, pre, post, hp, wp, pt, pl, groups, wg, nonpos]`` (``MP_*``
    indices; ``pre``/``post`` non-linearity codes, ``nonpos``: ``sign_at_zero=-1``); ``slopes``:
    float32 ``(4, c)``: ``pre_pos, pre_neg, post_pos, post_neg``. (Few arguments: each costs
    dispatch time, which at batch 1 of a small model is most of a layer's time.)
    """
    for q in prange(ip[MP_N] * ip[MP_OH]):
        _merge_pack_rows(y, short, ip, slopes, dst, q, q + 1)


def merge_params(sc, n, oh, ow, c, pre, post, target_geom, nonpos, pre_slopes, post_slopes):
    """``(ip, slopes)`` for :func:`merge_pack`; ``target_geom`` ``(hp, wp, pt, pl, groups, wg)``,
    ``pre_slopes``/``post_slopes`` ``(pos, neg)`` float32 ``(c,)`` each."""
    ip = np.array([sc, n, oh, ow, c, pre, post, *target_geom, int(nonpos)], np.int64)
    slopes = np.ascontiguousarray(np.stack([*pre_slopes, *post_slopes]), dtype=np.float32)
    return ip, slopes
