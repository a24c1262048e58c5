"""PyTorch twins of refbnn models, and weights moved both ways (needs the ``torch`` extra).

``twin(config)`` builds a ``torch.nn.Module`` with exactly refbnn's layer names, so
``state_dict`` keys and shapes are identical; :func:`to_torch_state` / :func:`from_torch_state`
convert the arrays. The binary layers follow the official Bi-Real Net PyTorch code, with refbnn's
sign semantics (``sign_at_zero``: +1 Larq/LCE, -1 Caffe, 0 ``torch.sign``):

* activations: ``sign(x)`` forward; backward ``approx_sign`` (2 + 2x on [-1, 0), 2 - 2x on [0, 1)),
  ``ste`` (1 on |x| <= 1) or ``identity``;
* weights: ``alpha * sign(W)`` (``alpha = mean |W|`` per output channel, detached, or 1), gradient
  ``dL/dWb`` passed to ``W`` where ``|W| <= 1`` (Bi-Real's clamp trick);
* padding applied after ``sign`` with the layer's ``pad_value``.

:func:`load_official_birealnet` reads the official Bi-Real Net checkpoint layout
(``module.`` prefixes, ``binary_conv.weights`` stored flat as ``(O*I*9, 1)``).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from refbnn.models.config import BN_EPS, binary_options, bridge_spec, resolve, stage_specs


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
            wb = wb * w.abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)
        return wb

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return g * (w.abs() <= 1).to(g.dtype), None, None


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
        if p:
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
    def __init__(self, cin, cout, stride, groups, binary, downsample, nonlinear, position):
        super().__init__()
        self.binary_conv = BinaryConv2d(cin, cout, 3, stride, 1, groups, **binary)
        self.bn1 = nn.BatchNorm2d(cout)
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
    def __init__(self, cin, cout, binary, nonlinear):
        super().__init__()
        self.binary_conv = BinaryConv2d(cin, cout, 3, 1, 1, 1, **binary)
        self.bn1 = nn.BatchNorm2d(cout)
        if nonlinear is not None:
            self.nonlinear = nonlinear
        self.has_nl = nonlinear is not None

    def forward(self, x):
        y = self.bn1(self.binary_conv(x))
        return self.nonlinear(y) if self.has_nl else y


def _downsample(kind, cin, cout, binary):
    pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
    if kind == "real":
        return nn.Sequential(pool, nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
    if kind == "binary":
        return nn.Sequential(pool, BinaryConv2d(cin, cout, 1, 1, 0, 1, **binary), nn.BatchNorm2d(cout))
    return nn.Sequential(pool, ChannelRepeat(cout // cin))


class TorchBNNResNet(nn.Module):
    """The PyTorch twin of :class:`refbnn.models.BNNResNet` (same config, same names)."""

    def __init__(self, config):
        super().__init__()
        cfg = resolve(config)
        self.config = cfg
        k, s = cfg["stem_kernel"], cfg["stem_stride"]
        self.conv1 = nn.Conv2d(cfg["input_shape"][0], cfg["stem_channels"], k, s, k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(cfg["stem_channels"])
        self.maxpool = nn.MaxPool2d(3, 2, 1) if cfg["stem_pool"] else nn.Identity()
        binary = binary_options(cfg)
        bridge = bridge_spec(cfg)
        self.bridge = None
        if bridge is not None:
            cin, cout, kind = bridge
            self.bridge = Bridge(cin, cout, binary, make_nonlinearity(kind, cout))
        for si, specs in enumerate(stage_specs(cfg)):
            blocks = [BasicBlock(b.cin, b.cout, b.stride, b.groups, binary,
                                 _downsample(cfg["downsample"], b.cin, b.cout, binary)
                                 if b.downsample else None,
                                 make_nonlinearity(b.nonlinearity, b.cout), b.position) for b in specs]
            self.add_module(f"layer{si + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cfg["widths"][-1], cfg["num_classes"])
        self.nstages = len(cfg["widths"])
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = float(cfg.get("bn_eps", BN_EPS))

    def forward(self, x):
        x = self.maxpool(self.bn1(self.conv1(x)))
        if self.bridge is not None:
            x = self.bridge(x)
        for si in range(self.nstages):
            x = getattr(self, f"layer{si + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def make_nonlinearity(kind, c):
    if kind == "none":
        return None
    if kind == "relu":
        return nn.ReLU()
    if kind == "prelu":
        return nn.PReLU(c)
    return FPReLU(c)


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
    to a refbnn state dict for ``config`` (e.g. ``get_config("birealnet18")``).

    Strips ``module.``; reshapes ``*.binary_conv.weights`` ``(O*I*9, 1)`` to ``weight (O, I, 3, 3)``.
    Raises ``KeyError`` naming missing or unexpected tensors.

    The official code binarizes with ``torch.sign`` (0 at 0). To reproduce its outputs exactly, use
    ``get_config("birealnet18", sign_at_zero=0)`` (float path only; the packed engine needs +1 or -1,
    which differ from it only where an activation or weight is exactly 0).
    """
    if "state_dict" in state:
        state = state["state_dict"]
    expected = TorchBNNResNet(config).state_dict()
    out = OrderedDict()
    for key, value in state.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name.endswith("binary_conv.weights"):
            name = name[: -len("weights")] + "weight"
        if name not in expected:
            raise KeyError(f"unexpected tensor {key} in the Bi-Real Net checkpoint")
        arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        out[name] = arr.reshape(tuple(expected[name].shape)).copy()
    missing = [k for k in expected if k not in out]
    if missing:
        raise KeyError(f"the Bi-Real Net checkpoint lacks {missing[:5]}")
    return OrderedDict((k, out[k]) for k in expected)
