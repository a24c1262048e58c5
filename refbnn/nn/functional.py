"""Stateless array helpers shared by the conv layers: padding, im2col, the conv GEMMs and their
gradients.

Layout: NCHW images, OIHW kernels (PyTorch). Every function computes in the dtype of its input
(float32 in training, float64 in gradient checks). :func:`im2col` can binarize while it gathers
(:func:`binarize` states the sign rules) and :func:`conv2d_backward_fused` can apply a
straight-through gate to the input gradient; :func:`im2col_reference` and
:func:`col2im_reference` are the NumPy oracles of the column layout and its adjoint.

Convolution is cross-correlation (no kernel flip), computed as one GEMM per group:
``cols[(c, a, b), (n, i, j)] = xpad[n, c, i*sh + a*dh, j*sw + b*dw]`` and
``y[n, g*Og + o, i, j] = sum_k w[g*Og + o, k] * cols[g*Kg + k, (n, i, j)]`` with ``k = (c, a, b)``
flattened C-order within the group. The float summation order inside each dot product is
BLAS's; for +-1 operands every partial sum is an integer of magnitude <= K, so the result is
exact while K < 2**24.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numba as nb
import numpy as np
from numpy.lib.stride_tricks import as_strided

from refbnn.nn import _conv_kernels as _k


def pair(v, what: str = "value") -> tuple[int, int]:
    """``v`` as an ``(int, int)`` pair; ints are repeated. Raises ``ValueError`` otherwise."""
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    t = tuple(v)
    if len(t) != 2 or not all(isinstance(e, (int, np.integer)) for e in t):
        raise ValueError(f"{what} must be an int or a pair of ints, got {v!r}")
    return int(t[0]), int(t[1])


def out_size(n: int, k: int, s: int, p: int, d: int = 1) -> int:
    """Output length of a sliding window: ``floor((n + 2p - d(k-1) - 1) / s) + 1`` (PyTorch)."""
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def pad_hw(x: np.ndarray, ph: int, pw: int, value: float = 0.0) -> np.ndarray:
    """``x`` (N, C, H, W) padded symmetrically by ``ph`` rows and ``pw`` columns of ``value``.

    Returns ``x`` itself (no copy) when there is nothing to pad.
    """
    if ph == 0 and pw == 0:
        return x
    n, c, h, w = x.shape
    out = np.empty((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
    if value == 0.0:
        # Zero only the border, not the whole buffer.
        out[:, :, :ph] = 0
        out[:, :, h + ph:] = 0
        out[:, :, :, :pw] = 0
        out[:, :, :, w + pw:] = 0
    else:
        out[:, :, :ph] = value
        out[:, :, h + ph:] = value
        out[:, :, :, :pw] = value
        out[:, :, :, w + pw:] = value
    out[:, :, ph:ph + h, pw:pw + w] = x
    return out


def window_view(xp: np.ndarray, kh, kw, sh, sw, dh, dw, oh, ow) -> np.ndarray:
    """Read-only strided view ``v[n, c, a, b, i, j] = xp[n, c, i*sh + a*dh, j*sw + b*dw]``."""
    sn, sc, s_h, s_w = xp.strides
    n, c = xp.shape[:2]
    return as_strided(xp, shape=(n, c, kh, kw, oh, ow),
                      strides=(sn, sc, s_h * dh, s_w * dw, s_h * sh, s_w * sw), writeable=False)


BINARIZE_MODES = {None: 0, 1: 1, -1: -1, 0: 2}


def binarize(x: np.ndarray, sign_at_zero) -> np.ndarray:
    """``+-1`` in the dtype of ``x``: sign_at_zero 1 -> ``x >= 0 -> +1``; -1 -> ``x > 0 -> +1``;
    0 -> ``np.sign`` (ternary, 0 -> 0). ``None`` returns ``x`` unchanged."""
    if sign_at_zero is None:
        return x
    one = x.dtype.type(1)
    if sign_at_zero == 1:
        return np.where(x >= 0, one, -one)
    if sign_at_zero == -1:
        return np.where(x > 0, one, -one)
    return np.sign(x)


def im2col_reference(x, kh, kw, sh, sw, ph, pw, dh, dw, pad_value=0.0, sign_at_zero=None):
    """NumPy oracle of the column matrix ``(C*KH*KW, N*OH*OW)`` (``_conv_kernels`` layout):
    binarize (optional), pad with ``pad_value``, gather windows."""
    n, c, h, w = x.shape
    oh, ow = out_size(h, kh, sh, ph, dh), out_size(w, kw, sw, pw, dw)
    xp = pad_hw(binarize(x, sign_at_zero), ph, pw, pad_value)
    v = window_view(xp, kh, kw, sh, sw, dh, dw, oh, ow)  # (N, C, KH, KW, OH, OW)
    return np.ascontiguousarray(v.transpose(1, 2, 3, 0, 4, 5)).reshape(c * kh * kw, n * oh * ow)


def col2im_reference(dcols, x_shape, kh, kw, sh, sw, ph, pw, dh, dw):
    """NumPy oracle of the adjoint: scatter-add ``dcols`` into zeros of the padded shape, taps in
    (a, b) order, then drop the padding. Returns (N, C, H, W)."""
    n, c, h, w = x_shape
    oh, ow = out_size(h, kh, sh, ph, dh), out_size(w, kw, sw, pw, dw)
    d6 = dcols.reshape(c, kh, kw, n, oh, ow)
    dxp = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=dcols.dtype)
    for a in range(kh):
        for b in range(kw):
            dxp[:, :, a * dh: a * dh + (oh - 1) * sh + 1: sh,
                b * dw: b * dw + (ow - 1) * sw + 1: sw] += d6[:, a, b].transpose(1, 0, 2, 3)
    return dxp[:, :, ph:ph + h, pw:pw + w].copy()


class ConvGeometry:
    """Shapes of one convolution call: input (N, C, H, W), kernel (O, C/g, KH, KW)."""

    __slots__ = ("c", "dh", "dw", "groups", "h", "kh", "kw", "n", "o", "oh", "ow", "ph", "pw",
                 "sh", "sw", "w")

    def __init__(self, x_shape, w_shape, stride, padding, dilation, groups):
        if len(x_shape) != 4:
            raise ValueError(f"conv input must be (N, C, H, W), got shape {tuple(x_shape)}")
        self.n, self.c, self.h, self.w = x_shape
        self.o, cg, self.kh, self.kw = w_shape
        self.sh, self.sw = stride
        self.ph, self.pw = padding
        self.dh, self.dw = dilation
        self.groups = groups
        if cg * groups != self.c:
            raise ValueError(f"input has {self.c} channels, kernel expects {cg} x {groups} groups")
        self.oh = out_size(self.h, self.kh, self.sh, self.ph, self.dh)
        self.ow = out_size(self.w, self.kw, self.sw, self.pw, self.dw)
        if self.oh < 1 or self.ow < 1:
            raise ValueError(f"input {self.h}x{self.w} is smaller than the kernel window")

    @property
    def args(self):
        """``(kh, kw, sh, sw, ph, pw, dh, dw)`` as the kernels and oracles take them."""
        return self.kh, self.kw, self.sh, self.sw, self.ph, self.pw, self.dh, self.dw

    @property
    def cols_shape(self):
        return self.c * self.kh * self.kw, self.n * self.oh * self.ow


def im2col(x, geom: ConvGeometry, pad_value=0.0, sign_at_zero=None, out=None):
    """Fast :func:`im2col_reference` (Numba, exact copy). ``out`` is reused if it fits."""
    if out is None or out.shape != geom.cols_shape or out.dtype != x.dtype:
        out = np.empty(geom.cols_shape, dtype=x.dtype)
    mode = BINARIZE_MODES[sign_at_zero]
    _k.im2col_kernel(np.ascontiguousarray(x), *geom.args[:2], geom.sh, geom.sw, geom.ph, geom.pw,
                     geom.dh, geom.dw, geom.oh, geom.ow, float(pad_value), mode, out)
    return out


ACT_GRADS = ("ste", "approx_sign", "identity")
_GATES = {None: 0, "identity": 0, "ste": 1, "approx_sign": 2}


def act_grad_factor(x: np.ndarray, act_grad: str) -> np.ndarray:
    """The derivative that ``act_grad`` substitutes for d sign(x)/dx, elementwise, dtype of x:
    ``"ste"`` 1 on ``|x| <= 1`` else 0; ``"approx_sign"`` ``2 + 2x`` on [-1, 0), ``2 - 2x`` on
    [0, 1), 0 elsewhere; ``"identity"`` 1."""
    if act_grad == "ste":
        return (np.abs(x) <= 1).astype(x.dtype)
    if act_grad == "approx_sign":
        g = np.abs(x)
        g *= -2
        g += 2  # 2 - 2|x|: equals 2 + 2x on [-1, 0) and 2 - 2x on [0, 1), <= 0 outside
        np.maximum(g, 0, out=g)
        return g
    if act_grad == "identity":
        return np.ones_like(x)
    raise ValueError(f"act_grad must be one of {ACT_GRADS}, got {act_grad!r}")


# --- threaded GEMMs ------------------------------------------------------------------------------
# refbnn splits its large GEMMs over ``numba.get_num_threads()`` Python threads (NumPy releases the
# GIL inside BLAS) and runs BLAS itself single-threaded: during each call BLAS is limited to one
# thread with threadpoolctl (restored afterwards; ~20 us). Measured on a loaded 2-core machine,
# OpenBLAS's own spinning worker threads made a training step 4-8x slower, while blocking Python
# threads degrade gracefully.
_POOL: list = [None, 0]
_BLAS: list = [None]
MIN_SPLIT_MACS = 8_000_000


def _single_threaded_blas():
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


def _pool(threads: int) -> ThreadPoolExecutor:
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
    with _single_threaded_blas():
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
        list(_pool(threads).map(
            lambda r: np.matmul(a[:, r[0]:r[1]], b, out=out[:, r[0]:r[1]]), _chunks(m, threads)))
        return out
    if split == "reduce":
        parts = list(_pool(threads).map(
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
    list(_pool(threads).map(
        lambda r: np.matmul(a, b[:, :, r[0]:r[1]], out=out[:, :, r[0]:r[1]]),
        _chunks(p, threads)))
    return out


_SCRATCH: dict = {}


def scratch(tag: str, shape, dtype) -> np.ndarray:
    """A reusable uninitialised buffer (one per tag, shape and dtype) for temporaries that do not
    outlive a call; avoids re-faulting large fresh pages on every step. Not thread-safe."""
    key = (tag, tuple(shape), np.dtype(dtype))
    buf = _SCRATCH.get(key)
    if buf is None:
        if len(_SCRATCH) > 64:
            _SCRATCH.clear()
        buf = _SCRATCH[key] = np.empty(shape, dtype=dtype)
    return buf


def conv2d_gemm(cols, w, geom: ConvGeometry):
    """``y`` (N, O, OH, OW) from columns and ``w`` (O, C/g, KH, KW): one GEMM per group over the
    batch, ``ym[g] = w[g] (O/g, K/g) @ cols[g] (K/g, N*P)``, then reordered to NCHW."""
    g = geom.groups
    p = geom.oh * geom.ow
    wm = w.reshape(g, geom.o // g, -1)
    ym = scratch("conv_y", (g, geom.o // g, geom.n * p), cols.dtype)
    matmul(wm, cols.reshape(g, -1, geom.n * p), out=ym)
    y = np.empty((geom.n, geom.o, p), dtype=cols.dtype)
    _k.swap01_kernel(ym.reshape(geom.o, geom.n, p), y)  # a parallel copy
    return y.reshape(geom.n, geom.o, geom.oh, geom.ow)


# conv2d_backward_fused's chunking (see image_chunks; measured on the 2-core EPYC: 2 MB chunks
# 10-18% faster on the wide layers than whole-batch GEMMs, reductions under ~2048 pixels slower)
CHUNK_BYTES = 2 << 20
CHUNK_MIN_PIXELS = 2048
TASKS_PER_THREAD = 2
# tap-major pixel-major columns up to this many output pixels per image (measured: 2-10x faster
# to build than channel-major; on 28x28 outputs the channel-major dW GEMM was faster)
TAP_MAJOR_MAX_P = 256


_TLS = threading.local()


def _arena(size: int, dtype) -> np.ndarray:
    """A flat grow-only buffer of at least ``size`` elements, one per thread and dtype (freed with
    its thread): the workspace of :func:`conv2d_backward_fused`, whose views never outlive a call."""
    arenas = getattr(_TLS, "arenas", None)
    if arenas is None:
        arenas = _TLS.arenas = {}
    key = np.dtype(dtype)
    buf = arenas.get(key)
    if buf is None or buf.size < size:
        buf = arenas[key] = np.empty(size, dtype=dtype)
    return buf


def image_chunks(n: int, p: int, image_bytes: int, threads: int):
    """:func:`conv2d_backward_fused`'s image chunks ``[(n0, n1), ...]`` of near-equal size: about
    :data:`CHUNK_BYTES` of columns each (the GEMMs then read what was just written from cache) but
    at least :data:`CHUNK_MIN_PIXELS` pixels (the dW GEMM's reduction), and with ``threads > 1``
    a multiple of ``threads`` chunks, up to ``threads *`` :data:`TASKS_PER_THREAD` when the pixel
    minimum allows (handed to whichever thread is free, a core slowed by another process gets less
    of the work)."""
    min_imgs = max(1, -(-CHUNK_MIN_PIXELS // p))
    step = max(min_imgs, CHUNK_BYTES // image_bytes)
    count = -(-n // step)
    if threads > 1:
        count = max(count, threads * max(1, min(TASKS_PER_THREAD, n // (threads * min_imgs))))
        count = -(-count // threads) * threads
    count = min(count, n)
    return [(n * i // count, n * (i + 1) // count) for i in range(count)]


def conv2d_backward_fused(dy, w, geom: ConvGeometry, x=None, cols=None, pad_value=0.0,
                          sign_at_zero=None, act_grad=None, need_input_grad=True):
    """Gradients ``(dx, dw)`` of ``y = conv2d_gemm(im2col(x), w)`` for ``dy`` (N, O, OH, OW).

    The batch is cut into chunks of consecutive images (:func:`image_chunks`), run with ``T =
    numba.get_num_threads() > 1`` by refbnn's threads as each becomes free. Per chunk, in the
    thread's own workspace:

    1. ``dyt`` (groups, n*P, O/g): ``dy`` pixel-major;
    2. the chunk's columns, built from ``x`` (``pad_value``, ``sign_at_zero`` as in :func:`im2col`)
       or taken from ``cols`` (:func:`im2col`'s full matrix) when given: tap-major pixel-major
       (groups, n*P, KH*KW*C/g) when P <= :data:`TAP_MAJOR_MAX_P` (``im2col_taps_kernel``), else
       channel-major (C*KH*KW, n*P) (``im2col_range_kernel``);
    3. the chunk's ``dw[g]``: ``dyt[g].T @ cols[g]`` (tap-major) or ``cols[g] @ dyt[g]``
       (channel-major), one BLAS GEMM per group;
    4. with ``need_input_grad``: ``dpm[g] = dyt[g] @ wt[g]`` with ``wt`` the kernel in tap-major
       (O/g, KH*KW*C/g) order, scattered back by ``col2im_taps_kernel`` into the chunk's images
       of ``dx`` (N, C, H, W), times ``act_grad_factor(x, act_grad)`` when ``act_grad`` is given.

    ``dw`` is the chunks' sum in chunk order, and the chunks depend only on the shapes and ``T``:
    deterministic for a given thread count. Float summation order: BLAS's within each dot product
    (over a chunk's pixels for ``dw``, then chunk by chunk; over O/g for ``dpm``), then <= KH*KW
    taps per ``dx`` element in row-major output-pixel order (:func:`col2im_reference` adds them in
    (a, b) order): equal to the plain definition up to float rounding. Returns ``(None, dw)``
    without ``need_input_grad``; ``dw`` (O, C/g, KH, KW) in the dtype of ``dy``.
    """
    g, p = geom.groups, geom.oh * geom.ow
    og, cg = geom.o // g, geom.c // g
    kg, taps = cg * geom.kh * geom.kw, geom.kh * geom.kw
    dt = dy.dtype
    dy = np.ascontiguousarray(dy).reshape(geom.n, g, og, p)
    gate = _GATES[act_grad] if need_input_grad else 0
    tap_major = cols is None and p <= TAP_MAJOR_MAX_P
    if cols is None:
        if x is None:
            raise ValueError("conv2d_backward_fused needs x or cols")
        x = np.ascontiguousarray(x, dtype=dt)
        mode = BINARIZE_MODES[sign_at_zero]
    else:
        cols = cols.reshape(g, kg, geom.n * p)
    if gate and (x is None or x.shape != (geom.n, geom.c, geom.h, geom.w)):
        raise ValueError("conv2d_backward_fused: act_grad needs x of the input shape")
    wt = None
    dx = None
    if need_input_grad:
        wt = np.ascontiguousarray(
            w.astype(dt, copy=False).reshape(g, og, cg, taps).transpose(0, 1, 3, 2)).reshape(
                g, og, taps * cg)
        dx = np.empty((geom.n, geom.c, geom.h, geom.w), dtype=dt)
    xg = x if gate else dx
    hp, wp = geom.h + 2 * geom.ph, geom.w + 2 * geom.pw
    conv = (geom.kh, geom.kw, geom.sh, geom.sw, geom.ph, geom.pw, geom.dh, geom.dw, geom.oh,
            geom.ow)

    threads = nb.get_num_threads()
    chunks = image_chunks(geom.n, p, kg * g * p * dt.itemsize, threads)
    cpx = max(c1 - c0 for c0, c1 in chunks) * p
    sizes = (g * cpx * og, 0 if cols is not None else g * kg * cpx,
             g * cpx * taps * cg if need_input_grad else 0, geom.h * geom.w * geom.c,
             hp * wp * geom.c if tap_major else 0)

    def work(c0, c1):
        """dw of images c0..c1 (and their dx), in the calling thread's workspace."""
        buf = _arena(sum(sizes), dt)
        views, at = [], 0
        for s in sizes:
            views.append(buf[at:at + s])
            at += s
        npx = (c1 - c0) * p
        dyt = views[0][:g * npx * og].reshape(g, npx, og)
        np.copyto(dyt.reshape(g, c1 - c0, p, og), dy[c0:c1].transpose(1, 0, 3, 2))
        if tap_major:
            c_t = views[1][:g * npx * kg].reshape(g, npx, kg)
            _k.im2col_taps_kernel(x, c0, c1, g, *conv, float(pad_value), mode,
                                  views[4].reshape(hp, wp, geom.c), c_t)
            part = np.matmul(dyt.transpose(0, 2, 1), c_t)
        else:
            if cols is None:
                c_t = views[1][:g * kg * npx].reshape(g * kg, npx)
                _k.im2col_range_kernel(x, c0, c1, *conv, float(pad_value), mode, c_t)
                c_t = c_t.reshape(g, kg, npx)
            else:
                c_t = cols[:, :, c0 * p:c1 * p]
            part = np.matmul(c_t, dyt)
        if need_input_grad:
            dpm = views[2][:g * npx * taps * cg].reshape(g, npx, taps * cg)
            np.matmul(dyt, wt, out=dpm)
            _k.col2im_taps_kernel(dpm, c0, c1, g, *conv, xg, gate, dx,
                                  views[3].reshape(geom.h, geom.w, geom.c))
        return part

    with _single_threaded_blas():
        if threads == 1 or len(chunks) == 1:
            parts = (work(*c) for c in chunks)
        else:
            parts = _pool(threads).map(lambda c: work(*c), chunks)
        # the chunks' dw added in chunk order as they arrive: deterministic for a thread count
        total = None
        for q in parts:
            if total is None:
                total = q
            else:
                total += q
    if tap_major:  # (g, O/g, (a, b, c)) -> (O, C/g, KH, KW)
        dw = total.reshape(g, og, geom.kh, geom.kw, cg).transpose(0, 1, 4, 2, 3)
    else:  # (g, (c, a, b), O/g) -> (O, C/g, KH, KW)
        dw = total.transpose(0, 2, 1)
    return dx, np.ascontiguousarray(dw).reshape(geom.o, cg, geom.kh, geom.kw)


def conv2d(x, w, stride=1, padding=0, dilation=1, groups=1, pad_value=0.0):
    """Plain float cross-correlation, NCHW/OIHW (PyTorch ``conv2d`` semantics, no bias)."""
    geom = ConvGeometry(x.shape, w.shape, pair(stride), pair(padding), pair(dilation), groups)
    return conv2d_gemm(im2col(x, geom, pad_value), w.astype(x.dtype, copy=False), geom)
