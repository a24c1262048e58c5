"""Numba intrinsics that emit explicit LLVM vector code: bit gathering and 512-bit XOR-popcount.

LLVM's auto-vectoriser is fragile for these loops and, on AVX-512 CPUs, prefers 256-bit vectors
(``cpu-kernel-notes.md``). These intrinsics write the vector IR directly, so the width is fixed by
the IR type, not by a tuning heuristic or the user's ``NUMBA_CPU_FEATURES``:

* :func:`neg_bits64` / :func:`nonpos_bits64` / :func:`nan_bits64`: 64 consecutive array elements
  -> one ``uint64`` word, bit ``i`` = (element ``i`` < 0) resp. (element ``i`` <= 0) resp. NaN; a
  compare on ``<64 x T>`` bitcast to ``i64`` (element 0 -> bit 0).
* :data:`vec8` is a Numba type whose LLVM value is ``<8 x i64>`` (one zmm register on AVX-512), with
  :func:`v8_zero`, :func:`v8_load`, :func:`v8_bcast`, :func:`v8_xpa` (``acc + ctpop(a ^ b)`` lane-wise)
  and :func:`v8_store`. On CPUs without AVX-512 VPOPCNTDQ LLVM lowers the same IR to narrower
  instructions: still exact, only slower.

Array arguments are raw data pointers plus a flat element index: there is no bounds check and no
negative-index wrap; callers guarantee the index range.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

_I64 = ir.IntType(64)
_V8 = ir.VectorType(_I64, 8)


class Vec8Type(types.Type):
    """Eight ``uint64`` lanes held as one LLVM ``<8 x i64>`` value."""

    def __init__(self):
        super().__init__(name="vec8xu64")


vec8 = Vec8Type()


@register_model(Vec8Type)
class _Vec8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V8)


def _elem_ptr(context, builder, aryty, ary_val, index, elem_llty=None):
    ary = context.make_array(aryty)(context, builder, ary_val)
    ptr = builder.gep(ary.data, [index])
    if elem_llty is not None:
        ptr = builder.bitcast(ptr, ir.PointerType(elem_llty))
    return ptr


def _bits64(compare):
    """Intrinsic body: load ``<64 x T>`` at ``arr[start]``, ``compare(builder, v, zero, is_float)``
    gives a ``<64 x i1>`` mask, returned as an ``i64`` (element 0 -> bit 0)."""
    def impl(typingctx, arr, start):
        if not isinstance(arr, types.Array) or not isinstance(start, types.Integer):
            return None
        dtype = arr.dtype
        if not isinstance(dtype, (types.Float, types.Integer)):
            return None
        sig = types.uint64(arr, start)

        def codegen(context, builder, sig, args):
            elt = context.get_data_type(dtype)
            vty = ir.VectorType(elt, 64)
            ptr = _elem_ptr(context, builder, sig.args[0], args[0], args[1], vty)
            v = builder.load(ptr, align=dtype.bitwidth // 8)
            mask = compare(builder, v, ir.Constant(vty, None), isinstance(dtype, types.Float))
            return builder.bitcast(mask, _I64)

        return sig, codegen

    return impl


def _lt0(b, v, zero, is_float):
    return b.fcmp_ordered("<", v, zero) if is_float else b.icmp_signed("<", v, zero)


def _le0_or_nan(b, v, zero, is_float):
    return b.fcmp_unordered("<=", v, zero) if is_float else b.icmp_signed("<=", v, zero)


def _isnan(b, v, zero, is_float):
    if is_float:
        return b.fcmp_unordered("uno", v, v)
    return ir.Constant(ir.VectorType(ir.IntType(1), 64), None)


@intrinsic
def neg_bits64(typingctx, arr, start):
    """``uint64`` whose bit ``i`` is ``arr[start + i] < 0`` (ordered compare), ``i`` in 0..63."""
    return _bits64(_lt0)(typingctx, arr, start)


@intrinsic
def nonpos_bits64(typingctx, arr, start):
    """``uint64`` whose bit ``i`` is ``not (arr[start + i] > 0)``, ``i`` in 0..63."""
    return _bits64(_le0_or_nan)(typingctx, arr, start)


@intrinsic
def nan_bits64(typingctx, arr, start):
    """``uint64`` whose bit ``i`` is ``isnan(arr[start + i])`` (always 0 for integer arrays)."""
    return _bits64(_isnan)(typingctx, arr, start)


@intrinsic
def sum_into64(typingctx, acc, arr, start):
    """``acc`` (a :data:`vec8` holding 512 bits of ``arr``'s float type) plus the 64 values from
    ``arr[start]``, summed as a tree of 512-bit vectors. NaN propagates through every add, so a
    finite final sum proves the values held no NaN (a non-finite one means NaN, an infinity or
    overflow: the caller checks exactly). Integer arrays: returns ``acc`` unchanged."""
    if not isinstance(arr, types.Array) or not isinstance(start, types.Integer) or acc != vec8:
        return None
    dtype = arr.dtype
    if not isinstance(dtype, (types.Float, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        if not isinstance(dtype, types.Float):
            return args[0]
        elt = context.get_data_type(dtype)
        lanes = 512 // dtype.bitwidth
        v = builder.load(_elem_ptr(context, builder, sig.args[1], args[1], args[2],
                                   ir.VectorType(elt, 64)), align=dtype.bitwidth // 8)
        parts = [builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), lanes),
                                                          list(range(i, i + lanes))))
                 for i in range(0, 64, lanes)]
        while len(parts) > 1:
            parts = [builder.fadd(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
        total = builder.fadd(builder.bitcast(args[0], ir.VectorType(elt, lanes)), parts[0])
        return builder.bitcast(total, _V8)

    return vec8(acc, arr, start), codegen


@intrinsic
def all_finite(typingctx, acc, like):
    """True when every lane of ``acc``, read as 512 bits of ``like``'s float type, is finite
    (always true for integer ``like``)."""
    if acc != vec8 or not isinstance(like, types.Array):
        return None
    dtype = like.dtype

    def codegen(context, builder, sig, args):
        if not isinstance(dtype, types.Float):
            return ir.Constant(ir.IntType(1), 1)
        elt = context.get_data_type(dtype)
        v = builder.bitcast(args[0], ir.VectorType(elt, 512 // dtype.bitwidth))
        # x - x is 0 for finite x, NaN for NaN and +-inf
        d = builder.fsub(v, v)
        ok = builder.fcmp_ordered("==", d, ir.Constant(d.type, None))
        n = 512 // dtype.bitwidth
        return builder.icmp_unsigned("==", builder.bitcast(ok, ir.IntType(n)),
                                     ir.Constant(ir.IntType(n), (1 << n) - 1))

    return types.boolean(vec8, like), codegen


@intrinsic
def popcount64(typingctx, x):
    """Population count of a 64-bit integer via ``llvm.ctpop.i64``; returns int64."""
    if not isinstance(x, types.Integer):
        return None
    sig = types.int64(x)

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.uint64)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_I64, [_I64]), "llvm.ctpop.i64")
        return builder.call(fn, [v])

    return sig, codegen


@intrinsic
def v8_zero(typingctx):
    """All-zero ``<8 x i64>``."""
    def codegen(context, builder, sig, args):
        return ir.Constant(_V8, None)

    return vec8(), codegen


@intrinsic
def v8_load(typingctx, arr, index):
    """Load ``arr[index : index + 8]`` (64-bit elements, unaligned) as one vector."""
    if not isinstance(arr, types.Array) or arr.dtype.bitwidth != 64:
        return None

    def codegen(context, builder, sig, args):
        ptr = _elem_ptr(context, builder, sig.args[0], args[0], args[1], _V8)
        return builder.load(ptr, align=8)

    return vec8(arr, index), codegen


@intrinsic
def v8_bcast(typingctx, arr, index):
    """Broadcast the 64-bit element ``arr[index]`` to all eight lanes."""
    if not isinstance(arr, types.Array) or arr.dtype.bitwidth != 64:
        return None

    def codegen(context, builder, sig, args):
        ptr = _elem_ptr(context, builder, sig.args[0], args[0], args[1], _I64)
        s = builder.load(ptr, align=8)
        v = builder.insert_element(ir.Constant(_V8, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(v, ir.Constant(_V8, ir.Undefined),
                                      ir.Constant(ir.VectorType(ir.IntType(32), 8), None))

    return vec8(arr, index), codegen


@intrinsic
def v8_xpa(typingctx, acc, a, b):
    """``acc + ctpop(a ^ b)`` lane-wise (XOR, popcount, accumulate)."""
    if not (acc == vec8 and a == vec8 and b == vec8):
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V8, [_V8]), "llvm.ctpop.v8i64")
        return builder.add(args[0], builder.call(fn, [builder.xor(args[1], args[2])]))

    return vec8(vec8, vec8, vec8), codegen


@intrinsic
def v8_store(typingctx, arr, index, v):
    """Store the eight lanes of ``v`` to the int64/uint64 array at ``arr[index : index + 8]``."""
    if not isinstance(arr, types.Array) or arr.dtype.bitwidth != 64 or v != vec8:
        return None

    def codegen(context, builder, sig, args):
        ptr = _elem_ptr(context, builder, sig.args[0], args[0], args[1], _V8)
        builder.store(args[2], ptr, align=8)
        return context.get_dummy_value()

    return types.none(arr, index, vec8), codegen


@intrinsic
def v8_store_acc_i32(typingctx, out, index, pc, k, corr):
    """``out[index : index + 8] = int32(k - 2 * pc + corr)`` lane-wise (``out`` int32, ``corr``
    a :data:`vec8` of int64 corrections, e.g. :func:`v8_load` of an int64 array or zero)."""
    if not (isinstance(out, types.Array) and out.dtype == types.int32 and pc == vec8
            and corr == vec8 and isinstance(k, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        _, _, pcv, kv, cv = args
        a = _acc8(context, builder, kv, sig.args[3], pcv, cv)
        v32 = ir.VectorType(ir.IntType(32), 8)
        _store_i32x8(builder, _elem_ptr(context, builder, sig.args[0], args[0], args[1], v32), a)
        return context.get_dummy_value()

    return types.none(out, index, vec8, k, vec8), codegen


def _splat(builder, value):
    v = builder.insert_element(ir.Constant(_V8, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(_V8, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), 8), None))


def _acc8(context, builder, k, k_ty, pc, corr=None):
    """``k - 2 * pc (+ corr)`` on ``<8 x i64>`` lanes (``k`` a scalar of Numba type ``k_ty``)."""
    kvec = _splat(builder, context.cast(builder, k, k_ty, types.int64))
    a = builder.sub(kvec, builder.shl(pc, ir.Constant(_V8, [1] * 8)))
    return a if corr is None else builder.add(a, corr)


def _store_i32x8(builder, ptr, a):
    """Store the low 32 bits of the eight lanes of ``a`` at ``ptr`` (``<8 x i32>*``)."""
    builder.store(builder.trunc(a, ir.VectorType(ir.IntType(32), 8)), ptr, align=4)


def _bits_below(builder, a, direction, thr):
    """Low 8 bits of a ``uint64``: bit ``l`` = ``a[l] * direction[l] < thr[l]`` (signed)."""
    mask = builder.icmp_signed("<", builder.mul(a, direction), thr)
    return builder.zext(builder.bitcast(mask, ir.IntType(8)), _I64)


@intrinsic
def v8_threshold_bits(typingctx, pc, k, corr, direction, thr):
    """Eight output bits: bit ``l`` = ``(k - 2*pc[l] + corr[l]) * direction[l] < thr[l]`` (int64
    lanes, signed compare), returned in the low 8 bits of a ``uint64``."""
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
        cv = builder.load(_gep(context, builder, ca, sig.args[2], ci, _I64, _V8), align=8)
        return _bits_below(builder, _acc8(context, builder, kv, sig.args[1], pcv, cv), dv, tv)

    return types.uint64(vec8, k, caddr, cindex, vec8, vec8), codegen


@intrinsic
def v8_store_f32(typingctx, out, index, pc, k, corr, scale, shift, o, lce):
    """Float output of eight lanes, ``a = k - 2*pc + corr`` (int64 lanes), stored as float32 to
    ``out[index : index + 8]`` with per-channel ``scale[o : o + 8]``, ``shift[o : o + 8]``:

    * ``lce`` false: ``float32(float32(a) * scale) + shift`` (multiplier, bias);
    * ``lce`` true: ``float32(float32(2) * float32((k - a) >> 1) * (-scale)) + shift`` (multiplier,
      LCE offset); ``>> 1`` is floor division by 2.

    Separate IEEE float32 operations, never fused (no fast-math flags)."""
    if not (isinstance(out, types.Array) and out.dtype == types.float32 and pc == vec8
            and corr == vec8 and isinstance(scale, types.Array) and scale.dtype == types.float32
            and isinstance(shift, types.Array) and shift.dtype == types.float32):
        return None

    def codegen(context, builder, sig, args):
        outv, idx, pcv, kv, cv, sc, sh, ov, lce_v = args
        f8 = ir.VectorType(ir.FloatType(), 8)
        kvec = _splat(builder, context.cast(builder, kv, sig.args[3], types.int64))
        a = _acc8(context, builder, kv, sig.args[3], pcv, cv)
        m = builder.load(_elem_ptr(context, builder, sig.args[5], sc, ov, f8), align=4)
        b = builder.load(_elem_ptr(context, builder, sig.args[6], sh, ov, f8), align=4)
        plain = builder.fmul(builder.sitofp(a, f8), m)
        half = builder.ashr(builder.sub(kvec, a), ir.Constant(_V8, [1] * 8))
        two_pc = builder.fmul(ir.Constant(f8, [2.0] * 8), builder.sitofp(half, f8))
        lce_prod = builder.fmul(two_pc, builder.fneg(m))
        is_lce = context.cast(builder, lce_v, sig.args[8], types.boolean)
        y = builder.fadd(builder.select(is_lce, lce_prod, plain), b)
        builder.store(y, _elem_ptr(context, builder, sig.args[0], outv, idx, f8), align=4)
        return context.get_dummy_value()

    return types.none(out, index, vec8, k, vec8, scale, shift, o, lce), codegen


# -- raw-address variants: an array argument costs a Numba call ~7 machine words, an address one.
# ``addr`` is ``array.ctypes.data`` of a live array; ``index`` counts elements of the stated type.

def _gep(context, builder, addr, addr_ty, index, scalar_llty, vec_llty=None):
    """Pointer to element ``index`` (of ``scalar_llty``) at address ``addr``, cast to ``vec_llty``."""
    base = builder.inttoptr(context.cast(builder, addr, addr_ty, types.uintp),
                            ir.PointerType(scalar_llty))
    ptr = builder.gep(base, [index])
    return builder.bitcast(ptr, ir.PointerType(vec_llty)) if vec_llty is not None else ptr


@intrinsic
def a_i64(typingctx, addr, index):
    """The int64 at element ``index`` of the int64 array at ``addr``."""
    if not (isinstance(addr, types.Integer) and isinstance(index, types.Integer)):
        return None
    def codegen(context, builder, sig, args):
        return builder.load(_gep(context, builder, args[0], sig.args[0], args[1], _I64), align=8)

    return types.int64(addr, index), codegen


@intrinsic
def a_or_u64(typingctx, addr, index, value):
    """``array[index] |= value`` for the uint64 array at ``addr``."""
    if not (isinstance(addr, types.Integer) and isinstance(index, types.Integer)):
        return None
    def codegen(context, builder, sig, args):
        ptr = _gep(context, builder, args[0], sig.args[0], args[1], _I64)
        v = context.cast(builder, args[2], sig.args[2], types.uint64)
        builder.store(builder.or_(builder.load(ptr, align=8), v), ptr, align=8)
        return context.get_dummy_value()

    return types.none(addr, index, value), codegen


@intrinsic
def a8_load(typingctx, addr, index):
    """Eight 64-bit elements from ``index`` of the array at ``addr`` (see :func:`v8_load`)."""
    if not (isinstance(addr, types.Integer) and isinstance(index, types.Integer)):
        return None
    def codegen(context, builder, sig, args):
        return builder.load(_gep(context, builder, args[0], sig.args[0], args[1], _I64, _V8),
                            align=8)

    return vec8(addr, index), codegen


@intrinsic
def a8_bcast(typingctx, addr, index):
    """Element ``index`` of the 64-bit array at ``addr`` in all eight lanes."""
    if not (isinstance(addr, types.Integer) and isinstance(index, types.Integer)):
        return None
    def codegen(context, builder, sig, args):
        s = builder.load(_gep(context, builder, args[0], sig.args[0], args[1], _I64), align=8)
        return _splat(builder, s)

    return vec8(addr, index), codegen


@intrinsic
def a8_store(typingctx, addr, index, v):
    """Store ``v`` to elements ``index .. index + 7`` of the 64-bit array at ``addr``."""
    if not (isinstance(addr, types.Integer) and isinstance(index, types.Integer)):
        return None
    if v != vec8:
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], _gep(context, builder, args[0], sig.args[0], args[1], _I64, _V8),
                      align=8)
        return context.get_dummy_value()

    return types.none(addr, index, vec8), codegen


@intrinsic
def a8_store_acc_i32(typingctx, addr, index, pc, k):
    """``int32(k - 2 * pc)`` to elements ``index .. index + 7`` of the int32 array at ``addr``."""
    if not (isinstance(addr, types.Integer) and isinstance(index, types.Integer)):
        return None
    if pc != vec8 or not isinstance(k, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        a = _acc8(context, builder, args[3], sig.args[3], args[2])
        v32 = ir.VectorType(ir.IntType(32), 8)
        _store_i32x8(builder, _gep(context, builder, args[0], sig.args[0], args[1],
                                   ir.IntType(32), v32), a)
        return context.get_dummy_value()

    return types.none(addr, index, vec8, k), codegen


_V16 = ir.VectorType(ir.IntType(32), 16)


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
    ptr = _gep(context, builder, args[0], sig.args[0], args[1], ir.IntType(32), _V16)
    builder.store(a, ptr, align=4)
    return context.get_dummy_value()


@intrinsic
def a16_store_acc_i32(typingctx, addr, index, lo, hi, k):
    """``int32(k - 2 * pc)`` for the 16 popcounts ``lo`` then ``hi`` to elements
    ``index .. index + 15`` of the int32 array at ``addr`` (one 512-bit store)."""
    if not all(isinstance(a, types.Integer) for a in (addr, index, k)):
        return None
    if lo != vec8 or hi != vec8:
        return None

    def codegen(context, builder, sig, args):
        return _store_acc16(context, builder, sig, args, None)

    return types.none(addr, index, vec8, vec8, k), codegen


@intrinsic
def a16_store_acc_corr_i32(typingctx, addr, index, lo, hi, k, caddr, cindex):
    """:func:`a16_store_acc_i32` plus the corrections at elements ``cindex .. cindex + 15`` of
    the int64 array at ``caddr``."""
    if not all(isinstance(a, types.Integer) for a in (addr, index, k, caddr, cindex)):
        return None
    if lo != vec8 or hi != vec8:
        return None

    def codegen(context, builder, sig, args):
        ca, ci = args[5], args[6]
        c_lo = builder.load(_gep(context, builder, ca, sig.args[5], ci, _I64, _V8), align=8)
        c_hi = builder.load(_gep(context, builder, ca, sig.args[5],
                                 builder.add(ci, ir.Constant(ci.type, 8)), _I64, _V8), align=8)
        return _store_acc16(context, builder, sig, args, _low_dwords(builder, c_lo, c_hi))

    return types.none(addr, index, vec8, vec8, k, caddr, cindex), codegen


@intrinsic
def a8_store_acc_corr_i32(typingctx, addr, index, pc, k, caddr, cindex):
    """``int32(k - 2 * pc + corr)`` to elements ``index .. index + 7`` of the int32 array at
    ``addr``, ``corr`` being elements ``cindex .. cindex + 7`` of the int64 array at ``caddr``."""
    if not all(isinstance(a, types.Integer) for a in (addr, index, k, caddr, cindex)):
        return None
    if pc != vec8:
        return None

    def codegen(context, builder, sig, args):
        corr = builder.load(_gep(context, builder, args[4], sig.args[4], args[5], _I64, _V8),
                            align=8)
        a = _acc8(context, builder, args[3], sig.args[3], args[2], corr)
        v32 = ir.VectorType(ir.IntType(32), 8)
        _store_i32x8(builder, _gep(context, builder, args[0], sig.args[0], args[1],
                                   ir.IntType(32), v32), a)
        return context.get_dummy_value()

    return types.none(addr, index, vec8, k, caddr, cindex), codegen


@intrinsic
def v8_pc_bits(typingctx, pc, flip, thr):
    """Eight output bits straight from popcounts: bit ``l`` = ``(pc[l] ^ flip[l]) > thr[l]``
    (signed), in the low 8 bits of a ``uint64``. With ``flip`` 0 this is ``pc > thr``; with
    ``flip`` -1 (``~pc = -pc - 1``) it tests ``pc < -thr - 1``."""
    if not (pc == vec8 and flip == vec8 and thr == vec8):
        return None

    def codegen(context, builder, sig, args):
        mask = builder.icmp_signed(">", builder.xor(args[0], args[1]), args[2])
        return builder.zext(builder.bitcast(mask, ir.IntType(8)), _I64)

    return types.uint64(vec8, vec8, vec8), codegen
