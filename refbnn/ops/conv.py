"""Public binary conv ops: validated wrappers around :class:`~refbnn.ops.plan.BConv2DPlan` and the
packed max-pool kernel. Each equals its NumPy oracle in :mod:`refbnn.reference` exactly.
"""

from __future__ import annotations

import numpy as np

from ..kernels.pool import maxpool_packed
from .args import check_groups, check_pair, resolve_padding
from .packing import pack_bits, pack_kernel_taps
from .plan import BConv2DPlan


def bconv2d(x, kernel, stride=1, padding="same", pad_value: int = 0, dilation=1,
            groups: int = 1, sign_at_zero: int = 1, impl: str | None = None) -> np.ndarray:
    """Binary 2-D convolution of real tensors: int32 accumulators, equal to ``reference.bconv2d``.

    ``x``: ``(N, H, W, C)`` real (float16/32/64 or int8..int64, no NaN); ``kernel``: HWIO
    ``(KH, KW, C / groups, O)`` real. Both are binarized with :func:`sign` under ``sign_at_zero``,
    the input padded with ``pad_value`` (0: padded taps add nothing; +1/-1: padded taps are that
    value), and correlated with the kernel (no flip). ``padding``: ``"valid"``, ``"same"``
    (TensorFlow split), ``int``, ``(ph, pw)`` or ``(top, bottom, left, right)``. Returns int32
    ``(N, OH, OW, O)``; each value equals ``K - 2 * popcount(x XOR w)`` over the taps that take part.
    ``impl``: ``"fast"``, ``"portable"`` or ``None`` (``$REFBNN_KERNEL`` / CPU auto-detection).
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC (4-D), got shape {x.shape}")
    plan = _real_plan(x.shape[3], x.shape[1:3], kernel, stride, padding, pad_value, dilation,
                      groups, sign_at_zero, impl)
    return plan(x, sign_at_zero)


def bconv2d_nchw(x, kernel, stride=1, padding="same", pad_value: int = 0, dilation=1,
                 groups: int = 1, sign_at_zero: int = 1, impl: str | None = None,
                 what: str = "x") -> np.ndarray:
    """:func:`bconv2d` of NCHW ``x`` ``(N, C, H, W)``: the same int32 ``(N, OH, OW, O)`` as
    ``bconv2d(x.transpose(0, 2, 3, 1), ...)``, the signs packed straight from the channel planes
    (:meth:`BConv2DPlan.pack_input_nchw`; no transposed copy of ``x``). ``what`` names ``x`` in
    the NaN error."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be NCHW (4-D), got shape {x.shape}")
    plan = _real_plan(x.shape[1], x.shape[2:4], kernel, stride, padding, pad_value, dilation,
                      groups, sign_at_zero, impl)
    return plan.run_padded(plan.pack_input_nchw(x, sign_at_zero, what))


def _real_plan(channels, hw, kernel, stride, padding, pad_value, dilation, groups, sign_at_zero,
               impl) -> BConv2DPlan:
    """The plan of :func:`bconv2d` for an input of ``channels`` channels and size ``hw``."""
    kernel = np.asarray(kernel)
    if kernel.ndim != 4:
        raise ValueError(f"kernel must be HWIO (4-D), got shape {kernel.shape}")
    groups = check_groups(groups, channels, "input channels")
    if kernel.shape[2] * groups != channels:
        raise ValueError(f"kernel has {kernel.shape[2]} input channels per group; x has "
                         f"{channels} channels in {groups} groups")
    return BConv2DPlan.from_tap_words(pack_kernel_taps(kernel, sign_at_zero), kernel.shape[:2],
                                      channels, tuple(hw), stride, padding, pad_value, dilation,
                                      groups, impl=impl)


def bconv2d_packed(x_packed, w_packed, in_channels: int, stride=1, padding="same",
                   pad_value: int = 0, dilation=1, groups: int = 1, *, output: str = "int32",
                   multiplier=None, bias=None, out_groups: int = 1, sign_at_zero: int = 1,
                   impl: str | None = None) -> np.ndarray:
    """Binary 2-D convolution of packed operands (see :class:`BConv2DPlan` for ``output``).

    ``x_packed``: ``uint64`` ``(N, H, W, G, Wg)`` (:func:`pack_groups`) or ``(N, H, W, G*Wg)``
    (:func:`pack_bits` when ``groups=1``), ``Wg = ceil(in_channels / groups / 64)``, group ``g``'s
    channels from bit 0 of its first word, unused high bits 0. ``w_packed``: ``uint64`` OHWI
    ``(O, KH, KW, Wg)`` (:func:`pack_kernel`). ``sign_at_zero`` applies to the ``"bits"`` output.
    Builds a plan per call; hold a :class:`BConv2DPlan` to repeat a layer cheaply.
    """
    x = np.asarray(x_packed)
    if x.ndim not in (4, 5):
        raise ValueError(f"x_packed must be (N, H, W, words) or (N, H, W, G, Wg), got {x.shape}")
    plan = BConv2DPlan(w_packed, in_channels, x.shape[1:3], stride, padding, pad_value, dilation,
                       groups, output=output, multiplier=multiplier, bias=bias,
                       out_groups=out_groups, sign_at_zero=sign_at_zero, impl=impl)
    return plan.run_packed(x)


def bgemm_packed(x_packed, w_packed, k: int, impl: str | None = None) -> np.ndarray:
    """Binary matrix product of packed rows: ``out[i, j] = k - 2 * popcount(x[i] XOR w[j])``.

    ``x_packed`` ``(M, ceil(k/64))`` and ``w_packed`` ``(N, ceil(k/64))`` ``uint64``; int32 ``(M, N)``
    = ``sign(x) @ sign(w).T``. Computed as a 1x1 binary convolution.
    """
    x, w = np.asarray(x_packed), np.asarray(w_packed)
    if x.ndim != 2 or w.ndim != 2 or x.dtype != np.uint64 or w.dtype != np.uint64:
        raise ValueError("bgemm_packed needs 2-D uint64 x_packed (M, words) and w_packed (N, words)")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if w.shape[0] == 0 or x.shape[0] == 0:
        return np.zeros((x.shape[0], w.shape[0]), np.int32)
    plan = BConv2DPlan(w.reshape(w.shape[0], 1, 1, -1), int(k), (1, x.shape[0]), padding="valid",
                       impl=impl)
    return plan.run_packed(x.reshape(1, 1, x.shape[0], -1)).reshape(x.shape[0], w.shape[0])


def bgemm(x, w, sign_at_zero: int = 1, impl: str | None = None) -> np.ndarray:
    """``sign(x) @ sign(w).T`` as int32, ``x`` ``(M, K)`` and ``w`` ``(N, K)`` real (no NaN)."""
    x, w = np.asarray(x), np.asarray(w)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or x.shape[1] == 0:
        raise ValueError(f"bgemm needs x (M, K) and w (N, K) with equal K > 0, got {x.shape}, "
                         f"{w.shape}")
    return bgemm_packed(pack_bits(x, sign_at_zero=sign_at_zero),
                        pack_bits(w, sign_at_zero=sign_at_zero), x.shape[1], impl)


def maxpool2d_packed(x_packed, pool, stride=None, padding="valid") -> np.ndarray:
    """Max-pool of packed ``+-1`` values: the AND of the words over each window (bit 1 = -1).

    ``x_packed``: ``uint64`` ``(N, H, W, words)``; ``pool``, ``stride`` (default ``pool``): int or
    pair; ``padding`` as in :func:`bconv2d`, each side smaller than the pool so every window holds
    an input pixel; padded positions take no part. Returns ``(N, OH, OW, words)``.
    """
    x = np.ascontiguousarray(x_packed)
    if x.ndim != 4 or x.dtype != np.uint64:
        raise ValueError(f"x_packed must be uint64 (N, H, W, words), got {x.dtype} {x.shape}")
    ph, pw = check_pair(pool, "pool")
    sh, sw = check_pair(stride if stride is not None else pool, "stride")
    pt, pb, pl, pr = resolve_padding(padding, x.shape[1:3], (ph, pw), (sh, sw))
    if max(pt, pb) >= ph or max(pl, pr) >= pw:
        raise ValueError(f"padding {(pt, pb, pl, pr)} must be smaller than the pool {(ph, pw)}")
    hp, wp = x.shape[1] + pt + pb, x.shape[2] + pl + pr
    if hp < ph or wp < pw:
        raise ValueError(f"pool {(ph, pw)} is larger than the padded input {(hp, wp)}")
    out = np.empty((x.shape[0], (hp - ph) // sh + 1, (wp - pw) // sw + 1, x.shape[3]), np.uint64)
    if out.size:
        maxpool_packed(x, ph, pw, sh, sw, pt, pl, out)
    return out
