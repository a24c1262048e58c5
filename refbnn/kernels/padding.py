"""The padding correction of a binary convolution: its one definition for every path.

``docs/semantics.md`` section 4 states the meaning of a pad value ``p`` (0: padded taps add
nothing; +1/-1: padded taps hold that value); ``refbnn.reference.bconv2d`` pads explicitly. The
kernels do not: each reads the padded taps as some fixed value ``q`` and adds a correction,

    ``acc = (what the kernel summed) + corr[rc[oh], cc[ow], o]``,
    ``corr[r, c, o] = (p - q) * sum of the signs of o's weights over the taps padded at (r, c)``,

* the fast path (:mod:`refbnn.kernels.bconv_fast`) reads a physically padded input whose pad words
  are all zero bits, i.e. ``q = +1`` (no correction for ``p = +1``);
* the portable path (:mod:`refbnn.kernels.bconv_portable`) skips the padded taps, i.e. ``q = 0``
  (no correction for ``p = 0``).

Output rows (columns) whose windows leave the image at the same taps form one class ``rc[oh]``
(``cc[ow]``); class 0 is the interior (no padded tap), so row ``(0, 0)`` of ``corr`` is zero. Only
the few border classes cost memory: ``corr`` is ``(n_row_classes, n_col_classes, O)`` int64.
"""

from __future__ import annotations

import numpy as np
from numba import njit


def border_classes(n_in: int, n_out: int, k: int, s: int, d: int, p0: int):
    """Classes of output rows along one axis: ``(ids, keys)``.

    ``ids[i]`` (int64 ``(n_out,)``) is the class of output row ``i``; ``keys[j]`` (bool
    ``(n_classes, k)``) says which of the ``k`` taps fall outside ``[0, n_in)`` in class ``j``;
    ``keys[0]`` is all False. Tap ``a`` of row ``i`` reads input row ``i*s + a*d - p0``.
    """
    idx = np.arange(n_out)[:, None] * s + np.arange(k)[None, :] * d - p0
    oob = (idx < 0) | (idx >= n_in)
    if k > 62:  # pragma: no cover - kernels this wide: compare the rows themselves
        keys, ids = np.unique(np.concatenate([np.zeros((1, k), bool), oob]), axis=0,
                              return_inverse=True)
        # rows sort lexicographically, False first: the all-False interior key is class 0
        return ids.reshape(-1)[1:].astype(np.int64), keys
    codes = oob.astype(np.int64) @ (np.int64(1) << np.arange(k, dtype=np.int64))
    uniq, ids = np.unique(np.concatenate([[0], codes]), return_inverse=True)  # code 0 first
    keys = (uniq[:, None] >> np.arange(k)) & 1 == 1
    return ids[1:].astype(np.int64), keys


def correction(row_keys, col_keys, tap_sign_sums, pad_value: int, read_as: int) -> np.ndarray:
    """``corr`` ``(n_row_classes, n_col_classes, O)`` int64 (module docstring).

    ``tap_sign_sums``: int64 ``(O, KH, KW)``, the sum of the signs of output channel ``o``'s
    ``Cg`` weights at each tap (``Cg - 2 * popcount`` of its words); ``read_as``: the value ``q``
    the kernel reads padded taps as.
    """
    out = np.empty((len(row_keys), len(col_keys), tap_sign_sums.shape[0]), np.int64)
    _correction(np.ascontiguousarray(row_keys), np.ascontiguousarray(col_keys),
                np.ascontiguousarray(tap_sign_sums, dtype=np.int64), pad_value - read_as, out)
    return out


@njit(cache=True)
def _correction(row_keys, col_keys, sums, factor, out):
    """``out[r, c, o] = factor * sum of sums[o, a, b] over taps (a, b) padded in class (r, c)``."""
    nr, kh = row_keys.shape
    nc, kw = col_keys.shape
    for r in range(nr):
        for c in range(nc):
            for o in range(sums.shape[0]):
                total = 0
                for a in range(kh):
                    for b in range(kw):
                        if row_keys[r, a] or col_keys[c, b]:
                            total += sums[o, a, b]
                out[r, c, o] = factor * total
