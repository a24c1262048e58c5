"""The process-wide runtime of :mod:`refbnn.nn`: the GEMM thread pool, the BLAS limit, scratch.

This is the only state the layers' array helpers (:mod:`refbnn.nn.functional`) share:

* :func:`matmul` splits large GEMMs over ``numba.get_num_threads()`` Python threads of one pool
  (NumPy releases the GIL inside BLAS; the pool is rebuilt when the thread count changes) and runs
  BLAS itself single-threaded: during each call BLAS is limited to one thread with threadpoolctl
  (restored afterwards; ~20 us). Measured on a loaded 2-core machine, OpenBLAS's own spinning
  worker threads made a training step 4-8x slower, while blocking Python threads degrade
  gracefully.
* :func:`scratch` hands out reusable buffers for temporaries; whoever returns a view of one says so
  (*scratch* in its docstring).
* :func:`thread_arena` is a grow-only workspace per thread, for work run on :func:`pool`'s threads
  (``refbnn.nn.functional.conv2d_backward_fused``).
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numba as nb
import numpy as np

_POOL: list = [None, 0]
_BLAS: list = [None]
MIN_SPLIT_MACS = 8_000_000


def single_threaded_blas():
    """A context limiting every BLAS library to one thread (a no-op without threadpoolctl)."""
    if _BLAS[0] is None:
        try:
            from threadpoolctl import ThreadpoolController
            _BLAS[0] = ThreadpoolController()
        except ImportError:  # pragma: no cover - threadpoolctl is a dependency
            _BLAS[0] = False
    if not _BLAS[0]:
        return contextlib.nullcontext()
    return _BLAS[0].limit(limits=1, user_api="blas")


def pool(threads: int) -> ThreadPoolExecutor:
    """refbnn's thread pool of ``threads`` workers (rebuilt when ``threads`` changes)."""
    if _POOL[1] != threads:
        if _POOL[0] is not None:
            _POOL[0].shutdown(wait=True)
        _POOL[0], _POOL[1] = ThreadPoolExecutor(threads, thread_name_prefix="refbnn-gemm"), threads
    return _POOL[0]


def _chunks(p: int, threads: int):
    step = -(-p // threads)
    step = -(-step // 64) * 64
    return [(a, min(a + step, p)) for a in range(0, p, step)]


def matmul(a, b, out=None, split="cols"):
    """``a @ b`` for stacks ``a`` (g, M, K), ``b`` (g, K, P), split over threads.

    ``split="cols"``: the P columns of ``b`` and ``out`` are divided among the threads;
    ``"rows"``: the M rows of ``a`` and ``out``; ``"reduce"``: the K axis, and the partial products
    are summed in chunk order (for ``dW``, where K = N*OH*OW is the long axis). Row and column
    splits give each output element one BLAS dot product, as an unsplit call does."""
    with single_threaded_blas():
        return _matmul(a, b, out, split)


def _matmul(a, b, out, split):
    threads = nb.get_num_threads()
    g, m, k = a.shape
    p = b.shape[2]
    if threads == 1 or m * k * p < MIN_SPLIT_MACS:
        return np.matmul(a, b, out=out)
    if split == "rows":
        if out is None:
            out = np.empty((g, m, p), dtype=np.result_type(a, b))
        list(pool(threads).map(
            lambda r: np.matmul(a[:, r[0]:r[1]], b, out=out[:, r[0]:r[1]]), _chunks(m, threads)))
        return out
    if split == "reduce":
        parts = list(pool(threads).map(
            lambda r: np.matmul(a[:, :, r[0]:r[1]], b[:, r[0]:r[1], :]), _chunks(k, threads)))
        total = parts[0]
        for q in parts[1:]:
            total += q
        if out is not None:
            out[...] = total
            return out
        return total
    if out is None:
        out = np.empty((g, m, p), dtype=np.result_type(a, b))
    list(pool(threads).map(
        lambda r: np.matmul(a, b[:, :, r[0]:r[1]], out=out[:, :, r[0]:r[1]]),
        _chunks(p, threads)))
    return out


_SCRATCH: dict = {}


def scratch(tag: str, shape, dtype) -> np.ndarray:
    """The process-wide uninitialised buffer for ``(tag, shape, dtype)``, shared by every caller
    that asks for the same key: its contents are valid until the next request of that key (up to
    64 keys are kept, then all are dropped). Reusing it avoids re-faulting large fresh pages on
    every step (a fresh 20 MB array costs ~5,000 page faults). Not thread-safe."""
    key = (tag, tuple(shape), np.dtype(dtype))
    buf = _SCRATCH.get(key)
    if buf is None:
        if len(_SCRATCH) > 64:
            _SCRATCH.clear()
        buf = _SCRATCH[key] = np.empty(shape, dtype=dtype)
    return buf


_TLS = threading.local()


def thread_arena(size: int, dtype) -> np.ndarray:
    """The calling thread's flat grow-only buffer of at least ``size`` elements of ``dtype``
    (uninitialised; one per thread and dtype, freed with its thread). Valid until the same thread
    asks again: views of it must not outlive the caller's call."""
    arenas = getattr(_TLS, "arenas", None)
    if arenas is None:
        arenas = _TLS.arenas = {}
    key = np.dtype(dtype)
    buf = arenas.get(key)
    if buf is None or buf.size < size:
        buf = arenas[key] = np.empty(size, dtype=dtype)
    return buf
