"""Generic Numba intrinsics that emit explicit LLVM vector code: sign bits and 512-bit XOR-popcount.

LLVM's loop vectoriser is fragile for these loops, and on AVX-512 CPUs its tuning prefers 256-bit
vectors (``prefer-256-bit``; Numba's default target on a Zen 4 core uses AVX-512 instructions on
ymm registers, half the throughput). These intrinsics write the vector IR directly, so the width is
fixed by the IR type, not by a tuning heuristic or the user's ``NUMBA_CPU_FEATURES``:

* :func:`neg_bits64` / :func:`nonpos_bits64` / :func:`nan_bits64`: 64 consecutive array elements
  -> one ``uint64`` word, bit ``i`` = (element ``i`` < 0) resp. (element ``i`` <= 0) resp. NaN; a
  compare on ``<64 x T>`` bitcast to ``i64`` (element 0 -> bit 0).
* :data:`vec8` is a Numba type whose LLVM value is ``<8 x i64>`` (one zmm register on AVX-512), with
  :func:`v8_zero`, :func:`v8_load`, :func:`v8_bcast`, :func:`v8_xpa` (``acc + ctpop(a ^ b)`` lane-wise)
  and :func:`v8_store`. On CPUs without AVX-512 VPOPCNTDQ LLVM lowers the same IR to narrower
  instructions: still exact, only slower. For those, :func:`v8_xpb` counts bits per byte
  (``<64 x i8>`` popcount, no per-word horizontal sum) and :func:`v8_bsum` folds the byte counters
  into 64-bit lanes every :data:`BYTE_STEPS` words (the narrow tiles of
  :mod:`refbnn.kernels.bconv_tiles`).
* ``a_*`` / ``a8_*``: the same on raw addresses (``array.ctypes.data``; a Numba array argument of a
  call costs seven machine words, an address one), ``index`` counting elements of the stated type.

Array arguments are raw data pointers plus a flat element index: there is no bounds check and no
negative-index wrap; callers guarantee the index range. The output transform's intrinsics (int32
stores, float stores, threshold bits) are in :mod:`refbnn.kernels.epilogue`; the IR helpers
:func:`elem_ptr`, :func:`addr_ptr`, :func:`splat` are shared with it.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

I64 = ir.IntType(64)
V8 = ir.VectorType(I64, 8)
V64B = ir.VectorType(ir.IntType(8), 64)


class Vec8Type(types.Type):
    """Eight ``uint64`` lanes held as one LLVM ``<8 x i64>`` value."""

    def __init__(self):
        super().__init__(name="vec8xu64")


vec8 = Vec8Type()


@register_model(Vec8Type)
class _Vec8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, V8)


def elem_ptr(context, builder, aryty, ary_val, index, elem_llty=None):
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
            ptr = elem_ptr(context, builder, sig.args[0], args[0], args[1], vty)
            v = builder.load(ptr, align=dtype.bitwidth // 8)
            mask = compare(builder, v, ir.Constant(vty, None), isinstance(dtype, types.Float))
            return builder.bitcast(mask, I64)

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
        v = builder.load(elem_ptr(context, builder, sig.args[1], args[1], args[2],
                                   ir.VectorType(elt, 64)), align=dtype.bitwidth // 8)
        parts = [builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), lanes),
                                                          list(range(i, i + lanes))))
                 for i in range(0, 64, lanes)]
        while len(parts) > 1:
            parts = [builder.fadd(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
        total = builder.fadd(builder.bitcast(args[0], ir.VectorType(elt, lanes)), parts[0])
        return builder.bitcast(total, V8)

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
            builder.module, ir.FunctionType(I64, [I64]), "llvm.ctpop.i64")
        return builder.call(fn, [v])

    return sig, codegen


@intrinsic
def v8_zero(typingctx):
    """All-zero ``<8 x i64>``."""
    def codegen(context, builder, sig, args):
        return ir.Constant(V8, None)

    return vec8(), codegen


@intrinsic
def v8_load(typingctx, arr, index):
    """Load ``arr[index : index + 8]`` (64-bit elements, unaligned) as one vector."""
    if not isinstance(arr, types.Array) or arr.dtype.bitwidth != 64:
        return None

    def codegen(context, builder, sig, args):
        ptr = elem_ptr(context, builder, sig.args[0], args[0], args[1], V8)
        return builder.load(ptr, align=8)

    return vec8(arr, index), codegen


@intrinsic
def v8_bcast(typingctx, arr, index):
    """Broadcast the 64-bit element ``arr[index]`` to all eight lanes."""
    if not isinstance(arr, types.Array) or arr.dtype.bitwidth != 64:
        return None

    def codegen(context, builder, sig, args):
        ptr = elem_ptr(context, builder, sig.args[0], args[0], args[1], I64)
        s = builder.load(ptr, align=8)
        v = builder.insert_element(ir.Constant(V8, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(v, ir.Constant(V8, ir.Undefined),
                                      ir.Constant(ir.VectorType(ir.IntType(32), 8), None))

    return vec8(arr, index), codegen


@intrinsic
def v8_xpa(typingctx, acc, a, b):
    """``acc + ctpop(a ^ b)`` lane-wise (XOR, popcount, accumulate)."""
    if not (acc == vec8 and a == vec8 and b == vec8):
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(V8, [V8]), "llvm.ctpop.v8i64")
        return builder.add(args[0], builder.call(fn, [builder.xor(args[1], args[2])]))

    return vec8(vec8, vec8, vec8), codegen


#: Steps a byte counter of :func:`v8_xpb` holds: 31 words of at most 8 set bits per byte, 248 <= 255.
BYTE_STEPS = 31


@intrinsic
def v8_xpb(typingctx, acc, a, b):
    """Byte-wise ``acc + ctpop(a ^ b)`` on the 64 bytes of the lanes (``<64 x i8>``): each byte of
    ``acc`` counts the set bits of that byte over the words added so far, so at most
    :data:`BYTE_STEPS` additions before :func:`v8_bsum` must fold it (no carry crosses a byte).
    Without VPOPCNTDQ this is LLVM's nibble-table popcount (VPSHUFB) with no per-word horizontal
    sum: about 20% more words per second than :func:`v8_xpa` on AVX2 (module docstring)."""
    if not (acc == vec8 and a == vec8 and b == vec8):
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(V64B, [V64B]), "llvm.ctpop.v64i8")
        x = builder.bitcast(builder.xor(args[1], args[2]), V64B)
        return builder.bitcast(builder.add(builder.bitcast(args[0], V64B), builder.call(fn, [x])), V8)

    return vec8(vec8, vec8, vec8), codegen


@intrinsic
def v8_bsum(typingctx, acc, counts):
    """``acc`` plus, per 64-bit lane, the sum of the eight byte counters of ``counts``
    (:func:`v8_xpb`'s), by three shift-mask-add halvings (exact: a lane sums to at most 2040)."""
    if not (acc == vec8 and counts == vec8):
        return None

    def codegen(context, builder, sig, args):
        v = args[1]
        for shift, mask in ((8, 0x00FF00FF00FF00FF), (16, 0x0000FFFF0000FFFF), (32, 0xFFFFFFFF)):
            m = ir.Constant(V8, [mask] * 8)
            v = builder.add(builder.and_(v, m),
                            builder.and_(builder.lshr(v, ir.Constant(V8, [shift] * 8)), m))
        return builder.add(args[0], v)

    return vec8(vec8, vec8), codegen


@intrinsic
def v8_store(typingctx, arr, index, v):
    """Store the eight lanes of ``v`` to the int64/uint64 array at ``arr[index : index + 8]``."""
    if not isinstance(arr, types.Array) or arr.dtype.bitwidth != 64 or v != vec8:
        return None

    def codegen(context, builder, sig, args):
        ptr = elem_ptr(context, builder, sig.args[0], args[0], args[1], V8)
        builder.store(args[2], ptr, align=8)
        return context.get_dummy_value()

    return types.none(arr, index, vec8), codegen



def splat(builder, value):
    """``value`` (an ``i64``) in all eight lanes of an ``<8 x i64>``."""
    v = builder.insert_element(ir.Constant(V8, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(V8, ir.Undefined),
                                  ir.Constant(ir.VectorType(ir.IntType(32), 8), None))


def addr_ptr(context, builder, addr, addr_ty, index, scalar_llty, vec_llty=None):
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
        return builder.load(addr_ptr(context, builder, args[0], sig.args[0], args[1], I64), align=8)

    return types.int64(addr, index), codegen


@intrinsic
def a_or_u64(typingctx, addr, index, value):
    """``array[index] |= value`` for the uint64 array at ``addr``."""
    if not (isinstance(addr, types.Integer) and isinstance(index, types.Integer)):
        return None
    def codegen(context, builder, sig, args):
        ptr = addr_ptr(context, builder, args[0], sig.args[0], args[1], I64)
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
        return builder.load(addr_ptr(context, builder, args[0], sig.args[0], args[1], I64, V8),
                            align=8)

    return vec8(addr, index), codegen


@intrinsic
def a8_bcast(typingctx, addr, index):
    """Element ``index`` of the 64-bit array at ``addr`` in all eight lanes."""
    if not (isinstance(addr, types.Integer) and isinstance(index, types.Integer)):
        return None
    def codegen(context, builder, sig, args):
        s = builder.load(addr_ptr(context, builder, args[0], sig.args[0], args[1], I64), align=8)
        return splat(builder, s)

    return vec8(addr, index), codegen


@intrinsic
def a8_store(typingctx, addr, index, v):
    """Store ``v`` to elements ``index .. index + 7`` of the 64-bit array at ``addr``."""
    if not (isinstance(addr, types.Integer) and isinstance(index, types.Integer)):
        return None
    if v != vec8:
        return None

    def codegen(context, builder, sig, args):
        builder.store(args[2], addr_ptr(context, builder, args[0], sig.args[0], args[1], I64, V8),
                      align=8)
        return context.get_dummy_value()

    return types.none(addr, index, vec8), codegen


@intrinsic
def a_u8(typingctx, addr, index):
    """The byte at element ``index`` of the uint8 (or bool) array at ``addr``, as a uint8."""
    if not (isinstance(addr, types.Integer) and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(addr_ptr(context, builder, args[0], sig.args[0], args[1],
                                     ir.IntType(8)), align=1)

    return types.uint8(addr, index), codegen


@intrinsic
def a_f32(typingctx, addr, index):
    """The float32 at element ``index`` of the float32 array at ``addr``."""
    if not (isinstance(addr, types.Integer) and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(addr_ptr(context, builder, args[0], sig.args[0], args[1],
                                     ir.FloatType()), align=4)

    return types.float32(addr, index), codegen


@intrinsic
def a_store(typingctx, addr, index, value):
    """Store ``value`` (an int or float scalar) at element ``index`` of the array of ``value``'s
    type at ``addr``."""
    if not (isinstance(addr, types.Integer) and isinstance(index, types.Integer)
            and isinstance(value, (types.Integer, types.Float))):
        return None

    def codegen(context, builder, sig, args):
        llty = context.get_data_type(sig.args[2])
        builder.store(args[2], addr_ptr(context, builder, args[0], sig.args[0], args[1], llty),
                      align=sig.args[2].bitwidth // 8)
        return context.get_dummy_value()

    return types.none(addr, index, value), codegen
