"""Array helpers shared by the conv layers: padding, im2col, the conv GEMMs and their gradients.

These functions keep no state of their own; the process-wide runtime they use (the GEMM thread
pool, the BLAS thread limit, the scratch buffers and the per-thread arenas) is
:mod:`refbnn.nn.runtime`. Results are owned arrays except where a docstring says *scratch*: such a
result lives in a :func:`~refbnn.nn.runtime.scratch` buffer and is valid only until the next call
of the same function (in any layer), so use it before calling again.

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

import numba as nb
import numpy as np
from numpy.lib.stride_tricks import as_strided

from refbnn.nn import _conv_kernels as _k
from refbnn.nn.runtime import matmul, pool, scratch, single_threaded_blas, thread_arena


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


def im2col_reference(x, kh, kw, sh, sw, ph, pw, dh, dw, pad_value=0.0, sign_at_zero=None, pb=None,
                     pr=None):
    """NumPy oracle of the column matrix ``(C*KH*KW, N*OH*OW)`` (``_conv_kernels`` layout):
    binarize (optional), pad with ``pad_value`` (``ph``/``pw`` top/left, ``pb``/``pr``
    bottom/right, default symmetric), gather windows."""
    n, c, h, w = x.shape
    pb, pr = ph if pb is None else pb, pw if pr is None else pr
    oh = (h + ph + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pw + pr - dw * (kw - 1) - 1) // sw + 1
    xp = np.pad(binarize(x, sign_at_zero), ((0, 0), (0, 0), (ph, pb), (pw, pr)),
                constant_values=pad_value)
    v = window_view(xp, kh, kw, sh, sw, dh, dw, oh, ow)  # (N, C, KH, KW, OH, OW)
    return np.ascontiguousarray(v.transpose(1, 2, 3, 0, 4, 5)).reshape(c * kh * kw, n * oh * ow)


def col2im_reference(dcols, x_shape, kh, kw, sh, sw, ph, pw, dh, dw, pb=None, pr=None):
    """NumPy oracle of the adjoint: scatter-add ``dcols`` into zeros of the padded shape, taps in
    (a, b) order, then drop the padding (``pb``/``pr`` as in :func:`im2col_reference`). Returns
    (N, C, H, W)."""
    n, c, h, w = x_shape
    pb, pr = ph if pb is None else pb, pw if pr is None else pr
    oh = (h + ph + pb - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pw + pr - dw * (kw - 1) - 1) // sw + 1
    d6 = dcols.reshape(c, kh, kw, n, oh, ow)
    dxp = np.zeros((n, c, h + ph + pb, w + pw + pr), dtype=dcols.dtype)
    for a in range(kh):
        for b in range(kw):
            dxp[:, :, a * dh: a * dh + (oh - 1) * sh + 1: sh,
                b * dw: b * dw + (ow - 1) * sw + 1: sw] += d6[:, a, b].transpose(1, 0, 2, 3)
    return dxp[:, :, ph:ph + h, pw:pw + w].copy()


class ConvGeometry:
    """Shapes of one convolution call: input (N, C, H, W), kernel (O, C/g, KH, KW).

    ``padding``: ``(ph, pw)`` (symmetric) or ``(top, bottom, left, right)``; ``ph``/``pw`` are the
    top/left offsets the kernels read from, ``pb``/``pr`` the bottom/right rows and columns (taps
    there are padding like any other tap outside the input)."""

    __slots__ = ("c", "dh", "dw", "groups", "h", "kh", "kw", "n", "o", "oh", "ow", "pb", "ph", "pr",
                 "pw", "sh", "sw", "w")

    def __init__(self, x_shape, w_shape, stride, padding, dilation, groups):
        if len(x_shape) != 4:
            raise ValueError(f"conv input must be (N, C, H, W), got shape {tuple(x_shape)}")
        self.n, self.c, self.h, self.w = x_shape
        self.o, cg, self.kh, self.kw = w_shape
        self.sh, self.sw = stride
        if len(padding) == 4:
            self.ph, self.pb, self.pw, self.pr = (int(p) for p in padding)
        else:
            (self.ph, self.pw), (self.pb, self.pr) = padding, padding
        self.dh, self.dw = dilation
        self.groups = groups
        if cg * groups != self.c:
            raise ValueError(f"input has {self.c} channels, kernel expects {cg} x {groups} groups")
        self.oh = (self.h + self.ph + self.pb - self.dh * (self.kh - 1) - 1) // self.sh + 1
        self.ow = (self.w + self.pw + self.pr - self.dw * (self.kw - 1) - 1) // self.sw + 1
        if self.oh < 1 or self.ow < 1:
            raise ValueError(f"input {self.h}x{self.w} is smaller than the kernel window")

    @property
    def args(self):
        """``(kh, kw, sh, sw, ph, pw, dh, dw)`` as the kernels and oracles take them."""
        return self.kh, self.kw, self.sh, self.sw, self.ph, self.pw, self.dh, self.dw

    @property
    def pads(self):
        """``dict(pb=..., pr=...)``: the bottom/right padding, as the oracles take it."""
        return {"pb": self.pb, "pr": self.pr}

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




def conv2d_gemm(cols, w, geom: ConvGeometry):
    """``y`` (N, O, OH, OW), owned, from columns and ``w`` (O, C/g, KH, KW): one GEMM per group
    over the batch, ``ym[g] = w[g] (O/g, K/g) @ cols[g] (K/g, N*P)`` (into scratch), then
    reordered to NCHW."""
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
        wt = np.empty((geom.o, geom.kh, geom.kw, cg), dtype=dt)
        _k.oihw_to_ohwi_kernel(np.ascontiguousarray(w), wt)
        wt = wt.reshape(g, og, taps * cg)
        dx = np.empty((geom.n, geom.c, geom.h, geom.w), dtype=dt)
    xg = x if gate else dx
    hp, wp = geom.h + geom.ph + geom.pb, geom.w + geom.pw + geom.pr
    conv = (geom.kh, geom.kw, geom.sh, geom.sw, geom.ph, geom.pw, geom.dh, geom.dw, geom.oh,
            geom.ow)

    threads = nb.get_num_threads()
    chunks = image_chunks(geom.n, p, kg * g * p * dt.itemsize, threads)
    cpx = max(c1 - c0 for c0, c1 in chunks) * p
    sizes = (g * cpx * og, 0 if cols is not None else g * kg * cpx,
             g * cpx * taps * cg if need_input_grad else 0, geom.h * geom.w * geom.c,
             hp * wp * geom.c if tap_major else 0)

    # the chunks' dw, each written by its GEMM into its own slot (summed after, in chunk order)
    parts = scratch("conv_dw_parts", (len(chunks), g) + ((og, kg) if tap_major else (kg, og)),
                    dt)

    def work(i, c0, c1):
        """dw of images c0..c1 (and their dx) into ``parts[i]``, in the calling thread's
        workspace."""
        buf = thread_arena(sum(sizes), dt)
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
            np.matmul(dyt.transpose(0, 2, 1), c_t, out=parts[i])
        else:
            if cols is None:
                c_t = views[1][:g * kg * npx].reshape(g * kg, npx)
                _k.im2col_range_kernel(x, c0, c1, *conv, float(pad_value), mode, c_t)
                c_t = c_t.reshape(g, kg, npx)
            else:
                c_t = cols[:, :, c0 * p:c1 * p]
            np.matmul(c_t, dyt, out=parts[i])
        if need_input_grad:
            dpm = views[2][:g * npx * taps * cg].reshape(g, npx, taps * cg)
            np.matmul(dyt, wt, out=dpm)
            _k.col2im_taps_kernel(dpm, c0, c1, g, *conv, xg, gate, dx,
                                  views[3].reshape(geom.h, geom.w, geom.c))

    with single_threaded_blas():
        if threads == 1 or len(chunks) == 1:
            for i, c in enumerate(chunks):
                work(i, *c)
        else:
            list(pool(threads).map(lambda ic: work(ic[0], *ic[1]), enumerate(chunks)))
    # the chunks' dw added in chunk order (deterministic for a thread count), straight to OIHW
    dw = np.empty((geom.o, cg, geom.kh, geom.kw), dtype=dt)
    _k.sum_dw_partials_kernel(parts, tap_major, geom.kh, geom.kw, dw)
    return dx, dw


def conv_padding(padding, x_shape, w_shape, stride, dilation):
    """A conv layer's ``padding`` for input ``x_shape`` (N, C, H, W) and kernel ``w_shape``
    (O, C/g, KH, KW): ``"same"`` (TensorFlow: output ``ceil(in / stride)``, the odd row/column at
    the bottom/right) resolves to ``(top, bottom, left, right)``; a pair or 4-tuple is returned."""
    if isinstance(padding, str):
        if padding != "same":
            raise ValueError(f"padding must be 'same', an int, a pair or 4 ints, got {padding!r}")
        pads = []
        for n, k, s, d in zip(x_shape[2:], w_shape[2:], stride, dilation):
            total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    return padding


def layer_padding(padding, what: str = "padding"):
    """A layer's padding argument: ``"same"``, an int or pair (symmetric), or ``(top, bottom,
    left, right)``; all >= 0. Returns ``"same"``, a pair or a 4-tuple of ints."""
    if isinstance(padding, str):
        if padding != "same":
            raise ValueError(f"{what} must be 'same', an int, a pair or 4 ints, got {padding!r}")
        return padding
    if isinstance(padding, (tuple, list)) and len(padding) == 4:
        pads = tuple(pair(p, what)[0] for p in padding)
    else:
        pads = pair(padding, what)
    if min(pads) < 0:
        raise ValueError(f"{what} must be >= 0, got {padding!r}")
    return pads


def conv2d(x, w, stride=1, padding=0, dilation=1, groups=1, pad_value=0.0):
    """Plain float cross-correlation, NCHW/OIHW (PyTorch ``conv2d`` semantics, no bias)."""
    geom = ConvGeometry(x.shape, w.shape, pair(stride), pair(padding), pair(dilation), groups)
    return conv2d_gemm(im2col(x, geom, pad_value), w.astype(x.dtype, copy=False), geom)
