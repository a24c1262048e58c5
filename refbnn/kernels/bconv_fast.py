"""Fast binary 2-D convolution: register-blocked ``<8 x i64>`` XOR-popcount on padded packed NHWC.

One kernel, :func:`bconv_fast`, serves every stride, dilation, kernel size, group count and channel
count; the per-layer geometry arrives precomputed (``refbnn.ops.BConv2DPlan`` builds it, and the
per-call pixel table with :func:`tile_table`):

* ``xp``: flat ``uint64`` input, physically padded ``(N, Hp, Wp, CW)`` with ``CW = G * Wg`` words per
  pixel (group ``g`` at words ``g*Wg ..``); padded pixels are all-zero words (= +1 values).
* ``wt``: flat weight tiles ``(G, T, ntaps, Wg, 8*NV)``: lane ``l`` of tile ``t`` of group ``g`` is
  output channel ``g*Og + t*8*NV + l`` (zero words past ``Og``); ``soff[tap * Wg + c]`` is the
  word offset in ``xp`` of word ``c`` of tap ``tap`` (``(kh*dh*Wp + kw*dw) * CW + c``).
* Output pixels ``p = (n*OH + oh)*OW + ow`` are cut into ``ntiles`` balanced tiles of at most
  ``MR`` = 6 consecutive pixels (a multiple of the worker count when there are enough pixels);
  each of ``nchunks = min(nthreads, ntiles)`` workers takes a contiguous run of tiles. The table
  (:func:`tile_table`) holds, per tile slot ``(ti, i)``: ``tpix`` the flat index in ``xp`` of the
  pixel's top-left tap word, ``tout`` the flat index of its first output element, ``tcor`` the
  flat index ``(rc[oh] * ncc + cc[ow]) * O`` of its padding-correction row (0 = none); per tile:
  ``tm`` its pixel count and ``tborder`` whether any of its pixels has a correction.

Per output value: ``acc = K - 2*popcount`` (one-padding, ``K = ntaps * Cg``) ``+ corr[rc[oh], cc[ow], o]``
(zero/-1 padding correction ``(pad_value - 1) * sum of w's signs over the padded taps``, flat
``(nrc, ncc, O)``; row ``(0, 0)``, the interior class, is all zeros), then the epilogue ``mode``:

* 0 ``out_i32[p*O + o] = acc``
* 1 ``out_f32[p*O + o] = float32(float32(acc) * mul[o]) + bias[o]`` (two roundings, no FMA)
* 2 LCE: ``float32(float32(2 * ((K - acc) // 2)) * (-mul[o])) + off[o]``, ``off`` = LCE offset
* 3 bits: bit ``obit[o]`` of word ``oword[o]`` of output pixel ``p`` is ``acc * dirn[o] < thr[o]``
  (in tiles without border pixels, equivalently ``(pc ^ pcflip[o]) > pcthr[o]``),
  written into a (possibly padded) ``uint64`` buffer ``out_bits`` of ``(N, OHp, OWp, OWords)``
  with the image at offset ``(opt, opl)``; the pixel's words are zeroed first. ``run8[o]`` is
  true when channels ``o .. o+7`` are consecutive bits of one word (one OR for eight bits).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .bconv_tiles import tile_nv1, tile_nv4
from .simd import v8_load, v8_store_acc_i32, v8_store_f32, v8_threshold_bits, v8_zero

MR = 6  # pixels per tile; bconv_tiles holds kernels for 1..MR

# Numba's cache does not notice edits to imported kernels; this digest of simd.py, bconv_tiles.py
# (tests/test_kernels_misc.py recomputes it) forces an edit here, hence a recompile.
DEPS_DIGEST = "9e03d47ae60203e6"


def tile_table(n, out_hw, padded_hw, words_per_pixel, stride, rc, cc, ncc, out_channels,
               has_corr, nthreads, bits_out=None):
    """The pixel table of :func:`bconv_fast` for a batch of ``n`` (see the module docstring).

    ``bits_out = (OHp, OWp, OWords, opt, opl)`` for mode 3 (``tout`` then indexes the padded
    ``uint64`` output), ``None`` for the other modes (``tout = p * O``). Returns
    ``(tpix, tout, tcor, tm, tborder, nchunks)``: three int64 ``(ntiles * MR,)`` arrays (slots
    past a tile's ``tm`` pixels hold 0), int64 ``tm``, bool ``tborder``, and the worker count.
    """
    oh, ow = out_hw
    hp, wp = padded_hw
    sh, sw = stride
    npix = n * oh * ow
    ntiles = -(-npix // MR)
    nchunks = min(nthreads, ntiles)
    ntiles = min(npix, -(-ntiles // nchunks) * nchunks)  # equal tile counts per worker
    q, r = divmod(npix, ntiles)
    ti = np.arange(ntiles)
    tm = np.where(ti < r, q + 1, q).astype(np.int64)
    slot = np.arange(MR)
    valid = slot[None, :] < tm[:, None]
    p = np.where(valid, (ti * q + np.minimum(ti, r))[:, None] + slot[None, :], 0)
    img, rest = np.divmod(p, oh * ow)
    y, x = np.divmod(rest, ow)
    tpix = ((img * hp + y * sh) * wp + x * sw) * words_per_pixel
    tcor = (np.asarray(rc)[y] * ncc + np.asarray(cc)[x]) * out_channels if has_corr else 0 * p
    if bits_out is None:
        tout = p * out_channels
    else:
        ohp, owp, owords, opt, opl = bits_out
        tout = ((img * ohp + y + opt) * owp + x + opl) * owords
    tpix, tout, tcor = (np.where(valid, a, 0).astype(np.int64) for a in (tpix, tout, tcor))
    tborder = (tcor != 0).any(axis=1)
    return (tpix.reshape(-1), tout.reshape(-1), tcor.reshape(-1), tm, tborder, nchunks)


@njit(cache=True, parallel=True)
def bconv_fast(xp, wt, nv, G, Wg, T, soff, K, O, tpix, tout, tcor, tm, tborder, nchunks, corr,
               mode, mul, bias, off, thr, dirn, pcflip, pcthr, oword, obit, run8,
               out_i32, out_f32, out_bits, OWords):
    ntiles = tm.shape[0]
    nsteps = soff.shape[0]
    to = 8 * nv
    og = O // G
    wstep = nsteps * to
    a_xp, a_wt, a_soff, a_o32 = xp.ctypes.data, wt.ctypes.data, soff.ctypes.data, \
        out_i32.ctypes.data
    a_bits, a_flip, a_pct = out_bits.ctypes.data, pcflip.ctypes.data, pcthr.ctypes.data
    a_dirn, a_thr = dirn.ctypes.data, thr.ctypes.data
    a_pix, a_out, a_cor, a_corr = tpix.ctypes.data, tout.ctypes.data, tcor.ctypes.data, \
        corr.ctypes.data
    for ch in prange(nchunks):
        acc = np.empty(MR * to, np.int64)
        a_acc = acc.ctypes.data
        for ti in range(ch * ntiles // nchunks, (ch + 1) * ntiles // nchunks):
            m = tm[ti]
            s0 = ti * MR
            border = tborder[ti]
            if mode == 3:
                for i in range(m):
                    for k in range(OWords):
                        out_bits[tout[s0 + i] + k] = 0
            a_tp, a_to, a_tc = a_pix + 8 * s0, a_out + 8 * s0, a_cor + 8 * s0
            for g in range(G):
                for t in range(T):
                    wbase = (g * T + t) * wstep
                    o0 = g * og + t * to
                    nl = min(to, og - t * to)
                    # direct 1/3: the tile writes int32 K - 2*pc (+ the padding correction);
                    # direct 2/4: its packed bits (popcount thresholds / with the correction)
                    direct = 0
                    shift = 0
                    ooff = o0
                    a_t1, a_t2 = a_flip, a_pct
                    if mode == 0 and nl == to:
                        direct = 3 if border else 1
                    elif mode == 3 and nl == to and oword[o0 + to - 1] == oword[o0] \
                            and obit[o0 + to - 1] == obit[o0] + to - 1:
                        direct = 4 if border else 2
                        shift = obit[o0]
                        ooff = oword[o0]
                        if border:
                            a_t1, a_t2 = a_dirn, a_thr
                    if nv == 4:
                        tile_nv4(m, a_xp, a_tp, g * Wg, a_wt, wbase, a_soff, nsteps, a_acc, a_o32,
                                 a_to, ooff, K, direct, a_bits, a_t1, a_t2, o0, shift, a_corr,
                                 a_tc)
                    else:
                        tile_nv1(m, a_xp, a_tp, g * Wg, a_wt, wbase, a_soff, nsteps, a_acc, a_o32,
                                 a_to, ooff, K, direct, a_bits, a_t1, a_t2, o0, shift, a_corr,
                                 a_tc)
                    # otherwise the epilogue reads the scratch popcounts: whole 8-lane groups as
                    # vectors (K - 2*pc + corr, then the output mode), the other lanes scalar
                    for i in range(m if direct == 0 else 0):
                        cbase = tcor[s0 + i]
                        pborder = cbase != 0
                        obase = tout[s0 + i]
                        l0 = 8 * (nl // 8)
                        if mode == 0:
                            for l in range(0, l0, 8):
                                cv = v8_load(corr, cbase + o0 + l) if pborder else v8_zero()
                                v8_store_acc_i32(out_i32, obase + o0 + l,
                                                 v8_load(acc, i * to + l), K, cv)
                        elif mode == 1 or mode == 2:
                            for l in range(0, l0, 8):
                                cv = v8_load(corr, cbase + o0 + l) if pborder else v8_zero()
                                v8_store_f32(out_f32, obase + o0 + l, v8_load(acc, i * to + l),
                                             K, cv, mul, bias if mode == 1 else off, o0 + l,
                                             mode == 2)
                        else:  # bits: a vector compare, then one OR per 8-bit run
                            for l in range(0, l0, 8):
                                o = o0 + l
                                cv = v8_load(corr, cbase + o) if pborder else v8_zero()
                                b8 = v8_threshold_bits(v8_load(acc, i * to + l), K, cv,
                                                       v8_load(dirn, o), v8_load(thr, o))
                                if run8[o]:
                                    out_bits[obase + oword[o]] |= b8 << np.uint64(obit[o])
                                else:
                                    for j in range(8):
                                        if (b8 >> np.uint64(j)) & np.uint64(1):
                                            out_bits[obase + oword[o + j]] |= \
                                                np.uint64(1) << np.uint64(obit[o + j])
                        _epilogue(acc, i * to, l0, nl, o0, K, pborder, corr, cbase, mode, mul,
                                  bias, off, thr, dirn, oword, obit, out_i32, out_f32,
                                  out_bits, obase)


@njit(cache=True, inline="always")
def _epilogue(acc, a0, l0, nl, o0, K, border, corr, cbase, mode, mul, bias, off, thr, dirn,
              oword, obit, out_i32, out_f32, out_bits, obase):
    """Scalar epilogue for lanes ``l0 .. nl - 1`` of one pixel's tile (see module docstring)."""
    for l in range(l0, nl):
        o = o0 + l
        a = K - 2 * acc[a0 + l]
        if border:
            a += corr[cbase + o]
        if mode == 0:
            out_i32[obase + o] = np.int32(a)
        elif mode == 3:
            if a * dirn[o] < thr[o]:
                out_bits[obase + oword[o]] |= np.uint64(1) << np.uint64(obit[o])
        else:
            out_f32[obase + o] = float_transform(a, K, mode, mul[o], bias[o], off[o])


@njit(cache=True, inline="always")
def float_transform(a, K, mode, m, b, off):
    """mode 1: ``float32(float32(a) * m) + b``; mode 2 (LCE): ``float32(2*pc) * (-m) + off``."""
    if mode == 1:
        return np.float32(np.float32(a) * m) + b
    pc = (K - a) // 2
    return np.float32(np.float32(2) * np.float32(pc) * (-m)) + off
