"""Threaded float32 NHWC convolutions on the :mod:`refbnn.kernels.ftiles` micro-kernels.

One driver, :func:`conv_taps`, serves every real-valued layer of the engine (no im2col matrix):

``out[p * O + o] = float32(acc[p, o] * scale[o]) + shift[o]``,
``acc[p, o] = sum_t x[bases[p] + toff[t]] * W[t, o]`` (fused multiply-adds in tap order),

for output pixel ``p`` in ``0 .. npix-1``. A KxK conv of a zero-padded NHWC image has
``bases[p]`` = the flat index of pixel ``p``'s top-left input value and ``toff[t]`` the offset of tap
``t = (a, b, c)`` (:func:`conv_geometry`); a 1x1 conv or a matrix product has ``bases[p] = p * C``,
``toff = 0 .. C-1``. :func:`pool2_conv1x1` fuses the 2x2/2 average pool (ceil mode, in-bounds pixels
only) in front of a 1x1 conv, pooling each tile's pixels into a small scratch first.

Weights go in as :func:`weight_tiles` (``(T, O)`` split into blocks of ``16 * nv`` channels, zero
padded). Work is split over tiles of ``MR`` consecutive output pixels (``prange``); the last tile
repeats pixel ``npix - 1``, which recomputes and rewrites the same values (same thread).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .ftiles import MR, tile_nv1, tile_nv2, tile_nv4
from .fvec import f16_add, f16_div, f16_load_n, f16_store_n

# Numba's cache does not notice edits to imported kernels; this digest of ftiles.py and fvec.py
# (tests/test_kernels_real.py recomputes it) forces an edit here, hence a recompile.
DEPS_DIGEST = "a1a0abfb7f066d75"

MR1, MR2, MR4 = MR[1], MR[2], MR[4]


def vectors_for(channels: int) -> int:
    """Vectors of 16 channels per tile: 1 for <= 16 channels, 2 for <= 32, else 4."""
    return 1 if channels <= 16 else 2 if channels <= 32 else 4


def weight_tiles(w_to, nv: int) -> np.ndarray:
    """``w_to`` float32 ``(T, O)`` -> flat ``(ceil(O / (16 nv)), T, 16 nv)`` blocks, zero padded."""
    t, o = w_to.shape
    lanes = 16 * nv
    nct = -(-o // lanes)
    wt = np.zeros((t, nct * lanes), np.float32)
    wt[:, :o] = w_to
    return np.ascontiguousarray(wt.reshape(t, nct, lanes).transpose(1, 0, 2)).reshape(-1)


def conv_geometry(n, hp, wp, c, k, stride, oh, ow):
    """``(bases, toff)`` int64 of a ``k x k`` stride-``stride`` conv reading a padded NHWC image
    ``(n, hp, wp, c)`` (flat), output ``(n, oh, ow)`` pixels in row-major order."""
    img, i, j = np.meshgrid(np.arange(n), np.arange(oh), np.arange(ow), indexing="ij")
    bases = (((img * hp + i * stride) * wp + j * stride) * c).reshape(-1).astype(np.int64)
    a, b, ch = np.meshgrid(np.arange(k), np.arange(k), np.arange(c), indexing="ij")
    toff = ((a * wp + b) * c + ch).reshape(-1).astype(np.int64)
    return bases, toff


@njit(cache=True, inline="always")
def _tile(x, toff, ntaps, w, nv, o, scale, shift, out, b, ob):
    lanes = 16 * nv
    nct = (o + lanes - 1) // lanes
    for ct in range(nct):
        c0 = ct * lanes
        wbase = ct * ntaps * lanes
        if nv == 4:
            tile_nv4(x, b, toff, ntaps, w, wbase, out, ob, scale, shift, c0, o - c0)
        elif nv == 2:
            tile_nv2(x, b, toff, ntaps, w, wbase, out, ob, scale, shift, c0, o - c0)
        else:
            tile_nv1(x, b, toff, ntaps, w, wbase, out, ob, scale, shift, c0, o - c0)


@njit(cache=True, inline="always")
def _mr(nv):
    return MR4 if nv == 4 else MR2 if nv == 2 else MR1


@njit(cache=True, parallel=True)
def conv_taps(x, bases, npix, toff, w, nv, o, scale, shift, out):
    """See the module docstring; ``x``, ``w``, ``scale``, ``shift``, ``out`` flat float32."""
    mr = _mr(nv)
    ntaps = toff.shape[0]
    for q in prange((npix + mr - 1) // mr):
        b = np.empty(mr, np.int64)
        ob = np.empty(mr, np.int64)
        for i in range(mr):
            p = min(q * mr + i, npix - 1)
            b[i] = bases[p]
            ob[i] = p * o
        _tile(x, toff, ntaps, w, nv, o, scale, shift, out, b, ob)


@njit(cache=True, inline="always")
def avgpool2_pixel(x, n, h, w, c, i, j, dst, d0):
    """``dst[d0 : d0 + c]`` = the 2x2/2 ceil-mode average of output pixel ``(n, i, j)`` of NHWC
    ``x`` (flat), as the float path computes it: the in-bounds taps summed in the order
    (0,0), (0,1), (1,0), (1,1), then divided by their count (float32); 16 channels per vector."""
    r0, c0 = 2 * i, 2 * j
    nr = 2 if r0 + 1 < h else 1
    nc = 2 if c0 + 1 < w else 1
    cnt = np.float32(nr * nc)
    p00 = ((n * h + r0) * w + c0) * c
    for ch in range(0, c, 16):
        m = min(16, c - ch)
        s = f16_load_n(x, p00 + ch, m)
        if nc == 2:
            s = f16_add(s, f16_load_n(x, p00 + c + ch, m))
        if nr == 2:
            s = f16_add(s, f16_load_n(x, p00 + w * c + ch, m))
            if nc == 2:
                s = f16_add(s, f16_load_n(x, p00 + (w + 1) * c + ch, m))
        f16_store_n(dst, d0 + ch, f16_div(s, cnt), m)


@njit(cache=True, parallel=True)
def pool2_conv1x1(x, n, h, w, c, oh, ow, w_tiles, nv, o, scale, shift, out):
    """``out`` (flat NHWC ``(n, oh, ow, o)``) = BN(1x1 conv(2x2/2 average pool of ``x``))."""
    mr = _mr(nv)
    npix = n * oh * ow
    toff = np.arange(c).astype(np.int64)
    for q in prange((npix + mr - 1) // mr):
        scratch = np.empty(mr * c, np.float32)
        b = np.empty(mr, np.int64)
        ob = np.empty(mr, np.int64)
        for i in range(mr):
            p = min(q * mr + i, npix - 1)
            img = p // (oh * ow)
            r = p - img * oh * ow
            avgpool2_pixel(x, img, h, w, c, r // ow, r % ow, scratch, i * c)
            b[i] = i * c
            ob[i] = p * o
        _tile(scratch, toff, c, w_tiles, nv, o, scale, shift, out, b, ob)
