"""Threaded float32 NHWC pooling for the packed engine: the stem's 3x3/2 max-pool (which also
packs its output for the first binary conv), the shortcuts' 2x2/2 average pool and the global
average pool. Inputs and outputs are flat C-contiguous arrays.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .elementwise import pack_pixel
from .fvec import f16_add, f16_div, f16_load_n, f16_max, f16_store_n
from .realconv import avgpool2_pixel

# Numba's cache does not notice edits to imported kernels; this digest of elementwise.py,
# realconv.py and simd.py (tests/test_kernels_real.py recomputes it) forces an edit here.
DEPS_DIGEST = "3e35c5a8a6323ae3"


@njit(cache=True, parallel=True)
def maxpool3s2_pack(x, n, h, w, c, oh, ow, out, dst, hp, wp, pt, pl, groups, wg, nonpos):
    """``out`` (NHWC ``(n, oh, ow, c)``) = 3x3 stride-2 max-pool of ``x`` (``(n, h, w, c)``) with
    padding 1, padded taps never chosen (= PyTorch's ``-inf`` padding): the running maximum over the
    in-bounds taps in row-major order, replaced only by a strictly larger value (16 channels per
    vector). Each output pixel
    is also packed into ``dst`` as in :func:`refbnn.kernels.elementwise.merge_pack`."""
    for q in prange(n * oh):
        _maxpool_rows(x, h, w, c, oh, ow, out, dst, hp, wp, pt, pl, groups, wg, nonpos, q, q + 1)


#: Layout of :func:`maxpool3s2_pack_rows`'s integer parameters.
XP_H, XP_W, XP_C, XP_OH, XP_OW, XP_HP, XP_WP, XP_PT, XP_PL, XP_GROUPS, XP_WG, XP_NONPOS = range(12)


@njit(cache=True)
def maxpool3s2_pack_rows(x, ip, out, dst, q0, q1):
    """:func:`maxpool3s2_pack` of output rows ``q0 .. q1 - 1`` (row ``q`` = image ``q // oh``, row
    ``q % oh``) on the calling thread; ``ip`` int64 ``[h, w, c, oh, ow, hp, wp, pt, pl, groups, wg,
    nonpos]`` (``XP_*``)."""
    _maxpool_rows(x, ip[XP_H], ip[XP_W], ip[XP_C], ip[XP_OH], ip[XP_OW], out, dst, ip[XP_HP],
                  ip[XP_WP], ip[XP_PT], ip[XP_PL], ip[XP_GROUPS], ip[XP_WG], ip[XP_NONPOS] != 0,
                  q0, q1)


@njit(cache=True, inline="always")
def _maxpool_rows(x, h, w, c, oh, ow, out, dst, hp, wp, pt, pl, groups, wg, nonpos, q0, q1):
    pack = dst.shape[0] > 0
    cw = groups * wg
    cg = c // groups
    for q in range(q0, q1):
        img = q // oh
        i = q - img * oh
        r0, r1 = max(2 * i - 1, 0), min(2 * i + 2, h)
        for j in range(ow):
            c0, c1 = max(2 * j - 1, 0), min(2 * j + 2, w)
            o = ((img * oh + i) * ow + j) * c
            first = ((img * h + r0) * w + c0) * c
            for ch in range(0, c, 16):
                m = min(16, c - ch)
                best = f16_load_n(x, first + ch, m)
                for a in range(r0, r1):
                    for b in range(c0, c1):
                        best = f16_max(best, f16_load_n(x, ((img * h + a) * w + b) * c + ch, m))
                f16_store_n(out, o + ch, best, m)
            if pack:
                pack_pixel(out, o, groups, cg, wg, dst, ((img * hp + pt + i) * wp + pl + j) * cw,
                           nonpos)


@njit(cache=True)
def avgpool2_rows(x, n, h, w, c, oh, ow, out, q0, q1):
    """:func:`avgpool2` of output rows ``q0 .. q1 - 1`` (row ``q`` = image ``q // oh``, row
    ``q % oh``), on the calling thread."""
    for q in range(q0, q1):
        img = q // oh
        i = q - img * oh
        for j in range(ow):
            avgpool2_pixel(x, img, h, w, c, i, j, out, ((img * oh + i) * ow + j) * c)


@njit(cache=True, parallel=True)
def avgpool2(x, n, h, w, c, oh, ow, out):
    """``out`` (NHWC ``(n, oh, ow, c)``) = the 2x2/2 ceil-mode average pool of ``x``
    (:func:`refbnn.kernels.realconv.avgpool2_pixel`)."""
    for q in prange(n * oh):
        avgpool2_rows(x, n, h, w, c, oh, ow, out, q, q + 1)


@njit(cache=True, inline="always")
def global_avgpool_image(x, img, hw, c, out):
    """:func:`global_avgpool` of image ``img`` only."""
    d = np.float32(hw)
    for ch in range(0, c, 16):
        m = min(16, c - ch)
        s = f16_load_n(x, img * hw * c + ch, m)
        for p in range(1, hw):
            s = f16_add(s, f16_load_n(x, (img * hw + p) * c + ch, m))
        f16_store_n(out, img * c + ch, f16_div(s, d), m)


@njit(cache=True, parallel=True)
def global_avgpool(x, n, hw, c, out):
    """``out[img, ch]`` = float32 mean of ``x[img, :, ch]`` (``x`` flat ``(n, hw, c)``): a running
    float32 sum over the pixels in order, divided by ``hw`` (16 channels per vector)."""
    for img in prange(n):
        global_avgpool_image(x, img, hw, c, out)
