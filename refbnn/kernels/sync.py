"""Two scalar intrinsics for multi-threaded drivers: an atomic counter and the CPU's cycle counter.

* :func:`fetch_add`: ``old = a[i]; a[i] += v`` as one atomic read-modify-write (sequentially
  consistent), returning ``old``: workers of one ``prange`` claim work items from a shared counter,
  so a worker that the OS holds back (another process on its core) leaves its share to the others.
* :func:`cycles`: the CPU's time-stamp counter (``llvm.readcyclecounter``; ``rdtsc`` on x86, a
  constant rate on CPUs with ``constant_tsc``), for timing stages inside a compiled call.
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


@njit(cache=True)
def read_cycles():
    """:func:`cycles` from Python (calibration)."""
    return cycles()
