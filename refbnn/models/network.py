"""The one network family behind every preset: stem -> [bridge] -> stages of basic blocks -> head.

Layer names follow the official Bi-Real Net PyTorch code, so state dicts map one to one:
``conv1``, ``bn1``, ``layer{s}.{i}.binary_conv``, ``layer{s}.{i}.bn1``,
``layer{s}.0.downsample.{0: AvgPool, 1: 1x1 conv, 2: BN}``, ``fc``; FTBNN adds
``layer{s}.{i}.nonlinear`` and the derived models ``bridge.{binary_conv, bn1, nonlinear}``.

Every module computes NCHW float32 and has an explicit ``backward``.
"""

from __future__ import annotations

import numpy as np

from refbnn import nn
from refbnn.models.config import BN_EPS, binary_options, bridge_spec, resolve, stage_specs


def make_nonlinearity(kind: str, channels: int):
    """``None`` for ``"none"``, else a fresh ReLU / PReLU (init 0.25) / FPReLU (slopes 1)."""
    if kind == "none":
        return None
    if kind == "relu":
        return nn.ReLU()
    if kind == "prelu":
        return nn.PReLU(channels)
    if kind == "fprelu":
        return nn.FPReLU(channels)
    raise ValueError(f"unknown nonlinearity {kind!r}")


class BasicBlock(nn.Module):
    """``out = BN(BinaryConv3x3(sign(x)))``; ``y = out + shortcut(x)`` with an optional non-linearity
    after the add (``after_add``) or on the branch before it (``before_add``).

    ``shortcut`` is the identity when ``downsample`` is ``None``.
    """

    def __init__(self, cin, cout, stride, groups, binary, downsample=None, nonlinear=None,
                 position="after_add", padding=1, eps=1e-5):
        super().__init__()
        self.binary_conv = nn.BinaryConv2d(cin, cout, 3, stride=stride, padding=padding, groups=groups,
                                           **binary)
        self.bn1 = nn.BatchNorm2d(cout, eps=eps)
        self.downsample = downsample  # a Module attribute registers itself; None stays unregistered
        self.nonlinear = nonlinear
        self.position = position

    def forward(self, x):
        out = self.bn1(self.binary_conv(x))
        shortcut = x if self.downsample is None else self.downsample(x)
        if self.nonlinear is not None and self.position == "before_add":
            out = self.nonlinear(out)
        y = out + shortcut
        if self.nonlinear is not None and self.position == "after_add":
            y = self.nonlinear(y)
        return y

    def backward(self, grad):
        if self.nonlinear is not None and self.position == "after_add":
            grad = self.nonlinear.backward(grad)
        g_branch = grad
        if self.nonlinear is not None and self.position == "before_add":
            g_branch = self.nonlinear.backward(g_branch)
        gx = self.binary_conv.backward(self.bn1.backward(g_branch))
        return gx + (grad if self.downsample is None else self.downsample.backward(grad))

    def extra_repr(self):
        return f"position={self.position}"


class Bridge(nn.Module):
    """Derived models: ``nonlinear(BN(BinaryConv3x3(sign(x))))`` from the stem width to stage 1's."""

    def __init__(self, cin, cout, binary, nonlinear=None, padding=1, eps=1e-5):
        super().__init__()
        self.binary_conv = nn.BinaryConv2d(cin, cout, 3, stride=1, padding=padding, **binary)
        self.bn1 = nn.BatchNorm2d(cout, eps=eps)
        self.nonlinear = nonlinear

    def forward(self, x):
        y = self.bn1(self.binary_conv(x))
        return y if self.nonlinear is None else self.nonlinear(y)

    def backward(self, grad):
        if self.nonlinear is not None:
            grad = self.nonlinear.backward(grad)
        return self.binary_conv.backward(self.bn1.backward(grad))


def make_downsample(kind, cin, cout, rgroups, binary, eps=1e-5):
    """Shortcut of a stride-2 block. The 2x2 average pool uses ``ceil_mode`` so that odd sizes
    (7 -> 4) match the stride-2 conv's output, averaging only the in-bounds pixels (which is also
    TensorFlow's ``AvgPool2D(2, 2, padding="same")``)."""
    pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
    if kind == "real":
        return nn.Sequential(pool, nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout, eps=eps))
    if kind == "binary":
        return nn.Sequential(pool, nn.BinaryConv2d(cin, cout, 1, padding=0, **binary),
                             nn.BatchNorm2d(cout, eps=eps))
    if kind == "cheap":
        return nn.Sequential(pool, nn.ChannelRepeat(cout // cin))
    raise ValueError(f"unknown downsample {kind!r}")


class BNNResNet(nn.Module):
    """Bi-Real Net / FTBNN / derived FTBNN, built from a config (see :mod:`refbnn.models.config`).

    Input ``(N, C, H, W)`` float32 normalised images; output ``(N, num_classes)`` logits.
    """

    def __init__(self, config: dict):
        super().__init__()
        cfg = resolve(config)
        self.config = cfg
        cin = cfg["input_shape"][0]
        k, s = cfg["stem_kernel"], cfg["stem_stride"]
        tf, eps = cfg["conv_padding"] == "tf", cfg["bn_eps"]
        self.conv1 = nn.Conv2d(cin, cfg["stem_channels"], k, stride=s,
                               padding="same" if tf else k // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(cfg["stem_channels"], eps=eps)
        self.maxpool = nn.MaxPool2d(3, 2, "same" if tf else 1) if cfg["stem_pool"] else None
        pad3 = "same" if tf else 1
        bridge = bridge_spec(cfg)
        self.bridge = None if bridge is None else Bridge(
            bridge[0], bridge[1], binary_options(cfg, "bridge.binary_conv"),
            make_nonlinearity(bridge[2], bridge[1]), pad3, eps)
        self.stages = []
        for si, specs in enumerate(stage_specs(cfg)):
            blocks = [BasicBlock(b.cin, b.cout, b.stride, b.groups,
                                 binary_options(cfg, f"{b.name}.binary_conv"),
                                 make_downsample(cfg["downsample"], b.cin, b.cout, b.groups,
                                                 binary_options(cfg, f"{b.name}.downsample.1"), eps)
                                 if b.downsample else None,
                                 make_nonlinearity(b.nonlinearity, b.cout), b.position, pad3, eps)
                      for b in specs]
            stage = nn.Sequential(*blocks)
            self.add_module(f"layer{si + 1}", stage)
            self.stages.append(stage)
        self.avgpool = nn.GlobalAvgPool2d()
        self.fc = nn.Linear(cfg["widths"][-1], cfg["num_classes"], bias=True)
        for _, m in self.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = float(cfg.get("bn_eps", BN_EPS))

    def binary_weights(self) -> dict:
        """``{state-dict name: {"groups": g, "sign_at_zero": s[, "scale": alpha]}}`` for every binary
        layer's weight (what :func:`refbnn.fileformat.save_model` packs); ``scale`` is Bi-Real's
        per-channel ``mean |W|`` for ``scale="mean_abs"`` layers, which packed-only files need."""
        out = {}
        for name, m in self.named_modules():
            if isinstance(m, (nn.BinaryConv2d, nn.BinaryLinear)):
                spec = {"groups": getattr(m, "groups", 1), "sign_at_zero": m.sign_at_zero}
                if m.scale == "mean_abs":
                    spec["scale"] = m.weight_scale()
                out[f"{name}.weight"] = spec
        return out

    def features(self, x):
        """Everything up to and including the global average pool: ``(N, C_last)``."""
        x = self.bn1(self.conv1(x))
        if self.maxpool is not None:
            x = self.maxpool(x)
        if self.bridge is not None:
            x = self.bridge(x)
        for stage in self.stages:
            x = stage(x)
        return self.avgpool(x)

    def forward(self, x):
        return self.fc(self.features(np.asarray(x, dtype=np.float32)))

    def backward(self, grad):
        grad = self.avgpool.backward(self.fc.backward(grad))
        for stage in reversed(self.stages):
            grad = stage.backward(grad)
        if self.bridge is not None:
            grad = self.bridge.backward(grad)
        if self.maxpool is not None:
            grad = self.maxpool.backward(grad)
        return self.conv1.backward(self.bn1.backward(grad))
