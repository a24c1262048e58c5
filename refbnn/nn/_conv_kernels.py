"""Numba loops behind the conv layers: im2col (optionally binarizing) in two layouts, its adjoint
col2im, and the layout / element-wise passes around the binary convolutions.

They are scatter/gather copies whose padding logic needs per-row index arithmetic, so they are
loops; :mod:`refbnn.nn.functional` holds the plain NumPy oracles they are tested against
(``tests/test_nn_functional.py``, ``tests/test_nn_fast_paths.py``).

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


# --- serial kernels over an image range, for the conv backward pass ----------------------------
# refbnn.nn.functional.conv2d_backward_fused runs these from its own threads, one image range per
# thread (nogil, no Numba parallel region inside). Indices into the inner loops come from views
# and ``range`` so that LLVM sees them non-negative and vectorizes (no wraparound selects).


@nb.njit(cache=True, inline="always")
def _factor(v, gate, one, two, zero):
    # act_grad_factor(v) in the dtype of v: "ste" (1) or "approx_sign" (2), see refbnn.nn.binary
    if gate == 1:
        return one if abs(v) <= one else zero
    m = two - two * abs(v)
    return m if m > zero else zero


@nb.njit(cache=True, nogil=True)
def im2col_range_kernel(x, n0, n1, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, pad_value, mode,
                        out):
    """:func:`im2col_kernel` for images ``n0 <= n < n1`` only: ``out`` (C*KH*KW, (n1-n0)*OH*OW)
    holds columns ``n0*OH*OW ... n1*OH*OW - 1`` of the full matrix. Serial, releases the GIL."""
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    o6 = out.reshape(c, kh, kw, n1 - n0, oh, ow)
    one = x.dtype.type(1.0)
    for r in range(c * kh * kw):
        ci = r // (kh * kw)
        a = (r // kw) % kh
        b = r % kw
        xoff = b * dw - pw
        for ni in range(n1 - n0):
            xi = x[n0 + ni, ci]
            for i in range(oh):
                y = i * sh + a * dh - ph
                if y < 0 or y >= h:
                    for j in range(ow):
                        o6[ci, a, b, ni, i, j] = pad_value
                elif mode == 0:
                    for j in range(ow):
                        xx = j * sw + xoff
                        o6[ci, a, b, ni, i, j] = xi[y, xx] if (xx >= 0 and xx < w) else pad_value
                elif mode == 1:
                    for j in range(ow):
                        xx = j * sw + xoff
                        if xx >= 0 and xx < w:
                            o6[ci, a, b, ni, i, j] = one if xi[y, xx] >= 0 else -one
                        else:
                            o6[ci, a, b, ni, i, j] = pad_value
                elif mode == -1:
                    for j in range(ow):
                        xx = j * sw + xoff
                        if xx >= 0 and xx < w:
                            o6[ci, a, b, ni, i, j] = one if xi[y, xx] > 0 else -one
                        else:
                            o6[ci, a, b, ni, i, j] = pad_value
                else:
                    for j in range(ow):
                        xx = j * sw + xoff
                        if xx >= 0 and xx < w:
                            v = xi[y, xx]
                            o6[ci, a, b, ni, i, j] = one if v > 0 else (-one if v < 0 else v * 0)
                        else:
                            o6[ci, a, b, ni, i, j] = pad_value
    return out


@nb.njit(cache=True, nogil=True)
def im2col_taps_kernel(x, n0, n1, groups, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, pad_value,
                       mode, xs, out):
    """Tap-major pixel-major columns of images ``n0 <= n < n1``: ``out`` (groups, (n1-n0)*OH*OW,
    KH*KW*Cg) with ``out[g, (n - n0, i, j), (a*KW + b)*Cg + cl] = v(x[n, g*Cg + cl, i*sh + a*dh
    - ph, j*sw + b*dw - pw])`` (``pad_value`` outside; ``v`` by ``mode`` as in
    :func:`im2col_kernel`): the same entries as :func:`im2col_kernel`'s, transposed and with the
    row order (c, a, b) -> (a, b, c) within each group. ``xs`` (ph + H + bottom, pw + W + right,
    C) is scratch (the padded image, binarized, channels last; it must hold every tap the OH x OW
    windows read). Serial, releases the GIL."""
    c, h, w = x.shape[1], x.shape[2], x.shape[3]
    cg = c // groups
    one = x.dtype.type(1.0)
    zero = x.dtype.type(0.0)
    pv = x.dtype.type(pad_value)
    hp, wp = xs.shape[0], xs.shape[1]
    xs2 = xs.reshape(hp * wp, c)
    for q in range(hp * wp):
        r = xs2[q]
        for ci in range(c):
            r[ci] = pv
    for ni in range(n1 - n0):
        xi = x[n0 + ni]
        for ci in range(c):
            for y in range(h):
                xr = xi[ci, y]
                dr = xs[ph + y, pw:pw + w]
                for xx in range(w):
                    v = xr[xx]
                    if mode == 1:
                        v = one if v >= zero else -one
                    elif mode == -1:
                        v = one if v > zero else -one
                    elif mode == 2:
                        v = one if v > zero else (-one if v < zero else v * zero)
                    dr[xx, ci] = v
        for g in range(groups):
            og = out[g]
            for i in range(oh):
                for j in range(ow):
                    row = og[(ni * oh + i) * ow + j]
                    for a in range(kh):
                        for b in range(kw):
                            src = xs[i * sh + a * dh, j * sw + b * dw, g * cg:(g + 1) * cg]
                            dst = row[(a * kw + b) * cg:(a * kw + b + 1) * cg]
                            for cl in range(cg):
                                dst[cl] = src[cl]
    return out


@nb.njit(cache=True, nogil=True)
def col2im_taps_kernel(dpm, n0, n1, groups, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow, x, gate,
                       dx, acc):
    """Adjoint of im2col for tap-major pixel-major columns, images ``n0 <= n < n1``.

    ``dpm`` (groups, (n1-n0)*OH*OW, KH*KW*Cg): row ``(n - n0, i, j)``, column ``(a*KW + b)*Cg +
    cl`` is the gradient of tap (a, b) of channel ``g*Cg + cl`` of output pixel (i, j). For each
    image, output pixels are visited in row-major (i, j) order and each in-range tap's channel
    run is added into ``acc`` (H, W, C) scratch at its source pixel; then ``dx[n, c, y, x] =
    acc[y, x, c]``, times ``act_grad_factor(x[n, c, y, x])`` in the dtype of ``dx`` when ``gate``
    is 1 (``"ste"``) or 2 (``"approx_sign"``). Serial, releases the GIL."""
    c, h, w = dx.shape[1], dx.shape[2], dx.shape[3]
    cg = c // groups
    hw = h * w
    one = dx.dtype.type(1.0)
    two = dx.dtype.type(2.0)
    zero = dx.dtype.type(0.0)
    a2 = acc.reshape(hw, c)
    # flat offsets as uint64: non-negative to LLVM, so the channel runs vectorize
    d1 = dpm.reshape(-1)
    a1 = acc.reshape(-1)
    row_len = nb.uint64(kh * kw * cg)
    ucg = nb.uint64(cg)
    for ni in range(n0, n1):
        acc[:] = zero
        for g in range(groups):
            for i in range(oh):
                for j in range(ow):
                    row = nb.uint64((g * (n1 - n0) + ni - n0) * oh * ow + i * ow + j) * row_len
                    for a in range(kh):
                        y = i * sh + a * dh - ph
                        if y < 0 or y >= h:
                            continue
                        for b in range(kw):
                            xx = j * sw + b * dw - pw
                            if xx < 0 or xx >= w:
                                continue
                            src = row + nb.uint64(a * kw + b) * ucg
                            dst = nb.uint64((y * w + xx) * c + g * cg)
                            for cl in range(ucg):
                                a1[dst + cl] += d1[src + cl]
        for ci in range(c):
            dr = dx[ni, ci].reshape(hw)
            if gate == 0:
                for q in range(hw):
                    dr[q] = a2[q, ci]
            else:
                xr = x[ni, ci].reshape(hw)
                for q in range(hw):
                    dr[q] = a2[q, ci] * _factor(xr[q], gate, one, two, zero)
    return dx


@nb.njit(cache=True, parallel=True)
def nhwc_to_nchw_kernel(src, out):
    """``out[n, c, y, x] = src[n, y, x, c]`` converted to the dtype of ``out`` (exact for the
    integer accumulators of the packed forward pass: ``|acc| <= K < 2**24``). One image row per
    task, read pixel by pixel in memory order (measured 1.8x faster than reading channel by
    channel at 64 x 28 x 28)."""
    n, h, w, c = src.shape
    for r in nb.prange(n * h):
        ni = r // h
        y = r % h
        s = src[ni, y]
        o = out[ni, :, y, :]
        for xx in range(w):
            sr = s[xx]
            for ci in range(c):
                o[ci, xx] = sr[ci]
    return out


@nb.njit(cache=True, parallel=True)
def oihw_to_hwio_kernel(w, out):
    """``out[a, b, c, o] = w[o, c, a, b]``: a conv kernel (O, C, KH, KW) as HWIO (KH, KW, C, O),
    an exact copy (what the packed kernels read). One (a, b, c) row of ``out`` per task."""
    o, c, kh, kw = w.shape
    for r in nb.prange(kh * kw * c):
        a = r // (kw * c)
        b = (r // c) % kw
        ci = r % c
        row = out[a, b, ci]
        for q in range(o):
            row[q] = w[q, ci, a, b]
    return out


@nb.njit(cache=True, parallel=True)
def oihw_to_ohwi_kernel(w, out):
    """``out[o, a, b, c] = w[o, c, a, b]`` converted to the dtype of ``out``: a conv kernel (O,
    C, KH, KW) tap-major per output channel (the dX GEMM's operand), an exact copy for float32
    to float32/float64. One output channel per task."""
    o, c, kh, kw = w.shape
    for q in nb.prange(o):
        wq = w[q]
        oq = out[q]
        for a in range(kh):
            for b in range(kw):
                row = oq[a, b]
                for ci in range(c):
                    row[ci] = wq[ci, a, b]
    return out


@nb.njit(cache=True, parallel=True)
def sign_kernel(x, mode, out):
    """``out = +-1`` in the dtype of ``x`` (flat arrays): ``mode`` 1: ``x >= 0 -> +1`` (also -0.0);
    -1: ``x > 0 -> +1``; 2: ternary, 0 -> 0 (``np.sign``). As :func:`refbnn.nn.functional.binarize`,
    exactly."""
    one = x.dtype.type(1.0)
    zero = x.dtype.type(0.0)
    size = x.size
    step = 1 << 14
    for blk in nb.prange((size + step - 1) // step):
        lo, hi = blk * step, min(size, (blk + 1) * step)
        xb, ob = x[lo:hi], out[lo:hi]
        for i in range(hi - lo):
            v = xb[i]
            if mode == 1:
                ob[i] = one if v >= zero else -one
            elif mode == -1:
                ob[i] = one if v > zero else -one
            else:
                ob[i] = one if v > zero else (-one if v < zero else (zero if v == zero else v))
    return out


@nb.njit(cache=True, parallel=True)
def clipped_ste_kernel(w, g, out):
    """``out = g`` where ``|w| <= 1``, else ``0`` (flat arrays, as ``np.where(np.abs(w) <= 1, g,
    0)``): the clipped straight-through gradient of the latent binary weights."""
    zero = out.dtype.type(0)
    size = w.size
    step = 1 << 14
    for blk in nb.prange((size + step - 1) // step):
        lo, hi = blk * step, min(size, (blk + 1) * step)
        wb, gb, ob = w[lo:hi], g[lo:hi], out[lo:hi]
        for i in range(hi - lo):
            ob[i] = gb[i] if abs(wb[i]) <= 1 else zero
    return out


@nb.njit(cache=True, parallel=True)
def swap01_kernel(src, out):
    """``out[b, a, :] = src[a, b, :]`` for ``src`` (A, B, L): the GEMM's (O, N, P) result as NCHW
    (N, O, P). One ``b`` per task."""
    na, nb_, length = src.shape
    for b in nb.prange(nb_):
        for a in range(na):
            s = src[a, b]
            o = out[b, a]
            for i in range(length):
                o[i] = s[i]
    return out


@nb.njit(cache=True, parallel=True)
def sum_dw_partials_kernel(parts, tap_major, kh, kw, out):
    """``out`` (O, C/g, KH, KW) = ``parts[0] + parts[1] + ...``, added one part after another in
    index order (as ``total = parts[0]; total += parts[1]; ...``: the same float additions, so
    bit-identical), each element written straight to its OIHW place. ``parts`` (count, g, A, B):
    :func:`refbnn.nn.functional.conv2d_backward_fused`'s per-chunk ``dw`` in tap-major (O/g,
    (a, b, c)) or channel-major ((c, a, b), O/g) order. Parallel over blocks of output channels;
    the parts are read in memory order (tap-major) or 16 channels at a time (channel-major)."""
    count, g = parts.shape[0], parts.shape[1]
    o_all, cg = out.shape[0], out.shape[1]
    og = o_all // g
    taps = kh * kw
    flat = out.reshape(o_all, cg * taps)
    if tap_major:  # parts (count, g, O/g, (a, b, c)): rows in memory order
        for o in nb.prange(o_all):
            gi = o // og
            oi = o - gi * og
            row = flat[o]
            for t in range(taps):
                for c in range(cg):
                    j = t * cg + c
                    s = parts[0, gi, oi, j]
                    for q in range(1, count):
                        s += parts[q, gi, oi, j]
                    row[c * taps + t] = s
        return out
    block = 16  # channel-major parts (count, g, (c, a, b), O/g): a blocked transpose
    nblk = (og + block - 1) // block
    for task in nb.prange(g * nblk):
        gi = task // nblk
        o0 = (task - gi * nblk) * block
        o1 = min(og, o0 + block)
        for j in range(cg * taps):
            for oi in range(o0, o1):
                s = parts[0, gi, j, oi]
                for q in range(1, count):
                    s += parts[q, gi, j, oi]
                flat[gi * og + oi, j] = s
    return out
