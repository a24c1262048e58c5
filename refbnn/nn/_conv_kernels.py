"""Numba loops behind the conv layers: im2col (optionally binarizing) and its adjoint col2im.

Both are scatter/gather copies whose padding logic needs per-row index arithmetic, so they are
loops; :mod:`refbnn.nn.functional` holds the plain NumPy oracles they are tested against exactly.

Column layout (one GEMM per group over the whole batch):
``cols[(c, a, b), (n, i, j)] = v(x[n, c, i*sh + a*dh - ph, j*sw + b*dw - pw])``, rows C-order over
``(c, a, b)``, columns C-order over ``(n, i, j)``; out-of-range taps hold ``pad_value``. ``v`` is
selected by ``mode``: 0 copy; 1 sign with sign(0) = +1 (``x >= 0 -> +1``); -1 sign with
sign(0) = -1 (``x > 0 -> +1``); 2 ternary ``np.sign`` (0 -> 0). NaN inputs are the caller's job.
"""

from __future__ import annotations

import numba as nb


@nb.njit(cache=True, parallel=True)
def im2col_kernel(x, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, pad_value, mode, out):
    """Fill ``out`` (C*KH*KW, N*OH*OW) from ``x`` (N, C, H, W); see the module docstring."""
    n, c, h, w = x.shape
    o6 = out.reshape(c, kh, kw, n, oh, ow)
    one = x.dtype.type(1.0)
    # Written as multi-dimensional indexing with an in-loop bounds test: measured 3x faster than
    # flat offsets or split ranges (LLVM then vectorizes and drops wraparound checks).
    for r in nb.prange(c * kh * kw):
        ci = r // (kh * kw)
        a = (r // kw) % kh
        b = r % kw
        xoff = b * dw - pw
        for ni in range(n):
            for i in range(oh):
                y = i * sh + a * dh - ph
                if y < 0 or y >= h:
                    for j in range(ow):
                        o6[ci, a, b, ni, i, j] = pad_value
                elif mode == 0:
                    for j in range(ow):
                        xx = j * sw + xoff
                        o6[ci, a, b, ni, i, j] = x[ni, ci, y, xx] if (xx >= 0 and xx < w) \
                            else pad_value
                elif mode == 1:
                    for j in range(ow):
                        xx = j * sw + xoff
                        if xx >= 0 and xx < w:
                            o6[ci, a, b, ni, i, j] = one if x[ni, ci, y, xx] >= 0 else -one
                        else:
                            o6[ci, a, b, ni, i, j] = pad_value
                elif mode == -1:
                    for j in range(ow):
                        xx = j * sw + xoff
                        if xx >= 0 and xx < w:
                            o6[ci, a, b, ni, i, j] = one if x[ni, ci, y, xx] > 0 else -one
                        else:
                            o6[ci, a, b, ni, i, j] = pad_value
                else:
                    for j in range(ow):
                        xx = j * sw + xoff
                        if xx >= 0 and xx < w:
                            v = x[ni, ci, y, xx]
                            o6[ci, a, b, ni, i, j] = one if v > 0 else (-one if v < 0 else v * 0)
                        else:
                            o6[ci, a, b, ni, i, j] = pad_value
    return out


@nb.njit(cache=True, inline="always")
def _gate(v, gate):
    # d sign(v) / dv as the straight-through estimators define it (see refbnn.nn.binary)
    if gate == 1:
        return 1.0 if abs(v) <= 1 else 0.0
    if v < -1 or v >= 1:
        return 0.0
    if v < 0:
        return 2 + 2 * v
    return 2 - 2 * v


@nb.njit(cache=True, parallel=True)
def col2im_kernel(dcols, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, x, gate, dx):
    """Adjoint of :func:`im2col_kernel` (mode 0): ``dx`` (N, C, H, W) is zeroed, then every
    in-range tap of ``dcols`` is added at its source position, taps in (a, b, i, j) order.

    ``gate`` 1 (``"ste"``) or 2 (``"approx_sign"``) then multiplies each element of ``dx`` by the
    estimator's factor at ``x`` (same shape as ``dx``); 0 leaves ``dx`` as is (``x`` unused)."""
    n, c, h, w = dx.shape
    d6 = dcols.reshape(c, kh, kw, n, oh, ow)
    for plane in nb.prange(n * c):
        ni = plane // c
        ci = plane % c
        for y in range(h):
            for xx in range(w):
                dx[ni, ci, y, xx] = 0
        for a in range(kh):
            for b in range(kw):
                xoff = b * dw - pw
                for i in range(oh):
                    y = i * sh + a * dh - ph
                    if y < 0 or y >= h:
                        continue
                    for j in range(ow):
                        xx = j * sw + xoff
                        if xx >= 0 and xx < w:
                            dx[ni, ci, y, xx] += d6[ci, a, b, ni, i, j]
        if gate != 0:
            for y in range(h):
                for xx in range(w):
                    dx[ni, ci, y, xx] *= dx.dtype.type(_gate(x[ni, ci, y, xx], gate))
    return dx


@nb.njit(cache=True, parallel=True)
def col2im_pm_kernel(dcols_pm, groups, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, x, gate, dx):
    """Adjoint of im2col for pixel-major columns ``dcols_pm`` (groups, N*OH*OW, C/g*KH*KW):
    ``dx`` (N, C, H, W) is zeroed, then for each image, output pixel (i, j) in row-major order and
    tap (a, b), the in-range values are added at their source positions. ``gate`` as in
    :func:`col2im_kernel`. One image per task."""
    n, c, h, w = dx.shape
    cg = c // groups
    d5 = dcols_pm.reshape(groups, n, oh, ow, cg * kh * kw)
    for ni in nb.prange(n):
        for ci in range(c):
            for y in range(h):
                for xx in range(w):
                    dx[ni, ci, y, xx] = 0
        for i in range(oh):
            for a in range(kh):
                y = i * sh + a * dh - ph
                if y < 0 or y >= h:
                    continue
                for j in range(ow):
                    for b in range(kw):
                        xx = j * sw + b * dw - pw
                        if xx < 0 or xx >= w:
                            continue
                        for g in range(groups):
                            for cl in range(cg):
                                dx[ni, g * cg + cl, y, xx] += d5[g, ni, i, j, (cl * kh + a) * kw + b]
        if gate != 0:
            for ci in range(c):
                for y in range(h):
                    for xx in range(w):
                        dx[ni, ci, y, xx] *= dx.dtype.type(_gate(x[ni, ci, y, xx], gate))
    return dx
