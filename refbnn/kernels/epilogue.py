"""The output transform (epilogue) of a binary convolution: its one definition for every path.

``docs/semantics.md`` (sections 5 and 6) states the meaning; ``refbnn.reference.output_transform``,
``output_transform_lce`` and ``threshold_output`` are the independent oracle. This module holds
everything else about it: the parameters (:class:`Epilogue`, derived once per layer by
:func:`prepare`), the scalar code of the portable path and of the fast path's odd lanes, and the
``<8 x i64>`` intrinsics of the fast path and of the generated micro-kernels
(:mod:`refbnn.kernels.bconv_tiles`).

Every path first forms the accumulator of output channel ``o`` at one output pixel,
``a = K - 2 * pc + corr`` (``pc``: popcount of ``x XOR w`` over the taps the kernel read; ``corr``:
the padding correction of :mod:`refbnn.kernels.padding`; ``K = KH * KW * Cg``), then applies the
output mode:

* :data:`INT32`: ``int32(a)``;
* :data:`FLOAT`: ``float32(float32(a) * mul[o]) + bias[o]``, two roundings, multiply first, never
  fused (no fast-math flags anywhere);
* :data:`FLOAT_LCE`: ``float32(float32(2) * float32((K - a) >> 1) * (-mul[o])) + off[o]`` with
  ``off = float32(double(bias) + K * double(mul))`` (LCE's order; ``>> 1`` floors);
* :data:`BITS`: the packed sign of the :data:`FLOAT` output under ``sign_at_zero``, as the integer
  test ``a * dirn[o] < thr[o]`` (:func:`thresholds`); set as bit ``obit[o]`` of word ``oword[o]`` of
  the pixel's ``owords`` output words (``out_groups`` groups, each from bit 0 of its first word).
  Without a padding correction the same test reads ``(pc ^ pcflip[o]) > pcthr[o]`` on the popcount
  itself; ``run8[o]`` marks channels ``o .. o + 7`` that are consecutive bits of one word;
* :data:`FUSED` (a residual block's tail): ``y = FLOAT``, then
  ``z = post(pre(y) + residual)`` with the non-linearities ``pre``/``post`` of
  :func:`refbnn.kernels.elementwise.act` (per-channel slopes ``pre_pos``/``pre_neg``,
  ``post_pos``/``post_neg``), each step one float32 rounding; writes the float32 ``z`` and its
  packed sign under ``sign_at_zero`` (``z < 0``, or ``not z > 0`` for -1; bit positions as for
  :data:`BITS`): the residual stream and the next binary layer's input in one pass, with the
  engine's per-pixel merge and pack (:func:`~refbnn.kernels.elementwise.merge_pixel`,
  :func:`~refbnn.kernels.elementwise.pack_pixel`).

A micro-kernel finishes its ``m x 8*NV`` block itself in one of the tile modes :data:`TILE_INT32`,
:data:`TILE_INT32_CORR`, :data:`TILE_BITS`, :data:`TILE_BITS_CORR`, :data:`TILE_FUSED`,
:data:`TILE_FUSED_CORR` (:func:`fuse16`, the same float32 steps as :func:`fuse_tile` on the
accumulators in registers), :data:`TILE_FUSED_PART`, :data:`TILE_FUSED_PART_CORR` (the same for a
group's last, partial tile, masked to its lanes), or leaves the popcounts in a scratch buffer
(:data:`TILE_SCRATCH`) for the caller's vector/scalar epilogue.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.experimental import structref
from numba.extending import intrinsic

from .elementwise import NONE, act16, merge_pixel, pack_pixel
from .fvec import (
    f16,
    f16_add,
    f16_affine_n,
    f16_fprelu,
    f16_load_n,
    f16_max,
    f16_prelu,
    f16_sign_bits,
    f16_store_n,
    f16_zero,
)
from .simd import V8, a_i64, a_store, addr_ptr, elem_ptr, splat, vec8

# Numba's cache does not notice edits to imported kernels; this digest of the modules this one
# imports, transitively (written by ``python refbnn/kernels/_codegen.py``), forces a recompile.
DEPS_DIGEST = "2189992595ae6801"

# output modes
INT32, FLOAT, FLOAT_LCE, BITS, FUSED = 0, 1, 2, 3, 4
MODES = {"int32": INT32, "float": FLOAT, "float_lce": FLOAT_LCE, "bits": BITS, "fused": FUSED}

# what a micro-kernel does with its popcounts
TILE_SCRATCH = 0      # store them to the int64 scratch buffer
TILE_INT32 = 1        # int32(K - 2*pc) to the output
TILE_BITS = 2         # packed bits from the popcount thresholds (no padding correction)
TILE_INT32_CORR = 3   # int32(K - 2*pc + corr)
TILE_BITS_CORR = 4    # packed bits from the accumulator thresholds, with the correction
TILE_FUSED = 5        # FUSED in registers (32-channel tiles): float32 out, residual, sign bits
TILE_FUSED_CORR = 6   # TILE_FUSED with the padding correction
TILE_FUSED_PART = 7   # TILE_FUSED of a group's last, partial tile: nl < 32 lanes, masked
TILE_FUSED_PART_CORR = 8  # TILE_FUSED_PART with the padding correction

#: Slots of the int64 parameter block of :data:`TILE_FUSED` (:func:`fused_block`): addresses of
#: the float32 ``mul``, ``bias``, slopes and residual (0: no residual) and of the uint64 bits
#: buffer, the non-linearity codes, ``nonpos`` (1 for ``sign_at_zero = -1``) and ``FP_NL``, the
#: channels of a partial tile (:data:`TILE_FUSED_PART`; the caller sets it per channel tile: a
#: group's last tile computes only its ``nl`` lanes, every load and store masked to them).
FP_MUL, FP_BIAS, FP_PRE, FP_PRE_POS, FP_PRE_NEG, FP_POST, FP_POST_POS, FP_POST_NEG, FP_RES, \
    FP_NONPOS, FP_BITS, FP_NL = range(12)
FP_SIZE = 12


# -- the parameters ---------------------------------------------------------------------------

@structref.register
class EpilogueType(types.StructRef):
    pass


class Epilogue(structref.StructRefProxy):
    """One layer's output-transform parameters, read by the Numba kernels (opaque in Python).

    Fields (see the module docstring): ``mode``, ``k``, ``mul``/``bias``/``off`` (float32, ``(O,)``),
    ``thr``/``dirn``/``pcflip``/``pcthr``/``oword``/``obit``/``run8`` (int64, ``(O,)``),
    ``owords``, and for :data:`FUSED` the non-linearities as
    codes ``pre``/``post`` with slopes ``pre_pos``/``pre_neg``/``post_pos``/``post_neg`` (float32
    ``(O,)``), ``saz`` and ``groups`` (output groups of the packed
    bits). Fields a mode does not read hold one element.
    """


structref.define_boxing(EpilogueType, Epilogue)
_F32A = types.Array(types.float32, 1, "C")
_I64A = types.Array(types.int64, 1, "C")
EPILOGUE = EpilogueType([("mode", types.int64), ("k", types.int64), ("mul", _F32A),
                         ("bias", _F32A), ("off", _F32A), ("thr", _I64A), ("dirn", _I64A),
                         ("pcflip", _I64A), ("pcthr", _I64A), ("oword", _I64A), ("obit", _I64A),
                         ("run8", _I64A), ("owords", types.int64), ("pre", types.int64),
                         ("pre_pos", _F32A), ("pre_neg", _F32A), ("post", types.int64),
                         ("post_pos", _F32A), ("post_neg", _F32A), ("saz", types.int64),
                         ("groups", types.int64)])


@njit(cache=True)
def _new_epilogue(mode, k, mul, bias, off, thr, dirn, pcflip, pcthr, oword, obit, run8, owords,
                  pre, pre_pos, pre_neg, post, post_pos, post_neg, saz, groups):
    e = structref.new(EPILOGUE)
    e.mode, e.k, e.owords = mode, k, owords
    e.mul, e.bias, e.off = mul, bias, off
    e.thr, e.dirn, e.pcflip, e.pcthr = thr, dirn, pcflip, pcthr
    e.oword, e.obit, e.run8 = oword, obit, run8
    e.pre, e.pre_pos, e.pre_neg, e.post, e.post_pos, e.post_neg = \
        pre, pre_pos, pre_neg, post, post_pos, post_neg
    e.saz, e.groups = saz, groups
    return e


def thresholds(mul, bias, k: int, sign_at_zero: int):
    """Integer thresholds equal to ``sign(float32(float32(acc) * mul) + bias)`` for every acc.

    Per output channel ``(thr, direction)`` (int64) such that, for every integer ``acc`` in
    ``[-k, k]``, ``acc * direction < thr`` exactly when the float output is negative
    (``sign_at_zero=+1``) or non-positive (``-1``), i.e. when the packed bit is 1. Built by
    evaluating the float32 transform on every integer in ``[-k, k]``; it is monotone in ``acc``
    (non-decreasing for ``mul > 0``, non-increasing for ``mul < 0``, constant for ``mul == 0``), so
    the bits form one run. ``mul``/``bias``: finite float32 ``(O,)``; ``0 <= k < 2**24``.
    """
    acc = np.arange(-k, k + 1, dtype=np.float32)[:, None]
    with np.errstate(over="ignore"):  # a huge multiplier may round the product to +-inf: fine
        y = (acc * mul).astype(np.float32) + bias
    neg = (y < 0) if sign_at_zero == 1 else (y <= 0)  # (2k+1, O): the packed bit for each acc
    ones = neg.sum(axis=0).astype(np.int64)
    prefix = np.arange(2 * k + 1)[:, None] < ones  # ones first, then zeros
    suffix = np.arange(2 * k + 1)[:, None] >= (2 * k + 1 - ones)
    is_prefix = (neg == prefix).all(axis=0)
    if not (is_prefix | (neg == suffix).all(axis=0)).all():  # pragma: no cover - monotone
        raise AssertionError("float output transform is not monotone in acc")
    direction = np.where(is_prefix, 1, -1).astype(np.int64)
    # prefix: bit iff acc < ones - k; suffix: bit iff acc > k - ones, i.e. -acc < ones - k
    return ones - k, direction


def bit_positions(out_channels: int, out_groups: int):
    """``(oword, obit, run8, owords)`` of the packed output: channel ``o`` of group
    ``g = o // Og`` is bit ``(o % Og) % 64`` of word ``g * Wg + (o % Og) // 64``."""
    og = out_channels // out_groups
    wg = -(-og // 64)
    ch = np.arange(out_channels)
    oword = ((ch // og) * wg + (ch % og) // 64).astype(np.int64)
    obit = ((ch % og) % 64).astype(np.int64)
    last = np.minimum(ch + 7, out_channels - 1)
    run8 = ((ch + 7 < out_channels) & (oword[last] == oword) & (obit[last] == obit + 7))
    return oword, obit, run8.astype(np.int64), out_groups * wg


_NO_F32 = np.zeros(1, np.float32)
_NO_I64 = np.zeros(1, np.int64)


def prepare(mode: int, k: int, out_channels: int, mul=None, bias=None, out_groups: int = 1,
            sign_at_zero: int = 1, pre=(NONE, None, None), post=(NONE, None, None)) -> Epilogue:
    """The :class:`Epilogue` of one layer (arguments already validated by ``refbnn.ops``):
    ``mul``/``bias`` C-contiguous finite float32 ``(O,)`` for every mode but :data:`INT32`;
    ``out_groups`` and ``sign_at_zero`` for :data:`BITS` and :data:`FUSED`; ``pre``/``post``
    ``(code, pos, neg)`` (float32 ``(O,)`` slopes, or ``None`` for codes without them) for
    :data:`FUSED`."""
    off = thr = dirn = pcflip = pcthr = oword = obit = run8 = None
    owords = 0
    if mode == FUSED:
        oword, obit, run8, owords = bit_positions(out_channels, out_groups)
    if mode == FLOAT_LCE:
        off = (bias.astype(np.float64) + k * mul.astype(np.float64)).astype(np.float32)
    elif mode == BITS:
        thr, dirn = thresholds(mul, bias, k, sign_at_zero)
        # the same test on pc = (K - acc) / 2: acc < thr  <=>  pc > (K - thr) // 2, and
        # -acc < thr  <=>  pc <= h = ceil((K + thr) / 2) - 1  <=>  ~pc > -h - 2
        up = dirn > 0
        h = -((-(k + thr)) // 2) - 1
        pcflip = np.where(up, 0, -1).astype(np.int64)
        pcthr = np.where(up, (k - thr) // 2, -h - 2).astype(np.int64)
        oword, obit, run8, owords = bit_positions(out_channels, out_groups)

    def f32(a):
        return _NO_F32 if a is None else a

    def i64(a):
        return _NO_I64 if a is None else a

    def slopes(a):  # codes without slopes (and modes without activations) read none
        return _NO_F32 if a is None else a

    return _new_epilogue(mode, k, f32(mul), f32(bias), f32(off), i64(thr), i64(dirn), i64(pcflip),
                         i64(pcthr), i64(oword), i64(obit), i64(run8), owords,
                         pre[0], slopes(pre[1]), slopes(pre[2]), post[0], slopes(post[1]),
                         slopes(post[2]), sign_at_zero, out_groups)


# -- scalar code ------------------------------------------------------------------------------

@njit(cache=True, inline="always")
def float_output(a, k, mode, m, b, off):
    """:data:`FLOAT`: ``float32(float32(a) * m) + b``; :data:`FLOAT_LCE`:
    ``float32(float32(2) * float32((k - a) // 2) * (-m)) + off``."""
    if mode == FLOAT:
        return np.float32(np.float32(a) * m) + b
    pc = (k - a) // 2
    return np.float32(np.float32(2) * np.float32(pc) * (-m)) + off


@njit(cache=True, inline="always")
def bit_output(a, dirn, thr):
    """:data:`BITS`: whether the packed output bit of accumulator ``a`` is 1 (the value is -1)."""
    return a * dirn < thr


@njit(cache=True)
def fuse_pixel(y, z, ob, residual, rsc, bits, bb, epi):
    """:data:`FUSED` of one output pixel whose :data:`FLOAT` values are ``y[0 : O]`` (float32
    scratch, overwritten): ``z[ob + o] = post(pre(y[o]) + residual[ob // O * rsc + o % rsc])``
    (``rsc`` residual channels per pixel, repeated; 0: no residual; ``residual`` may be ``z``
    itself) and the pixel's sign words at ``bits[bb ..]`` (flat uint64; ``epi.groups`` output groups
    of ``O / groups`` channels, each from bit 0 of its first word). The portable path's, per
    pixel."""
    o, groups, nonpos = epi.oword.shape[0], epi.groups, epi.saz == -1
    og = o // groups
    merge_pixel(y, 0, residual, (ob // o) * rsc, o, rsc, epi.pre, epi.pre_pos, epi.pre_neg,
                epi.post, epi.post_pos, epi.post_neg)
    z[ob:ob + o] = y[:o]
    pack_pixel(z, ob, groups, og, (og + 63) // 64, bits, bb, nonpos)


@njit(cache=True, inline="always")
def fuse_tile(acc, to, m, nl, o0, s0, k, corr, tcor, z, tout, residual, rsc, rtmp, a_bits, tbits,
              unit, unit_bytes, mul, bias, pre, pre_pos, pre_neg, post, post_pos, post_neg, nonpos):
    """:data:`FUSED` of one ``m x nl`` tile, straight from its popcounts (no float round trip):
    for pixel ``i < m`` (table slot ``s0 + i``) and channels ``o0 .. o0 + nl - 1``, 16 lanes at a
    time, ``a = k - 2 * acc[i * to + l] + corr``, ``y = float32(float32(a) * mul) + bias``,
    ``z = post(pre(y) + r)`` (``r`` the residual: ``residual[rb + o % rsc]`` with
    ``rb = tout // O * rsc``, i.e. ``rsc`` channels repeated; none for ``rsc == 0``), stored at
    ``z[tout[s0 + i] + o]``. ``unit >= 0``: the tile's ``nl`` sign bits (bit ``l`` = channel
    ``o0 + l``, zero above ``nl``) are stored as one ``unit_bytes``-byte integer at byte
    ``8 * tbits[s0 + i] + unit`` of the bits buffer at address ``a_bits`` (the caller checked that
    these channels are exactly those bits of the packed layout); ``unit < 0``: signs not written
    here. ``rtmp``: float32 scratch of 16 (a residual run that wraps around ``rsc``). The
    :class:`Epilogue`'s fields come as arguments (``nonpos``: ``saz == -1``): the caller reads
    them once per call, not once per tile."""
    o_all = mul.shape[0]
    for i in range(m):
        s = s0 + i
        cb = tcor[s]
        ob = tout[s]
        rb = ob if rsc == o_all else (ob // o_all) * rsc
        word = np.uint64(0)
        for h in range(0, nl, 16):
            n = min(16, nl - h)
            o = o0 + h
            a = a16_acc_f32(acc, i * to + h, k, corr, cb + o, cb != 0, n)
            v = act16(f16_affine_n(a, mul, bias, o, n), pre, pre_pos, pre_neg, o, n)
            if rsc > 0:
                r0 = o % rsc
                if r0 + n <= rsc:
                    v = f16_add(v, f16_load_n(residual, rb + r0, n))
                else:  # the repeated channels wrap inside these lanes
                    for j in range(n):
                        rtmp[j] = residual[rb + (o + j) % rsc]
                    v = f16_add(v, f16_load_n(rtmp, 0, n))
            v = act16(v, post, post_pos, post_neg, o, n)
            f16_store_n(z, ob + o, v, n)
            word |= f16_sign_bits(v, nonpos, n) << np.uint64(h)
        if unit >= 0:
            if unit_bytes == 4:
                a_store(a_bits + 8 * tbits[s] + unit, 0, np.uint32(word))
            else:
                a_store(a_bits + 8 * tbits[s] + unit, 0, np.uint8(word))


@njit(cache=True, inline="always")
def fused_block(fp, mul, bias, pre, pre_pos, pre_neg, post, post_pos, post_neg, residual, rsc,
                nonpos, bits):
    """Fill ``fp`` (int64 ``(FP_SIZE,)``) with :data:`TILE_FUSED`'s parameters (``FP_*`` slots):
    the arrays' addresses (the caller keeps them alive), the residual's only where ``rsc > 0``
    (``FP_NL`` is the caller's, set before each partial tile's run)."""
    fp[FP_MUL], fp[FP_BIAS] = mul.ctypes.data, bias.ctypes.data
    fp[FP_PRE], fp[FP_PRE_POS], fp[FP_PRE_NEG] = pre, pre_pos.ctypes.data, pre_neg.ctypes.data
    fp[FP_POST], fp[FP_POST_POS], fp[FP_POST_NEG] = post, post_pos.ctypes.data, \
        post_neg.ctypes.data
    fp[FP_RES] = 0
    if rsc > 0:
        fp[FP_RES] = residual.ctypes.data
    fp[FP_NONPOS] = 1 if nonpos else 0
    fp[FP_BITS] = bits.ctypes.data


@njit(cache=True, inline="always")
def fused_params(fp):
    """The :data:`TILE_FUSED` parameters read from the block at address ``fp``:
    ``(mul, bias, pre, pre_pos, pre_neg, post, post_pos, post_neg, res, nonpos, bits)``."""
    return (a_i64(fp, FP_MUL), a_i64(fp, FP_BIAS), a_i64(fp, FP_PRE), a_i64(fp, FP_PRE_POS),
            a_i64(fp, FP_PRE_NEG), a_i64(fp, FP_POST), a_i64(fp, FP_POST_POS),
            a_i64(fp, FP_POST_NEG), a_i64(fp, FP_RES), a_i64(fp, FP_NONPOS) != 0,
            a_i64(fp, FP_BITS))


@njit(cache=True, inline="always")
def act16a(v, code, pos, neg, o, n):
    """:func:`~refbnn.kernels.elementwise.act16` of lanes ``l < n`` (``0 <= n <= 16``), the slopes
    at elements ``o ..`` of the float32 arrays at addresses ``pos`` and ``neg`` (masked loads:
    nothing at or past element ``o + n`` is read; lanes ``>= n`` are don't-care)."""
    if code == 1:
        return f16_max(v, f16_zero())
    if code == 2:
        return f16_prelu(v, a16f_load(neg, o, n))
    if code == 3:
        return f16_fprelu(v, a16f_load(pos, o, n), a16f_load(neg, o, n))
    return v


@njit(cache=True, inline="always")
def fuse16(a, o, zi, z, fz, n):
    """:data:`FUSED` of channels ``o .. o + n - 1`` (``0 <= n <= 16``) of one pixel from ``a``
    (:data:`f16`, the accumulators as float32): ``y = float32(a * mul) + bias``,
    ``v = post(pre(y) + r)`` (``r`` the residual at elements ``zi ..`` of the float32 array at
    address ``res``, i.e. the output's own layout; none for ``res == 0``), stored at elements
    ``zi .. zi + n - 1`` of the float32 array at ``z``; returns the ``n`` sign bits
    (:func:`f16_sign_bits`, 0 above ``n``). Every load and store is masked to the ``n`` lanes, so
    a partial tile touches no element past its channels; with ``n`` a constant 16 the masks fold
    away. ``fz``: the parameters as :func:`fused_params` returns them; the float32 steps are
    :func:`fuse_tile`'s."""
    mul, bias, pre, pre_pos, pre_neg, post, post_pos, post_neg, res, nonpos, _bits = fz
    v = act16a(a16_affine(a, mul, bias, o, n), pre, pre_pos, pre_neg, o, n)
    if res != 0:
        v = f16_add(v, a16f_load(res, zi, n))
    v = act16a(v, post, post_pos, post_neg, o, n)
    a16f_store(z, zi, v, n)
    return f16_sign_bits(v, nonpos, n)


@njit(cache=True)
def fuse_part(acc, m, k, fp, out, obases, ooff, cbases, o0, corr, has_corr, bbases, shift, q):
    """:data:`TILE_FUSED_PART` (``has_corr``: :data:`TILE_FUSED_PART_CORR`) of the ``m`` pixels of
    one tile whose popcounts a micro-kernel stored at the int64 array at address ``acc`` (pixel
    ``i``'s 32 lanes from element ``32 * i``): the ``nl`` channels (``FP_NL`` of the parameter block
    at ``fp``) of each pixel through :func:`fuse16` masked to them, float32 results at
    ``out[ob : ob + nl]`` and the ``nl`` sign bits as one ``uint32`` at byte
    ``8 * bbases[q + i] + shift`` of the bits buffer (arguments as the micro-kernels', see
    :mod:`refbnn.kernels._codegen`). One function for every tile shape, called by each of them:
    unrolled into every micro-kernel, this code doubled the kernels' compile time."""
    fz = fused_params(fp)
    nl = a_i64(fp, FP_NL)
    n0 = min(nl, 16)
    n1 = nl - n0
    for i in range(m):
        ob = a_i64(obases, q + i) + ooff
        cb = a_i64(cbases, q + i) + o0 if has_corr else o0
        w = fuse16(p16_acc_f32(acc, 32 * i, k, corr, cb, has_corr, n0), o0, ob, out, fz, n0)
        h = fuse16(p16_acc_f32(acc, 32 * i + 16, k, corr, cb + 16, has_corr, n1), o0 + 16, ob + 16,
                   out, fz, n1)
        w |= h << np.uint64(16)
        a_store(fz[FP_BITS] + 8 * a_i64(bbases, q + i) + shift, 0, np.uint32(w))


# -- vector code (LLVM IR) ------------------------------------------------------------------------

_V16F = ir.VectorType(ir.FloatType(), 16)
_V16L = ir.VectorType(ir.IntType(64), 16)
_M16 = ir.VectorType(ir.IntType(1), 16)


def _lanes_below(builder, n):
    """``<16 x i1>``: lane ``l`` is ``l < n`` (``n`` an integer value)."""
    n64 = builder.sext(n, ir.IntType(64)) if n.type.width < 64 else n
    vn = builder.insert_element(ir.Constant(_V16L, ir.Undefined), n64, ir.Constant(ir.IntType(32), 0))
    vn = builder.shuffle_vector(vn, ir.Constant(_V16L, ir.Undefined),
                                ir.Constant(ir.VectorType(ir.IntType(32), 16), None))
    return builder.icmp_signed("<", ir.Constant(_V16L, list(range(16))), vn)


def _masked_load_i64x16(builder, ptr, mask):
    fn = _get_fn(builder, _V16L, [ir.PointerType(_V16L), ir.IntType(32), _M16, _V16L],
                 "llvm.masked.load.v16i64.p0v16i64")
    return builder.call(fn, [ptr, ir.Constant(ir.IntType(32), 8), mask, ir.Constant(_V16L, None)])


def _masked_load_f32x16(builder, ptr, mask):
    fn = _get_fn(builder, _V16F, [ir.PointerType(_V16F), ir.IntType(32), _M16, _V16F],
                 "llvm.masked.load.v16f32.p0v16f32")
    return builder.call(fn, [ptr, ir.Constant(ir.IntType(32), 4), mask, ir.Constant(_V16F, None)])


def _get_fn(builder, ret, params, name):
    from numba.core import cgutils

    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, params), name)


def _acc16_masked(context, builder, pc_ptr, c_ptr, k, k_ty, has_corr, n):
    """``float32(k - 2 * pc[l] + corr[l])`` for lanes ``l < n`` (0 above; the correction only when
    ``has_corr``): masked ``<16 x i64>`` loads at ``pc_ptr`` and ``c_ptr``."""
    mask = _lanes_below(builder, n)
    pc = _masked_load_i64x16(builder, pc_ptr, mask)
    kk = context.cast(builder, k, k_ty, types.int64)
    kvec = builder.shuffle_vector(
        builder.insert_element(ir.Constant(_V16L, ir.Undefined), kk, ir.Constant(ir.IntType(32), 0)),
        ir.Constant(_V16L, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), 16), None))
    a = builder.sub(kvec, builder.shl(pc, ir.Constant(_V16L, [1] * 16)))
    hmask = builder.and_(mask, builder.shuffle_vector(
        builder.insert_element(ir.Constant(_M16, ir.Undefined), has_corr,
                               ir.Constant(ir.IntType(32), 0)),
        ir.Constant(_M16, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), 16), None)))
    a = builder.add(a, _masked_load_i64x16(builder, c_ptr, hmask))
    return builder.sitofp(builder.select(mask, a, ir.Constant(_V16L, None)), _V16F)


@intrinsic
def a16_acc_f32(typingctx, acc, index, k, corr, cindex, has_corr, n):
    """``float32(k - 2 * acc[index + l] + corr[cindex + l])`` for lanes ``l < n`` (0 above; the
    correction only when ``has_corr``): int64 arrays ``acc`` (popcounts) and ``corr``, masked loads
    (nothing past lane ``n`` is read). Exact: ``|a| < 2**24``."""
    if not (isinstance(acc, types.Array) and isinstance(corr, types.Array)
            and all(isinstance(a, types.Integer) for a in (index, k, cindex, n))
            and isinstance(has_corr, types.Boolean)):
        return None

    def codegen(context, builder, sig, args):
        av, iv, kv, cv, civ, hv, nv = args
        return _acc16_masked(context, builder,
                             elem_ptr(context, builder, sig.args[0], av, iv, _V16L),
                             elem_ptr(context, builder, sig.args[3], cv, civ, _V16L),
                             kv, sig.args[2], hv, nv)

    return f16(acc, index, k, corr, cindex, has_corr, n), codegen


@intrinsic
def p16_acc_f32(typingctx, acc, index, k, corr, cindex, has_corr, n):
    """:func:`a16_acc_f32` on the int64 arrays at addresses ``acc`` and ``corr``."""
    if not (all(isinstance(a, types.Integer) for a in (acc, index, k, corr, cindex, n))
            and isinstance(has_corr, types.Boolean)):
        return None

    def codegen(context, builder, sig, args):
        av, iv, kv, cv, civ, hv, nv = args
        i64 = ir.IntType(64)
        return _acc16_masked(context, builder,
                             addr_ptr(context, builder, av, sig.args[0], iv, i64, _V16L),
                             addr_ptr(context, builder, cv, sig.args[3], civ, i64, _V16L),
                             kv, sig.args[2], hv, nv)

    return f16(acc, index, k, corr, cindex, has_corr, n), codegen


_V32x8 = ir.VectorType(ir.IntType(32), 8)
_V16 = ir.VectorType(ir.IntType(32), 16)


def _acc8(context, builder, k, k_ty, pc, corr=None):
    """``k - 2 * pc (+ corr)`` on ``<8 x i64>`` lanes (``k`` a scalar of Numba type ``k_ty``)."""
    kvec = splat(builder, context.cast(builder, k, k_ty, types.int64))
    a = builder.sub(kvec, builder.shl(pc, ir.Constant(V8, [1] * 8)))
    return a if corr is None else builder.add(a, corr)


def _store_i32x8(builder, ptr, a):
    """Store the low 32 bits of the eight lanes of ``a`` at ``ptr`` (``<8 x i32>*``)."""
    builder.store(builder.trunc(a, _V32x8), ptr, align=4)


def _bits_below(builder, a, direction, thr):
    """Low 8 bits of a ``uint64``: bit ``l`` = ``a[l] * direction[l] < thr[l]`` (signed)."""
    mask = builder.icmp_signed("<", builder.mul(a, direction), thr)
    return builder.zext(builder.bitcast(mask, ir.IntType(8)), ir.IntType(64))


@intrinsic
def v8_store_i32(typingctx, addr, index, pc, k, corr):
    """:data:`INT32` of eight lanes: ``int32(k - 2 * pc + corr)`` to elements ``index .. index + 7``
    of the int32 array at ``addr`` (``corr`` a :data:`vec8` of int64 corrections, or zero)."""
    if not (isinstance(addr, types.Integer) and isinstance(index, types.Integer) and pc == vec8
            and corr == vec8 and isinstance(k, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        a = _acc8(context, builder, args[3], sig.args[3], args[2], args[4])
        _store_i32x8(builder, addr_ptr(context, builder, args[0], sig.args[0], args[1],
                                       ir.IntType(32), _V32x8), a)
        return context.get_dummy_value()

    return types.none(addr, index, vec8, k, vec8), codegen


@intrinsic
def v8_threshold_bits(typingctx, pc, k, corr, direction, thr):
    """:data:`BITS` of eight lanes: bit ``l`` = ``(k - 2*pc[l] + corr[l]) * direction[l] < thr[l]``
    (int64 lanes, signed compare), returned in the low 8 bits of a ``uint64``."""
    if not (pc == vec8 and corr == vec8 and direction == vec8 and thr == vec8
            and isinstance(k, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        pcv, kv, cv, dv, tv = args
        return _bits_below(builder, _acc8(context, builder, kv, sig.args[1], pcv, cv), dv, tv)

    return types.uint64(vec8, k, vec8, vec8, vec8), codegen


@intrinsic
def a8_threshold_bits(typingctx, pc, k, caddr, cindex, direction, thr):
    """:func:`v8_threshold_bits` with the correction read as elements ``cindex .. cindex + 7`` of
    the int64 array at ``caddr``."""
    if not (pc == vec8 and direction == vec8 and thr == vec8
            and all(isinstance(a, types.Integer) for a in (k, caddr, cindex))):
        return None

    def codegen(context, builder, sig, args):
        pcv, kv, ca, ci, dv, tv = args
        cv = builder.load(addr_ptr(context, builder, ca, sig.args[2], ci, ir.IntType(64), V8),
                          align=8)
        return _bits_below(builder, _acc8(context, builder, kv, sig.args[1], pcv, cv), dv, tv)

    return types.uint64(vec8, k, caddr, cindex, vec8, vec8), codegen


@intrinsic
def v8_store_f32(typingctx, addr, index, pc, k, corr, scale, shift, o, lce):
    """:data:`FLOAT` / :data:`FLOAT_LCE` of eight lanes, ``a = k - 2*pc + corr`` (int64 lanes),
    stored as float32 to elements ``index .. index + 7`` of the float32 array at ``addr``, with
    per-channel ``scale[o : o + 8]``, ``shift[o : o + 8]`` (float32 arrays):

    * ``lce`` false: ``float32(float32(a) * scale) + shift`` (multiplier, bias);
    * ``lce`` true: ``float32(float32(2) * float32((k - a) >> 1) * (-scale)) + shift`` (multiplier,
      LCE offset); ``>> 1`` is floor division by 2.

    Separate IEEE float32 operations, never fused (no fast-math flags)."""
    if not (isinstance(addr, types.Integer) and isinstance(index, types.Integer) and pc == vec8
            and corr == vec8 and isinstance(scale, types.Array) and scale.dtype == types.float32
            and isinstance(shift, types.Array) and shift.dtype == types.float32):
        return None

    def codegen(context, builder, sig, args):
        outa, idx, pcv, kv, cv, sc, sh, ov, lce_v = args
        f8 = ir.VectorType(ir.FloatType(), 8)
        kvec = splat(builder, context.cast(builder, kv, sig.args[3], types.int64))
        a = _acc8(context, builder, kv, sig.args[3], pcv, cv)
        m = builder.load(elem_ptr(context, builder, sig.args[5], sc, ov, f8), align=4)
        b = builder.load(elem_ptr(context, builder, sig.args[6], sh, ov, f8), align=4)
        plain = builder.fmul(builder.sitofp(a, f8), m)
        half = builder.ashr(builder.sub(kvec, a), ir.Constant(V8, [1] * 8))
        two_pc = builder.fmul(ir.Constant(f8, [2.0] * 8), builder.sitofp(half, f8))
        lce_prod = builder.fmul(two_pc, builder.fneg(m))
        is_lce = context.cast(builder, lce_v, sig.args[8], types.boolean)
        y = builder.fadd(builder.select(is_lce, lce_prod, plain), b)
        builder.store(y, addr_ptr(context, builder, outa, sig.args[0], idx, ir.FloatType(), f8),
                      align=4)
        return context.get_dummy_value()

    return types.none(addr, index, vec8, k, vec8, scale, shift, o, lce), codegen


@intrinsic
def a8_store_acc_i32(typingctx, addr, index, pc, k):
    """:data:`TILE_INT32` of eight lanes: ``int32(k - 2 * pc)`` to elements ``index .. index + 7``
    of the int32 array at ``addr``."""
    if not (isinstance(addr, types.Integer) and isinstance(index, types.Integer)):
        return None
    if pc != vec8 or not isinstance(k, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        a = _acc8(context, builder, args[3], sig.args[3], args[2])
        _store_i32x8(builder, addr_ptr(context, builder, args[0], sig.args[0], args[1],
                                       ir.IntType(32), _V32x8), a)
        return context.get_dummy_value()

    return types.none(addr, index, vec8, k), codegen


def _low_dwords(builder, lo, hi):
    """``<16 x i32>`` of the low halves of the 64-bit lanes of ``lo`` then ``hi`` (one shuffle;
    little-endian: dword ``2j`` is lane ``j``'s low half)."""
    even = ir.Constant(ir.VectorType(ir.IntType(32), 16), list(range(0, 32, 2)))
    return builder.shuffle_vector(builder.bitcast(lo, _V16), builder.bitcast(hi, _V16), even)


def _store_acc16(context, builder, sig, args, corr):
    """Store ``int32(k - 2 * pc [+ corr])`` for ``pc`` = lanes of ``args[2]`` then ``args[3]``,
    computed in int32 (exact: popcounts, ``k`` and corrections fit in 31 bits)."""
    pc = _low_dwords(builder, args[2], args[3])
    k32 = builder.trunc(context.cast(builder, args[4], sig.args[4], types.int64), ir.IntType(32))
    kvec = builder.shuffle_vector(
        builder.insert_element(ir.Constant(_V16, None), k32, ir.Constant(ir.IntType(32), 0)),
        ir.Constant(_V16, None), ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16))
    a = builder.sub(kvec, builder.shl(pc, ir.Constant(_V16, [1] * 16)))
    if corr is not None:
        a = builder.add(a, corr)
    ptr = addr_ptr(context, builder, args[0], sig.args[0], args[1], ir.IntType(32), _V16)
    builder.store(a, ptr, align=4)
    return context.get_dummy_value()


@intrinsic
def a16_store_acc_i32(typingctx, addr, index, lo, hi, k):
    """:data:`TILE_INT32` of 16 lanes: ``int32(k - 2 * pc)`` for the popcounts ``lo`` then ``hi``
    to elements ``index .. index + 15`` of the int32 array at ``addr`` (one 512-bit store)."""
    if not all(isinstance(a, types.Integer) for a in (addr, index, k)):
        return None
    if lo != vec8 or hi != vec8:
        return None

    def codegen(context, builder, sig, args):
        return _store_acc16(context, builder, sig, args, None)

    return types.none(addr, index, vec8, vec8, k), codegen


def _corr16(context, builder, sig, args, at):
    """The low dwords of the 16 int64 corrections at elements ``args[at + 1] ..`` of the array at
    address ``args[at]`` (two aligned 8-lane loads)."""
    ca, ci = args[at], args[at + 1]
    i64 = ir.IntType(64)
    c_lo = builder.load(addr_ptr(context, builder, ca, sig.args[at], ci, i64, V8), align=8)
    c_hi = builder.load(addr_ptr(context, builder, ca, sig.args[at],
                                 builder.add(ci, ir.Constant(ci.type, 8)), i64, V8), align=8)
    return _low_dwords(builder, c_lo, c_hi)


@intrinsic
def a16_store_acc_corr_i32(typingctx, addr, index, lo, hi, k, caddr, cindex):
    """:data:`TILE_INT32_CORR` of 16 lanes: :func:`a16_store_acc_i32` plus the corrections at
    elements ``cindex .. cindex + 15`` of the int64 array at ``caddr``."""
    if not all(isinstance(a, types.Integer) for a in (addr, index, k, caddr, cindex)):
        return None
    if lo != vec8 or hi != vec8:
        return None

    def codegen(context, builder, sig, args):
        return _store_acc16(context, builder, sig, args, _corr16(context, builder, sig, args, 5))

    return types.none(addr, index, vec8, vec8, k, caddr, cindex), codegen


@intrinsic
def a8_store_acc_corr_i32(typingctx, addr, index, pc, k, caddr, cindex):
    """:data:`TILE_INT32_CORR` of eight lanes: ``int32(k - 2 * pc + corr)`` to elements
    ``index .. index + 7`` of the int32 array at ``addr``, ``corr`` being elements
    ``cindex .. cindex + 7`` of the int64 array at ``caddr``."""
    if not all(isinstance(a, types.Integer) for a in (addr, index, k, caddr, cindex)):
        return None
    if pc != vec8:
        return None

    def codegen(context, builder, sig, args):
        corr = builder.load(addr_ptr(context, builder, args[4], sig.args[4], args[5],
                                     ir.IntType(64), V8), align=8)
        a = _acc8(context, builder, args[3], sig.args[3], args[2], corr)
        _store_i32x8(builder, addr_ptr(context, builder, args[0], sig.args[0], args[1],
                                       ir.IntType(32), _V32x8), a)
        return context.get_dummy_value()

    return types.none(addr, index, vec8, k, caddr, cindex), codegen


@intrinsic
def v8_pc_bits(typingctx, pc, flip, thr):
    """:data:`TILE_BITS` of eight lanes, straight from popcounts: bit ``l`` =
    ``(pc[l] ^ flip[l]) > thr[l]`` (signed), in the low 8 bits of a ``uint64``. With ``flip`` 0
    this is ``pc > thr``; with ``flip`` -1 (``~pc = -pc - 1``) it tests ``pc < -thr - 1``."""
    if not (pc == vec8 and flip == vec8 and thr == vec8):
        return None

    def codegen(context, builder, sig, args):
        mask = builder.icmp_signed(">", builder.xor(args[0], args[1]), args[2])
        return builder.zext(builder.bitcast(mask, ir.IntType(8)), ir.IntType(64))

    return types.uint64(vec8, vec8, vec8), codegen


# -- TILE_FUSED: 16 lanes of float32 from two <8 x i64> accumulator vectors ----------------------

def _acc16_f32(context, builder, sig, args, corr):
    """``float32(k - 2 * pc [+ corr])`` of the popcounts ``args[0]`` then ``args[1]``: int32
    arithmetic (popcounts, ``k`` and corrections fit in 31 bits), then one conversion, which
    rounds the same integer as the int64 path's (exact for ``|acc| < 2**24``)."""
    pc = _low_dwords(builder, args[0], args[1])
    k32 = builder.trunc(context.cast(builder, args[2], sig.args[2], types.int64), ir.IntType(32))
    kvec = builder.shuffle_vector(
        builder.insert_element(ir.Constant(_V16, None), k32, ir.Constant(ir.IntType(32), 0)),
        ir.Constant(_V16, None), ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 16))
    a = builder.sub(kvec, builder.shl(pc, ir.Constant(_V16, [1] * 16)))
    if corr is not None:
        a = builder.add(a, corr)
    return builder.sitofp(a, _V16F)


@intrinsic
def v16_acc_f32(typingctx, lo, hi, k):
    """:data:`f16` ``float32(k - 2 * pc)`` of the 16 popcounts ``lo`` then ``hi`` (:data:`vec8`),
    the same values as :func:`a16_acc_f32` (the same integer, converted once)."""
    if lo != vec8 or hi != vec8 or not isinstance(k, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return _acc16_f32(context, builder, sig, args, None)

    return f16(vec8, vec8, k), codegen


@intrinsic
def v16_acc_corr_f32(typingctx, lo, hi, k, caddr, cindex):
    """:func:`v16_acc_f32` plus the corrections at elements ``cindex .. cindex + 15`` of the
    int64 array at ``caddr``."""
    if lo != vec8 or hi != vec8 or not all(isinstance(a, types.Integer) for a in (k, caddr, cindex)):
        return None

    def codegen(context, builder, sig, args):
        return _acc16_f32(context, builder, sig, args, _corr16(context, builder, sig, args, 3))

    return f16(vec8, vec8, k, caddr, cindex), codegen


@intrinsic
def a16f_load(typingctx, addr, index, n):
    """:data:`f16` of elements ``index .. index + n - 1`` of the float32 array at ``addr`` (masked
    load, ``0 <= n <= 16``; 0 above ``n``)."""
    if not all(isinstance(a, types.Integer) for a in (addr, index, n)):
        return None

    def codegen(context, builder, sig, args):
        ptr = addr_ptr(context, builder, args[0], sig.args[0], args[1], ir.FloatType(), _V16F)
        return _masked_load_f32x16(builder, ptr, _lanes_below(builder, args[2]))

    return f16(addr, index, n), codegen


@intrinsic
def a16f_store(typingctx, addr, index, v, n):
    """Store lanes ``l < n`` of the :data:`f16` ``v`` to elements ``index + l`` of the float32
    array at ``addr`` (masked store, ``0 <= n <= 16``)."""
    if not (all(isinstance(a, types.Integer) for a in (addr, index, n)) and v == f16):
        return None

    def codegen(context, builder, sig, args):
        ptr = addr_ptr(context, builder, args[0], sig.args[0], args[1], ir.FloatType(), _V16F)
        fn = _get_fn(builder, ir.VoidType(), [_V16F, ir.PointerType(_V16F), ir.IntType(32), _M16],
                     "llvm.masked.store.v16f32.p0v16f32")
        builder.call(fn, [args[2], ptr, ir.Constant(ir.IntType(32), 4),
                          _lanes_below(builder, args[3])])
        return context.get_dummy_value()

    return types.none(addr, index, f16, n), codegen


@intrinsic
def a16_affine(typingctx, v, maddr, baddr, o, n):
    """``float32(v * mul[o + l]) + bias[o + l]`` on lanes ``l < n`` (``0 <= n <= 16``; masked
    loads, lanes above are don't-care), ``mul``/``bias`` the float32 arrays at addresses
    ``maddr``/``baddr``: a multiply then an add, two roundings (no contraction)."""
    if not (v == f16 and all(isinstance(a, types.Integer) for a in (maddr, baddr, o, n))):
        return None

    def codegen(context, builder, sig, args):
        vv, ma, ba, ov, nv = args
        mask = _lanes_below(builder, nv)
        m = _masked_load_f32x16(builder, addr_ptr(context, builder, ma, sig.args[1], ov,
                                                  ir.FloatType(), _V16F), mask)
        b = _masked_load_f32x16(builder, addr_ptr(context, builder, ba, sig.args[2], ov,
                                                  ir.FloatType(), _V16F), mask)
        return builder.fadd(builder.fmul(vv, m), b)

    return f16(f16, maddr, baddr, o, n), codegen
