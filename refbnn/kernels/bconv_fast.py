"""Fast binary 2-D convolution: register-blocked ``<8 x i64>`` XOR-popcount on padded packed NHWC.

One kernel, :func:`bconv_fast`, serves every stride, dilation, kernel size, group count and channel
count. It reads two records that ``refbnn.ops.plan.BConv2DPlan`` builds: a :class:`FastConv` once per
layer (:func:`make_conv`) and a :class:`TileTable` per batch size, thread count and output layout
(:func:`make_table`):

* ``xp``: flat ``uint64`` input, physically padded ``(N, Hp, Wp, CW)`` with ``CW = G * Wg`` words per
  pixel (group ``g`` at words ``g*Wg ..``); padded pixels are all-zero words (= +1 values).
* ``conv.wt``: flat weight tiles ``(G, T, ntaps, Wg, 8*NV)``: lane ``l`` of tile ``t`` of group ``g``
  is output channel ``g*Og + t*8*NV + l`` (zero words past ``Og``); ``conv.soff[tap * Wg + c]`` is
  the word offset in ``xp`` of word ``c`` of tap ``tap`` (``(kh*dh*Wp + kw*dw) * CW + c``).
* ``conv.corr``: the padding correction ``(nrc, ncc, O)`` for taps read as +1
  (:mod:`refbnn.kernels.padding`); ``conv.epi``: the output transform
  (:mod:`refbnn.kernels.epilogue`).
* Output pixels ``p = (n*OH + oh)*OW + ow`` are cut into ``ntiles`` balanced tiles of at most
  ``MR`` = 6 consecutive pixels; each of ``table.nchunks`` workers takes a contiguous run of tiles.
  Per tile slot ``(ti, i)`` (flat ``ti * MR + i``): ``tpix`` the flat index in ``xp`` of the pixel's
  top-left tap word, ``tout`` the flat index of its first output element, ``tcor`` the flat index
  ``(rc[oh] * ncc + cc[ow]) * O`` of its correction row (0 = none); per tile: ``tm`` its pixel
  count and ``tborder`` whether any of its pixels has a correction.
* ``out``: the output array's bytes (``uint8``, flat): int32 or float32 ``(N, OH, OW, O)``, or for
  :data:`~refbnn.kernels.epilogue.BITS` a ``uint64`` ``(N, OHp, OWp, owords)`` buffer whose output
  pixels' words are overwritten (the rest is left alone).
* :data:`~refbnn.kernels.epilogue.FUSED` only (else empty): ``residual``, float32 flat
  ``(N, OH, OW, O)``, not overlapping ``out``; ``bits``, a flat ``uint64`` buffer as for ``BITS``,
  pixel words at ``table.tbits`` (for the other modes ``tbits`` is ``tout``).

Per output value ``acc = K - 2*popcount + corr`` then the epilogue; the micro-kernels
(:mod:`refbnn.kernels.bconv_tiles`) finish whole tiles themselves where they can (int32, or bits
that fill one word run), otherwise this module's vector and scalar epilogue does.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.experimental import structref

from .bconv_tiles import tile
from .epilogue import (
    BITS,
    EPILOGUE,
    FLOAT,
    FLOAT_LCE,
    FUSED,
    INT32,
    TILE_BITS,
    TILE_BITS_CORR,
    TILE_INT32,
    TILE_INT32_CORR,
    TILE_SCRATCH,
    bit_output,
    float_output,
    fuse_pixels,
    v8_store_f32,
    v8_store_i32,
    v8_threshold_bits,
)
from .simd import a_or_u64, a_store, v8_load, v8_zero

MR = 6  # pixels per tile; bconv_tiles holds kernels for 1..MR

# Numba's cache does not notice edits to imported kernels; this digest of the modules this one
# imports, transitively (written by ``python refbnn/kernels/_codegen.py``), forces a recompile.
DEPS_DIGEST = "c2b382badac3d2e4"


@structref.register
class FastConvType(types.StructRef):
    pass


class FastConv(structref.StructRefProxy):
    """One layer prepared for :func:`bconv_fast` (opaque in Python; see the module docstring)."""


@structref.register
class TileTableType(types.StructRef):
    pass


class TileTable(structref.StructRefProxy):
    """The pixel table of one call configuration of :func:`bconv_fast` (opaque in Python)."""


structref.define_boxing(FastConvType, FastConv)
structref.define_boxing(TileTableType, TileTable)
_I64A = types.Array(types.int64, 1, "C")
FAST_CONV = FastConvType([("wt", types.Array(types.uint64, 1, "C")), ("soff", _I64A),
                          ("nv", types.int64), ("groups", types.int64), ("wg", types.int64),
                          ("t", types.int64), ("o", types.int64), ("corr", _I64A),
                          ("epi", EPILOGUE)])
TILE_TABLE = TileTableType([("tpix", _I64A), ("tout", _I64A), ("tcor", _I64A), ("tm", _I64A),
                            ("tborder", types.Array(types.boolean, 1, "C")),
                            ("nchunks", types.int64), ("tbits", _I64A)])


@njit(cache=True)
def make_conv(wt, soff, nv, groups, wg, t, o, corr, epi):
    """:class:`FastConv` of weight tiles ``wt`` (``NV`` = ``nv`` vectors of 8 lanes, ``t`` tiles per
    group), step offsets ``soff``, ``groups``, ``wg`` words per group, ``o`` output channels, the
    padding correction ``corr`` and the :class:`~refbnn.kernels.epilogue.Epilogue` ``epi``."""
    c = structref.new(FAST_CONV)
    c.wt, c.soff, c.nv, c.groups, c.wg, c.t, c.o, c.corr, c.epi = \
        wt, soff, nv, groups, wg, t, o, corr, epi
    return c


@njit(cache=True)
def make_table(tpix, tout, tcor, tm, tborder, nchunks, tbits):
    """:class:`TileTable` of the module docstring's arrays and worker count."""
    t = structref.new(TILE_TABLE)
    t.tpix, t.tout, t.tcor, t.tm, t.tborder, t.nchunks = tpix, tout, tcor, tm, tborder, nchunks
    t.tbits = tbits
    return t


@njit(cache=True, parallel=True)
def bconv_fast(xp, conv, table, out, residual, bits):
    epi = conv.epi
    mode, K, O, G, Wg, T, nv = epi.mode, epi.k, conv.o, conv.groups, conv.wg, conv.t, conv.nv
    corr, mul, bias, off = conv.corr, epi.mul, epi.bias, epi.off
    thr, dirn, oword, obit, run8 = epi.thr, epi.dirn, epi.oword, epi.obit, epi.run8
    tpix, tout, tcor, tm, tborder = table.tpix, table.tout, table.tcor, table.tm, table.tborder
    nchunks, owords, tbits = table.nchunks, epi.owords, table.tbits
    fmode = FLOAT if mode == FUSED else mode  # FUSED starts from the FLOAT output
    z = out.view(np.float32)  # the float output (every output is a whole number of 4 bytes)
    ntiles = tm.shape[0]
    nsteps = conv.soff.shape[0]
    to = 8 * nv
    og = O // G
    wstep = nsteps * to
    a_xp, a_wt, a_soff, a_out = xp.ctypes.data, conv.wt.ctypes.data, conv.soff.ctypes.data, \
        out.ctypes.data
    a_flip, a_pct, a_dirn, a_thr = epi.pcflip.ctypes.data, epi.pcthr.ctypes.data, \
        dirn.ctypes.data, thr.ctypes.data
    a_pix, a_tout, a_cor, a_corr = tpix.ctypes.data, tout.ctypes.data, tcor.ctypes.data, \
        corr.ctypes.data
    for ch in prange(nchunks):
        acc = np.empty(MR * to, np.int64)
        a_acc = acc.ctypes.data
        for ti in range(ch * ntiles // nchunks, (ch + 1) * ntiles // nchunks):
            m = tm[ti]
            s0 = ti * MR
            border = tborder[ti]
            if mode == BITS:
                for i in range(m):
                    for k in range(owords):
                        a_store(a_out, tout[s0 + i] + k, np.uint64(0))
            a_tp, a_to, a_tc = a_pix + 8 * s0, a_tout + 8 * s0, a_cor + 8 * s0
            for g in range(G):
                for t in range(T):
                    wbase = (g * T + t) * wstep
                    o0 = g * og + t * to
                    nl = min(to, og - t * to)
                    tmode = TILE_SCRATCH
                    shift = 0
                    ooff = o0
                    a_t1, a_t2 = a_flip, a_pct
                    if mode == INT32 and nl == to:
                        tmode = TILE_INT32_CORR if border else TILE_INT32
                    elif mode == BITS and nl == to and oword[o0 + to - 1] == oword[o0] \
                            and obit[o0 + to - 1] == obit[o0] + to - 1:
                        tmode = TILE_BITS_CORR if border else TILE_BITS
                        shift = obit[o0]
                        ooff = oword[o0]
                        if border:
                            a_t1, a_t2 = a_dirn, a_thr
                    tile(nv, m, a_xp, a_tp, g * Wg, a_wt, wbase, a_soff, nsteps, a_acc, a_out,
                         a_to, ooff, K, tmode, a_t1, a_t2, o0, shift, a_corr, a_tc)
                    if tmode != TILE_SCRATCH:
                        continue
                    # the epilogue reads the scratch popcounts: whole 8-lane groups as vectors
                    # (K - 2*pc + corr, then the output mode), the other lanes scalar
                    l0 = 8 * (nl // 8)
                    for i in range(m):
                        cbase = tcor[s0 + i]
                        pborder = cbase != 0
                        obase = tout[s0 + i]
                        for l in range(0, l0, 8):
                            o = o0 + l
                            pc = v8_load(acc, i * to + l)
                            cv = v8_load(corr, cbase + o) if pborder else v8_zero()
                            if mode == INT32:
                                v8_store_i32(a_out, obase + o, pc, K, cv)
                            elif fmode == FLOAT or fmode == FLOAT_LCE:
                                v8_store_f32(a_out, obase + o, pc, K, cv, mul,
                                             bias if fmode == FLOAT else off, o, fmode == FLOAT_LCE)
                            else:  # bits: a vector compare, then one OR per 8-bit run
                                b8 = v8_threshold_bits(pc, K, cv, v8_load(dirn, o), v8_load(thr, o))
                                if run8[o]:
                                    a_or_u64(a_out, obase + oword[o], b8 << np.uint64(obit[o]))
                                else:
                                    for j in range(8):
                                        if (b8 >> np.uint64(j)) & np.uint64(1):
                                            a_or_u64(a_out, obase + oword[o + j],
                                                     np.uint64(1) << np.uint64(obit[o + j]))
                        for l in range(l0, nl):
                            o = o0 + l
                            a = K - 2 * acc[i * to + l]
                            if pborder:
                                a += corr[cbase + o]
                            if mode == INT32:
                                a_store(a_out, obase + o, np.int32(a))
                            elif mode == BITS:
                                if bit_output(a, dirn[o], thr[o]):
                                    a_or_u64(a_out, obase + oword[o],
                                             np.uint64(1) << np.uint64(obit[o]))
                            else:
                                a_store(a_out, obase + o,
                                        float_output(a, K, fmode, mul[o], bias[o], off[o]))
            if mode == FUSED:
                fuse_pixels(z, tout, tbits, s0, s0 + m, residual, bits, epi)
