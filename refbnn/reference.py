"""The reference oracle: obviously-correct NumPy definitions of every binary op.

Written for clarity, not speed, and sharing no code with ``refbnn.bits``, ``refbnn.kernels`` or
``refbnn.ops``: tests hold every fast path to these functions, and other implementations may too.
Each function restates the semantics it implements; ``docs/semantics.md`` is the long form.

Conventions used throughout:

* ``sign(v) = +1 if v >= 0 else -1`` (``sign_at_zero=+1``, Larq/LCE; ``-0.0`` gives ``+1``), or
  ``+1 if v > 0 else -1`` (``sign_at_zero=-1``, Caffe).
* A packed bit is 1 for -1 and 0 for +1; value ``c`` of the last axis goes to word ``c // W``,
  bit ``c % W``; unused high bits are 0.
* Images are NHWC, kernels HWIO with ``I = C_in / groups`` (Keras/Larq layout).
"""

from __future__ import annotations

import numpy as np


def sign(x, sign_at_zero=1):
    """Elementwise sign as float64 ``+-1``. NaN raises ``ValueError``."""
    x = np.asarray(x, dtype=np.float64)
    if np.isnan(x).any():
        raise ValueError("sign of NaN is undefined")
    if sign_at_zero == 1:
        return np.where(x >= 0, 1.0, -1.0)
    if sign_at_zero == -1:
        return np.where(x > 0, 1.0, -1.0)
    raise ValueError("sign_at_zero must be +1 or -1")


def pack(x, word_bits=64, sign_at_zero=1):
    """Pack the last axis of ``x`` into words, one value at a time.

    Returns ``uint64`` (``word_bits=64``) or ``uint32`` (``word_bits=32``) words of shape
    ``x.shape[:-1] + (ceil(C / word_bits),)``.
    """
    s = sign(x, sign_at_zero)
    n = s.shape[-1]
    nwords = (n + word_bits - 1) // word_bits
    words = np.zeros(s.shape[:-1] + (nwords,), dtype=object)
    for c in range(n):
        bit = (s[..., c] < 0).astype(object)
        words[..., c // word_bits] += bit * (2 ** (c % word_bits))
    return words.astype(np.uint64 if word_bits == 64 else np.uint32)


def unpack(words, n, word_bits=64):
    """Inverse of :func:`pack`: ``+-1`` float64 values of shape ``words.shape[:-1] + (n,)``."""
    words = np.asarray(words).astype(object)
    out = np.empty(words.shape[:-1] + (n,), dtype=np.float64)
    for c in range(n):
        bit = (words[..., c // word_bits] // (2 ** (c % word_bits))) % 2
        out[..., c] = np.where(bit.astype(np.int64) == 1, -1.0, 1.0)
    return out


def explicit_padding(padding, in_hw, kernel_hw, stride, dilation):
    """Return ``(top, bottom, left, right)`` for a padding spec.

    ``"valid"``: no padding. ``"same"``: output size ``ceil(in / stride)``; total padding
    ``max((out - 1) * stride + (k - 1) * dilation + 1 - in, 0)``, split with the odd row/column at the
    bottom/right (TensorFlow). An int ``p``: ``p`` on all sides. ``(ph, pw)``: symmetric per axis.
    ``(top, bottom, left, right)``: as given.
    """
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        pads = []
        for n, k, s, d in zip(in_hw, kernel_hw, stride, dilation):
            out = -(-n // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    if isinstance(padding, int):
        return (padding,) * 4
    padding = tuple(padding)
    if len(padding) == 2:
        return (padding[0], padding[0], padding[1], padding[1])
    return padding


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def bconv2d(x, kernel, stride=1, padding="same", pad_value=0, dilation=1, groups=1,
            sign_at_zero=1):
    """Binary 2-D convolution accumulators, as an ordinary convolution of ``+-1`` tensors.

    ``x``: ``(N, H, W, C)`` real; ``kernel``: ``(KH, KW, C // groups, O)`` real. Both are binarized
    with :func:`sign`; the binarized input is then padded with ``pad_value`` (0: padded taps add
    nothing; +1 or -1: padded taps are that value) and correlated (no kernel flip) with the
    binarized kernel. Output ``(N, OH, OW, O)`` int64 with
    ``acc[n, i, j, o] = sum_{kh, kw, c} xpad[n, i*sh + kh*dh, j*sw + kw*dw, g*Cg + c] * w[kh, kw, c, o]``
    where ``g = o // (O / groups)``. This equals ``K - 2 * popcount(x XOR w)`` over the taps that take
    part (all taps for +-1 padding, the in-bounds taps for zero padding).
    """
    xs = sign(x, sign_at_zero)
    ws = sign(kernel, sign_at_zero)
    n, h, w, c = xs.shape
    kh, kw, cg, o = ws.shape
    sh, sw = pair(stride)
    dh, dw = pair(dilation)
    assert c == cg * groups and o % groups == 0
    top, bottom, left, right = explicit_padding(padding, (h, w), (kh, kw), (sh, sw), (dh, dw))
    xp = np.pad(xs, ((0, 0), (top, bottom), (left, right), (0, 0)),
                constant_values=float(pad_value))
    oh = (h + top + bottom - (kh - 1) * dh - 1) // sh + 1
    ow = (w + left + right - (kw - 1) * dw - 1) // sw + 1
    # patches[n, i, j, a, b, c] = xp[n, i*sh + a*dh, j*sw + b*dw, c]
    patches = np.empty((n, oh, ow, kh, kw, c))
    for a in range(kh):
        for b in range(kw):
            patches[:, :, :, a, b, :] = xp[:, a * dh: a * dh + (oh - 1) * sh + 1: sh,
                                           b * dw: b * dw + (ow - 1) * sw + 1: sw, :]
    og = o // groups
    out = np.empty((n, oh, ow, o))
    for g in range(groups):
        out[..., g * og:(g + 1) * og] = np.einsum(
            "nijabc,abco->nijo", patches[..., g * cg:(g + 1) * cg], ws[..., g * og:(g + 1) * og])
    return out.astype(np.int64)


def output_transform(acc, multiplier, bias):
    """Float output of a binary layer: ``y = float32(float32(acc) * multiplier) + bias``.

    ``acc`` int (..., O); ``multiplier``, ``bias`` float32 per output channel. Exactly two float32
    roundings, multiply first, no fused multiply-add. Returns float32.
    """
    a = np.asarray(acc).astype(np.float32)
    m = np.asarray(multiplier, dtype=np.float32)
    b = np.asarray(bias, dtype=np.float32)
    prod = (a * m).astype(np.float32)
    return (prod + b).astype(np.float32)


def output_transform_lce(acc, k, multiplier, bias):
    """LCE's float output transform, reproduced exactly (its ``core/bconv2d/output_transform.h``).

    With ``pc = (k - acc) / 2`` (the popcount of ``x XOR w``):
    ``y = float32(2 * pc) * (-multiplier) + float32(double(bias) + k * double(multiplier))``,
    every step rounded to float32, no fused multiply-add.
    """
    acc = np.asarray(acc).astype(np.int64)
    m = np.asarray(multiplier, dtype=np.float32)
    b = np.asarray(bias, dtype=np.float32)
    pc = (k - acc) // 2
    offset = (b.astype(np.float64) + float(k) * m.astype(np.float64)).astype(np.float32)
    prod = (np.float32(2) * pc.astype(np.float32) * (-m)).astype(np.float32)
    return (prod + offset).astype(np.float32)


def padded_tap_sum(kernel, in_hw, padding, stride=1, dilation=1, sign_at_zero=1):
    """For each output pixel, the sum of ``sign(kernel)`` over the taps that fall in the padding.

    ``kernel`` ``(KH, KW, Cg, O)`` real; returns ``(corr, has_pad)``: ``corr`` int64
    ``(OH, OW, O)`` with ``corr[i, j, o] = sum`` over taps ``(a, b)`` of pixel ``(i, j)`` outside
    the ``in_hw`` input of ``sum_c sign(kernel)[a, b, c, o]``, and ``has_pad`` bool ``(OH, OW)``,
    whether pixel ``(i, j)`` has any such tap. The accumulator with pad value +1 is the one with
    zero padding plus ``corr``: ``bconv2d(.., pad_value=1) = bconv2d(.., pad_value=0) + corr``.
    """
    ws = sign(kernel, sign_at_zero).sum(axis=2)  # (KH, KW, O)
    kh, kw, o = ws.shape
    h, w = in_hw
    sh, sw = pair(stride)
    dh, dw = pair(dilation)
    top, bottom, left, right = explicit_padding(padding, (h, w), (kh, kw), (sh, sw), (dh, dw))
    oh = (h + top + bottom - (kh - 1) * dh - 1) // sh + 1
    ow = (w + left + right - (kw - 1) * dw - 1) // sw + 1
    corr = np.zeros((oh, ow, o), dtype=np.int64)
    has_pad = np.zeros((oh, ow), dtype=bool)
    for i in range(oh):
        for j in range(ow):
            for a in range(kh):
                for b in range(kw):
                    y, x = i * sh + a * dh - top, j * sw + b * dw - left
                    if not (0 <= y < h and 0 <= x < w):
                        corr[i, j] += ws[a, b].astype(np.int64)
                        has_pad[i, j] = True
    return corr, has_pad


def output_transform_lce_zero_padding(acc, corr, has_pad, k, multiplier, bias):
    """LCE's float output of a zero-padded binary conv, reproduced exactly (``zero_padding_correction``).

    LCE pads with +1 (its bit 0), applies :func:`output_transform_lce` to that one-padded
    accumulator ``acc + corr`` (``k`` counting every tap), then adds to each border pixel
    (``has_pad``) the cached ``float32(float32(-multiplier) * float32(corr))``, rounding once more.
    ``acc`` ``(..., OH, OW, O)`` is the zero-padded accumulator (:func:`bconv2d`, ``pad_value=0``),
    ``corr`` and ``has_pad`` from :func:`padded_tap_sum`. Returns float32. LCE's own kernel derives
    ``corr`` from one side per border (top or bottom, left or right), so its result is wrong when
    the kernel reaches past the whole input; this function is what LCE means, not that defect.
    """
    m = np.asarray(multiplier, dtype=np.float32)
    y = output_transform_lce(np.asarray(acc) + corr, k, m, bias)
    c = ((-m) * np.asarray(corr).astype(np.float32)).astype(np.float32)
    return np.where(has_pad[..., None], (y + c).astype(np.float32), y).astype(np.float32)


def threshold_output(acc, multiplier, bias, sign_at_zero=1):
    """Binary output of a binary layer: ``sign(output_transform(acc, multiplier, bias))``, +-1 float64.

    Defined as the sign of the float32 transform itself, so a ``y`` that rounds to exactly 0 maps
    to ``sign_at_zero``.
    """
    return sign(output_transform(acc, multiplier, bias), sign_at_zero)


def activation(v, spec=None):
    """A float32 non-linearity, elementwise: ``None`` identity; ``"relu"`` ``v if v > 0 else 0``;
    ``("prelu", a)`` ``v if v > 0 else a * v``; ``("fprelu", pos, neg)`` ``pos * v if v >= 0 else
    neg * v`` (slopes float32 scalars or per channel, last axis). One rounding per product; the
    sign of a zero result is not specified (both zeros binarize alike)."""
    v = np.asarray(v, dtype=np.float32)
    if spec is None:
        return v
    if spec == "relu":
        return np.where(v > 0, v, np.float32(0)).astype(np.float32)
    if spec[0] == "prelu":
        a = np.asarray(spec[1], dtype=np.float32)
        return np.where(v > 0, v, (a * v).astype(np.float32)).astype(np.float32)
    if spec[0] == "fprelu":
        pos, neg = np.asarray(spec[1], np.float32), np.asarray(spec[2], np.float32)
        return np.where(v >= 0, (pos * v).astype(np.float32),
                        (neg * v).astype(np.float32)).astype(np.float32)
    raise ValueError(f"unknown non-linearity {spec!r}")


def residual_output(acc, multiplier, bias, residual, pre=None, post=None, sign_at_zero=1):
    """The tail of a residual block on a binary layer's accumulators: ``(z, sign(z))`` with
    ``z = post(pre(output_transform(acc, multiplier, bias)) + residual)``, float32 (each step one
    rounding, :func:`activation`), and its sign as float64 ``+-1`` under ``sign_at_zero``.
    ``residual``: float32 of ``acc``'s shape."""
    y = activation(output_transform(acc, multiplier, bias), pre)
    z = activation((y + np.asarray(residual, np.float32)).astype(np.float32), post)
    return z, sign(z, sign_at_zero)


def maxpool2d(x, pool, stride=None, padding="valid", sign_at_zero=1):
    """Max-pool of binarized values: ``sign(x)`` then the max over each window, +-1 float64.

    ``x`` (N, H, W, C). Padded positions take no part (as if -infinity). Windows are
    ``pool`` (int or pair) with ``stride`` (defaults to ``pool``), padding as in :func:`bconv2d`.
    """
    xs = sign(x, sign_at_zero)
    ph, pw = pair(pool)
    sh, sw = pair(stride if stride is not None else pool)
    n, h, w, c = xs.shape
    top, bottom, left, right = explicit_padding(padding, (h, w), (ph, pw), (sh, sw), (1, 1))
    xp = np.pad(xs, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=-np.inf)
    oh = (h + top + bottom - ph) // sh + 1
    ow = (w + left + right - pw) // sw + 1
    out = np.full((n, oh, ow, c), -np.inf)
    for a in range(ph):
        for b in range(pw):
            out = np.maximum(out, xp[:, a: a + (oh - 1) * sh + 1: sh, b: b + (ow - 1) * sw + 1: sw])
    return out


def bgemm(x, w, sign_at_zero=1):
    """Binary matrix product: ``sign(x) @ sign(w).T`` as int64; ``x`` (M, K), ``w`` (N, K)."""
    return (sign(x, sign_at_zero) @ sign(w, sign_at_zero).T).astype(np.int64)
