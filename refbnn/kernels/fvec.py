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

Array arguments are arrays plus a flat element index: there is no bounds check and no negative-index
wrap; callers guarantee ``index .. index + n - 1`` is in range.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

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


def _masked_store(builder, value, ptr, mask):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [_V16, ir.PointerType(_V16), _I32, _M16]),
        "llvm.masked.store.v16f32.p0v16f32")
    builder.call(fn, [value, ptr, ir.Constant(_I32, 4), mask])


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
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V16, [ir.PointerType(_V16), _I32, _M16, _V16]),
            "llvm.masked.load.v16f32.p0v16f32")
        ptr = _ptr(context, builder, sig.args[0], args[0], args[1], _V16)
        return builder.call(fn, [ptr, ir.Constant(_I32, 4), _mask(builder, args[2]),
                                 ir.Constant(_V16, None)])

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
        _masked_store(builder, args[2], ptr, _mask(builder, args[3]))
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
        mask = _mask(builder, nv)
        zero = ir.Constant(_V16, None)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_V16, [ir.PointerType(_V16), _I32, _M16, _V16]),
            "llvm.masked.load.v16f32.p0v16f32")
        s = builder.call(fn, [_ptr(context, builder, sig.args[3], sc, c0v, _V16),
                              ir.Constant(_I32, 4), mask, zero])
        b = builder.call(fn, [_ptr(context, builder, sig.args[4], sh, c0v, _V16),
                              ir.Constant(_I32, 4), mask, zero])
        y = builder.fadd(builder.fmul(vv, s), b)
        _masked_store(builder, y, _ptr(context, builder, sig.args[0], outv, idx, _V16), mask)
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
