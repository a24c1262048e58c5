"""Array helpers shared by the conv layers: padding, im2col/col2im, the conv GEMMs.

These functions keep no state of their own; the process-wide runtime they use (the GEMM thread
pool, the BLAS thread limit and the scratch buffers) is :mod:`refbnn.nn.runtime`. Results are
owned arrays except where a docstring says *scratch*: such a result lives in a
:func:`~refbnn.nn.runtime.scratch` buffer and is valid only until the next call of the same function
(in any layer), so use it before calling again.

Layout: NCHW images, OIHW kernels (PyTorch). Every function computes in the dtype of its input
(float32 in training, float64 in gradient checks). :func:`im2col` can binarize while it gathers
(:func:`binarize` states the sign rules) and :func:`col2im` can apply a straight-through gate.

Convolution is cross-correlation (no kernel flip), computed as one GEMM per group:
``cols[(c, a, b), (n, i, j)] = xpad[n, c, i*sh + a*dh, j*sw + b*dw]`` and
``y[n, g*Og + o, i, j] = sum_k w[g*Og + o, k] * cols[g*Kg + k, (n, i, j)]`` with ``k = (c, a, b)``
flattened C-order within the group. The float summation order inside each dot product is
BLAS's; for +-1 operands every partial sum is an integer of magnitude <= K, so the result is
exact while K < 2**24.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from refbnn.nn import _conv_kernels as _k
from refbnn.nn.runtime import matmul, scratch


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


def col2im(dcols, geom: ConvGeometry, x=None, act_grad=None):
    """Fast :func:`col2im_reference` (Numba) of channel-major ``dcols`` (C*KH*KW, N*OH*OW): the
    same additions in the same order, so equal exactly.

    With ``act_grad`` ("ste" / "approx_sign") the result is multiplied elementwise by
    ``act_grad_factor(x, act_grad)`` in the same pass (one rounding per element, as NumPy's)."""
    dx = np.empty((geom.n, geom.c, geom.h, geom.w), dtype=dcols.dtype)
    gate, xg = _gate_args(dx, x, act_grad)
    _k.col2im_kernel(dcols, geom.kh, geom.kw, geom.sh, geom.sw, geom.ph, geom.pw, geom.dh,
                     geom.dw, geom.oh, geom.ow, xg, gate, dx)
    return dx


def col2im_pixel_major(dcols_pm, geom: ConvGeometry, x=None, act_grad=None):
    """:func:`col2im` for pixel-major columns ``dcols_pm`` (groups, N*OH*OW, C/g*KH*KW), as
    :func:`conv2d_backward` produces them. Taps are added per element in (i, j, a, b) order rather
    than (a, b), so it equals :func:`col2im_reference` of the transposed columns up to float
    rounding of at most KH*KW terms."""
    dx = np.empty((geom.n, geom.c, geom.h, geom.w), dtype=dcols_pm.dtype)
    gate, xg = _gate_args(dx, x, act_grad)
    _k.col2im_pm_kernel(dcols_pm, geom.groups, geom.kh, geom.kw, geom.sh, geom.sw, geom.ph,
                        geom.pw, geom.dh, geom.dw, geom.oh, geom.ow, xg, gate, dx)
    return dx


def pixel_major_to_channel_major(dcols_pm, geom: ConvGeometry):
    """(groups, N*P, Kg) -> (C*KH*KW, N*P): the layout :func:`col2im_reference` takes."""
    return np.ascontiguousarray(dcols_pm.transpose(0, 2, 1)).reshape(geom.cols_shape)


def _gate_args(dx, x, act_grad):
    gate = _GATES[act_grad]
    if gate and (x is None or x.shape != dx.shape):
        raise ValueError("col2im: act_grad needs x of the input shape")
    return gate, (np.ascontiguousarray(x, dtype=dx.dtype) if gate else dx)


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
    np.copyto(y, ym.reshape(geom.o, geom.n, p).transpose(1, 0, 2))
    return y.reshape(geom.n, geom.o, geom.oh, geom.ow)


PIXEL_MAJOR_MAX_P = 64


def conv2d_backward(dy, cols, w, geom: ConvGeometry, need_input_grad=True):
    """Gradients of ``y = conv2d_gemm(cols, w)`` -> ``(dcols, dw)``; ``dy`` (N, O, OH, OW).

    Two GEMM orientations, chosen by output size P = OH*OW (measured: each is up to 1.7x faster
    than the other on its side of the threshold, col2im included):

    * P > ``PIXEL_MAJOR_MAX_P``: channel-major, with ``dym[g]`` (O/g, N*P): ``dw[g] = dym[g] @
      cols[g].T`` and ``dcols = w[g].T @ dym[g]`` as (C*KH*KW, N*P);
    * otherwise pixel-major, with ``dyt[g]`` (N*P, O/g): ``dw[g] = (cols[g] @ dyt[g]).T`` and
      ``dcols[g] = dyt[g] @ w[g]`` as (groups, N*P, C/g*KH*KW).

    ``dcols`` is None unless ``need_input_grad``, else *scratch* (see the module docstring; valid
    until the next ``conv2d_backward`` call of the same orientation, shape and dtype): pass it to
    :func:`input_grad` (either layout) before the next call. ``dw`` is owned. Everything is
    computed in the dtype of ``cols``.
    """
    g = geom.groups
    p = geom.oh * geom.ow
    og = geom.o // g
    npix = geom.n * p
    colsg = cols.reshape(g, -1, npix)
    wm = w.reshape(g, og, -1).astype(cols.dtype, copy=False)
    dcols = None
    if p > PIXEL_MAJOR_MAX_P:
        dym = scratch("conv_dy", (geom.o, geom.n, p), cols.dtype)
        np.copyto(dym, dy.reshape(geom.n, geom.o, p).transpose(1, 0, 2))
        dym = dym.reshape(g, og, npix)
        dw = matmul(dym, colsg.transpose(0, 2, 1), split="reduce")
        if need_input_grad:
            dcols = scratch("conv_dcols", colsg.shape, cols.dtype)
            matmul(wm.transpose(0, 2, 1), dym, out=dcols)
            dcols = dcols.reshape(geom.cols_shape)
        return dcols, dw.reshape(w.shape)
    dyt = scratch("conv_dyt", (g, geom.n, p, og), cols.dtype)
    np.copyto(dyt, dy.reshape(geom.n, g, og, p).transpose(1, 0, 3, 2))
    dyt = dyt.reshape(g, npix, og)
    dw = matmul(colsg, dyt, split="reduce").transpose(0, 2, 1)
    if need_input_grad:
        dcols = scratch("conv_dcols_pm", (g, npix, wm.shape[2]), cols.dtype)
        matmul(dyt, wm, out=dcols, split="rows")
    return dcols, np.ascontiguousarray(dw).reshape(w.shape)


def input_grad(dcols, geom: ConvGeometry, x=None, act_grad=None):
    """The input gradient from :func:`conv2d_backward`'s ``dcols`` in either layout
    (:func:`col2im` for channel-major 2-D, :func:`col2im_pixel_major` for 3-D)."""
    if dcols.ndim == 2:
        return col2im(dcols, geom, x, act_grad)
    return col2im_pixel_major(dcols, geom, x, act_grad)


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
