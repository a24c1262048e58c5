"""Portable binary 2-D convolution: scalar XOR-popcount loops, exact on any CPU Numba targets.

No vector types, no physical padding: each tap is bounds-checked. Layouts (flat ``uint64``):

* ``x``: packed NHWC ``(N, H, W, G, Wg)``, group ``g``'s ``Cg`` channels from bit 0 of word ``g*Wg``;
* ``wt``: packed weights transposed to ``(KH, KW, Wg, O)`` (output channel innermost, so the
  loop over output channels vectorizes), ``o`` in group ``o // (O / G)``;
* ``wsum``: ``(KH, KW, O)``, the sum of the signs of ``o``'s ``Cg`` weights at that tap.

``acc[p*O + o] = sum over in-bounds taps (Cg - 2*popcount(x XOR w)) + pad_value * sum over padded
taps wsum`` (``pad_value`` 0, +1 or -1), ``p = (n*OH + oh)*OW + ow``; input row of tap ``kh`` is
``oh*sh + kh*dh - pt``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .bconv_fast import float_transform
from .simd import popcount64

# Numba's cache does not notice edits to imported kernels; this digest of simd.py, bconv_tiles.py,
# bconv_fast.py (tests/test_kernels_misc.py recomputes it) forces an edit here, hence a recompile.
DEPS_DIGEST = "ec02d32c925cfeaa"


@njit(cache=True, parallel=True)
def bconv_portable(x, N, H, W, G, Wg, Cg, wt, wsum, O, KH, KW, sh, sw, dh, dw, pt, pl,
                   OH, OW, pad_value, out_i32):
    og = O // G
    for q in prange(N * OH):  # one output row per iteration
        n = q // OH
        oh = q - n * OH
        pc = np.empty(O, np.int64)
        pads = np.empty(O, np.int64)
        for ow in range(OW):
            pc[:] = 0
            pads[:] = 0
            taps_in = 0
            for kh in range(KH):
                ih = oh * sh + kh * dh - pt
                for kw in range(KW):
                    iw = ow * sw + kw * dw - pl
                    if 0 <= ih < H and 0 <= iw < W:
                        taps_in += 1
                        xb = ((n * H + ih) * W + iw) * G * Wg
                        for g in range(G):
                            for c in range(Wg):
                                xv = x[xb + g * Wg + c]
                                wb = ((kh * KW + kw) * Wg + c) * O
                                for o in range(g * og, (g + 1) * og):  # contiguous: vectorizes
                                    pc[o] += popcount64(xv ^ wt[wb + o])
                    elif pad_value != 0:
                        wb = (kh * KW + kw) * O
                        for o in range(O):
                            pads[o] += wsum[wb + o]
            base = ((n * OH + oh) * OW + ow) * O
            for o in range(O):
                out_i32[base + o] = taps_in * Cg - 2 * pc[o] + pad_value * pads[o]


@njit(cache=True, parallel=True)
def epilogue_pass(acc, P, O, K, mode, mul, bias, off, thr, dirn, oword, obit, out_f32,
                  out_bits, OH, OW, OHp, OWp, OWords, opt, opl):
    """Apply output ``mode`` 1, 2 (float) or 3 (bits) of :mod:`bconv_fast` to int32 ``acc``."""
    for p in prange(P):
        if mode == 3:
            n = p // (OH * OW)
            r = p - n * OH * OW
            oh = r // OW
            ow = r - oh * OW
            ob = ((n * OHp + oh + opt) * OWp + ow + opl) * OWords
            for k in range(OWords):
                out_bits[ob + k] = 0
            for o in range(O):
                if acc[p * O + o] * dirn[o] < thr[o]:
                    out_bits[ob + oword[o]] |= np.uint64(1) << np.uint64(obit[o])
        else:
            for o in range(O):
                out_f32[p * O + o] = float_transform(np.int64(acc[p * O + o]), K, mode, mul[o],
                                                     bias[o], off[o])
