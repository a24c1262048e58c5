"""Fast binary 2-D convolution: register-blocked ``<8 x i64>`` XOR-popcount on padded packed NHWC
(micro-kernels of the host's family, wide or narrow: :mod:`refbnn.kernels.bconv_tiles`).

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
  ``(N, OH, OW, rsc)`` (``rsc`` channels, repeated across the ``O`` outputs; ``rsc = 0``: no
  residual), which may be the float output itself (each element is read before it is written) but
  must not overlap it otherwise; ``bits``, a flat ``uint64`` buffer as for ``BITS``, pixel words at
  ``table.tbits`` (for the other modes ``tbits`` is ``tout``). The fused epilogue runs on each
  tile's popcounts, 16 lanes at a time: for 32-lane tiles (a group's last one may be partial:
  masked to its channels) with a residual in the output's layout (or none) and aligned sign units
  in the micro-kernel's registers (:data:`~refbnn.kernels.epilogue.TILE_FUSED`),
  else from the scratch popcounts (:func:`~refbnn.kernels.epilogue.fuse_tile`), the same float32
  steps; where every tile's channels are one byte-aligned run of the packed layout
  (``conv.tunit``) each tile stores its sign bits as one integer, else each pixel is packed from
  its float result after its last channel tile (:func:`~refbnn.kernels.elementwise.pack_pixel`).

Entry points: :func:`bconv_fast` (one call, ``prange`` over ``table.nchunks`` workers, pixel-major)
and :func:`conv_items` (a range of work items on the calling thread, pixel-major or channel-major;
the engine's whole-network executor splits a layer over threads with it).

Per output value ``acc = K - 2*popcount + corr`` then the epilogue; the micro-kernels
(:mod:`refbnn.kernels.bconv_tiles`) finish whole tiles themselves where they can (int32, the fused
epilogue, or bits that fill one word run), otherwise this module's vector and scalar epilogue does.
Where tiles write outputs of their own, one micro-kernel call computes a run of consecutive pixel
tiles of one channel tile (the per-tile bookkeeping paid once per run: at Bi-Real-18's layer1,
1046 tiles of nine steps, it cost about a fifth of the conv).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.experimental import structref

from .bconv_tiles import tile
from .elementwise import pack_pixel
from .epilogue import (
    BITS,
    EPILOGUE,
    FLOAT,
    FLOAT_LCE,
    FP_NL,
    FP_SIZE,
    FUSED,
    INT32,
    TILE_BITS,
    TILE_BITS_CORR,
    TILE_FUSED,
    TILE_FUSED_CORR,
    TILE_FUSED_PART,
    TILE_FUSED_PART_CORR,
    TILE_INT32,
    TILE_INT32_CORR,
    TILE_SCRATCH,
    bit_output,
    float_output,
    fuse_tile,
    fused_block,
    v8_store_f32,
    v8_store_i32,
    v8_threshold_bits,
)
from .simd import a_or_u64, a_store, v8_load, v8_zero
from .sync import borrowed

MR = 6  # pixels per tile; bconv_tiles holds kernels for 1..MR
#: Pixel tiles per band (0: all): every channel tile runs over a band before the next band
#: starts, so that the band's outputs and residual stay in cache.
BAND = 32

# Numba's cache does not notice edits to imported kernels; this digest of the modules this one
# imports, transitively (written by ``python refbnn/kernels/_codegen.py``), forces a recompile.
DEPS_DIGEST = "65480942e00df20c"


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
                          ("epi", EPILOGUE), ("tunit", _I64A), ("tzero", _I64A)])
TILE_TABLE = TileTableType([("tpix", _I64A), ("tout", _I64A), ("tcor", _I64A), ("tm", _I64A),
                            ("tborder", types.Array(types.boolean, 1, "C")),
                            ("nchunks", types.int64), ("tbits", _I64A)])


@njit(cache=True)
def make_conv(wt, soff, nv, groups, wg, t, o, corr, epi, tunit, tzero):
    """:class:`FastConv` of weight tiles ``wt`` (``NV`` = ``nv`` vectors of 8 lanes, ``t`` tiles per
    group), step offsets ``soff``, ``groups``, ``wg`` words per group, ``o`` output channels, the
    padding correction ``corr``, the :class:`~refbnn.kernels.epilogue.Epilogue` ``epi`` and, for
    :data:`FUSED`, the packed-sign layout of the tiles: ``tunit[g * t + j]`` the byte offset in an
    output pixel's words of tile ``j`` of group ``g``'s ``8 * nv`` sign bits (``nv`` bytes), all
    ``>= 0`` when every tile's channels are exactly such a unit of the layout, else ``[-1]``;
    ``tzero`` pairs ``(byte offset, count)`` of the pixel's bytes no tile writes (zeroed)."""
    c = structref.new(FAST_CONV)
    c.wt, c.soff, c.nv, c.groups, c.wg, c.t, c.o, c.corr, c.epi = \
        wt, soff, nv, groups, wg, t, o, corr, epi
    c.tunit, c.tzero = tunit, tzero
    return c


@njit(cache=True)
def make_table(tpix, tout, tcor, tm, tborder, nchunks, tbits):
    """:class:`TileTable` of the module docstring's arrays and worker count."""
    t = structref.new(TILE_TABLE)
    t.tpix, t.tout, t.tcor, t.tm, t.tborder, t.nchunks = tpix, tout, tcor, tm, tborder, nchunks
    t.tbits = tbits
    return t


# Reading an array field of a structref costs a reference-count round trip (two calls into Numba's
# runtime, each an atomic update); the per-tile code read about twenty of them, which at Bi-Real-18's
# layer1 (nine steps per tile) cost as much as the popcounts themselves. So a call reads the
# records' fields once (:func:`_run`) and hands them to :func:`_tiles` as plain arguments.

@njit(cache=True, inline="always")
def _zero_uncovered(tzero, tm, tbits, ti, a_bits):
    if tzero.shape[0] == 0:
        return
    s0 = ti * MR
    for i in range(tm[ti]):
        base = a_bits + 8 * tbits[s0 + i]
        for z in range(0, tzero.shape[0], 2):
            for b in range(tzero[z + 1]):
                a_store(base + tzero[z], b, np.uint8(0))


@njit(cache=True)
def _tiles(xp, i0, i1, channel_major, out, residual, rsc, bits, acc, rtmp,
           wt, soff, nv, groups, wg, T, O, corr, tunit, tzero, tpix, tout, tcor, tm, tborder, tbits,
           mode, K, mul, bias, off, thr, dirn, pcflip, pcthr, oword, obit, run8, owords,
           pre, pre_pos, pre_neg, post, post_pos, post_neg, nonpos, ogroups, regs, band):
    """:func:`conv_items` on the records' fields (see the comment above): item ``it`` is pixel
    tile ``it`` with all its channel tiles, or (``channel_major``) channel tile ``it // ntiles``
    of pixel tile ``it % ntiles``; each ``m x 8*NV`` tile (pixel tile ``ti``, channel tile
    ``gt = g * T + t``) in any mode.

    Where every tile writes outputs of its own (not :data:`BITS`, whose tiles share words, nor
    :data:`FUSED` packing whole pixels), the work runs as *segments*, one channel tile over a range
    of pixel tiles (pixel-major items: the range ``i0 .. i1 - 1`` for each channel tile in turn),
    and a micro-kernel call computes a whole run of tiles of equal size that it finishes in
    registers (:data:`TILE_INT32`, :data:`TILE_FUSED`, with or without the correction), so the
    per-tile bookkeeping here is paid once per run; otherwise one segment per (pixel tile,
    channel tile), pixel-major. The same values either way: each output element is written once,
    from the same popcounts."""
    ntiles = tm.shape[0]
    fused = mode == FUSED
    aligned = tunit[0] >= 0
    a_out = out.ctypes.data
    a_bits = bits.ctypes.data
    # what the per-tile code hands to inlined functions, as views without reference counting
    z = borrowed(out.view(np.float32))
    corr, tcor, tout, tbits, residual = borrowed(corr), borrowed(tcor), borrowed(tout), \
        borrowed(tbits), borrowed(residual)
    rtmp, acc, bits, tzero, tm = borrowed(rtmp), borrowed(acc), borrowed(bits), borrowed(tzero), \
        borrowed(tm)
    mul, bias, off = borrowed(mul), borrowed(bias), borrowed(off)
    pre_pos, pre_neg, post_pos, post_neg = borrowed(pre_pos), borrowed(pre_neg), \
        borrowed(post_pos), borrowed(post_neg)
    fmode = FLOAT if mode == FUSED else mode
    # the fused epilogue in the micro-kernel's registers: 32-lane tiles (whole or a group's last,
    # partial one) whose signs are one aligned 32-bit unit and a residual in the output's own
    # layout (or none); else TILE_SCRATCH
    regs = regs and fused and aligned and nv == 4 and (rsc == 0 or rsc == O)
    fpar = np.empty(FP_SIZE, np.int64)
    if regs:
        fused_block(fpar, mul, bias, pre, pre_pos, pre_neg, post, post_pos, post_neg, residual,
                    rsc, nonpos, bits)
    to = 8 * nv
    og = O // groups
    nsteps = soff.shape[0]
    wstep = nsteps * to
    gts = groups * T
    runs = channel_major or (mode != BITS and (not fused or aligned))
    if i1 <= i0:
        return
    # segments: channel tiles over bands of pixel tiles (a part of the channel-major items: over
    # the pixel tiles of each channel tile in the part), or channel tiles of one pixel tile
    part = channel_major and (i0 > 0 or i1 < gts * ntiles)
    p0, p1 = (0, ntiles) if channel_major else (i0, i1)
    bw = p1 - p0 if band <= 0 else band
    if part:
        gt0 = i0 // ntiles
        nseg = (i1 - 1) // ntiles + 1 - gt0
    elif runs:
        gt0, nseg = 0, -(-(p1 - p0) // bw) * gts
    else:
        gt0, nseg = 0, (i1 - i0) * gts
    a_tpix, a_tout, a_tcor, a_tbits = tpix.ctypes.data, tout.ctypes.data, tcor.ctypes.data, \
        tbits.ctypes.data
    a_wt, a_soff, a_corr, a_fp, a_bord = wt.ctypes.data, soff.ctypes.data, corr.ctypes.data, \
        fpar.ctypes.data, tborder.ctypes.data
    for sg in range(nseg):
        if part:  # channel tile gt over its pixel tiles within i0 .. i1 - 1
            gt = gt0 + sg
            ta = max(i0 - gt * ntiles, 0)
            tb = min(i1 - gt * ntiles, ntiles)
        elif runs:  # band sg // gts, channel tile sg % gts
            bi = sg // gts
            gt = sg - bi * gts
            ta = p0 + bi * bw
            tb = min(ta + bw, p1)
        else:  # pixel tile ti, its channel tiles in turn
            ti = i0 + sg // gts
            gt = sg - (sg // gts) * gts
            ta, tb = ti, ti + 1
            if mode == BITS and gt == 0:  # the tile's output words start cleared
                s0 = ti * MR
                for i in range(tm[ti]):
                    for k in range(owords):
                        a_store(a_out, tout[s0 + i] + k, np.uint64(0))
        g = gt // T
        t = gt - g * T
        wbase = gt * wstep
        o0 = g * og + t * to
        nl = min(to, og - t * to)
        if fused and aligned and gt == 0:
            for ti in range(ta, tb):
                _zero_uncovered(tzero, tm, tbits, ti, a_bits)
        # a mode the micro-kernel finishes for whole runs (-1: none)
        rmode, rcorr, shift = -1, -1, 0
        if mode == INT32 and nl == to:
            rmode, rcorr = TILE_INT32, TILE_INT32_CORR
        elif regs and nl == to:
            rmode, rcorr, shift = TILE_FUSED, TILE_FUSED_CORR, tunit[gt]
        elif regs:  # a group's last, partial tile: the kernel masks to its nl lanes
            rmode, rcorr, shift = TILE_FUSED_PART, TILE_FUSED_PART_CORR, tunit[gt]
            fpar[FP_NL] = nl
        ti = ta
        while ti < tb:
            m = tm[ti]
            s0 = ti * MR
            if rmode >= 0:
                e = ti + 1
                while e < tb and tm[e] == m:
                    e += 1
                tile(nv, m, xp.ctypes.data, a_tpix + 8 * s0, g * wg, a_wt, wbase, a_soff, nsteps,
                     acc.ctypes.data, a_out, a_tout + 8 * s0, o0, K, rmode, np.uint64(0),
                     np.uint64(0), o0, shift, a_corr, a_tcor + 8 * s0, a_fp, a_tbits + 8 * s0,
                     e - ti, a_bord + ti, rcorr)
                ti = e
                continue
            border = tborder[ti]
            tmode = TILE_SCRATCH
            bshift = 0
            ooff = o0
            a_t1, a_t2 = pcflip.ctypes.data, pcthr.ctypes.data
            if mode == BITS and nl == to and oword[o0 + to - 1] == oword[o0] \
                    and obit[o0 + to - 1] == obit[o0] + to - 1:
                tmode = TILE_BITS_CORR if border else TILE_BITS
                bshift = obit[o0]
                ooff = oword[o0]
                if border:
                    a_t1, a_t2 = dirn.ctypes.data, thr.ctypes.data
            tile(nv, m, xp.ctypes.data, a_tpix + 8 * s0, g * wg, a_wt, wbase, a_soff, nsteps,
                 acc.ctypes.data, a_out, a_tout + 8 * s0, ooff, K, tmode, a_t1, a_t2, o0, bshift,
                 a_corr, a_tcor + 8 * s0, a_fp, a_tbits + 8 * s0, np.int64(1), np.int64(0),
                 tmode)
            ti += 1
            if tmode != TILE_SCRATCH:
                continue
            if mode == FUSED:
                unit = tunit[gt] if aligned else -1
                fuse_tile(acc, to, m, nl, o0, s0, K, corr, tcor, z, tout, residual, rsc, rtmp,
                          a_bits, tbits, unit, nv, mul, bias, pre, pre_pos, pre_neg, post,
                          post_pos, post_neg, nonpos)
                continue
            # the other modes read the scratch popcounts: whole 8-lane groups as vectors
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
                            a_or_u64(a_out, obase + oword[o], np.uint64(1) << np.uint64(obit[o]))
                    else:
                        a_store(a_out, obase + o,
                                float_output(a, K, fmode, mul[o], bias[o], off[o]))
        if fused and not aligned and not runs and gt == gts - 1:
            s0 = ta * MR
            ogo = O // ogroups
            for i in range(tm[ta]):
                pack_pixel(z, tout[s0 + i], ogroups, ogo, (ogo + 63) // 64, bits, tbits[s0 + i],
                           nonpos)


@njit(cache=True, inline="always")
def _run(xp, conv, table, i0, i1, channel_major, out, residual, rsc, bits, acc, rtmp, regs, band):
    """Items ``i0 .. i1 - 1`` (pixel tiles, or channel-major items): the fields read once.

    The scalars go to :func:`_tiles` as plain ``int64``/``bool`` (a constant would reach it as a
    Numba literal type, and each literal is another compilation of the whole micro-kernel tree)."""
    epi = conv.epi
    _tiles(xp, np.int64(i0), np.int64(i1), np.bool_(channel_major), out, residual, np.int64(rsc),
           bits, acc, rtmp,
           conv.wt, conv.soff, conv.nv, conv.groups, conv.wg, conv.t, conv.o, conv.corr,
           conv.tunit, conv.tzero, table.tpix, table.tout, table.tcor, table.tm, table.tborder,
           table.tbits, epi.mode, epi.k, epi.mul, epi.bias, epi.off, epi.thr, epi.dirn,
           epi.pcflip, epi.pcthr, epi.oword, epi.obit, epi.run8, epi.owords, epi.pre, epi.pre_pos,
           epi.pre_neg, epi.post, epi.post_pos, epi.post_neg, epi.saz == -1, epi.groups,
           np.bool_(regs), np.int64(band))


def fused_in_registers(out_channels: int, groups: int, aligned: bool, rsc: int) -> bool:
    """Whether :func:`conv_items` finishes every tile of a :data:`FUSED` call in the micro-kernel's
    registers (:data:`~refbnn.kernels.epilogue.TILE_FUSED`): sign units aligned
    (``BConv2DPlan.fused_units_aligned``), 32-lane tiles (more than 8 channels per group; a
    group's last tile may be partial, masked) and a residual of ``rsc`` = ``out_channels``
    channels or none (``rsc = 0``)."""
    return bool(aligned) and out_channels // groups > 8 and rsc in (0, out_channels)


def acc_scratch():
    """The int64 popcount scratch one worker of :func:`conv_items` needs (``MR * 32 + 16``)."""
    return np.empty(MR * 32 + 16, np.int64)


@njit(cache=True)
def items(conv, table, channel_major):
    """How many work items :func:`conv_items` splits a call into: pixel tiles, or (channel tile,
    pixel tile) pairs when ``channel_major``."""
    ntiles = table.tm.shape[0]
    return ntiles * conv.groups * conv.t if channel_major else ntiles


@njit(cache=True)
def conv_items(xp, conv, table, i0, i1, channel_major, out, residual, rsc, bits, acc, rtmp,
               regs, band):
    """Work items ``i0 .. i1 - 1`` of one call (see :func:`items`), on the calling thread.

    ``channel_major`` (item ``it`` = channel tile ``it // ntiles`` of pixel tile
    ``it % ntiles``: one weight tile serves a run of pixel tiles; every item writes its own
    output, so items may run on different threads): modes ``INT32``, ``FLOAT``, ``FLOAT_LCE``, and
    ``FUSED`` with aligned sign units (``conv.tunit``); otherwise pixel tiles. Arguments as for
    :func:`bconv_fast`, plus ``rsc`` (the residual's channels per pixel, repeated across the
    output's ``O``; 0: none), ``acc`` (:func:`acc_scratch`) and ``rtmp`` (float32 scratch of 16).
    ``regs`` (normally ``True``; ``False``: the fused epilogue always through the scratch
    popcounts, :func:`~refbnn.kernels.epilogue.fuse_tile`, never in the micro-kernel's registers,
    :data:`~refbnn.kernels.epilogue.TILE_FUSED`; the same values, tests compare the two) and
    ``band`` (normally :data:`BAND`) have no defaults: every caller passes the same argument types,
    so the kernel tree compiles once (an omitted argument is a type of its own to Numba).
    """
    _run(xp, conv, table, i0, i1, channel_major, out, residual, rsc, bits, acc, rtmp, regs, band)


@njit(cache=True, parallel=True)
def bconv_fast(xp, conv, table, out, residual, rsc, bits):
    """The whole call on ``table.nchunks`` workers, each a contiguous run of pixel tiles."""
    ntiles = table.tm.shape[0]
    nchunks = table.nchunks
    for ch in prange(nchunks):
        acc = np.empty(MR * 32 + 16, np.int64)
        rtmp = np.empty(16, np.float32)
        _run(xp, conv, table, ch * ntiles // nchunks, (ch + 1) * ntiles // nchunks, False, out,
             residual, rsc, bits, acc, rtmp, True, BAND)
