"""Portable binary 2-D convolution: scalar XOR-popcount loops, exact on any CPU Numba targets.

No vector types, no physical padding: each tap is bounds-checked. Layouts (flat ``uint64``):

* ``x``: packed NHWC ``(N, H, W, G, Wg)``, group ``g``'s ``Cg`` channels from bit 0 of word ``g*Wg``;
* ``w``: packed OHWI ``(O, KH, KW, Wg)``, output channel ``o`` in group ``o // (O / G)``;
* ``wsum[o, kh, kw]``: sum of the signs of ``w``'s ``Cg`` values at that tap (``Cg - 2 * popcount``).

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
DEPS_DIGEST = "4ce45c957e86f158"


@njit(cache=True, parallel=True)
def bconv_portable(x, N, H, W, G, Wg, Cg, w, wsum, O, KH, KW, sh, sw, dh, dw, pt, pl,
                   OH, OW, pad_value, out_i32):
    og = O // G
    for p in prange(N * OH * OW):
        n = p // (OH * OW)
        r = p - n * OH * OW
        oh = r // OW
        ow = r - oh * OW
        for o in range(O):
            g = o // og
            acc = 0
            for kh in range(KH):
                ih = oh * sh + kh * dh - pt
                for kw in range(KW):
                    iw = ow * sw + kw * dw - pl
                    if 0 <= ih < H and 0 <= iw < W:
                        xb = ((n * H + ih) * W + iw) * G * Wg + g * Wg
                        wb = ((o * KH + kh) * KW + kw) * Wg
                        pc = 0
                        for c in range(Wg):
                            pc += popcount64(x[xb + c] ^ w[wb + c])
                        acc += Cg - 2 * pc
                    else:
                        acc += pad_value * wsum[o, kh, kw]
            out_i32[p * O + o] = acc


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
