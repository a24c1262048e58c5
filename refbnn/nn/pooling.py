"""Pooling: ``MaxPool2d``, ``AvgPool2d`` (PyTorch semantics), ``GlobalAvgPool2d``.

Windows of ``kernel_size`` (int or pair) move by ``stride`` (default: the kernel size) over the
input (N, C, H, W) padded symmetrically by ``padding`` (at most half the kernel, as PyTorch).
"""

from __future__ import annotations

import numpy as np

from refbnn.nn import _pool_kernels as _pk
from refbnn.nn import functional as F
from refbnn.nn._checks import check_grad, check_input
from refbnn.nn.module import Module


def _tap(arr, a, b, sh, sw, oh, ow):
    """``arr[:, :, a + i*sh, b + j*sw]`` for all output positions (a strided view)."""
    return arr[:, :, a: a + (oh - 1) * sh + 1: sh, b: b + (ow - 1) * sw + 1: sw]


class _Pool2d(Module):
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = F.pair(kernel_size, "kernel_size")
        self.stride = F.pair(stride if stride is not None else kernel_size, "stride")
        if isinstance(padding, str) and type(self) is MaxPool2d and padding == "same":
            self.padding = "same"  # TensorFlow's, resolved per input (MaxPool2d only)
            self._cache = None
            return
        self.padding = F.pair(padding, "padding")
        if min(self.kernel_size + self.stride) < 1 or min(self.padding) < 0:
            raise ValueError("kernel_size and stride must be >= 1 and padding >= 0")
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"padding {self.padding} must be at most half of kernel_size "
                             f"{self.kernel_size}")
        self._cache = None

    def _geometry(self, x):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        oh, ow = F.out_size(x.shape[2], kh, sh, ph), F.out_size(x.shape[3], kw, sw, pw)
        if oh < 1 or ow < 1:
            raise ValueError(f"{type(self).__name__}: input {x.shape[2:]} smaller than the window")
        return kh, kw, sh, sw, ph, pw, oh, ow

    _tap = staticmethod(_tap)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


def _pad_to_windows(x, kh, kw, sh, sw, ph, pw, oh, ow, value):
    """``x`` padded by ``ph`` rows on top and ``pw`` columns on the left, and at the bottom/right
    by as many as the OH x OW windows reach (symmetric padding, or TensorFlow's "same")."""
    h, w = x.shape[2:]
    pb, pr = max(0, (oh - 1) * sh + kh - h - ph), max(0, (ow - 1) * sw + kw - w - pw)
    return np.pad(x, ((0, 0), (0, 0), (ph, pb), (pw, pr)), constant_values=value)


def max_pool2d_reference(x, kh, kw, sh, sw, ph, pw, oh, ow):
    """NumPy oracle of :class:`MaxPool2d`'s training forward: ``(y, arg)``, the window maxima of
    ``x`` padded with ``-inf`` (``ph``/``pw`` top/left, bottom/right as far as the OH x OW windows
    reach) and the first maximal tap ``a*KW + b`` (int32) of each window."""
    xp = _pad_to_windows(x, kh, kw, sh, sw, ph, pw, oh, ow, -np.inf)
    best = _tap(xp, 0, 0, sh, sw, oh, ow).copy()
    arg = np.zeros(best.shape, dtype=np.int32)
    for t in range(1, kh * kw):
        v = _tap(xp, t // kw, t % kw, sh, sw, oh, ow)
        arg[v > best] = t
        np.maximum(best, v, out=best)
    return best, arg


def max_pool2d_backward_reference(dy, arg, x_shape, kh, kw, sh, sw, ph, pw):
    """NumPy oracle of :class:`MaxPool2d`'s backward: ``dy`` added at each window's arg-max tap,
    taps in order, into zeros of the padded shape, then cropped to ``x_shape``."""
    oh, ow = dy.shape[2:]
    h, w = x_shape[2:]
    dxp = _pad_to_windows(np.zeros(x_shape, dtype=dy.dtype), kh, kw, sh, sw, ph, pw, oh, ow, 0)
    for t in range(kh * kw):
        _tap(dxp, t // kw, t % kw, sh, sw, oh, ow)[...] += np.where(arg == t, dy, 0)
    return dxp[:, :, ph:ph + h, pw:pw + w].copy()


class MaxPool2d(_Pool2d):
    """Maximum over each window; padded taps are ``-inf`` (never chosen). The gradient goes to the
    first maximal tap of each window in row-major (a, b) order (PyTorch's choice on ties).
    ``padding="same"``: TensorFlow's (output ``ceil(in / stride)``, the odd row/column of padding
    at the bottom/right).

    Computed by ``refbnn.nn._pool_kernels`` (equal to :func:`max_pool2d_reference` and
    :func:`max_pool2d_backward_reference`)."""

    def _geometry(self, x):
        if self.padding != "same":
            return super()._geometry(x)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        t, b, left, r = F.conv_padding("same", x.shape, (0, 0, kh, kw), self.stride, (1, 1))
        oh, ow = (x.shape[2] + t + b - kh) // sh + 1, (x.shape[3] + left + r - kw) // sw + 1
        return kh, kw, sh, sw, t, left, oh, ow

    def forward(self, x):
        x = check_input(x, (4,), "MaxPool2d")
        kh, kw, sh, sw, ph, pw, oh, ow = self._geometry(x)
        x = np.ascontiguousarray(x)
        y = np.empty((x.shape[0], x.shape[1], oh, ow), dtype=x.dtype)
        arg = np.empty(y.shape if self.training else (1, 1, 1, 1), dtype=np.int32)
        _pk.max_pool_forward_kernel(x, kh, kw, sh, sw, ph, pw, y, arg, self.training)
        self._cache = (x.shape, arg, ph, pw) if self.training else None
        return y

    def backward(self, grad_out):
        x_shape, arg, ph, pw = check_grad(self._cache, "MaxPool2d")
        kh, kw, sh, sw = *self.kernel_size, *self.stride
        dx = np.empty(x_shape, dtype=grad_out.dtype)
        _pk.max_pool_backward_kernel(np.ascontiguousarray(grad_out), arg, kh, kw, sh, sw, ph, pw,
                                     dx)
        return dx


def ceil_out_size(n: int, k: int, s: int, p: int) -> int:
    """PyTorch's ``ceil_mode`` output length: ``ceil((n + 2p - k) / s) + 1``, less one if the last
    window would start inside the right padding only."""
    out = -(-(n + 2 * p - k) // s) + 1
    if (out - 1) * s >= n + p:
        out -= 1
    return out


class AvgPool2d(_Pool2d):
    """Mean over each window of the zero-padded input. ``count_include_pad=True`` divides by the
    window's taps inside the input or its symmetric padding; ``False`` by its in-bounds taps only.

    ``ceil_mode=True`` (PyTorch's) rounds the output size up; the extra last window may run past the
    padding, and taps out there never count (so a 2x2/2 pool maps 7x7 to 4x4, the last row and column
    averaging the pixels that exist).
    """

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad=True, ceil_mode=False):
        super().__init__(kernel_size, stride, padding)
        self.count_include_pad = bool(count_include_pad)
        self.ceil_mode = bool(ceil_mode)

    def _geometry(self, x):
        if not self.ceil_mode:
            return super()._geometry(x)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        oh, ow = ceil_out_size(x.shape[2], kh, sh, ph), ceil_out_size(x.shape[3], kw, sw, pw)
        if oh < 1 or ow < 1:
            raise ValueError(f"AvgPool2d: input {x.shape[2:]} smaller than the window")
        return kh, kw, sh, sw, ph, pw, oh, ow

    def _overflow(self, h, w):
        """Rows/columns the last windows reach past ``h + 2*ph`` (``w + 2*pw``); 0 unless ceil_mode."""
        kh, kw, sh, sw, ph, pw, oh, ow = self._geometry(np.empty((1, 1, h, w)))
        return max(0, (oh - 1) * sh + kh - h - 2 * ph), max(0, (ow - 1) * sw + kw - w - 2 * pw)

    def _pad(self, x, value=0.0):
        ph, pw = self.padding
        eh, ew = self._overflow(*x.shape[2:])
        if ph == pw == eh == ew == 0:
            return x
        return np.pad(x, ((0, 0), (0, 0), (ph, ph + eh), (pw, pw + ew)), constant_values=value)

    def _divisor(self, h, w, dtype):
        kh, kw, sh, sw, ph, pw, oh, ow = self._geometry(np.empty((1, 1, h, w)))
        eh, ew = self._overflow(h, w)
        if eh == ew == 0 and (self.count_include_pad or (ph == 0 and pw == 0)):
            return dtype.type(kh * kw)
        if self.count_include_pad:
            counted = np.ones((1, 1, h + 2 * ph, w + 2 * pw), dtype=dtype)
            counted = np.pad(counted, ((0, 0), (0, 0), (0, eh), (0, ew)))
        else:
            counted = self._pad(np.ones((1, 1, h, w), dtype=dtype))
        return sum(self._tap(counted, a, b, sh, sw, oh, ow) for a in range(kh) for b in range(kw))

    def _tiles_exactly(self, h, w):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return (kh, kw) == (sh, sw) and ph == pw == 0 and h % kh == 0 and w % kw == 0

    def forward(self, x):
        x = check_input(x, (4,), "AvgPool2d")
        kh, kw, sh, sw, ph, pw, oh, ow = self._geometry(x)
        h, w = x.shape[2:]
        div = self._divisor(h, w, x.dtype)
        self._cache = (x.shape, div) if self.training else None
        x = np.ascontiguousarray(x)
        y = np.empty((x.shape[0], x.shape[1], oh, ow), dtype=x.dtype)
        return _pk.avg_pool_forward_kernel(x, kh, kw, sh, sw, ph, pw, self._div_map(div, oh, ow),
                                           y)

    @staticmethod
    def _div_map(div, oh, ow):
        return np.ascontiguousarray(np.broadcast_to(div, (1, 1, oh, ow))[0, 0])

    def backward(self, grad_out):
        x_shape, div = check_grad(self._cache, "AvgPool2d")
        kh, kw, sh, sw, ph, pw = *self.kernel_size, *self.stride, *self.padding
        oh, ow = grad_out.shape[2:]
        dx = np.empty(x_shape, dtype=grad_out.dtype)
        return _pk.avg_pool_backward_kernel(np.ascontiguousarray(grad_out), kh, kw, sh, sw, ph,
                                            pw, self._div_map(div, oh, ow).astype(grad_out.dtype),
                                            self._tiles_exactly(*x_shape[2:]), dx)

    def forward_reference(self, x):
        """NumPy oracle of :meth:`forward` (training or not): pad with zeros, add the taps in
        row-major order, divide by the window's count."""
        kh, kw, sh, sw, _, _, oh, ow = self._geometry(x)
        div = self._divisor(*x.shape[2:], x.dtype)
        xp = self._pad(x)  # x itself when there is nothing to pad
        s = self._tap(xp, 0, 0, sh, sw, oh, ow).copy()
        for t in range(1, kh * kw):
            s += self._tap(xp, t // kw, t % kw, sh, sw, oh, ow)
        return s / div

    def backward_reference(self, grad_out, x_shape):
        """NumPy oracle of :meth:`backward` for an input of ``x_shape``."""
        kh, kw, sh, sw, ph, pw = *self.kernel_size, *self.stride, *self.padding
        n, c, h, w = x_shape
        oh, ow = grad_out.shape[2:]
        g = grad_out / self._divisor(h, w, grad_out.dtype)
        if self._tiles_exactly(h, w):
            # non-overlapping windows tiling the input: every element gets exactly one tap
            out = np.empty(x_shape, dtype=grad_out.dtype)
            for t in range(kh * kw):
                self._tap(out, t // kw, t % kw, sh, sw, oh, ow)[...] = g
            return out
        eh, ew = self._overflow(h, w)
        dxp = np.zeros((n, c, h + 2 * ph + eh, w + 2 * pw + ew), dtype=grad_out.dtype)
        for t in range(kh * kw):
            self._tap(dxp, t // kw, t % kw, sh, sw, oh, ow)[...] += g
        return dxp[:, :, ph:ph + h, pw:pw + w].copy()

    def extra_repr(self):
        return (super().extra_repr() + f", count_include_pad={self.count_include_pad}"
                f", ceil_mode={self.ceil_mode}")


class GlobalAvgPool2d(Module):
    """``y[n, c] = mean_{h, w} x[n, c, h, w]``: (N, C, H, W) -> (N, C)."""

    def __init__(self):
        super().__init__()
        self._cache = None

    def forward(self, x):
        x = check_input(x, (4,), "GlobalAvgPool2d")
        self._cache = x.shape if self.training else None
        return x.mean(axis=(2, 3))

    def backward(self, grad_out):
        n, c, h, w = check_grad(self._cache, "GlobalAvgPool2d")
        g = grad_out / grad_out.dtype.type(h * w)
        return np.broadcast_to(g[:, :, None, None], (n, c, h, w)).copy()
