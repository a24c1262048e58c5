"""Threaded float32 NHWC convolutions on the :mod:`refbnn.kernels.ftiles` micro-kernels.

One driver, :func:`conv_taps`, serves every real-valued layer of the engine (no im2col matrix):

``out[p * O + o] = float32(acc[p, o] * scale[o]) + shift[o]``,
``acc[p, o] = sum_t x[bases[p] + toff[t]] * W[t, o]`` (fused multiply-adds in tap order),

for output pixel ``p`` in ``0 .. npix-1``. A KxK conv of a zero-padded NHWC image has
``bases[p]`` = the flat index of pixel ``p``'s top-left input value and ``toff[t]`` the offset of tap
``t = (a, b, c)`` (:func:`conv_geometry`); a 1x1 conv or a matrix product has ``bases[p] = p * C``,
``toff = 0 .. C-1``; the stem reads its image planar (``(C, Hp, Wp)``, :func:`planar_geometry`,
copied in row by row with :func:`to_padded_planar`: no NCHW -> NHWC transpose).
:func:`pool2_conv1x1` fuses the 2x2/2 average pool (ceil mode, in-bounds pixels only) in front of
a 1x1 conv, pooling each tile's pixels into a small scratch first;
:func:`stem_pool_rows` fuses the stem's conv + BN, its 3x3/2 max-pool and the sign packing, band by
band through a ring of conv rows that stays in cache. The ``*_tiles`` / ``*_rows`` functions run a
range of work items on the calling thread (the engine's executor splits layers with them).

With a ``uint16`` image (bfloat16 bits), tap-pair offsets and ``uint32`` weight pairs the same
drivers (:func:`conv_taps_tiles`, :func:`stem_pool_rows`) run the opt-in bf16 stem (its section
below; the micro-kernel is picked by the image's dtype at compile time).

Weights go in as :func:`weight_tiles` (``(T, O)`` split into blocks of ``16 * nv`` channels, zero
padded). Work is split over tiles of ``MR`` consecutive output pixels (``prange``); the last tile
repeats pixel ``npix - 1``, which recomputes and rewrites the same values (same thread).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .dispatch import host_has_wide_vectors, host_prefers_wide_float_tiles
from .elementwise import pack_pixel
from .ftiles import MR, tile_bf_nv1, tile_bf_nv2, tile_bf_nv4, tile_nv1, tile_nv2, tile_nv4
from .fvec import f16_add, f16_div, f16_load_n, f16_max, f16_store_n
from .sync import borrowed

# Numba's cache does not notice edits to imported kernels; this digest of ftiles.py and fvec.py
# (tests/test_kernels_real.py recomputes it) forces an edit here, hence a recompile.
DEPS_DIGEST = "0131c607828adbd3"

MR1, MR2, MR4 = MR[1], MR[2], MR[4]


def vectors_for(channels: int, bf16: bool = False) -> int:
    """Vectors of 16 channels per tile: 1 for <= 16 channels, 2 for <= 32, else 4, where
    :func:`refbnn.kernels.dispatch.host_prefers_wide_float_tiles` (AVX-512F with full-width
    units), and for the ``bf16`` stem's tiles wherever there is AVX-512F; else 1, the 6 x 16 tile
    (AVX2: its 12 accumulators fit the 16 ymm registers, the others' 24 zmm do not; AMD Zen 4:
    float32 tiles as fast or faster, measured there, but its VDPBF16PS tiles slower: the Bi-Real-18
    bf16 stem 1.50 -> 2.01 ms at batch 1). Every shape sums the same taps in the same order: the
    results do not depend on the choice."""
    if not (host_has_wide_vectors() if bf16 else host_prefers_wide_float_tiles()):
        return 1
    return 1 if channels <= 16 else 2 if channels <= 32 else 4


def weight_tiles(w_to, nv: int) -> np.ndarray:
    """``w_to`` ``(T, O)`` (float32, or :func:`weight_pairs_bf16`'s uint32) -> flat
    ``(ceil(O / (16 nv)), T, 16 nv)`` blocks of its dtype, zero padded."""
    t, o = w_to.shape
    lanes = 16 * nv
    nct = -(-o // lanes)
    wt = np.zeros((t, nct * lanes), np.uint32 if w_to.dtype == np.uint32 else np.float32)
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


def planar_geometry(n, c, hp, wp, k, stride, oh, ow):
    """``(bases, toff)`` int64 of a ``k x k`` stride-``stride`` conv reading zero-padded *planar*
    images ``(n, c, hp, wp)`` (flat NCHW, :func:`to_padded_planar`), output ``(n, oh, ow)`` pixels
    in row-major order. The taps keep :func:`conv_geometry`'s order ``(a, b, channel)`` (the
    weights' HWIO order), so a conv sums in the same order, bit for bit, from either layout."""
    img, i, j = np.meshgrid(np.arange(n), np.arange(oh), np.arange(ow), indexing="ij")
    bases = (img * c * hp * wp + i * stride * wp + j * stride).reshape(-1).astype(np.int64)
    a, b, ch = np.meshgrid(np.arange(k), np.arange(k), np.arange(c), indexing="ij")
    toff = ((ch * hp + a) * wp + b).reshape(-1).astype(np.int64)
    return bases, toff


@njit(cache=True)
def to_padded_planar(x, img, c, h, w, dst, hp, wp, pt, pl, r0, r1):
    """Rows ``r0 .. r1 - 1`` of every channel of image ``img`` of NCHW float32 ``x`` (flat
    ``(n, c, h, w)``) into the planar buffer ``dst`` (flat ``(c, hp, wp)``, one image) at row
    ``pt + r``, column ``pl``: an exact copy, row by row (the border is never written)."""
    for ch in range(c):
        for r in range(r0, r1):
            src = ((img * c + ch) * h + r) * w
            d = (ch * hp + pt + r) * wp + pl
            dst[d:d + w] = x[src:src + w]


# --- the opt-in bf16 stem ----------------------------------------------------------------------
# Image and weights rounded to bfloat16 (:func:`to_bf16`), the taps taken in pairs along a kernel
# row, each pair by one :func:`refbnn.kernels.fvec.bf_dot` (VDPBF16PS): pairs in the order
# (input channel, kernel row a, column pair (2q, 2q + 1)), an odd kernel's last column paired with
# a zero weight (reading a zero column appended to every padded row: :func:`bf16_planar_width`).
# docs/semantics.md ("bf16 stem") states the arithmetic; real_oracle.conv_bn_bf16 is its oracle.

@njit(cache=True, inline="always")
def to_bf16(bits):
    """float32 bits (``uint32``) -> bfloat16 bits (``uint32`` below 2**16): round to nearest even;
    a result below the smallest normal (2**-126) becomes zero of the same sign; NaN stays NaN
    (quiet, sign kept); infinities stay."""
    r = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    # (selects, no branches: the converters' loops vectorise)
    r = r if (r & np.uint32(0x7F80)) != 0 else r & np.uint32(0x8000)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    r = ((bits >> np.uint32(16)) | np.uint32(0x40)) if nan else r
    return r


@njit(cache=True)
def to_bf16_array(x, out):
    """:func:`to_bf16` of every element of float32 ``x`` into ``uint16`` ``out`` (same length)."""
    u = x.view(np.uint32)
    for i in range(u.shape[0]):
        out[i] = np.uint16(to_bf16(u[i]))


def bf16_planar_width(wp: int, k: int) -> int:
    """Row length of the bf16 stem's planar image: ``wp`` plus one zero column for an odd ``k``
    (the last column pair's odd partner)."""
    return wp + (k % 2)


def weight_pairs_bf16(w_hwio) -> np.ndarray:
    """HWIO float32 ``(k, k, c, o)`` -> ``(c * k * ceil(k / 2), o)`` uint32 pairs in the bf16
    stem's order ``(channel, a, q)``: low half ``bf16(w[a, 2q, ch])``, high half
    ``bf16(w[a, 2q + 1, ch])`` (0 past the kernel's last column)."""
    w = np.asarray(w_hwio, np.float32)
    k, _, c, o = w.shape
    kq = -(-k // 2)
    wb = np.zeros((k, 2 * kq, c, o), np.uint16)
    flat = np.empty(w.size, np.uint16)
    to_bf16_array(np.ascontiguousarray(w).reshape(-1), flat)
    wb[:, :k] = flat.reshape(w.shape)
    lo = wb[:, 0::2].astype(np.uint32)          # (a, q, ch, o)
    hi = wb[:, 1::2].astype(np.uint32)
    pairs = lo | (hi << np.uint32(16))
    return np.ascontiguousarray(pairs.transpose(2, 0, 1, 3)).reshape(c * k * kq, o)


def planar_geometry_bf16(n, c, hp, wpb, k, stride, oh, ow):
    """:func:`planar_geometry` for the bf16 stem: ``(bases, toff)`` over a planar bfloat16 image
    ``(n, c, hp, wpb)``, ``toff`` one offset per tap pair (its even element), in
    :func:`weight_pairs_bf16`'s order."""
    img, i, j = np.meshgrid(np.arange(n), np.arange(oh), np.arange(ow), indexing="ij")
    bases = (img * c * hp * wpb + i * stride * wpb + j * stride).reshape(-1).astype(np.int64)
    ch, a, q = np.meshgrid(np.arange(c), np.arange(k), np.arange(-(-k // 2)), indexing="ij")
    toff = ((ch * hp + a) * wpb + 2 * q).reshape(-1).astype(np.int64)
    return bases, toff


@njit(cache=True)
def to_padded_planar_bf16(x, img, c, h, w, dst, hp, wpb, pt, pl, r0, r1):
    """:func:`to_padded_planar` into a ``uint16`` planar buffer ``(c, hp, wpb)`` of bfloat16 bits
    (:func:`to_bf16` of each value; the border, zero, is never written)."""
    u = x.view(np.uint32)
    for ch in range(c):
        for r in range(r0, r1):
            src = ((img * c + ch) * h + r) * w
            d = (ch * hp + pt + r) * wpb + pl
            s_row, d_row = u[src:src + w], dst[d:d + w]
            for j in range(w):
                d_row[j] = np.uint16(to_bf16(s_row[j]))


def _tile_any(x, toff, ntaps, w, nv, o, scale, shift, out, b, ob):
    """``_tile`` for float32 images and weights, :func:`_tile_bf` for bf16 ones (by dtype)."""


@overload(_tile_any, inline="always")
def _tile_any_impl(x, toff, ntaps, w, nv, o, scale, shift, out, b, ob):
    if isinstance(x, types.Array) and x.dtype == types.uint16:
        return lambda x, toff, ntaps, w, nv, o, scale, shift, out, b, ob: \
            _tile_bf(x, toff, ntaps, w, nv, o, scale, shift, out, b, ob)
    return lambda x, toff, ntaps, w, nv, o, scale, shift, out, b, ob: \
        _tile(x, toff, ntaps, w, nv, o, scale, shift, out, b, ob)


@njit(cache=True, inline="always")
def _tile_bf(x, toff, ntaps, w, nv, o, scale, shift, out, b, ob):
    lanes = 16 * nv
    nct = (o + lanes - 1) // lanes
    for ct in range(nct):
        c0 = ct * lanes
        wbase = ct * ntaps * lanes
        if nv == 4:
            tile_bf_nv4(x, b, toff, ntaps, w, wbase, out, ob, scale, shift, c0, o - c0)
        elif nv == 2:
            tile_bf_nv2(x, b, toff, ntaps, w, wbase, out, ob, scale, shift, c0, o - c0)
        else:
            tile_bf_nv1(x, b, toff, ntaps, w, wbase, out, ob, scale, shift, c0, o - c0)


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


@njit(cache=True, inline="always")
def _conv_tiles(x, bases, npix, toff, w, nv, o, scale, shift, out, q0, q1):
    mr = _mr(nv)
    ntaps = toff.shape[0]
    b = np.empty(mr, np.int64)
    ob = np.empty(mr, np.int64)
    # the per-tile calls get views without reference counting (refbnn.kernels.sync.borrowed;
    # b and ob stay bound: they own their memory)
    x, toff, w, scale, shift, out = borrowed(x), borrowed(toff), borrowed(w), borrowed(scale), \
        borrowed(shift), borrowed(out)
    tb, tob = borrowed(b), borrowed(ob)
    for q in range(q0, q1):
        for i in range(mr):
            p = min(q * mr + i, npix - 1)
            tb[i] = bases[p]
            tob[i] = p * o
        _tile_any(x, toff, ntaps, w, nv, o, scale, shift, out, tb, tob)


def conv_tiles_count(npix: int, nv: int) -> int:
    """Tiles (work items of :func:`conv_taps_tiles`) of ``npix`` output pixels."""
    mr = MR[nv]
    return -(-npix // mr)


@njit(cache=True)
def conv_taps_tiles(x, bases, npix, toff, w, nv, o, scale, shift, out, q0, q1):
    """:func:`conv_taps` of pixel tiles ``q0 .. q1 - 1`` only (``MR[nv]`` pixels each), on the
    calling thread."""
    _conv_tiles(x, bases, npix, toff, w, nv, o, scale, shift, out, q0, q1)


@njit(cache=True, parallel=True)
def conv_taps(x, bases, npix, toff, w, nv, o, scale, shift, out):
    """See the module docstring; ``x``, ``w``, ``scale``, ``shift``, ``out`` flat float32."""
    mr = _mr(nv)
    for q in prange((npix + mr - 1) // mr):
        _conv_tiles(x, bases, npix, toff, w, nv, o, scale, shift, out, q, q + 1)


#: Layout of :func:`stem_pool_rows`'s integer geometry ``sg``.
SG_C, SG_WP, SG_STRIDE, SG_SH, SG_SW, SG_O, SG_PH, SG_PW, SG_RB, SG_BAND, SG_THP, SG_TWP, SG_TPT, \
    SG_TPL, SG_TGROUPS, SG_TWG, SG_NONPOS, SG_PACK = range(18)

#: Conv rows per band of :func:`stem_pool_rows` (its ring holds ``STEM_BAND + 2`` rows).
STEM_BAND = 6


def stem_geometry(c, wp, stride, sh, sw, o, ph, pw, target, nonpos, pack, ring_rows=None):
    """``sg`` for :func:`stem_pool_rows`: ``c`` the flat step between neighbouring input pixels of
    a row (the channel count of an NHWC input, 1 of a planar one) and padded width ``wp``, conv
    ``stride`` and output ``sh x sw x o``, pooled ``ph x pw``, ``target`` ``(hp, wp, pt, pl,
    groups, wg)`` of the packed output, ``nonpos`` (``sign_at_zero=-1``), ``pack``; the ring holds
    ``ring_rows`` conv rows (default ``STEM_BAND + 2``; ``>= sh`` keeps the whole conv output, row
    ``y`` at slot ``y``)."""
    rb = STEM_BAND + 2 if ring_rows is None else max(int(ring_rows), STEM_BAND + 2)
    return np.array([c, wp, stride, sh, sw, o, ph, pw, rb, STEM_BAND, *target, int(nonpos),
                     int(pack)], np.int64)


@njit(cache=True)
def stem_pool_rows(xin, sg, toff, w, nv, scale, shift, ring, pooled, dst, i0, i1):
    """The stem of one image for pooled rows ``i0 .. i1 - 1``: conv + BN (:func:`conv_taps`'s
    tiles and arithmetic) on the conv rows those rows need, a band of ``SG_BAND`` rows at a time
    into ``ring`` (conv row ``y`` at slot ``y % SG_RB``, ``(SG_RB, sw, o)`` float32), then the
    3x3/2 max-pool with padding 1 (:func:`refbnn.kernels.realpool.maxpool3s2_pack`'s order: the
    running maximum over the in-bounds taps, row-major, replaced only by a strictly larger value)
    into ``pooled`` (``(ph, pw, o)``), each pixel sign-packed into ``dst`` (this image's padded
    ``(hp, wp, groups * wg)`` buffer, at row ``pt + i``, column ``pl + j``) when ``SG_PACK``.
    ``xin``: the image zero-padded, NHWC ``(hp_in, wp_in, c)`` or planar ``(c_in, hp_in, wp_in)``
    (flat; ``toff`` from :func:`conv_geometry` or :func:`planar_geometry`). Rows of one image may be
    split over threads (each with its own ring): a range recomputes one conv row above it."""
    c, wp, stride, sh, sw, o = sg[SG_C], sg[SG_WP], sg[SG_STRIDE], sg[SG_SH], sg[SG_SW], sg[SG_O]
    pw, rb, band = sg[SG_PW], sg[SG_RB], sg[SG_BAND]
    twp, tpt, tpl = sg[SG_TWP], sg[SG_TPT], sg[SG_TPL]
    groups, wg, nonpos, pack = sg[SG_TGROUPS], sg[SG_TWG], sg[SG_NONPOS] != 0, sg[SG_PACK] != 0
    cw = groups * wg
    cg = o // groups
    mr = _mr(nv)
    ntaps = toff.shape[0]
    b = np.empty(mr, np.int64)
    ob = np.empty(mr, np.int64)
    # views without reference counting for the per-tile calls (b and ob own their memory)
    tb, tob = borrowed(b), borrowed(ob)
    xin, toff, w, scale, shift, ring = borrowed(xin), borrowed(toff), borrowed(w), \
        borrowed(scale), borrowed(shift), borrowed(ring)
    y = max(2 * i0 - 1, 0)
    yend = min(2 * (i1 - 1) + 2, sh)
    i = i0
    while i < i1:
        ya, yb = y, min(y + band, yend)
        npix = (yb - ya) * sw
        for q in range((npix + mr - 1) // mr):
            for t in range(mr):
                p = min(q * mr + t, npix - 1)
                yy = ya + p // sw
                xx = p - (p // sw) * sw
                tb[t] = (yy * stride * wp + xx * stride) * c
                tob[t] = ((yy % rb) * sw + xx) * o
            _tile_any(xin, toff, ntaps, w, nv, o, scale, shift, ring, tb, tob)
        y = yb
        while i < i1 and min(2 * i + 2, sh) <= y:
            r0, r1 = max(2 * i - 1, 0), min(2 * i + 2, sh)
            for j in range(pw):
                c0, c1 = max(2 * j - 1, 0), min(2 * j + 2, sw)
                po = (i * pw + j) * o
                first = ((r0 % rb) * sw + c0) * o
                for ch in range(0, o, 16):
                    m = min(16, o - ch)
                    best = f16_load_n(ring, first + ch, m)
                    for a in range(r0, r1):
                        for bb in range(c0, c1):
                            best = f16_max(best, f16_load_n(ring, ((a % rb) * sw + bb) * o + ch, m))
                    f16_store_n(pooled, po + ch, best, m)
                if pack:
                    pack_pixel(pooled, po, groups, cg, wg, dst, ((tpt + i) * twp + tpl + j) * cw,
                               nonpos)
            i += 1


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


@njit(cache=True, inline="always")
def _pool2_conv1x1_tiles(x, n, h, w, c, oh, ow, w_tiles, nv, o, scale, shift, out, q0, q1):
    mr = _mr(nv)
    npix = n * oh * ow
    toff = np.arange(c).astype(np.int64)
    scratch = np.empty(mr * c, np.float32)
    b = np.empty(mr, np.int64)
    ob = np.empty(mr, np.int64)
    # views without reference counting for the per-tile calls (the originals own the memory)
    tb, tob, ttoff, tscr = borrowed(b), borrowed(ob), borrowed(toff), borrowed(scratch)
    x, w_tiles, scale, shift, out = borrowed(x), borrowed(w_tiles), borrowed(scale), \
        borrowed(shift), borrowed(out)
    for q in range(q0, q1):
        for i in range(mr):
            p = min(q * mr + i, npix - 1)
            img = p // (oh * ow)
            r = p - img * oh * ow
            avgpool2_pixel(x, img, h, w, c, r // ow, r % ow, tscr, i * c)
            tb[i] = i * c
            tob[i] = p * o
        _tile(tscr, ttoff, c, w_tiles, nv, o, scale, shift, out, tb, tob)


@njit(cache=True)
def pool2_conv1x1_tiles(x, n, h, w, c, oh, ow, w_tiles, nv, o, scale, shift, out, q0, q1):
    """:func:`pool2_conv1x1` of pixel tiles ``q0 .. q1 - 1`` only, on the calling thread."""
    _pool2_conv1x1_tiles(x, n, h, w, c, oh, ow, w_tiles, nv, o, scale, shift, out, q0, q1)


@njit(cache=True, parallel=True)
def pool2_conv1x1(x, n, h, w, c, oh, ow, w_tiles, nv, o, scale, shift, out):
    """``out`` (flat NHWC ``(n, oh, ow, o)``) = BN(1x1 conv(2x2/2 average pool of ``x``))."""
    mr = _mr(nv)
    npix = n * oh * ow
    for q in prange((npix + mr - 1) // mr):
        _pool2_conv1x1_tiles(x, n, h, w, c, oh, ow, w_tiles, nv, o, scale, shift, out, q, q + 1)
