"""Fast binary 2-D convolution: register-blocked ``<8 x i64>`` XOR-popcount on padded packed NHWC.

One kernel, :func:`bconv_fast`, serves every stride, dilation, kernel size, group count and channel
count; the per-layer geometry arrives precomputed (``refbnn.ops.BConv2DPlan`` builds it):

* ``xp``: flat ``uint64`` input, physically padded ``(N, Hp, Wp, CW)`` with ``CW = G * Wg`` words per
  pixel (group ``g`` at words ``g*Wg ..``); padded pixels are all-zero words (= +1 values).
* ``wt``: flat weight tiles ``(G, T, ntaps, Wg, 8*NV)``: lane ``l`` of tile ``t`` of group ``g`` is
  output channel ``g*Og + t*8*NV + l`` (zero words past ``Og``); ``soff[tap * Wg + c]`` is the
  word offset in ``xp`` of word ``c`` of tap ``tap`` (``(kh*dh*Wp + kw*dw) * CW + c``).
* Output pixels ``p = (n*OH + oh)*OW + ow`` are cut into ``ntiles`` balanced tiles of at most 6
  pixels (a multiple of the worker count when there are enough pixels); each of
  ``min(nthreads, ntiles)`` workers (``nthreads``: ``numba.get_num_threads()``) takes a
  contiguous run of tiles.

Per output value: ``acc = K - 2*popcount`` (one-padding, ``K = ntaps * Cg``) ``+ corr[rc[oh], cc[ow], o]``
(zero/-1 padding correction ``(pad_value - 1) * sum of w's signs over the padded taps``, flat
``(nrc, ncc, O)``), then the
epilogue ``mode``:

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
DEPS_DIGEST = "f2119a1b8761233c"


@njit(cache=True, parallel=True)
def bconv_fast(xp, Hp, Wp, CW, wt, nv, G, Wg, T, soff, K,
               N, OH, OW, O, sh, sw,
               rc, cc, corr, ncc, has_corr,
               mode, mul, bias, off, thr, dirn, pcflip, pcthr, oword, obit, run8,
               out_i32, out_f32, out_bits, OHp, OWp, OWords, opt, opl, nthreads):
    P = N * OH * OW
    ntiles = (P + MR - 1) // MR
    nchunks = min(nthreads, ntiles)
    ntiles = min(P, (ntiles + nchunks - 1) // nchunks * nchunks)  # equal tile counts per worker
    q, r = P // ntiles, P % ntiles
    nsteps = soff.shape[0]
    to = 8 * nv
    og = O // G
    wstep = nsteps * to
    a_xp, a_wt, a_soff, a_out = xp.ctypes.data, wt.ctypes.data, soff.ctypes.data, out_i32.ctypes.data
    a_bits, a_flip, a_pct = out_bits.ctypes.data, pcflip.ctypes.data, pcthr.ctypes.data
    for ch in prange(nchunks):
        acc = np.empty(MR * to, np.int64)
        bases = np.empty(MR, np.int64)
        obases = np.empty(MR, np.int64)
        pix = np.empty(MR, np.int64)
        oidx = np.empty(MR, np.int64)
        rcs = np.empty(MR, np.int64)
        ccs = np.empty(MR, np.int64)
        a_acc, a_bases, a_obases = acc.ctypes.data, bases.ctypes.data, obases.ctypes.data
        ti0 = ch * ntiles // nchunks
        # tile ti holds q (+1 for ti < r) pixels; pixels are stepped through, not divided
        p0 = ti0 * q + min(ti0, r)
        n = p0 // (OH * OW)
        oh = (p0 - n * OH * OW) // OW
        ow = p0 - n * OH * OW - oh * OW
        for ti in range(ti0, (ch + 1) * ntiles // nchunks):
            m = q + 1 if ti < r else q
            for i in range(m):
                if ow == OW:
                    ow = 0
                    oh += 1
                    if oh == OH:
                        oh = 0
                        n += 1
                p = p0 + i
                pix[i] = ((n * Hp + oh * sh) * Wp + ow * sw) * CW
                rcs[i] = rc[oh]
                ccs[i] = cc[ow]
                if mode == 3:
                    oidx[i] = ((n * OHp + oh + opt) * OWp + ow + opl) * OWords
                    for k in range(OWords):
                        out_bits[oidx[i] + k] = 0
                else:
                    oidx[i] = p * O
                ow += 1
            tile_border = False
            for i in range(m):
                tile_border |= has_corr and (rcs[i] | ccs[i]) != 0
            for g in range(G):
                for i in range(m):
                    bases[i] = pix[i] + g * Wg
                for t in range(T):
                    wbase = (g * T + t) * wstep
                    o0 = g * og + t * to
                    nl = min(to, og - t * to)
                    # direct 1/2: the tile writes int32 K - 2*pc / its packed bits itself (int32:
                    # border pixels then get their padding correction added below)
                    direct = 1 if mode == 0 and nl == to else 0
                    shift = 0
                    if mode == 3 and nl == to and not tile_border \
                            and oword[o0 + to - 1] == oword[o0] \
                            and obit[o0 + to - 1] == obit[o0] + to - 1:
                        direct = 2
                        shift = obit[o0]
                    for i in range(m):
                        obases[i] = oidx[i] + (oword[o0] if direct == 2 else o0)
                    if nv == 4:
                        tile_nv4(m, a_xp, a_bases, a_wt, wbase, a_soff, nsteps, a_acc, a_out,
                                 a_obases, K, direct, a_bits, a_flip, a_pct, o0, shift)
                    else:
                        tile_nv1(m, a_xp, a_bases, a_wt, wbase, a_soff, nsteps, a_acc, a_out,
                                 a_obases, K, direct, a_bits, a_flip, a_pct, o0, shift)
                    if direct == 1 and tile_border:
                        for i in range(m):
                            if (rcs[i] | ccs[i]) != 0:
                                cbase = (rcs[i] * ncc + ccs[i]) * O + o0
                                ob = oidx[i] + o0
                                for l in range(to):
                                    out_i32[ob + l] += np.int32(corr[cbase + l])
                    # otherwise the epilogue reads the scratch popcounts: whole 8-lane groups as
                    # vectors (K - 2*pc + corr, then the output mode), the other lanes scalar
                    for i in range(m if direct == 0 else 0):
                        border = has_corr and (rcs[i] | ccs[i]) != 0
                        cbase = (rcs[i] * ncc + ccs[i]) * O
                        l0 = 8 * (nl // 8)
                        if mode == 0:
                            for l in range(0, l0, 8):
                                cv = v8_load(corr, cbase + o0 + l) if border else v8_zero()
                                v8_store_acc_i32(out_i32, oidx[i] + o0 + l,
                                                 v8_load(acc, i * to + l), K, cv)
                        elif mode == 1 or mode == 2:
                            for l in range(0, l0, 8):
                                cv = v8_load(corr, cbase + o0 + l) if border else v8_zero()
                                v8_store_f32(out_f32, oidx[i] + o0 + l, v8_load(acc, i * to + l),
                                             K, cv, mul, bias if mode == 1 else off, o0 + l,
                                             mode == 2)
                        else:  # bits: a vector compare, then one OR per 8-bit run
                            for l in range(0, l0, 8):
                                o = o0 + l
                                cv = v8_load(corr, cbase + o) if border else v8_zero()
                                b8 = v8_threshold_bits(v8_load(acc, i * to + l), K, cv,
                                                       v8_load(dirn, o), v8_load(thr, o))
                                if run8[o]:
                                    out_bits[oidx[i] + oword[o]] |= b8 << np.uint64(obit[o])
                                else:
                                    for j in range(8):
                                        if (b8 >> np.uint64(j)) & np.uint64(1):
                                            out_bits[oidx[i] + oword[o + j]] |= \
                                                np.uint64(1) << np.uint64(obit[o + j])
                        _epilogue(acc, i * to, l0, nl, o0, K, border, corr, cbase, mode, mul,
                                  bias, off, thr, dirn, oword, obit, out_i32, out_f32,
                                  out_bits, oidx[i])
            p0 += m


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
