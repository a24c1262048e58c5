"""``BatchNorm2d`` / ``BatchNorm1d`` with PyTorch's exact definitions.

Training: per channel ``c`` over the batch (and spatial) axes, ``mean`` and the biased variance
``var = mean((x - mean)**2)``; ``y = (x - mean) / sqrt(var + eps) * weight + bias``. The running
statistics then move as ``r = (1 - m) * r + m * stat`` with ``stat`` the batch mean and the
unbiased variance ``var * M / (M - 1)`` (M values per channel), ``m = momentum`` (or
``1 / num_batches_tracked`` when ``momentum is None``, a cumulative average). Evaluation uses the
running statistics. ``weight``/``bias`` take no weight decay by default. Training statistics
accumulate in float64 (:func:`batch_norm_train`); element-wise math is in the input dtype.
"""

from __future__ import annotations

import numpy as np

from refbnn.nn import _bn_kernels as _bn
from refbnn.nn._checks import check_grad, check_input, param, positive_int
from refbnn.nn.module import Module, Parameter


# --- training-mode arithmetic: NumPy oracles and Numba fast paths --------------------------------
def _ncl(a):
    """(N, C), (N, C, L) or (N, C, H, W) as a contiguous (N, C, L) view or copy."""
    a = np.ascontiguousarray(a)
    return a.reshape(a.shape[0], a.shape[1], -1)


def batch_norm_train_reference(x, w, b, eps):
    """NumPy oracle: ``(y, mean, var, inv)`` with per-channel (axis 1) ``mean``, biased ``var``,
    ``inv = 1 / sqrt(var + eps)``, ``y = (x - mean) * inv * w + b``; statistics in float64."""
    x3 = _ncl(x).astype(np.float64)
    mean = x3.mean(axis=(0, 2))
    var = ((x3 - mean[:, None]) ** 2).mean(axis=(0, 2))
    inv = 1.0 / np.sqrt(var + eps)
    y = (x3 - mean[:, None]) * inv[:, None] * w[:, None] + b[:, None]
    return y.astype(x.dtype).reshape(x.shape), mean, var, inv


def batch_norm_backward_reference(dy, x, mean, inv, w):
    """NumPy oracle of the training-mode gradients ``(dx, dw, db)`` in float64:
    ``xhat = (x - mean) * inv``, ``db = sum dy``, ``dw = sum dy * xhat``,
    ``dx = w * inv * (dy - db / M - xhat * dw / M)``, sums over all axes but 1."""
    d3, x3 = _ncl(dy).astype(np.float64), _ncl(x).astype(np.float64)
    m = d3.shape[0] * d3.shape[2]
    xhat = (x3 - np.asarray(mean, np.float64)[:, None]) * np.asarray(inv, np.float64)[:, None]
    db = d3.sum(axis=(0, 2))
    dw = (d3 * xhat).sum(axis=(0, 2))
    dx = (w * inv)[:, None] * (d3 - db[:, None] / m - xhat * dw[:, None] / m)
    return dx.astype(dy.dtype).reshape(dy.shape), dw, db


def batch_norm_eval_reference(x, scale, shift):
    """NumPy oracle of evaluation mode: ``x * scale + shift`` with per-channel (axis 1) ``scale``
    and ``shift`` in the dtype of ``x`` (the product rounded, then the sum)."""
    col = (1, -1) + (1,) * (x.ndim - 2)
    return x * scale.reshape(col) + shift.reshape(col)


def batch_norm_eval(x, scale, shift):
    """Fast :func:`batch_norm_eval_reference` (Numba, one (n, c) row per task): bit-identical."""
    x3 = _ncl(x)
    y = np.empty_like(x3)
    _bn.bn_affine_kernel(x3, scale.astype(x.dtype, copy=False), shift.astype(x.dtype, copy=False), y)
    return y.reshape(x.shape)


def batch_norm_train(x, w, b, eps):
    """Fast :func:`batch_norm_train_reference` (Numba, one channel per task): returns
    ``(y, mean, var, inv)``; ``mean``/``var`` float64, ``inv`` in the dtype of ``x``."""
    x3 = _ncl(x)
    c = x3.shape[1]
    y = np.empty_like(x3)
    mean, var = np.empty(c), np.empty(c)
    inv = np.empty(c, dtype=x.dtype)
    _bn.bn_forward_kernel(x3, w.astype(x.dtype, copy=False), b.astype(x.dtype, copy=False),
                          float(eps), y, mean, var, inv)
    return y.reshape(x.shape), mean, var, inv


def batch_norm_backward(dy, x, mean, inv, w):
    """Fast :func:`batch_norm_backward_reference`: ``(dx, dw, db)``; ``dw``/``db`` float64."""
    d3, x3 = _ncl(dy.astype(x.dtype, copy=False)), _ncl(x)
    c = x3.shape[1]
    dx = np.empty_like(x3)
    dw, db = np.empty(c), np.empty(c)
    _bn.bn_backward_kernel(d3, x3, mean, inv.astype(x.dtype, copy=False),
                           w.astype(x.dtype, copy=False), dx, dw, db)
    return dx.reshape(x.shape), dw, db


class _BatchNorm(Module):
    _ndims: tuple = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features = positive_int(num_features, "num_features")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if momentum is not None and not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        self.eps = float(eps)
        self.momentum = momentum
        self.weight = Parameter(np.ones(num_features, dtype=np.float32), decay=False)
        self.bias = Parameter(np.zeros(num_features, dtype=np.float32), decay=False)
        self.register_buffer("running_mean", np.zeros(num_features, dtype=np.float32))
        self.register_buffer("running_var", np.ones(num_features, dtype=np.float32))
        self.register_buffer("num_batches_tracked", np.array(0, dtype=np.int64))
        self._cache = None

    def forward(self, x):
        x = check_input(x, self._ndims, type(self).__name__, self.num_features)
        if not self.training:
            w, b = param(self.weight, x.dtype), param(self.bias, x.dtype)
            inv = 1.0 / np.sqrt(self.running_var.astype(x.dtype) + x.dtype.type(self.eps))
            scale = w * inv
            shift = b - self.running_mean.astype(x.dtype) * scale
            self._cache = None
            return batch_norm_eval(x, scale, shift)
        m = x.size // self.num_features
        if m < 2:
            raise ValueError(f"{type(self).__name__}: training needs more than 1 value per "
                             f"channel, got input shape {x.shape}")
        y, mean, var, inv = batch_norm_train(x, param(self.weight, x.dtype),
                                               param(self.bias, x.dtype), self.eps)
        self._update_running(mean, var, m)
        self._cache = (x, mean, inv, param(self.weight, x.dtype))
        return y

    def _update_running(self, mean, var, m):
        self.num_batches_tracked = np.array(self.num_batches_tracked + 1, dtype=np.int64)
        mom = (1.0 / float(self.num_batches_tracked) if self.momentum is None
               else float(self.momentum))
        unbiased = var * (m / (m - 1))
        self.running_mean = ((1 - mom) * self.running_mean + mom * mean).astype(np.float32)
        self.running_var = ((1 - mom) * self.running_var + mom * unbiased).astype(np.float32)

    def backward(self, grad_out):
        x, mean, inv, w = check_grad(self._cache, type(self).__name__)
        dx, dw, db = batch_norm_backward(grad_out, x, mean, inv, w)
        self.weight.accumulate(dw)
        self.bias.accumulate(db)
        return dx

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


class BatchNorm2d(_BatchNorm):
    """Batch normalisation of (N, C, H, W) input over (N, H, W) per channel."""

    _ndims = (4,)


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of (N, C) or (N, C, L) input over (N[, L]) per channel."""

    _ndims = (2, 3)
