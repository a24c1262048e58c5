"""Portable binary 2-D convolution: scalar XOR-popcount loops, exact on any CPU Numba targets.

No vector types, no physical padding: each tap is bounds-checked and padded taps are skipped.
:func:`bconv_portable` reads a :class:`PortableConv` that ``refbnn.ops.plan.BConv2DPlan`` builds
once per layer (:func:`make_conv`); layouts (flat ``uint64``):

* ``x``: packed NHWC ``(N, H, W, G, Wg)``, group ``g``'s ``Cg`` channels from bit 0 of word ``g*Wg``;
* ``conv.wt``: packed weights ``(KH, KW, Wg, O)`` (output channel innermost, so the loop over output
  channels vectorizes), ``o`` in group ``o // (O / G)``;
* ``conv.corr``: the padding correction ``(nrc, ncc, O)`` for skipped taps (read as 0;
  :mod:`refbnn.kernels.padding`), ``conv.rc``/``conv.cc`` the border class of each output row/column.

``acc[p*O + o] = sum over in-bounds taps (Cg - 2*popcount(x XOR w)) + corr[rc[oh], cc[ow], o]``,
``p = (n*OH + oh)*OW + ow``; input row of tap ``kh`` is ``oh*sh + kh*dh - pt``. The output
transform is a second pass, :func:`epilogue_pass` (:mod:`refbnn.kernels.epilogue`).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.experimental import structref

from .epilogue import BITS, FLOAT, FUSED, bit_output, float_output, fuse_pixel
from .simd import a_or_u64, a_store, popcount64

# Numba's cache does not notice edits to imported kernels; this digest of the modules this one
# imports, transitively (written by ``python refbnn/kernels/_codegen.py``), forces a recompile.
DEPS_DIGEST = "e8beb6f94fa27b22"


@structref.register
class PortableConvType(types.StructRef):
    pass


class PortableConv(structref.StructRefProxy):
    """One layer prepared for :func:`bconv_portable` (opaque in Python; module docstring)."""


structref.define_boxing(PortableConvType, PortableConv)
_I64A = types.Array(types.int64, 1, "C")
PORTABLE_CONV = PortableConvType([
    ("wt", types.Array(types.uint64, 1, "C")), ("h", types.int64), ("w", types.int64),
    ("groups", types.int64), ("wg", types.int64), ("cg", types.int64), ("o", types.int64),
    ("kh", types.int64), ("kw", types.int64), ("sh", types.int64), ("sw", types.int64),
    ("dh", types.int64), ("dw", types.int64), ("pt", types.int64), ("pl", types.int64),
    ("oh", types.int64), ("ow", types.int64), ("rc", _I64A), ("cc", _I64A), ("ncc", types.int64),
    ("corr", _I64A)])


@njit(cache=True)
def make_conv(wt, h, w, groups, wg, cg, o, kh, kw, sh, sw, dh, dw, pt, pl, oh, ow, rc, cc, ncc,
              corr):
    """:class:`PortableConv`: weights ``wt``, input ``h x w``, ``groups`` of ``cg`` channels in
    ``wg`` words, ``o`` outputs, kernel ``kh x kw``, stride, dilation, top/left padding, output
    ``oh x ow``, border classes ``rc``/``cc`` (``ncc`` column classes) and the correction ``corr``."""
    c = structref.new(PORTABLE_CONV)
    c.wt, c.h, c.w, c.groups, c.wg, c.cg, c.o = wt, h, w, groups, wg, cg, o
    c.kh, c.kw, c.sh, c.sw, c.dh, c.dw, c.pt, c.pl = kh, kw, sh, sw, dh, dw, pt, pl
    c.oh, c.ow, c.rc, c.cc, c.ncc, c.corr = oh, ow, rc, cc, ncc, corr
    return c


@njit(cache=True, parallel=True)
def bconv_portable(x, n, conv, out_i32):
    """``out_i32`` (int32, flat ``(n, OH, OW, O)``) = the accumulators of the module docstring."""
    H, W, G, Wg, Cg, O = conv.h, conv.w, conv.groups, conv.wg, conv.cg, conv.o
    KH, KW, sh, sw, dh, dw = conv.kh, conv.kw, conv.sh, conv.sw, conv.dh, conv.dw
    pt, pl, OH, OW = conv.pt, conv.pl, conv.oh, conv.ow
    wt, rc, cc, ncc, corr = conv.wt, conv.rc, conv.cc, conv.ncc, conv.corr
    og = O // G
    for q in prange(n * OH):  # one output row per iteration
        b = q // OH
        oh = q - b * OH
        pc = np.empty(O, np.int64)
        for ow in range(OW):
            pc[:] = 0
            taps_in = 0
            for kh in range(KH):
                ih = oh * sh + kh * dh - pt
                for kw in range(KW):
                    iw = ow * sw + kw * dw - pl
                    if 0 <= ih < H and 0 <= iw < W:
                        taps_in += 1
                        xb = ((b * H + ih) * W + iw) * G * Wg
                        for g in range(G):
                            for c in range(Wg):
                                xv = x[xb + g * Wg + c]
                                wb = ((kh * KW + kw) * Wg + c) * O
                                for o in range(g * og, (g + 1) * og):  # contiguous: vectorizes
                                    pc[o] += popcount64(xv ^ wt[wb + o])
            base = ((b * OH + oh) * OW + ow) * O
            cb = (rc[oh] * ncc + cc[ow]) * O
            for o in range(O):
                out_i32[base + o] = taps_in * Cg - 2 * pc[o] + corr[cb + o]


@njit(cache=True, parallel=True)
def epilogue_pass(acc, O, epi, pout, out, residual, rsc, bits, pbits):
    """Apply the output transform ``epi`` (any :class:`~refbnn.kernels.epilogue.Epilogue` but
    ``INT32``) to int32 ``acc`` (flat ``(P, O)``). ``out``: the output array's bytes (``uint8``,
    flat); pixel ``p``'s outputs start at element ``pout[p]`` of it read as float32 (float modes)
    or uint64 (bits: its ``owords`` words are overwritten). ``FUSED`` only (else empty):
    ``residual`` (float32 ``(P, rsc)``, its channels repeated across ``O``; ``rsc = 0``: none;
    it may be the float output itself) and ``bits`` (flat uint64, pixel ``p``'s
    words from ``pbits[p]``)."""
    mode, K = epi.mode, epi.k
    mul, bias, off, thr, dirn = epi.mul, epi.bias, epi.off, epi.thr, epi.dirn
    oword, obit, owords = epi.oword, epi.obit, epi.owords
    fmode = FLOAT if mode == FUSED else mode  # FUSED starts from the FLOAT output
    z = out.view(np.float32)  # the float output (every output is a whole number of 4 bytes)
    a_out = out.ctypes.data
    for p in prange(pout.shape[0]):
        ob = pout[p]
        if mode == BITS:
            for k in range(owords):
                a_store(a_out, ob + k, np.uint64(0))
            for o in range(O):
                if bit_output(np.int64(acc[p * O + o]), dirn[o], thr[o]):
                    a_or_u64(a_out, ob + oword[o], np.uint64(1) << np.uint64(obit[o]))
        elif mode == FUSED:
            y = np.empty(O, np.float32)
            for o in range(O):
                y[o] = float_output(np.int64(acc[p * O + o]), K, FLOAT, mul[o], bias[o], off[o])
            fuse_pixel(y, z, ob, residual, rsc, bits, pbits[p], epi)
        else:
            for o in range(O):
                a_store(a_out, ob + o, float_output(np.int64(acc[p * O + o]), K, fmode, mul[o],
                                                    bias[o], off[o]))
