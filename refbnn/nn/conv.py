"""Real-valued ``Conv2d`` and ``Linear`` (PyTorch semantics, NCHW / OIHW, float32 parameters)."""

from __future__ import annotations

from refbnn.nn import functional as F
from refbnn.nn._checks import check_grad, check_input, param, positive_int
from refbnn.nn.init import uniform_fan_in
from refbnn.nn.module import Module, Parameter


class ConvLayer(Module):
    """What :class:`Conv2d` and :class:`refbnn.nn.binary.BinaryConv2d` share: the checked geometry
    (``kernel_size``, ``stride``, ``dilation`` as int pairs, ``padding`` as the layer's padding
    spec, ``groups`` dividing both channel counts), the latent ``weight`` (O, C/groups, KH, KW)
    initialised uniform in +-1/sqrt(fan_in), and the per-input :class:`~refbnn.nn.functional.ConvGeometry`."""

    def _init_conv(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                   groups) -> int:
        """Check and store the geometry, create ``weight``; return its fan-in ``C/groups*KH*KW``."""
        self.in_channels = positive_int(in_channels, "in_channels")
        self.out_channels = positive_int(out_channels, "out_channels")
        self.groups = positive_int(groups, "groups")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels {in_channels} and out_channels {out_channels} must be "
                             f"divisible by groups {groups}")
        self.kernel_size = F.pair(kernel_size, "kernel_size")
        self.stride = F.pair(stride, "stride")
        self.padding = F.layer_padding(padding)
        self.dilation = F.pair(dilation, "dilation")
        if min(self.kernel_size + self.stride + self.dilation) < 1:
            raise ValueError("kernel_size, stride and dilation must be >= 1 and padding >= 0")
        kh, kw = self.kernel_size
        fan_in = in_channels // groups * kh * kw
        self.weight = Parameter(uniform_fan_in((out_channels, in_channels // groups, kh, kw),
                                               fan_in))
        return fan_in

    def _geometry(self, x):
        pad = F.conv_padding(self.padding, x.shape, self.weight.shape, self.stride, self.dilation)
        return F.ConvGeometry(x.shape, self.weight.shape, self.stride, pad, self.dilation,
                              self.groups)


class Conv2d(ConvLayer):
    """``y[n, o] = bias[o] + sum_{c, a, b} w[o, c, a, b] * xpad[n, g*Cg + c, i*sh + a*dh, j*sw + b*dw]``.

    Cross-correlation as ``torch.nn.Conv2d``: ``x`` (N, C, H, W) zero-padded symmetrically by
    ``padding`` (int or (ph, pw)), or by ``(top, bottom, left, right)``, or ``"same"``
    (TensorFlow: output ``ceil(in / stride)``, the odd row/column at the bottom/right);
    ``weight`` (O, C/groups, KH, KW); ``bias`` (O,) if ``bias``.
    Output (N, O, OH, OW), ``OH = floor((H + 2ph - dh(KH-1) - 1) / sh) + 1``; computed in the dtype
    of ``x`` (float32 or float64) as an im2col GEMM (BLAS summation order).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=False):
        super().__init__()
        fan_in = self._init_conv(in_channels, out_channels, kernel_size, stride, padding, dilation,
                                 groups)
        self.bias = Parameter(uniform_fan_in((out_channels,), fan_in), decay=False) if bias \
            else None
        self._cache = None
        self._cols = None

    def forward(self, x):
        x = check_input(x, (4,), type(self).__name__, self.in_channels)
        geom = self._geometry(x)
        w = param(self.weight, x.dtype)
        cols = F.im2col(x, geom, 0.0, None, out=self._cols)
        y = F.conv2d_gemm(cols, w, geom)
        if self.bias is not None:
            y += param(self.bias, x.dtype)[:, None, None]
        self._cols = cols
        self._cache = (geom, w) if self.training else None
        return y

    def backward(self, grad_out):
        geom, w = check_grad(self._cache, type(self).__name__)
        dx, dw = F.conv2d_backward_fused(grad_out, w, geom, cols=self._cols)
        self.weight.accumulate(dw)
        if self.bias is not None:
            self.bias.accumulate(grad_out.sum(axis=(0, 2, 3)))
        return dx

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}, "
                f"bias={self.bias is not None}")


class Linear(Module):
    """``y = x @ weight.T + bias``; ``x`` (N, in_features), ``weight`` (out, in), ``bias`` (out,)."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features = positive_int(in_features, "in_features")
        self.out_features = positive_int(out_features, "out_features")
        self.weight = Parameter(uniform_fan_in((out_features, in_features), in_features))
        self.bias = Parameter(uniform_fan_in((out_features,), in_features), decay=False) if bias \
            else None
        self._cache = None

    def forward(self, x):
        x = check_input(x, (2,), "Linear", self.in_features)
        w = param(self.weight, x.dtype)
        y = x @ w.T
        if self.bias is not None:
            y += param(self.bias, x.dtype)
        self._cache = (x, w) if self.training else None
        return y

    def backward(self, grad_out):
        x, w = check_grad(self._cache, "Linear")
        self.weight.accumulate(grad_out.T @ x)
        if self.bias is not None:
            self.bias.accumulate(grad_out.sum(axis=0))
        return grad_out @ w

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


