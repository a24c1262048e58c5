"""The packed inference engine: a trained Bi-Real / FTBNN model compiled for fast CPU inference.

:func:`compile_model` takes a :class:`refbnn.models.BNNResNet` with trained weights and returns an
:class:`Engine` that

* keeps activations NHWC float32 between layers (the residual stream is real-valued), and packs each
  binary conv's input into sign bits once, inside :class:`refbnn.ops.BConv2DPlan`;
* runs every binary conv as an XNOR-popcount kernel with BatchNorm (and Bi-Real's alpha) folded into
  its float output transform ``y = float32(float32(acc) * mul) + bias``, where
  ``mul = alpha * gamma / sqrt(var + eps)`` and ``bias = beta - mean * gamma / sqrt(var + eps)``;
* fuses "non-linearity, residual add, non-linearity" into one pass (:mod:`refbnn.kernels.elementwise`);
* runs the real-valued layers (stem, 1x1 shortcuts, classifier) in float32 with BLAS.

Threads: the binary kernels run on ``numba.get_num_threads()`` threads. Keep BLAS at one thread
beside them (``threadpoolctl.threadpool_limits(1)``, as ``refbnn.infer`` does): a multi-threaded
OpenBLAS keeps its workers polling after each call and takes their cores (measured with two threads
on weights/ftbnn18.h5: 2,688-2,910 images/s with BLAS at two threads, 4,066-5,334 at one).

Agreement with the float training path (eval mode): for ``scale="none"`` models (FTBNN) every binary
layer's output equals the float path's exactly, because ``acc`` is an exact integer and the float
path computes ``acc * scale + shift`` with the same two roundings; the only differences come from the
real convolutions' summation order (BLAS on NHWC vs NCHW), a few float32 ulp, which can flip a sign
at a binary input whose real value is within that rounding of 0. ``tests/test_engine.py`` states and
checks the bound.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from refbnn import nn
from refbnn.kernels import elementwise as ew
from refbnn.ops import BConv2DPlan, pack_kernel


class EngineError(ValueError):
    """A model the packed engine cannot run (e.g. ternary ``sign_at_zero=0``)."""


def _f32(a):  # a copy: the engine never shares memory with the model it was compiled from
    return np.array(a, dtype=np.float32, order="C", copy=True)


def fold_batchnorm(bn) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)`` of an eval-mode BatchNorm, computed exactly as its float32 forward does:
    ``inv = 1 / sqrt(var + eps)``, ``scale = gamma * inv``, ``shift = beta - mean * scale``."""
    f = np.float32
    inv = f(1.0) / np.sqrt(bn.running_var.astype(f) + f(bn.eps))
    scale = (bn.weight.data * inv).astype(f)
    shift = (bn.bias.data - bn.running_mean.astype(f) * scale).astype(f)
    return scale, shift


def _act_params(module, channels):
    """(code, pos, neg) for a non-linearity module or None."""
    ones = np.ones(channels, np.float32)
    if module is None:
        return ew.NONE, ones, ones
    if isinstance(module, nn.ReLU):
        return ew.RELU, ones, ones
    if isinstance(module, nn.PReLU):
        a = np.broadcast_to(module.weight.data.astype(np.float32), (channels,))
        return ew.PRELU, ones, _f32(a)
    if isinstance(module, nn.FPReLU):
        return ew.FPRELU, _f32(module.pos_slope.data), _f32(module.neg_slope.data)
    raise EngineError(f"unsupported non-linearity {type(module).__name__}")


def _pad_hw(x, top, bottom, left, right, value=0.0):
    """``x`` (N, H, W, C) inside a new ``value``-filled (N, H+top+bottom, W+left+right, C) array
    (``np.pad`` costs ~20 us per call at batch 1)."""
    n, h, w, c = x.shape
    out = np.full((n, h + top + bottom, w + left + right, c), value, x.dtype)
    out[:, top:top + h, left:left + w] = x
    return out


def _nhwc_rows(x):
    n, h, w, c = x.shape
    return x.reshape(n * h * w, c)


class RealConv:
    """Real conv (any kernel, stride, symmetric zero padding, groups=1) + folded BatchNorm, NHWC."""

    def __init__(self, conv, bn, act=None):
        if conv.groups != 1 or conv.dilation != (1, 1):
            raise EngineError("the engine runs real convs with groups=1 and dilation=1 only")
        o, i, kh, kw = conv.weight.shape
        self.kernel, self.stride, self.padding = (kh, kw), conv.stride, conv.padding
        self.w = _f32(conv.weight.data.transpose(2, 3, 1, 0).reshape(kh * kw * i, o))
        self.scale, self.shift = fold_batchnorm(bn)
        if conv.bias is not None:
            self.shift = _f32(self.shift + conv.bias.data * self.scale)
        self.act = _act_params(act, o)

    def __call__(self, x):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        if ph or pw:
            x = _pad_hw(x, ph, ph, pw, pw)
        n = x.shape[0]
        if kh == kw == 1:
            cols = x[:, ::sh, ::sw, :]
            oh, ow = cols.shape[1:3]
            cols = np.ascontiguousarray(cols).reshape(n * oh * ow, -1)
        else:
            win = sliding_window_view(x, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]  # N,OH,OW,C,KH,KW
            oh, ow = win.shape[1:3]
            cols = np.ascontiguousarray(win.transpose(0, 1, 2, 4, 5, 3)).reshape(n * oh * ow, -1)
        y = cols @ self.w
        ew.affine_act(y, self.scale, self.shift, *self.act)
        return y.reshape(n, oh, ow, -1)


class BinaryConv:
    """Binary conv via :class:`BConv2DPlan` with BN (and alpha) folded into the float output."""

    def __init__(self, conv, bn, in_hw, words=None, alpha=None):
        if conv.sign_at_zero not in (1, -1):
            raise EngineError("the packed engine needs sign_at_zero +1 or -1; 0 (torch.sign) is "
                              "ternary and cannot be packed")
        if words is None:
            words = pack_kernel(conv.weight.data.transpose(2, 3, 1, 0), conv.sign_at_zero)
        if alpha is None:
            alpha = conv.weight_scale() if conv.scale == "mean_abs" else None
        scale, shift = fold_batchnorm(bn)
        mul = scale if alpha is None else _f32(np.asarray(alpha, np.float32) * scale)
        ph, pw = conv.padding
        self.sign_at_zero = conv.sign_at_zero
        self.plan = BConv2DPlan(words, conv.in_channels, in_hw, conv.stride, (ph, ph, pw, pw),
                                int(conv.pad_value), conv.dilation, conv.groups, output="float",
                                multiplier=mul, bias=shift, sign_at_zero=conv.sign_at_zero)
        self.out_hw = self.plan.out_hw

    def __call__(self, x):
        return self.plan(x, self.sign_at_zero)


def _avgpool_ceil_2x2(x):
    """2x2 stride-2 average pool, ceil mode, averaging in-bounds pixels only (NHWC)."""
    n, h, w, c = x.shape
    if h % 2 or w % 2:
        x = _pad_hw(x, 0, h % 2, 0, w % 2)
    oh, ow = x.shape[1] // 2, x.shape[2] // 2
    s = x.reshape(n, oh, 2, ow, 2, c).sum(axis=(2, 4), dtype=np.float32)
    if h % 2 or w % 2:
        cnt = np.full((oh, ow), 4.0, np.float32)
        if h % 2:
            cnt[-1, :] /= 2
        if w % 2:
            cnt[:, -1] /= 2
        return s / cnt[None, :, :, None]
    return s / np.float32(4.0)


class Block:
    """A BasicBlock: ``post(pre(BN(bconv(x))) + shortcut(x))``."""

    def __init__(self, block, in_hw, packed, scales, prefix):
        self.conv = BinaryConv(block.binary_conv, block.bn1, in_hw,
                               packed.get(f"{prefix}.binary_conv.weight"),
                               scales.get(f"{prefix}.binary_conv.weight"))
        c = block.bn1.num_features
        nl = block.nonlinear
        none = _act_params(None, c)
        before = block.position == "before_add"
        self.pre = _act_params(nl, c) if before else none
        self.post = none if before else _act_params(nl, c)
        self.shortcut = None
        if block.downsample is not None:
            kinds = [type(m) for m in block.downsample.children()]
            mods = list(block.downsample.children())
            out_hw = self.conv.out_hw
            if nn.Conv2d in kinds:
                self.shortcut = ("real", RealConv(mods[1], mods[2]))
            elif nn.BinaryConv2d in kinds:
                self.shortcut = ("binary", BinaryConv(mods[1], mods[2], out_hw,
                                                      packed.get(f"{prefix}.downsample.1.weight"),
                                                      scales.get(f"{prefix}.downsample.1.weight")))
            else:
                self.shortcut = ("repeat", mods[1].times)
        self.out_hw = self.conv.out_hw

    def __call__(self, x):
        y = self.conv(x)
        if self.shortcut is None:
            s = x
        else:
            kind, op = self.shortcut
            pooled = _avgpool_ceil_2x2(x)
            s = op(pooled) if kind != "repeat" else np.concatenate([pooled] * op, axis=-1)
        ew.residual_merge(_nhwc_rows(y), _nhwc_rows(np.ascontiguousarray(s)), *self.pre, *self.post)
        return y


def _maxpool3x3s2(x):
    """3x3 stride-2 max-pool with padding 1 (padding never chosen), NHWC."""
    xp = _pad_hw(x, 1, 1, 1, 1, -np.inf)
    h, w = x.shape[1:3]
    oh, ow = (h + 2 - 3) // 2 + 1, (w + 2 - 3) // 2 + 1
    out = xp[:, 0:2 * oh - 1:2, 0:2 * ow - 1:2].copy()
    for a in range(3):
        for b in range(3):
            if a or b:
                np.maximum(out, xp[:, a:a + 2 * oh - 1:2, b:b + 2 * ow - 1:2], out=out)
    return out


class Engine:
    """A compiled model. ``forward(x)``: ``x`` (N, C, H, W) float32 normalised images -> logits."""

    def __init__(self, model, packed=None, scales=None):
        packed, scales = packed or {}, scales or {}
        cfg = model.config
        self.config = cfg
        c, h, w = cfg["input_shape"]
        self.input_shape = (c, h, w)
        self.stem = RealConv(model.conv1, model.bn1)
        s = model.conv1.stride[0]
        hw = ((h + 2 * model.conv1.padding[0] - model.conv1.weight.shape[2]) // s + 1,
              (w + 2 * model.conv1.padding[1] - model.conv1.weight.shape[3]) // s + 1)
        self.pool = model.maxpool is not None
        if self.pool:
            hw = ((hw[0] - 1) // 2 + 1, (hw[1] - 1) // 2 + 1)
        self.bridge = None
        if model.bridge is not None:
            b = model.bridge
            self.bridge = (BinaryConv(b.binary_conv, b.bn1, hw,
                                      packed.get("bridge.binary_conv.weight"),
                                      scales.get("bridge.binary_conv.weight")),
                           _act_params(b.nonlinear, b.bn1.num_features))
        self.blocks = []
        for si, stage in enumerate(model.stages):
            for bi, block in enumerate(stage.children()):
                blk = Block(block, hw, packed, scales, f"layer{si + 1}.{bi}")
                self.blocks.append(blk)
                hw = blk.out_hw
        self.fc_w = _f32(model.fc.weight.data.T)
        self.fc_b = _f32(model.fc.bias.data) if model.fc.bias is not None else None

    def features(self, x):
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"input must be (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {x.shape}")
        if np.isnan(x).any():
            raise ValueError("input contains NaN")
        y = self.stem(np.ascontiguousarray(x.transpose(0, 2, 3, 1)))
        if self.pool:
            y = _maxpool3x3s2(y)
        if self.bridge is not None:
            conv, act = self.bridge
            y = conv(y)
            code, pos, neg = act
            if code != ew.NONE:
                c = y.shape[-1]
                ew.affine_act(_nhwc_rows(y), np.ones(c, np.float32), np.zeros(c, np.float32),
                              code, pos, neg)
        for blk in self.blocks:
            y = blk(y)
        return y.mean(axis=(1, 2), dtype=np.float32)

    def forward(self, x):
        logits = self.features(x) @ self.fc_w
        if self.fc_b is not None:
            logits += self.fc_b
        return logits

    __call__ = forward


def compile_model(model, packed=None, scales=None) -> Engine:
    """Compile ``model`` (a BNNResNet with trained weights) for packed inference.

    ``packed``: optional ``{weight name: uint64 OHWI words}`` (e.g. from a packed-only file) used
    instead of packing the model's latent weights; ``scales``: optional ``{weight name: alpha}`` for
    ``scale="mean_abs"`` layers whose latent weights are not available.
    """
    return Engine(model, packed, scales)
