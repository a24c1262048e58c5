"""PyTorch twins of refbnn models, and weights moved both ways (needs the ``torch`` extra).

``twin(config)`` builds a ``torch.nn.Module`` with exactly refbnn's layer names, so
``state_dict`` keys and shapes are identical; :func:`to_torch_state` / :func:`from_torch_state`
convert the arrays. The binary layers follow the official Bi-Real Net PyTorch code, with refbnn's
sign semantics (``sign_at_zero``: +1 Larq/LCE, -1 Caffe, 0 ``torch.sign``):

* activations: ``sign(x)`` forward; backward ``approx_sign`` (2 + 2x on [-1, 0), 2 - 2x on [0, 1)),
  ``ste`` (1 on |x| <= 1) or ``identity``;
* weights: ``alpha * sign(W)`` (``alpha = mean |W|`` per output channel, the exact mean rounded
  once, :func:`refbnn.scale.mean_abs_scale`, detached; or 1), gradient
  ``dL/dWb`` passed to ``W`` where ``|W| <= 1`` (Bi-Real's clamp trick);
* padding applied after ``sign`` with the layer's ``pad_value``.

:func:`load_official_birealnet` reads the official Bi-Real Net checkpoint layout
(``module.`` prefixes, ``binary_conv.weights`` stored flat as ``(O*I*9, 1)``; files:
:mod:`refbnn.interop.checkpoints` and ``python -m refbnn.convert``).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from refbnn.interop.checkpoints import map_state, strip_prefix
from refbnn.models.config import binary_options, bridge_spec, resolve, stage_specs
from refbnn.scale import mean_abs_scale


def sign_t(x, sign_at_zero=1):
    if sign_at_zero == 1:
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
    if sign_at_zero == -1:
        return torch.where(x > 0, 1.0, -1.0).to(x.dtype)
    return torch.sign(x)


class BinarizeActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sign_at_zero, act_grad):
        ctx.save_for_backward(x)
        ctx.act_grad = act_grad
        return sign_t(x, sign_at_zero)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if ctx.act_grad == "identity":
            d = torch.ones_like(x)
        elif ctx.act_grad == "ste":
            d = (x.abs() <= 1).to(x.dtype)
        else:
            d = torch.where((x >= -1) & (x < 0), 2 + 2 * x,
                            torch.where((x >= 0) & (x < 1), 2 - 2 * x, torch.zeros_like(x)))
        return g * d, None, None


class BinarizeWeight(torch.autograd.Function):
    """``alpha * sign(W)`` forward; gradient passed to ``W`` where ``|W| <= 1``."""

    @staticmethod
    def forward(ctx, w, sign_at_zero, scale):
        ctx.save_for_backward(w)
        wb = sign_t(w, sign_at_zero)
        if scale == "mean_abs":
            dtype = np.float64 if w.dtype == torch.float64 else np.float32
            alpha = torch.from_numpy(mean_abs_scale(w.detach().cpu().numpy(), dtype))
            wb = wb * alpha.to(w.device).view(-1, *[1] * (w.dim() - 1))
        return wb

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return g * (w.abs() <= 1).to(g.dtype), None, None


def tf_same_pads(x, k, s):
    """TensorFlow "same" padding of NCHW ``x`` for a ``k``x``k`` window of stride ``s``, in
    ``F.pad``'s order ``(left, right, top, bottom)``: the odd row/column at the bottom/right."""
    pads = []
    for n in (x.shape[3], x.shape[2]):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


class TFConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow's "same" zero padding (no padding of its own)."""

    def forward(self, x):
        return super().forward(F.pad(x, tf_same_pads(x, self.kernel_size[0], self.stride[0])))


class TFMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` with TensorFlow's "same" padding (padded taps never win)."""

    def forward(self, x):
        return super().forward(F.pad(x, tf_same_pads(x, self.kernel_size, self.stride),
                                     value=-float("inf")))


class BinaryConv2d(nn.Module):
    def __init__(self, cin, cout, k, stride=1, padding=1, groups=1, scale="none", sign_at_zero=1,
                 act_grad="approx_sign", pad_value=0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin // groups, k, k).uniform_(-0.1, 0.1))
        self.stride, self.padding, self.groups = stride, padding, groups
        self.scale, self.sign_at_zero = scale, sign_at_zero
        self.act_grad, self.pad_value = act_grad, pad_value

    def forward(self, x):
        xb = BinarizeActivation.apply(x, self.sign_at_zero, self.act_grad)
        p = self.padding
        if p == "same":
            xb = F.pad(xb, tf_same_pads(xb, self.weight.shape[2], self.stride), value=float(self.pad_value))
        elif p:
            xb = F.pad(xb, (p, p, p, p), value=float(self.pad_value))
        wb = BinarizeWeight.apply(self.weight, self.sign_at_zero, self.scale)
        return F.conv2d(xb, wb, stride=self.stride, groups=self.groups)


class FPReLU(nn.Module):
    """``pos_slope[c] * x`` for ``x >= 0``, ``neg_slope[c] * x`` for ``x < 0``."""

    def __init__(self, c):
        super().__init__()
        self.pos_slope = nn.Parameter(torch.ones(c))
        self.neg_slope = nn.Parameter(torch.ones(c))

    def forward(self, x):
        a = self.pos_slope.view(1, -1, 1, 1)
        b = self.neg_slope.view(1, -1, 1, 1)
        return torch.where(x >= 0, a * x, b * x)


class ChannelRepeat(nn.Module):
    def __init__(self, times):
        super().__init__()
        self.times = times

    def forward(self, x):
        return torch.cat([x] * self.times, dim=1)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, groups, binary, downsample, nonlinear, position, padding=1,
                 eps=1e-5):
        super().__init__()
        self.binary_conv = BinaryConv2d(cin, cout, 3, stride, padding, groups, **binary)
        self.bn1 = nn.BatchNorm2d(cout, eps=eps)
        if downsample is not None:
            self.downsample = downsample
        if nonlinear is not None:
            self.nonlinear = nonlinear
        self.has_down, self.has_nl, self.position = downsample is not None, nonlinear is not None, position

    def forward(self, x):
        out = self.bn1(self.binary_conv(x))
        shortcut = self.downsample(x) if self.has_down else x
        if self.has_nl and self.position == "before_add":
            out = self.nonlinear(out)
        y = out + shortcut
        if self.has_nl and self.position == "after_add":
            y = self.nonlinear(y)
        return y


class Bridge(nn.Module):
    def __init__(self, cin, cout, binary, nonlinear, padding=1, eps=1e-5):
        super().__init__()
        self.binary_conv = BinaryConv2d(cin, cout, 3, 1, padding, 1, **binary)
        self.bn1 = nn.BatchNorm2d(cout, eps=eps)
        if nonlinear is not None:
            self.nonlinear = nonlinear
        self.has_nl = nonlinear is not None

    def forward(self, x):
        y = self.bn1(self.binary_conv(x))
        return self.nonlinear(y) if self.has_nl else y


def _downsample(kind, cin, cout, binary, eps=1e-5):
    pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
    if kind == "real":
        return nn.Sequential(pool, nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout, eps=eps))
    if kind == "binary":
        return nn.Sequential(pool, BinaryConv2d(cin, cout, 1, 1, 0, 1, **binary),
                             nn.BatchNorm2d(cout, eps=eps))
    return nn.Sequential(pool, ChannelRepeat(cout // cin))


class TorchBNNResNet(nn.Module):
    """The PyTorch twin of :class:`refbnn.models.BNNResNet` (same config, same names)."""

    def __init__(self, config):
        super().__init__()
        cfg = resolve(config)
        self.config = cfg
        k, s = cfg["stem_kernel"], cfg["stem_stride"]
        tf, eps = cfg["conv_padding"] == "tf", cfg["bn_eps"]
        if tf:
            self.conv1 = TFConv2d(cfg["input_shape"][0], cfg["stem_channels"], k, s, 0, bias=False)
        else:
            self.conv1 = nn.Conv2d(cfg["input_shape"][0], cfg["stem_channels"], k, s, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(cfg["stem_channels"], eps=eps)
        self.maxpool = ((TFMaxPool2d(3, 2) if tf else nn.MaxPool2d(3, 2, 1)) if cfg["stem_pool"]
                        else nn.Identity())
        pad3 = "same" if tf else 1
        bridge = bridge_spec(cfg)
        self.bridge = None if bridge is None else Bridge(
            bridge[0], bridge[1], binary_options(cfg, "bridge.binary_conv"),
            make_nonlinearity(bridge[2], bridge[1]), pad3, eps)
        for si, specs in enumerate(stage_specs(cfg)):
            self.add_module(f"layer{si + 1}", nn.Sequential(*[
                BasicBlock(b.cin, b.cout, b.stride, b.groups, binary_options(cfg, f"{b.name}.binary_conv"),
                           _downsample(cfg["downsample"], b.cin, b.cout,
                                       binary_options(cfg, f"{b.name}.downsample.1"), eps)
                           if b.downsample else None,
                           make_nonlinearity(b.nonlinearity, b.cout), b.position, pad3, eps)
                for b in specs]))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cfg["widths"][-1], cfg["num_classes"])
        self.nstages = len(cfg["widths"])

    def forward(self, x):
        x = self.maxpool(self.bn1(self.conv1(x)))
        if self.bridge is not None:
            x = self.bridge(x)
        for si in range(self.nstages):
            x = getattr(self, f"layer{si + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


#: the twin's layer per non-linearity kind, built for ``c`` channels (``"none"``: no layer)
NONLINEARITY_LAYERS = {"relu": lambda c: nn.ReLU(), "prelu": nn.PReLU, "fprelu": FPReLU}


def make_nonlinearity(kind, c):
    return None if kind == "none" else NONLINEARITY_LAYERS[kind](c)


def twin(config) -> TorchBNNResNet:
    """A freshly initialised PyTorch twin of the refbnn model described by ``config``."""
    return TorchBNNResNet(config)


def to_torch_state(state: dict) -> OrderedDict:
    """refbnn state dict (NumPy) -> PyTorch state dict (tensors), same names."""
    return OrderedDict((k, torch.from_numpy(np.array(v, copy=True))) for k, v in state.items())


def from_torch_state(state) -> OrderedDict:
    """PyTorch state dict -> refbnn state dict (float32 / int64 NumPy arrays), same names."""
    return OrderedDict((k, v.detach().cpu().numpy().copy()) for k, v in state.items())


def load_official_birealnet(state, config) -> OrderedDict:
    """Map an official Bi-Real Net PyTorch checkpoint (a ``state_dict`` or ``{"state_dict": ...}``)
    to a refbnn state dict for ``config`` (e.g. :func:`refbnn.interop.checkpoints.official_config`).

    Strips ``module.``; reshapes ``*.binary_conv.weights`` ``(O*I*9, 1)`` to ``weight (O, I, 3, 3)``
    (:func:`refbnn.interop.checkpoints.map_state`). Raises ``ConversionError`` naming missing,
    unexpected or misshapen tensors.

    The official code binarizes with ``torch.sign`` (0 at 0): ``sign_at_zero=0`` reproduces it (float
    path only; the packed engine needs +1 or -1, which differ from it only where an activation or a
    weight is exactly 0).
    """
    if "state_dict" in state:
        state = state["state_dict"]
    arrays = OrderedDict((k, v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
                         for k, v in state.items())
    return map_state(strip_prefix(arrays), config)
