"""Binary layers for training: ``BinaryConv2d`` and ``BinaryLinear`` with latent float weights.

Forward (``binarize_input=True``): ``xb = sign(x)``, padded with ``pad_value`` after the sign
(0: zero padding, as Bi-Real's PyTorch code; +1 or -1: that value; ``padding`` symmetric, 4 ints
``(top, bottom, left, right)`` or ``"same"``, TensorFlow's), correlated with ``wb =
sign(W)``; the result ``acc`` is an integer held exactly in float (a GEMM of +-1 values with
K < 2**24). Then ``y = alpha[o] * acc`` with ``alpha[o] = mean |W[o]|`` for ``scale="mean_abs"``
(Bi-Real; the exact mean rounded once, :mod:`refbnn.scale`; alpha gets no gradient) or
``y = acc`` for ``scale="none"`` (FTBNN: BN absorbs it).

sign: ``sign_at_zero=1``: ``x >= 0 -> +1`` (Larq/LCE, also -0.0); ``-1``: ``x > 0 -> +1`` (Caffe);
``0``: ``np.sign`` (torch.sign, ternary {-1, 0, +1}; float training path only). NaN raises.

Backward: ``dL/dx = dL/dxb * g(x)`` with ``act_grad`` g: ``"ste"`` 1 on ``|x| <= 1`` else 0;
``"approx_sign"`` (Bi-Real) ``2 + 2x`` on [-1, 0), ``2 - 2x`` on [0, 1), 0 elsewhere;
``"identity"`` 1. ``dL/dW = dL/dWq * (|W| <= 1)`` where ``Wq = alpha * wb`` is the weight the
conv used (clipped straight-through estimator). Padded taps get no gradient.

BinaryConv2d's forward runs on the bit-packed XNOR-popcount kernels of :func:`refbnn.bconv2d`
when it can (sign_at_zero +-1, binarized input), else as a float GEMM of +-1 values; the
backward pass always uses float GEMMs on the binarized patches.
"""

from __future__ import annotations

import numpy as np

from refbnn.nn import _conv_kernels as _ck
from refbnn.nn import functional as F
from refbnn.nn._checks import check_grad, check_input, param, positive_int
from refbnn.nn.conv import ConvLayer
from refbnn.nn.init import uniform_fan_in
from refbnn.nn.module import Module, Parameter
from refbnn.ops import bconv2d_nchw as packed_bconv2d_nchw
from refbnn.scale import mean_abs_scale

SCALES = ("none", "mean_abs")
ACT_GRADS = F.ACT_GRADS
act_grad_factor = F.act_grad_factor


def _check_options(scale, sign_at_zero, act_grad, pad_value):
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if sign_at_zero not in (1, -1, 0):
        raise ValueError(f"sign_at_zero must be 1, -1 or 0, got {sign_at_zero!r}")
    if act_grad not in ACT_GRADS:
        raise ValueError(f"act_grad must be one of {ACT_GRADS}, got {act_grad!r}")
    if pad_value not in (0, 1, -1):
        raise ValueError(f"pad_value must be 0, 1 or -1, got {pad_value!r}")


def _check_nan(x, name):
    if x.size and np.isnan(x.min()):
        raise ValueError(f"{name}: input contains NaN; sign(NaN) is undefined")


class _BinaryMixin:
    def binarized_weight(self, dtype=np.float32) -> np.ndarray:
        """``sign(W)`` as +-1 (0 at 0 for ``sign_at_zero=0``) in ``dtype``: ``F.binarize``,
        computed by a parallel Numba loop."""
        w = np.ascontiguousarray(param(self.weight, np.dtype(dtype)))
        out = np.empty_like(w)
        _ck.sign_kernel(w.reshape(-1), F.BINARIZE_MODES[self.sign_at_zero], out.reshape(-1))
        return out

    def weight_scale(self, dtype=np.float32) -> np.ndarray:
        """``alpha`` per output channel: the exact mean of ``|W[o]|`` rounded once to ``dtype``
        (:func:`refbnn.scale.mean_abs_scale`, ``scale="mean_abs"``) or ones."""
        if self.scale == "mean_abs":
            return mean_abs_scale(self.weight.data, dtype)
        return np.ones(self.weight.data.shape[0], dtype=dtype)

    def binarized_input(self, x) -> np.ndarray:
        """``sign(x)`` as this layer sees it (``x`` itself when ``binarize_input=False``)."""
        x = np.asarray(x)
        _check_nan(x, type(self).__name__)
        return F.binarize(x, self.sign_at_zero if self.binarize_input else None)

    def _input_grad(self, dxb, x):
        if not self.binarize_input or self.act_grad == "identity":
            return dxb
        dxb *= act_grad_factor(x, self.act_grad)
        return dxb

    def _weight_grad(self, dwq):
        w = self.weight.data
        g = np.ascontiguousarray(dwq, dtype=np.result_type(dwq, w))
        out = np.empty_like(g)
        _ck.clipped_ste_kernel(w.reshape(-1), g.reshape(-1), out.reshape(-1))
        self.weight.accumulate(out, owned=True)


class BinaryConv2d(_BinaryMixin, ConvLayer):
    """Binary 2-D convolution, NCHW / OIHW (see the module docstring for the exact meaning).

    ``weight`` (O, C/groups, KH, KW) latent float32. Output (N, O, OH, OW) in the dtype of ``x``.
    """

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=1, dilation=1,
                 groups=1, scale="none", sign_at_zero=1, act_grad="approx_sign", pad_value=0,
                 binarize_input=True):
        super().__init__()
        _check_options(scale, sign_at_zero, act_grad, pad_value)
        self._init_conv(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)
        self.scale, self.sign_at_zero, self.act_grad = scale, int(sign_at_zero), act_grad
        self.pad_value, self.binarize_input = float(pad_value), bool(binarize_input)
        self._cache = None
        self._cols = None
        # forward on refbnn.bconv2d's packed kernels (sign_at_zero +-1, binarized input); False
        # forces the float GEMM of +-1 values. Both give the same integers (tested).
        self.use_packed = True

    def _columns(self, x, geom, out=None):
        _check_nan(x, "BinaryConv2d")
        return F.im2col(x, geom, self.pad_value,
                        self.sign_at_zero if self.binarize_input else None, out=out)

    def _packed_path(self) -> bool:
        """Whether the forward pass can run on refbnn's bit-packed XNOR-popcount kernels."""
        return self.use_packed and self.binarize_input and self.sign_at_zero in (1, -1)

    def accumulators(self, x) -> np.ndarray:
        """Pre-scale accumulators ``acc`` (N, O, OH, OW), float in the dtype of ``x``: integers
        for binarized input, equal to ``refbnn.reference.bconv2d`` after NCHW/NHWC transposes.
        Uses no cache and does not disturb a pending backward."""
        x = check_input(x, (4,), "BinaryConv2d", self.in_channels)
        geom = self._geometry(x)
        if self._packed_path():
            w = self.weight.data
            whwio = np.empty((w.shape[2], w.shape[3], w.shape[1], w.shape[0]), dtype=w.dtype)
            # the signs packed straight from NCHW (no NHWC float copy; NaN raises there)
            acc = packed_bconv2d_nchw(x, _ck.oihw_to_hwio_kernel(w, whwio),
                                      stride=self.stride,
                                      padding=(geom.ph, geom.pb, geom.pw, geom.pr),
                                      pad_value=int(self.pad_value), dilation=self.dilation,
                                      groups=self.groups, sign_at_zero=self.sign_at_zero,
                                      what="BinaryConv2d: input")
            out = np.empty((geom.n, geom.o, geom.oh, geom.ow), dtype=x.dtype)
            return _ck.nhwc_to_nchw_kernel(acc, out)  # |acc| <= K < 2**24: exact
        return F.conv2d_gemm(self._columns(x, geom), self.binarized_weight(x.dtype), geom)

    def forward(self, x):
        x = check_input(x, (4,), "BinaryConv2d", self.in_channels)
        geom = self._geometry(x)
        packed = self._packed_path()
        # the packed kernels sign W themselves; the float GEMM and backward need sign(W)
        wb = None if packed and not self.training else self.binarized_weight(x.dtype)
        if packed:
            acc = self.accumulators(x)
            cols = None  # built in backward, from the cached x
        else:
            # the GEMM runs on +-1 weights so that acc is exact
            cols = self._cols = self._columns(x, geom, out=self._cols)
            acc = F.conv2d_gemm(cols, wb, geom)
        # alpha scales the result; backward uses wq = alpha * wb, the weight effectively applied
        wq = wb
        if self.scale == "mean_abs":
            alpha = self.weight_scale(x.dtype)
            acc *= alpha[:, None, None]
            if wb is not None:
                wq = wb * alpha[:, None, None, None]
        self._cache = (x, geom, wq, cols) if self.training else None
        return acc

    def backward(self, grad_out):
        x, geom, wq, cols = check_grad(self._cache, "BinaryConv2d")
        gated = self.binarize_input and self.act_grad != "identity"
        dx, dwq = F.conv2d_backward_fused(
            grad_out, wq, geom, x=x, cols=cols, pad_value=self.pad_value,
            sign_at_zero=self.sign_at_zero if self.binarize_input else None,
            act_grad=self.act_grad if gated else None)
        self._weight_grad(dwq)
        return dx

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"scale={self.scale!r}, sign_at_zero={self.sign_at_zero}, "
                f"act_grad={self.act_grad!r}, pad_value={self.pad_value:g}")


class BinaryLinear(_BinaryMixin, Module):
    """Binary fully connected layer: ``y = alpha * (sign(x) @ sign(W).T) + bias``; ``x`` (N, in),
    ``weight`` (out, in), optional ``bias`` (out,). Same sign, scale and gradient rules as
    :class:`BinaryConv2d`."""

    def __init__(self, in_features, out_features, bias=False, scale="none", sign_at_zero=1,
                 act_grad="approx_sign", binarize_input=True):
        super().__init__()
        _check_options(scale, sign_at_zero, act_grad, 0)
        self.in_features = positive_int(in_features, "in_features")
        self.out_features = positive_int(out_features, "out_features")
        self.scale, self.sign_at_zero, self.act_grad = scale, int(sign_at_zero), act_grad
        self.binarize_input = bool(binarize_input)
        self.weight = Parameter(uniform_fan_in((out_features, in_features), in_features))
        self.bias = Parameter(uniform_fan_in((out_features,), in_features), decay=False) if bias \
            else None
        self._cache = None

    def accumulators(self, x) -> np.ndarray:
        """Pre-scale ``sign(x) @ sign(W).T`` (N, out) in the dtype of ``x``."""
        x = check_input(x, (2,), "BinaryLinear", self.in_features)
        return self.binarized_input(x) @ self.binarized_weight(x.dtype).T

    def forward(self, x):
        x = check_input(x, (2,), "BinaryLinear", self.in_features)
        xb = self.binarized_input(x)
        alpha = self.weight_scale(x.dtype)
        y = xb @ self.binarized_weight(x.dtype).T
        if self.scale == "mean_abs":
            y *= alpha
        if self.bias is not None:
            y += param(self.bias, x.dtype)
        self._cache = (x, xb, alpha) if self.training else None
        return y

    def backward(self, grad_out):
        x, xb, alpha = check_grad(self._cache, "BinaryLinear")
        wq = self.binarized_weight(x.dtype) * alpha[:, None]
        self._weight_grad(grad_out.T @ xb)
        if self.bias is not None:
            self.bias.accumulate(grad_out.sum(axis=0))
        return self._input_grad(grad_out @ wq, x)

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, "
                f"scale={self.scale!r}, sign_at_zero={self.sign_at_zero}, "
                f"act_grad={self.act_grad!r}")
