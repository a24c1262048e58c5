"""Intrinsics for compiled drivers: an atomic counter, the CPU's cycle counter, a borrowed view.

* :func:`fetch_add`: ``old = a[i]; a[i] += v`` as one atomic read-modify-write (sequentially
  consistent), returning ``old``: workers of one ``prange`` claim work items from a shared counter,
  so a worker that the OS holds back (another process on its core) leaves its share to the others.
* :func:`cycles`: the CPU's time-stamp counter (``llvm.readcyclecounter``; ``rdtsc`` on x86, a
  constant rate on CPUs with ``constant_tsc``), for timing stages inside a compiled call.
* :func:`borrowed`: an array as a view Numba does not reference-count. Passing an array into an
  inlined function, or reading one from a structref, costs an ``NRT_incref``/``NRT_decref`` pair
  (calls, each an atomic update); in a per-tile loop that is as much as the tile's arithmetic.
  A borrowed view is valid only while the array it came from is alive (the caller holds it).
"""

from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def fetch_add(typingctx, arr, index, value):
    """Atomically add ``value`` to the int64 ``arr[index]``; returns the value before the add."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.int64
            and isinstance(index, types.Integer) and isinstance(value, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, v, "seq_cst")

    return types.int64(arr, index, value), codegen


@intrinsic
def cycles(typingctx):
    """The CPU's cycle (time-stamp) counter as an int64."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(64), []),
                                            "llvm.readcyclecounter")
        return builder.call(fn, [])

    return types.int64(), codegen


@intrinsic
def borrowed(typingctx, arr):
    """``arr`` (any array) as the same view with no meminfo and no parent: not reference-counted."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, sig, args):
        src = context.make_array(sig.args[0])(context, builder, args[0])
        dst = context.make_array(sig.return_type)(context, builder)
        for field in ("data", "shape", "strides", "itemsize", "nitems"):
            setattr(dst, field, getattr(src, field))
        dst.meminfo = cgutils.get_null_value(dst.meminfo.type)
        dst.parent = cgutils.get_null_value(dst.parent.type)
        return dst._getvalue()

    return arr(arr), codegen


@njit(cache=True)
def read_cycles():
    """:func:`cycles` from Python (calibration)."""
    return cycles()
