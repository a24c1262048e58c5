"""Numba intrinsics on ``<16 x float>`` (one zmm register): the float micro-kernels' vocabulary.

:data:`f16` is a Numba type whose LLVM value is ``<16 x float>``. The width is fixed by the IR
type, so AVX-512 CPUs get 512-bit code under Numba's default target (LLVM's own vectoriser prefers
256-bit there, ``cpu-kernel-notes.md``); other CPUs get the same IR lowered to narrower
instructions, still the same values.

* :func:`f16_zero`, :func:`f16_bcast` (one ``float32`` to every lane), :func:`f16_load`
  (16 consecutive elements, unaligned), :func:`f16_load_n` (the first ``n`` lanes, the rest 0);
* :func:`f16_fma`: ``a * b + c`` per lane with one rounding (``llvm.fma``), the sum of products of a
  convolution; :func:`f16_max`: lane-wise ``b if b > a else a`` (ties and NaN keep ``a``);
* :func:`f16_affine_store_n`: store ``float32(v * scale) + shift`` (two roundings, as a separate
  multiply and add: no contraction) to the first ``n`` lanes at ``out[index]``, masked so the
  other lanes' memory is untouched; :func:`f16_store_n`: the same without the affine.

The opt-in bf16 stem's vocabulary (:data:`bf32`: sixteen pairs of bfloat16 in one zmm register):
:func:`bf_bcast`, :func:`bf_load`, :func:`bf_dot` (VDPBF16PS, or its float32 emulation on CPUs
without AVX512-BF16), :func:`bf_dot_emulated` (see the section's comment for the exact arithmetic).

Array arguments are arrays plus a flat element index: there is no bounds check and no negative-index
wrap; callers guarantee ``index .. index + n - 1`` is in range.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from .dispatch import host_has_avx512_bf16, host_has_wide_vectors

_F32 = ir.FloatType()
_V16 = ir.VectorType(_F32, 16)
_M16 = ir.VectorType(ir.IntType(1), 16)
_I32 = ir.IntType(32)


class F16Type(types.Type):
    """Sixteen ``float32`` lanes held as one LLVM ``<16 x float>`` value."""

    def __init__(self):
        super().__init__(name="vec16xf32")


f16 = F16Type()


@register_model(F16Type)
class _F16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _V16)


def _is_f32_array(a):
    return isinstance(a, types.Array) and a.dtype == types.float32


def _ptr(context, builder, aryty, ary_val, index, llty):
    ary = context.make_array(aryty)(context, builder, ary_val)
    return builder.bitcast(builder.gep(ary.data, [index]), ir.PointerType(llty))


def _mask(builder, n):
    """``<16 x i1>``: lane ``l`` is ``l < n``."""
    n32 = builder.trunc(n, _I32) if n.type.width > 32 else builder.sext(n, _I32) \
        if n.type.width < 32 else n
    vn = builder.insert_element(ir.Constant(ir.VectorType(_I32, 16), ir.Undefined), n32,
                                ir.Constant(_I32, 0))
    vn = builder.shuffle_vector(vn, ir.Constant(ir.VectorType(_I32, 16), ir.Undefined),
                                ir.Constant(ir.VectorType(_I32, 16), None))
    lanes = ir.Constant(ir.VectorType(_I32, 16), list(range(16)))
    return builder.icmp_signed("<", lanes, vn)


def _masked_load(builder, ptr, mask):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V16, [ir.PointerType(_V16), _I32, _M16, _V16]),
        "llvm.masked.load.v16f32.p0v16f32")
    return builder.call(fn, [ptr, ir.Constant(_I32, 4), mask, ir.Constant(_V16, None)])


def _masked_store(builder, value, ptr, mask):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [_V16, ir.PointerType(_V16), _I32, _M16]),
        "llvm.masked.store.v16f32.p0v16f32")
    builder.call(fn, [value, ptr, ir.Constant(_I32, 4), mask])


# Without AVX-512 the ``*_n`` intrinsics take a plain load or store when ``n >= 16`` (a
# predictable branch) and the masked one only for a partial vector: there a masked float store is
# VMASKMOVPS, which Zen 4 runs far slower than a plain store (measured on a Zen 4 core running AVX2
# code, ``realconv.conv_taps_tiles`` on 6 x 16 tiles, G multiply-adds/s: 3x3x1 -> 32 13.4 -> 31.7,
# 1x1 24 -> 48 and 96 -> 192 within noise). With AVX-512 a masked access is one instruction with a
# mask register and the branch only cost (12 x 32 tiles, 3x3x1 -> 24: 21.7 -> 13.6), so it is
# masked throughout. The values are the same either way.

def _branch_on_full() -> bool:
    return not host_has_wide_vectors()


def _full(builder, n):
    """``n >= 16``: every lane is in."""
    return builder.icmp_signed(">=", n, ir.Constant(n.type, 16))


def _load_n(builder, ptr, n):
    """Lanes ``l < n`` of ``*ptr``, 0 above."""
    if not _branch_on_full():
        return _masked_load(builder, ptr, _mask(builder, n))
    with builder.if_else(_full(builder, n)) as (then, otherwise):
        with then:
            whole = builder.load(ptr, align=4)
            b_whole = builder.block
        with otherwise:
            part = _masked_load(builder, ptr, _mask(builder, n))
            b_part = builder.block
    out = builder.phi(_V16)
    out.add_incoming(whole, b_whole)
    out.add_incoming(part, b_part)
    return out


def _store_n(builder, value, ptr, n):
    """Lanes ``l < n`` of ``value`` to ``*ptr`` (the others' memory untouched)."""
    if not _branch_on_full():
        _masked_store(builder, value, ptr, _mask(builder, n))
        return
    with builder.if_else(_full(builder, n)) as (then, otherwise):
        with then:
            builder.store(value, ptr, align=4)
        with otherwise:
            _masked_store(builder, value, ptr, _mask(builder, n))


@intrinsic
def f16_zero(typingctx):
    """All-zero ``<16 x float>`` (+0.0 in every lane)."""
    def codegen(context, builder, sig, args):
        return ir.Constant(_V16, None)

    return f16(), codegen


@intrinsic
def f16_bcast(typingctx, arr, index):
    """``arr[index]`` (float32) in all sixteen lanes."""
    if not _is_f32_array(arr) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        s = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _F32), align=4)
        v = builder.insert_element(ir.Constant(_V16, ir.Undefined), s, ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, ir.Constant(_V16, ir.Undefined),
                                      ir.Constant(ir.VectorType(_I32, 16), None))

    return f16(arr, index), codegen


@intrinsic
def f16_load(typingctx, arr, index):
    """``arr[index : index + 16]`` (float32, unaligned)."""
    if not _is_f32_array(arr) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _V16), align=4)

    return f16(arr, index), codegen


@intrinsic
def f16_load_n(typingctx, arr, index, n):
    """``arr[index : index + n]`` in lanes ``0 .. n-1`` (masked load, ``0 <= n <= 16``), 0 above."""
    if not _is_f32_array(arr) or not isinstance(index, types.Integer) \
            or not isinstance(n, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return _load_n(builder, _ptr(context, builder, sig.args[0], args[0], args[1], _V16),
                       args[2])

    return f16(arr, index, n), codegen


@intrinsic
def f16_fma(typingctx, a, b, c):
    """``a * b + c`` per lane, one rounding (``llvm.fma.v16f32``)."""
    if not (a == f16 and b == f16 and c == f16):
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V16, [_V16, _V16, _V16]), "llvm.fma.v16f32")
        return builder.call(fn, list(args))

    return f16(f16, f16, f16), codegen


@intrinsic
def f16_max(typingctx, a, b):
    """``b if b > a else a`` per lane (an ordered compare: NaN in ``b`` keeps ``a``)."""
    if not (a == f16 and b == f16):
        return None

    def codegen(context, builder, sig, args):
        gt = builder.fcmp_ordered(">", args[1], args[0])
        return builder.select(gt, args[1], args[0])

    return f16(f16, f16), codegen


@intrinsic
def f16_store_n(typingctx, out, index, v, n):
    """Store lanes ``0 .. n-1`` of ``v`` to ``out[index : index + n]`` (masked, ``0 <= n <= 16``)."""
    if not (_is_f32_array(out) and isinstance(index, types.Integer) and v == f16
            and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ptr = _ptr(context, builder, sig.args[0], args[0], args[1], _V16)
        _store_n(builder, args[2], ptr, args[3])
        return context.get_dummy_value()

    return types.none(out, index, f16, n), codegen


@intrinsic
def f16_affine_store_n(typingctx, out, index, v, scale, shift, c0, n):
    """``out[index + l] = float32(v[l] * scale[c0 + l]) + shift[c0 + l]`` for lanes ``l < n``:
    a multiply then an add (two roundings; no ``contract`` flag, so no fused multiply-add)."""
    if not (_is_f32_array(out) and _is_f32_array(scale) and _is_f32_array(shift) and v == f16
            and all(isinstance(t, types.Integer) for t in (index, c0, n))):
        return None

    def codegen(context, builder, sig, args):
        outv, idx, vv, sc, sh, c0v, nv = args
        s = _load_n(builder, _ptr(context, builder, sig.args[3], sc, c0v, _V16), nv)
        b = _load_n(builder, _ptr(context, builder, sig.args[4], sh, c0v, _V16), nv)
        y = builder.fadd(builder.fmul(vv, s), b)
        _store_n(builder, y, _ptr(context, builder, sig.args[0], outv, idx, _V16), nv)
        return context.get_dummy_value()

    return types.none(out, index, f16, scale, shift, c0, n), codegen


@intrinsic
def f16_add(typingctx, a, b):
    """``a + b`` per lane (one IEEE rounding each)."""
    if not (a == f16 and b == f16):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return f16(f16, f16), codegen


@intrinsic
def f16_div(typingctx, a, d):
    """``a / d`` per lane for a float32 scalar ``d`` (IEEE division, as the scalar op rounds)."""
    if not (a == f16 and isinstance(d, types.Float)):
        return None

    def codegen(context, builder, sig, args):
        s = context.cast(builder, args[1], sig.args[1], types.float32)
        v = builder.insert_element(ir.Constant(_V16, ir.Undefined), s, ir.Constant(_I32, 0))
        v = builder.shuffle_vector(v, ir.Constant(_V16, ir.Undefined),
                                   ir.Constant(ir.VectorType(_I32, 16), None))
        return builder.fdiv(args[0], v)

    return f16(f16, d), codegen


@intrinsic
def f16_prelu(typingctx, v, a):
    """``v if v > 0 else a * v`` per lane (PReLU's float32 formula)."""
    if not (v == f16 and a == f16):
        return None

    def codegen(context, builder, sig, args):
        gt = builder.fcmp_ordered(">", args[0], ir.Constant(_V16, None))
        return builder.select(gt, args[0], builder.fmul(args[1], args[0]))

    return f16(f16, f16), codegen


@intrinsic
def f16_fprelu(typingctx, v, pos, neg):
    """``pos * v if v >= 0 else neg * v`` per lane (FPReLU's float32 formula)."""
    if not (v == f16 and pos == f16 and neg == f16):
        return None

    def codegen(context, builder, sig, args):
        ge = builder.fcmp_ordered(">=", args[0], ir.Constant(_V16, None))
        return builder.select(ge, builder.fmul(args[1], args[0]), builder.fmul(args[2], args[0]))

    return f16(f16, f16, f16), codegen


@intrinsic
def f16_affine_n(typingctx, v, scale, shift, c0, n):
    """``float32(v[l] * scale[c0 + l]) + shift[c0 + l]`` for lanes ``l < n`` (0 above): a multiply
    then an add, two roundings (no contraction), as :func:`f16_affine_store_n` without the store."""
    if not (v == f16 and _is_f32_array(scale) and _is_f32_array(shift)
            and isinstance(c0, types.Integer) and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        vv, sc, sh, c0v, nv = args
        s = _load_n(builder, _ptr(context, builder, sig.args[1], sc, c0v, _V16), nv)
        b = _load_n(builder, _ptr(context, builder, sig.args[2], sh, c0v, _V16), nv)
        return builder.fadd(builder.fmul(vv, s), b)

    return f16(f16, scale, shift, c0, n), codegen


@intrinsic
def f16_sign_bits(typingctx, v, nonpos, n):
    """The packed signs of lanes ``l < n`` as bits ``l`` of a ``uint64`` (0 above): bit 1 when
    ``v[l] < 0`` (``nonpos`` false, ``sign_at_zero=+1``) or ``not v[l] > 0`` (``nonpos`` true,
    ``sign_at_zero=-1``), as :func:`refbnn.kernels.simd.neg_bits64` / ``nonpos_bits64``."""
    if not (v == f16 and isinstance(nonpos, types.Boolean) and isinstance(n, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        vv, np_, nv = args
        zero = ir.Constant(_V16, None)
        lt = builder.fcmp_ordered("<", vv, zero)
        le = builder.fcmp_unordered("<=", vv, zero)
        m = builder.and_(builder.select(np_, le, lt), _mask(builder, nv))
        return builder.zext(builder.bitcast(m, ir.IntType(16)), ir.IntType(64))

    return types.uint64(f16, nonpos, n), codegen


# --- bfloat16 pairs (the opt-in bf16 stem) ---------------------------------------------------------
# A ``bf32`` value is 32 bfloat16 numbers as sixteen pairs, pair ``l`` in 32-bit lane ``l``: its
# low half the even element, its high half the odd one (memory order). ``bf_dot(acc, a, b)`` is
# AVX512-BF16's VDPBF16PS as Intel documents it: per lane ``l``,
#     acc[l] = ftz(fl(acc[l] + a.odd[l] * b.odd[l]))   then
#     acc[l] = ftz(fl(acc[l] + a.even[l] * b.even[l]))
# each product exact in float32 (8-bit significands), each sum rounded to nearest even, ``ftz``
# flushing results below 2**-126 in magnitude to zero of the same sign (and denormal inputs read
# as zero: refbnn's converters never produce denormal bfloat16, see ``realconv.to_bf16``). On Zen 4
# the instruction gave exactly this for 2000 random cases (tests/test_kernels_real.py keeps
# checking it). CPUs without AVX512-BF16 get the same computation as two float32 FMAs plus the
# flush (:func:`bf_dot_emulated`, also what the tests compare the instruction with).

class BF32Type(types.Type):
    """Sixteen pairs of ``bfloat16`` held as one LLVM ``<16 x i32>`` value."""

    def __init__(self):
        super().__init__(name="vec16xbf16x2")


bf32 = BF32Type()
_VI16 = ir.VectorType(_I32, 16)


@register_model(BF32Type)
class _BF32Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VI16)


class _BFloatType(ir.Type):
    """LLVM's ``bfloat`` (llvmlite has no class for it; the IR is text, so its name suffices)."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloatType)

    def __hash__(self):
        return hash("bfloat")


_VBF32 = ir.VectorType(_BFloatType(), 32)


def _is_array_of(a, dtype):
    return isinstance(a, types.Array) and a.dtype == dtype


@intrinsic
def bf_bcast(typingctx, arr, index):
    """The pair ``arr[index], arr[index + 1]`` (``uint16`` bfloat16 bits; any alignment) in all
    sixteen lanes."""
    if not _is_array_of(arr, types.uint16) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        s = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _I32), align=2)
        v = builder.insert_element(ir.Constant(_VI16, ir.Undefined), s, ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, ir.Constant(_VI16, ir.Undefined),
                                      ir.Constant(_VI16, None))

    return bf32(arr, index), codegen


@intrinsic
def bf_load(typingctx, arr, index):
    """Sixteen pairs ``arr[index : index + 16]`` (``uint32``, each a pair of bfloat16 bits)."""
    if not _is_array_of(arr, types.uint32) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _VI16), align=4)

    return bf32(arr, index), codegen


def _bf_dot_fmas(builder, acc, a, b):
    """VDPBF16PS in float32 FMAs: odd halves first, then even ones, each result flushed."""
    hi = ir.Constant(_VI16, [0xFFFF0000] * 16)
    sixteen = ir.Constant(_VI16, [16] * 16)
    fma = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_V16, [_V16, _V16, _V16]), "llvm.fma.v16f32")
    fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16]),
                                          "llvm.fabs.v16f32")
    tiny = ir.Constant(_V16, [float(2.0 ** -126)] * 16)
    zero_bits = ir.Constant(_VI16, [0x80000000] * 16)

    def flush(v):
        # |v| < 2**-126 -> zero of v's sign (bits & sign mask)
        small = builder.fcmp_ordered("<", builder.call(fabs, [v]), tiny)
        signed_zero = builder.bitcast(builder.and_(builder.bitcast(v, _VI16), zero_bits), _V16)
        return builder.select(small, signed_zero, v)

    for half in ("odd", "even"):
        if half == "odd":
            x, y = builder.and_(a, hi), builder.and_(b, hi)
        else:
            x, y = builder.shl(a, sixteen), builder.shl(b, sixteen)
        acc = flush(builder.call(fma, [builder.bitcast(x, _V16), builder.bitcast(y, _V16), acc]))
    return acc


@intrinsic
def bf_dot(typingctx, acc, a, b):
    """``acc`` plus the pairwise products of ``a`` and ``b`` (the module's section comment): one
    VDPBF16PS where the host CPU has AVX512-BF16, :func:`bf_dot_emulated`'s FMAs elsewhere."""
    if not (acc == f16 and a == bf32 and b == bf32):
        return None

    def codegen(context, builder, sig, args):
        if not host_has_avx512_bf16():
            return _bf_dot_fmas(builder, *args)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V16, [_V16, _VBF32, _VBF32]),
            "llvm.x86.avx512bf16.dpbf16ps.512")
        return builder.call(fn, [args[0], builder.bitcast(args[1], _VBF32),
                                 builder.bitcast(args[2], _VBF32)])

    return f16(f16, bf32, bf32), codegen


@intrinsic
def bf_dot_emulated(typingctx, acc, a, b):
    """:func:`bf_dot` as float32 FMAs on every CPU (odd halves, then even, each result flushed)."""
    if not (acc == f16 and a == bf32 and b == bf32):
        return None

    def codegen(context, builder, sig, args):
        return _bf_dot_fmas(builder, *args)

    return f16(f16, bf32, bf32), codegen
