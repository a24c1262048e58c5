"""Plain NumPy oracles of the engine's real-valued kernels (:mod:`.realconv`, :mod:`.realpool`,
:func:`.elementwise.merge_pack`), NHWC float32. Tests hold each kernel to its oracle: exactly where
the kernel does the same float32 operations in the same order (pools, epilogue), within a stated
bound where it sums in another order (convolutions, global pool).
"""

from __future__ import annotations

import numpy as np


def conv_bn(x, w_hwio, stride, pad, scale, shift):
    """``float32(conv * scale) + shift`` of NHWC ``x`` with HWIO ``w``, zero padding ``pad``; the
    conv sum in float64 (rounded once to float32), so it is within
    ``conv_error_bound`` of any float32 summation order. Returns ``(y, bound)``."""
    x = np.asarray(x, np.float64)
    kh, kw, _, o = w_hwio.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    n, hp, wp, _ = xp.shape
    oh, ow = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    acc = np.zeros((n, oh, ow, o))
    mag = np.zeros((n, oh, ow, o))
    for a in range(kh):
        for b in range(kw):
            patch = xp[:, a:a + stride * (oh - 1) + 1:stride, b:b + stride * (ow - 1) + 1:stride]
            acc += patch @ w_hwio[a, b].astype(np.float64)
            mag += np.abs(patch) @ np.abs(w_hwio[a, b]).astype(np.float64)
    taps = kh * kw * w_hwio.shape[2]
    y = (acc.astype(np.float32) * scale).astype(np.float32) + shift
    # float32 summation of `taps` products in any order: |error| <= taps * eps * sum |x w|,
    # then the affine's two roundings move it by |scale| times that (plus its own rounding)
    eps = np.finfo(np.float32).eps
    bound = (taps + 2) * eps * mag * np.abs(scale) + 2 * eps * np.abs(y)
    return y, bound


def bf16_round(x):
    """float32 ``x`` rounded to bfloat16 (8 significant bits, to nearest even), as float32; results
    below 2**-126 in magnitude are zeros of ``x``'s sign, values at or beyond 2**128 after rounding
    infinities, NaN stays NaN (:func:`refbnn.kernels.realconv.to_bf16`'s rule, derived here from
    ``frexp`` instead of bit arithmetic)."""
    x = np.asarray(x, np.float32)
    m, e = np.frexp(x.astype(np.float64))          # x = m * 2**e, 0.5 <= |m| < 1
    with np.errstate(over="ignore", invalid="ignore"):
        r = np.ldexp(np.round(m * 256.0), e - 8).astype(np.float32)   # np.round: half to even
    r = np.where(np.abs(r) < 2.0 ** -126, np.copysign(np.float32(0), x), r)
    return np.where(np.isnan(x) | np.isinf(x), x, r).astype(np.float32)


def _ftz(v):
    return np.where(np.abs(v) < 2.0 ** -126, np.copysign(np.float32(0), v), v).astype(np.float32)


def conv_bn_bf16(x, w_hwio, stride, pad, scale, shift):
    """The bf16 stem (docs/semantics.md, "bf16 stem"), exactly: NHWC ``x`` and HWIO ``w``
    rounded by :func:`bf16_round`, zero padding ``pad``; per output, in float32 from +0, the tap
    pairs in the order (input channel, kernel row ``a``, column pair ``(2q, 2q + 1)``) (an odd
    kernel's last column with a zero weight), each pair adding its odd column's product, then its
    even one's, each sum rounded once and flushed below 2**-126 (the products of two bfloat16
    values are exact in float32); then ``float32(acc * scale) + shift``. Exact for finite inputs
    whose products stay at or above 2**-126 in magnitude (or are zero)."""
    xb = bf16_round(x)
    wb = bf16_round(w_hwio)
    kh, kw, c, o = wb.shape
    kq = -(-kw // 2)
    xp = np.pad(xb, ((0, 0), (pad, pad), (pad, pad + 1), (0, 0)))
    n = xp.shape[0]
    oh = (x.shape[1] + 2 * pad - kh) // stride + 1
    ow = (x.shape[2] + 2 * pad - kw) // stride + 1
    acc = np.zeros((n, oh, ow, o), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for ch in range(c):
            for a in range(kh):
                for q in range(kq):
                    for b in (2 * q + 1, 2 * q):
                        wv = wb[a, b, ch] if b < kw else np.zeros(o, np.float32)
                        patch = xp[:, a:a + stride * (oh - 1) + 1:stride,
                                   b:b + stride * (ow - 1) + 1:stride, ch]
                        acc = _ftz(acc + patch[..., None] * wv)
    return (acc * scale).astype(np.float32) + shift


def avgpool2(x):
    """2x2/2 average pool, ceil mode, in-bounds pixels only, as the float path: taps (0,0), (0,1),
    (1,0), (1,1) summed in float32 in that order (missing taps skipped), divided by their count."""
    x = np.asarray(x, np.float32)
    n, h, w, c = x.shape
    oh, ow = -(-h // 2), -(-w // 2)
    out = np.empty((n, oh, ow, c), np.float32)
    for i in range(oh):
        for j in range(ow):
            taps = [(2 * i + a, 2 * j + b) for a in (0, 1) for b in (0, 1)
                    if 2 * i + a < h and 2 * j + b < w]
            s = x[:, taps[0][0], taps[0][1]].copy()
            for r, q in taps[1:]:
                s = s + x[:, r, q]
            out[:, i, j] = s / np.float32(len(taps))
    return out


def maxpool3s2(x):
    """3x3 stride-2 max-pool, padding 1 never chosen."""
    x = np.asarray(x, np.float32)
    _n, h, w, _c = x.shape
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    oh, ow = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    return np.stack([np.stack([xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
                               for j in range(ow)], 1) for i in range(oh)], 1)


def global_avgpool(x):
    """``(mean in float64 rounded to float32, bound)`` over the pixels of NHWC ``x``: a float32
    running sum of ``hw`` values is within ``hw * eps * sum |x|`` of the exact sum."""
    x = np.asarray(x, np.float64)
    hw = x.shape[1] * x.shape[2]
    eps = np.finfo(np.float32).eps
    mean = x.mean(axis=(1, 2))
    return mean.astype(np.float32), (hw + 1) * eps * np.abs(x).mean(axis=(1, 2)) + eps * np.abs(mean)


def act(v, kind, pos, neg):
    """The non-linearities' float32 formulas (``refbnn.nn``): none, relu, prelu (slope ``neg``),
    fprelu."""
    v = np.asarray(v, np.float32)
    if kind == "relu":
        return np.maximum(v, np.float32(0))
    if kind == "prelu":
        return np.where(v > 0, v, neg * v).astype(np.float32)
    if kind == "fprelu":
        return np.where(v >= 0, pos * v, neg * v).astype(np.float32)
    return v


def merge(y, short, pre, post):
    """``post(pre(y) + short)``, ``short`` repeated along channels to ``y``'s; ``pre``/``post``:
    ``(kind, pos, neg)``."""
    s = 0 if short is None else np.tile(short, (1,) * (y.ndim - 1) + (y.shape[-1] // short.shape[-1],))
    return act(act(y, *pre) + s, *post)
